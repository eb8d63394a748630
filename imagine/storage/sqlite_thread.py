"""One SQLite file served by one thread: the small embedded stores (quota counters, pending webhooks) share this.

The connection is opened on first use, in WAL mode, with the store's schema,
and used only by its own thread, so the event loop never waits on SQLite and
writes never wait on each other's locks. Each call runs a function of the
connection there and hands its result back.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteThread:
    def __init__(self, path: Path, schema: Sequence[str], name: str) -> None:
        self._path = path
        self._schema = tuple(schema)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connection: sqlite3.Connection | None = None

    async def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)` on the store's thread; its result."""

        def run() -> T:
            if self._connection is None:
                # Owner-only: the files hold who generated what.
                self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                connection = sqlite3.connect(self._path, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                # In WAL mode, NORMAL syncs at checkpoints, not at every commit: a crash of the process loses
                # nothing, a power cut at most the last moments; these rows are on every request's path.
                connection.execute("PRAGMA synchronous=NORMAL")
                for statement in self._schema:
                    connection.execute(statement)
                self._connection = connection
            return work(self._connection)

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def close(self) -> None:
        def shut(connection: sqlite3.Connection) -> None:
            connection.close()
            self._connection = None

        if self._connection is not None:
            await self.call(shut)
        self._thread.shutdown(wait=True)
