"""Quota counters in the embedded database (`quotas.sqlite3` in the state folder), so a restart keeps them.

One row per subject, window and model (`*` for all models). A charge is one
IMMEDIATE transaction on the store's own thread: it reads the counters its
limits apply to and adds the images only if all have room, so concurrent
requests of this process never admit more than a quota. Windows are deleted
a little after they end.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from imagine.security.quotas import TOTAL, WINDOW_GRACE_S, Applied, Charge, Counts, Windows
from imagine.storage.sqlite_thread import SqliteThread

DATABASE_FILE = "quotas.sqlite3"
# Ended windows are looked for at most this often.
PRUNE_EVERY_S = 3600.0

_SCHEMA = """CREATE TABLE IF NOT EXISTS quota_usage (
    sub TEXT NOT NULL,
    window TEXT NOT NULL,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (sub, window, model)
)"""
_ADD = """INSERT INTO quota_usage (sub, window, model, images, expires_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (sub, window, model) DO UPDATE SET images = images + excluded.images"""

T = TypeVar("T")


class SqliteQuotaStore:
    def __init__(self, folder: Path) -> None:
        self._database = SqliteThread(folder / DATABASE_FILE, [_SCHEMA], "imagine-quotas")
        self._pruned_at = 0.0

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._database.call(work)

    async def close(self) -> None:
        await self._database.close()

    async def charge(self, sub: str, model: str, images: int, at: Windows, applied: Applied) -> tuple[bool, Counts]:
        def charge(connection: sqlite3.Connection) -> tuple[bool, Counts]:
            connection.execute("BEGIN IMMEDIATE")
            try:
                self._prune(connection)
                used = [
                    _read(connection, sub, window, name)
                    for window, name in ((at.day, TOTAL), (at.month, TOTAL), (at.day, model), (at.month, model))
                ]
                limits = (applied.total.day, applied.total.month, applied.model.day, applied.model.month)
                counted = all(limit <= 0 or count + images <= limit for count, limit in zip(used, limits, strict=True))
                if counted:
                    for window, ends_at in ((at.day, at.day_ends_at), (at.month, at.month_ends_at)):
                        for name in (TOTAL, model):
                            connection.execute(_ADD, (sub, window, name, images, ends_at + WINDOW_GRACE_S))
                    used = [count + images for count in used]
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            return counted, Counts(*used)

        return await self._call(charge)

    async def refund(self, charge: Charge) -> None:
        def refund(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE quota_usage SET images = MAX(0, images - ?) WHERE sub = ? AND window IN (?, ?) AND model IN (?, ?)",
                (charge.images, charge.sub, charge.day, charge.month, TOTAL, charge.model),
            )

        await self._call(refund)

    async def usage(self, sub: str, at: Windows) -> tuple[dict[str, int], dict[str, int]]:
        def usage(connection: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
            found: dict[str, dict[str, int]] = {at.day: {TOTAL: 0}, at.month: {TOTAL: 0}}
            rows = connection.execute(
                "SELECT window, model, images FROM quota_usage WHERE sub = ? AND window IN (?, ?)", (sub, at.day, at.month)
            )
            for window, model, images in rows:
                found[window][model] = images
            return found[at.day], found[at.month]

        return await self._call(usage)

    def _prune(self, connection: sqlite3.Connection) -> None:
        now = time.time()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            connection.execute("DELETE FROM quota_usage WHERE expires_at < ?", (now,))
            self._pruned_at = now


def _read(connection: sqlite3.Connection, sub: str, window: str, model: str) -> int:
    row = connection.execute(
        "SELECT images FROM quota_usage WHERE sub = ? AND window = ? AND model = ?", (sub, window, model)
    ).fetchone()
    return 0 if row is None else int(row[0])
