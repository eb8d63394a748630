"""One SQLite connection served by one thread: the small embedded stores (quota counters, pending webhooks,
chat sessions) share this.

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
    def __init__(
        self,
        path: Path,
        schema: Sequence[str],
        name: str,
        *,
        durable: bool = False,
        prepare: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """`durable`: every commit synced (synchronous=FULL), and a wait for the write lock of another
        connection to the same file. `prepare` runs after the schema, before the first call's work
        (a store's version check, say); what it raises, that call raises."""
        self._path = path
        self._schema = tuple(schema)
        self._durable = durable
        self._prepare = prepare
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connection: sqlite3.Connection | None = None

    async def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(connection)` on the store's thread; its result."""

        def run() -> T:
            if self._connection is None:
                # Owner-only: the files hold who generated what.
                self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                connection = sqlite3.connect(self._path, isolation_level=None)
                try:
                    connection.execute("PRAGMA journal_mode=WAL")
                    if self._durable:
                        connection.execute("PRAGMA synchronous=FULL")
                        connection.execute("PRAGMA busy_timeout=5000")
                    else:
                        # In WAL mode, NORMAL syncs at checkpoints, not at every commit: a crash of the process
                        # loses nothing, a power cut at most the last moments; counters and outboxes are on
                        # every request's path.
                        connection.execute("PRAGMA synchronous=NORMAL")
                    for statement in self._schema:
                        connection.execute(statement)
                    if self._prepare is not None:
                        self._prepare(connection)
                except BaseException:
                    connection.close()
                    raise
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
