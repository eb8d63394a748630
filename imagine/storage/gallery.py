"""The embedded gallery store (the default): one PNG file per image plus one row in an SQLite index.

One host only: SQLite needs a local disk. Several replicas share one gallery
through `imagine.storage.shared_gallery` instead.

Consistency: a PNG is written under a temporary name, fsynced and renamed into
place before its row is committed, and a row is deleted (committed) before its
file is unlinked. So a row never points at a missing or partial file, and a
crash can leave behind only files without rows (orphans) and temporary files.
`open` removes both. Orphans are removed rather than re-indexed: their owner
exists only in the row, and no client ever saw their id (an id is returned
only once its row is committed). Rows whose file has gone anyway (a disk
restored from backup, a hand-deleted file) are removed at the same time.

Files are named only by ids that passed `is_valid_id`, so nothing a client
sends ever becomes part of a path.

Threads: every SQLite call runs on one dedicated thread that owns the
connection. An sqlite3 connection belongs to the thread that opened it, and
with a single writer the service's own transactions never wait on each
other's locks. PNG reads and writes go through asyncio.to_thread instead, so a
slow fsync never holds up a listing, and downloads are read in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imagine.security.private_files import TEMP_SUFFIX, write_private
from imagine.settings import Settings
from imagine.storage.interface import Gallery, GalleryState
from imagine.storage.records import (
    COLUMNS,
    ImageMetadata,
    ImageRecord,
    ListQuery,
    RecoveryReport,
    is_valid_id,
    new_id,
    record_from_values,
    record_values,
)

log = logging.getLogger(__name__)

INDEX_FILE = "gallery.sqlite3"
IMAGES_FOLDER = "images"
SCHEMA_VERSION = 2
# An orphan younger than this may be another process's image between its
# rename and its commit (several replicas on one host can share a folder).
ORPHAN_GRACE_S = 300.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    prompt TEXT NOT NULL,
    prompt_folded TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    model TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    guidance REAL NOT NULL,
    scheduler TEXT NOT NULL,
    loras TEXT NOT NULL,
    generation_time REAL NOT NULL,
    vram_used REAL NOT NULL,
    strength REAL,
    image_hash TEXT,
    mask_hash TEXT
)""",
    # Newest first per caller, per caller and model, for admins, and for age retention.
    # Each index ends in the implicit rowid, the tie-break of the listing order.
    "CREATE INDEX IF NOT EXISTS images_by_owner ON images (owner, created_at)",
    "CREATE INDEX IF NOT EXISTS images_by_owner_model ON images (owner, model, created_at)",
    "CREATE INDEX IF NOT EXISTS images_by_model ON images (model, created_at)",
    "CREATE INDEX IF NOT EXISTS images_by_age ON images (created_at)",
)
# What each schema version added to the one before (version 2: an input image's provenance; NULL for text).
_MIGRATIONS = {
    2: (
        "ALTER TABLE images ADD COLUMN strength REAL",
        "ALTER TABLE images ADD COLUMN image_hash TEXT",
        "ALTER TABLE images ADD COLUMN mask_hash TEXT",
    ),
}


def storage_folder(settings: Settings) -> Path:
    return Path(settings.storage.dir or Path(settings.server.state_dir) / "gallery")


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM images"
_INSERT = f"INSERT INTO images ({', '.join((*COLUMNS, 'prompt_folded'))}) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
_NEWEST_FIRST = "ORDER BY created_at DESC, rowid DESC"


def _row(record: ImageRecord) -> tuple[Any, ...]:
    return (*record_values(record), record.metadata.prompt.casefold())


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a write never fails half-way
    # on a lock; DEFERRED (for reads) gives two queries one consistent snapshot.
    connection.execute(f"BEGIN {mode}")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _fsync_folder(folder: Path) -> None:
    """Make renames and unlinks in `folder` survive a power cut."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


T = TypeVar("T")


class GalleryStore(Gallery):
    backend = "embedded"

    def __init__(
        self,
        folder: Path,
        *,
        max_images: int = 0,
        max_per_subject: int = 0,
        max_age_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._folder = folder
        self._images = folder / IMAGES_FOLDER
        self._max_images = max_images
        self._max_per_subject = max_per_subject
        self._max_age_s = max_age_s
        self._clock = clock
        self._db_thread: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    # ---- life cycle ---------------------------------------------------------

    async def open(self) -> RecoveryReport:
        """Create or open the store, repair what a crash left, apply retention."""
        await asyncio.to_thread(self._make_folders)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagine-gallery-db")
        await self._db(self._connect)
        report = await self._recover()
        if any(dataclasses.astuple(report)):
            log.warning("gallery recovery: %s", report)
        await self.apply_retention()
        return report

    async def close(self) -> None:
        if self._db_thread is None:
            return
        await self._db(self._disconnect)
        self._db_thread.shutdown(wait=True)
        self._db_thread = None

    def _make_folders(self) -> None:
        # Owner-only when we create them: the images and prompts are other people's work.
        self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._images.mkdir(mode=0o700, exist_ok=True)

    def _connect(self) -> None:
        connection = sqlite3.connect(self._folder / INDEX_FILE, isolation_level=None)
        connection.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed row (an id already returned to a client) survives a power cut.
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA busy_timeout = 5000")
        try:
            # The version is read under the write lock: replicas sharing the folder migrate it once.
            with _transaction(connection):
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"the gallery index was written by a newer version (schema {version})")
                # Version 0 is a new file: the CREATE statements make the whole table.
                for added in range(version + 1, SCHEMA_VERSION + 1) if version else ():
                    for statement in _MIGRATIONS[added]:
                        connection.execute(statement)
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _db(self, function: Callable[..., T], *args: Any) -> T:
        assert self._db_thread is not None, "gallery store not open"
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, function, *args)

    @property
    def _sql(self) -> sqlite3.Connection:
        assert self._connection is not None
        return self._connection

    # ---- paths --------------------------------------------------------------

    def _file_path(self, image_id: str) -> Path:
        """The PNG of an image; only ever built from a validated id."""
        if not is_valid_id(image_id):
            raise ValueError("not a gallery id")
        return self._images / f"{image_id}.png"

    # ---- writing ------------------------------------------------------------

    async def add(self, owner: str, images: Sequence[tuple[bytes, ImageMetadata]]) -> list[str]:
        """Store images for `owner`; their ids, in order.

        Shielded: once started, an add finishes even if the client goes away,
        so a cancelled request cannot stop between a file and its row.
        """
        return await asyncio.shield(self._add(owner, images))

    async def _add(self, owner: str, images: Sequence[tuple[bytes, ImageMetadata]]) -> list[str]:
        ids = [new_id() for _ in images]
        now = self._clock()
        records = [ImageRecord(image_id, owner, now, metadata) for image_id, (_, metadata) in zip(ids, images, strict=True)]
        try:
            await asyncio.to_thread(self._write_files, ids, [png for png, _ in images])
            await self._db(self._insert, records)
        except BaseException:
            # Nothing was committed: the files must not linger as orphans.
            await asyncio.to_thread(self._unlink, ids)
            raise
        # The images are stored by now: retention failing (logged) must not fail the add.
        await self._retain_quietly(owner, len(ids))
        return ids

    def _write_files(self, ids: Sequence[str], pngs: Sequence[bytes]) -> None:
        for image_id, png in zip(ids, pngs, strict=True):
            write_private(self._file_path(image_id), png)
        _fsync_folder(self._images)

    def _insert(self, records: Sequence[ImageRecord]) -> None:
        with _transaction(self._sql):
            self._sql.executemany(_INSERT, [_row(record) for record in records])

    async def delete(self, image_id: str, owner: str | None) -> bool:
        """Delete one image of `owner` (None: of anyone); False if there is none."""
        if not is_valid_id(image_id):
            return False
        return await asyncio.shield(self._delete(image_id, owner))

    async def _delete(self, image_id: str, owner: str | None) -> bool:
        deleted = await self._db(self._delete_row, image_id, owner)
        if deleted:
            await asyncio.to_thread(self._unlink, [image_id])
        return deleted

    def _delete_row(self, image_id: str, owner: str | None) -> bool:
        with _transaction(self._sql):
            if owner is None:
                cursor = self._sql.execute("DELETE FROM images WHERE id = ?", (image_id,))
            else:
                cursor = self._sql.execute("DELETE FROM images WHERE id = ? AND owner = ?", (image_id, owner))
        return cursor.rowcount > 0

    def _unlink(self, ids: Sequence[str]) -> None:
        for image_id in ids:
            self._file_path(image_id).unlink(missing_ok=True)
        if ids:
            _fsync_folder(self._images)

    async def apply_retention(self, owner: str | None = None, added: int = 0) -> int:
        return await self._retain(owner, added, every_subject=True)

    async def _retain(self, owner: str | None, added: int, *, every_subject: bool) -> int:
        if not (self._max_images or self._max_per_subject or self._max_age_s):
            return 0
        expired = await self._db(self._delete_expired_rows, self._clock(), owner, added, every_subject)
        await asyncio.to_thread(self._unlink, expired)
        return len(expired)

    def _delete_expired_rows(self, now: float, owner: str | None, added: int, every_subject: bool) -> list[str]:
        with _transaction(self._sql):
            expired: list[str] = []
            if self._max_age_s:
                cutoff = now - self._max_age_s
                expired += [row[0] for row in self._sql.execute("SELECT id FROM images WHERE created_at < ?", (cutoff,))]
                self._sql.execute("DELETE FROM images WHERE created_at < ?", (cutoff,))
            if self._max_per_subject and (owner is not None or every_subject):
                # Each subject's newest first; those past its limit go (off the owner index).
                if owner is not None:
                    beyond = self._sql.execute(
                        "SELECT id FROM images WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?",
                        (owner, max(self._max_per_subject, added)),
                    ).fetchall()
                else:
                    beyond = self._sql.execute(
                        "SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
                        "(PARTITION BY owner ORDER BY created_at DESC, rowid DESC) AS newer FROM images) WHERE newer > ?",
                        (self._max_per_subject,),
                    ).fetchall()
                self._sql.executemany("DELETE FROM images WHERE id = ?", beyond)
                expired += [row[0] for row in beyond]
            if self._max_images:
                # COUNT(*) over the whole table is a b-tree count; the oldest come off the age index.
                excess = self._sql.execute("SELECT COUNT(*) FROM images").fetchone()[0] - max(self._max_images, added)
                if excess > 0:
                    oldest = self._sql.execute(
                        "SELECT id FROM images ORDER BY created_at ASC, rowid ASC LIMIT ?", (excess,)
                    ).fetchall()
                    self._sql.executemany("DELETE FROM images WHERE id = ?", oldest)
                    expired += [row[0] for row in oldest]
        return expired

    @property
    def periodic_upkeep(self) -> bool:
        return bool(self._max_age_s)

    async def maintain(self) -> None:
        # Adds keep each subject within its limit: the every-subject pass (a table scan) is for the start only.
        await self._retain_quietly(None, 0, every_subject=False)

    async def _retain_quietly(self, owner: str | None, added: int, *, every_subject: bool = True) -> None:
        try:
            await self._retain(owner, added, every_subject=every_subject)
        except Exception:
            log.exception("gallery retention failed")

    async def state(self) -> GalleryState:
        return GalleryState(self.backend, self._connection is not None)

    # ---- reading ------------------------------------------------------------

    async def get(self, image_id: str, owner: str | None) -> ImageRecord | None:
        """One image of `owner` (None: of anyone); None for another caller's, a missing or a malformed id."""
        if not is_valid_id(image_id):
            return None
        return await self._db(self._get, image_id, owner)

    def _get(self, image_id: str, owner: str | None) -> ImageRecord | None:
        if owner is None:
            row = self._sql.execute(f"{_SELECT} WHERE id = ?", (image_id,)).fetchone()
        else:
            row = self._sql.execute(f"{_SELECT} WHERE id = ? AND owner = ?", (image_id, owner)).fetchone()
        return record_from_values(row) if row else None

    async def list(self, query: ListQuery) -> tuple[list[ImageRecord], int]:
        """One page, newest first, and how many images match in all."""
        return await self._db(self._list, query)

    def _list(self, query: ListQuery) -> tuple[list[ImageRecord], int]:
        conditions, parameters = [], []
        if query.owner is not None:
            conditions.append("owner = ?")
            parameters.append(query.owner)
        if query.model is not None:
            conditions.append("model = ?")
            parameters.append(query.model)
        if query.text:
            # A substring cannot use a b-tree index: this filter scans the rows the
            # other conditions (the caller's own images) leave, and no more.
            conditions.append("instr(prompt_folded, ?) > 0")
            parameters.append(query.text.casefold())
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with _transaction(self._sql, "DEFERRED"):
            rows = self._sql.execute(
                f"{_SELECT} {where} {_NEWEST_FIRST} LIMIT ? OFFSET ?", (*parameters, query.limit, query.offset)
            ).fetchall()
            total = self._sql.execute(f"SELECT COUNT(*) FROM images {where}", parameters).fetchone()[0]
        return [record_from_values(row) for row in rows], total

    async def read_png(self, image_id: str) -> bytes | None:
        """The PNG bytes, or None for a malformed id or an image deleted meanwhile."""
        if not is_valid_id(image_id):
            return None
        try:
            return await asyncio.to_thread(self._file_path(image_id).read_bytes)
        except FileNotFoundError:
            return None

    async def all_records(self, batch: int = 500) -> AsyncIterator[list[ImageRecord]]:
        """Every image, oldest first, `batch` at a time: what a migration copies."""
        after = 0
        while True:
            rows = await self._db(self._records_after, after, batch)
            if not rows:
                return
            after = rows[-1][0]
            yield [record_from_values(row[1:]) for row in rows]

    def _records_after(self, rowid: int, batch: int) -> list[tuple[Any, ...]]:
        select = _SELECT.replace("SELECT ", "SELECT rowid, ", 1)
        return self._sql.execute(f"{select} WHERE rowid > ? ORDER BY rowid LIMIT ?", (rowid, batch)).fetchall()

    # ---- recovery -----------------------------------------------------------

    async def _recover(self) -> RecoveryReport:
        # Rows first, then files: a file is renamed into place before its row is
        # committed, so an image another process stores meanwhile shows up as a
        # young orphan, which the grace period keeps, never as a row without a file.
        row_ids = await self._db(self._all_ids)
        temporary, files = await asyncio.to_thread(self._scan_files)
        dangling = list(row_ids - files.keys())
        if dangling:
            await self._db(self._delete_rows, dangling)
        now = self._clock()
        orphans = [image_id for image_id, mtime in files.items() if image_id not in row_ids and now - mtime > ORPHAN_GRACE_S]
        await asyncio.to_thread(self._unlink, orphans)
        await asyncio.to_thread(self._remove_temporary, temporary)
        return RecoveryReport(len(temporary), len(orphans), len(dangling))

    def _all_ids(self) -> set[str]:
        return {row[0] for row in self._sql.execute("SELECT id FROM images")}

    def _delete_rows(self, ids: Sequence[str]) -> None:
        with _transaction(self._sql):
            self._sql.executemany("DELETE FROM images WHERE id = ?", [(image_id,) for image_id in ids])

    def _scan_files(self) -> tuple[list[Path], dict[str, float]]:
        """Temporary files old enough to be abandoned, and every image file with its mtime."""
        now = self._clock()
        temporary: list[Path] = []
        files: dict[str, float] = {}
        with os.scandir(self._images) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if entry.name.endswith(TEMP_SUFFIX):
                    if now - mtime > ORPHAN_GRACE_S:
                        temporary.append(Path(entry.path))
                elif entry.name.endswith(".png") and is_valid_id(entry.name[: -len(".png")]):
                    files[entry.name[: -len(".png")]] = mtime
        return temporary, files

    def _remove_temporary(self, paths: Sequence[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
