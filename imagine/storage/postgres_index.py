"""The shared gallery's index: one PostgreSQL table every replica reads and writes, through an asyncpg pool.

Schema: created and migrated at start-up (`imagine.storage.postgres_database`),
its version recorded in `gallery_schema`; a replica that finds a newer version
than it knows refuses to start rather than write rows it does not understand.

Listing stays on indexes: each filter combination has a b-tree that ends in
the listing order (newest first, `seq` the tie-break, as SQLite's rowid), and
`q` is `LIKE '%...%'` on the prompt casefolded by Python (`prompt_folded`),
served by a trigram index (pg_trgm), as the embedded gallery compares: ILIKE
folds by the database's locale, ASCII alone under "C", so `été` missed
"Café ÉTÉ". A trigram index answers exactly the contract's case-insensitive
substring; full-text search would match words and stems instead, and a
b-tree cannot serve a substring at all.

Connection failures become `gallery_unavailable` (503). An insert whose COMMIT
was sent but not answered is reported as `CommitUnknown`: its rows may exist,
so the caller must not remove their objects (the sweep decides later).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from imagine.errors import ApiError
from imagine.storage.interface import gallery_unavailable
from imagine.storage.postgres_database import UNREACHABLE, VersionedDatabase
from imagine.storage.records import COLUMNS, ImageRecord, ListQuery, record_from_values, record_values

SCHEMA_VERSION = 2
TABLE = "gallery_images"
# Advisory lock keys (any 64-bit numbers of our own): schema changes, retention, the orphan sweep.
SCHEMA_LOCK = 0x1A6A_11E1
RETENTION_LOCK = 0x1A6A_11E2
SWEEP_LOCK = 0x1A6A_11E3
POOL_SIZE = 10

# What each schema version adds to the one before.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        f"""CREATE TABLE {TABLE} (
            seq bigserial PRIMARY KEY,
            -- Byte order ("C"), as S3 lists keys: the sweep walks rows and objects side by side.
            id text COLLATE "C" NOT NULL UNIQUE,
            owner text NOT NULL,
            created_at double precision NOT NULL,
            prompt text NOT NULL,
            negative_prompt text NOT NULL,
            model text NOT NULL,
            seed bigint NOT NULL,
            width integer NOT NULL,
            height integer NOT NULL,
            steps integer NOT NULL,
            guidance double precision NOT NULL,
            scheduler text NOT NULL,
            loras text NOT NULL,
            generation_time double precision NOT NULL,
            vram_used double precision NOT NULL,
            strength double precision,
            image_hash text,
            mask_hash text
        )""",
        # Newest first per caller, per caller and model, per model (admins), and by age (retention, admins).
        f"CREATE INDEX {TABLE}_by_owner ON {TABLE} (owner, created_at, seq)",
        f"CREATE INDEX {TABLE}_by_owner_model ON {TABLE} (owner, model, created_at, seq)",
        f"CREATE INDEX {TABLE}_by_model ON {TABLE} (model, created_at, seq)",
        f"CREATE INDEX {TABLE}_by_age ON {TABLE} (created_at, seq)",
        f"CREATE INDEX {TABLE}_prompt_trigrams ON {TABLE} USING gin (prompt gin_trgm_ops)",
    ),
    # The prompt casefolded for `q`. Rows written before it are folded by lower(), the nearest SQL has:
    # the same for ASCII, and for the rest as the database's locale folds.
    2: (
        f"ALTER TABLE {TABLE} ADD COLUMN prompt_folded text",
        f"UPDATE {TABLE} SET prompt_folded = lower(prompt)",
        f"ALTER TABLE {TABLE} ALTER COLUMN prompt_folded SET NOT NULL",
        f"DROP INDEX {TABLE}_prompt_trigrams",
        f"CREATE INDEX {TABLE}_folded_prompt_trigrams ON {TABLE} USING gin (prompt_folded gin_trgm_ops)",
    ),
}

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
_INSERTED = (*COLUMNS, "prompt_folded")
_INSERT = f"INSERT INTO {TABLE} ({', '.join(_INSERTED)}) VALUES ({', '.join(f'${n}' for n in range(1, len(_INSERTED) + 1))})"
_NEWEST_FIRST = "ORDER BY created_at DESC, seq DESC"
T = TypeVar("T")

class CommitUnknown(Exception):
    """The connection failed while a COMMIT was on its way: the rows may or may not exist."""


def _row(record: ImageRecord) -> tuple[Any, ...]:
    return (*record_values(record), record.metadata.prompt.casefold())


def _like_pattern(text: str) -> str:
    """`text` as a LIKE substring pattern, its own wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class PostgresIndex:
    def __init__(self, dsn: str) -> None:
        self._database = VersionedDatabase(
            dsn,
            what="the shared gallery's database",
            schema_table="gallery_schema",
            lock=SCHEMA_LOCK,
            migrations=_MIGRATIONS,
            pool_size=POOL_SIZE,
            unavailable=lambda error: gallery_unavailable(f"its database cannot be reached: {error}"),
        )

    # ---- life cycle ---------------------------------------------------------

    async def open(self) -> None:
        """Make the pool (no connection yet) and migrate the schema if the database answers."""
        await self._database.open()

    async def close(self) -> None:
        await self._database.close()

    async def _use(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        return await self._database.use(work)

    async def ping(self) -> bool:
        try:
            await self._use(lambda connection: connection.fetchval("SELECT 1"))
        except ApiError:
            return False
        return True

    # ---- writing ------------------------------------------------------------

    async def insert(self, records: Sequence[ImageRecord], *, if_absent: bool = False) -> int:
        """Commit the rows in one transaction; how many were new (`if_absent`: an id already there is kept as is)."""
        statement = f"{_INSERT} ON CONFLICT (id) DO NOTHING" if if_absent else _INSERT

        async def insert(connection: asyncpg.Connection) -> int:
            transaction = connection.transaction()
            await transaction.start()
            try:
                if if_absent:
                    statuses = [await connection.execute(statement, *_row(record)) for record in records]
                    added = sum(int(status.rsplit(" ", 1)[-1]) for status in statuses)
                else:
                    # One round trip for the lot.
                    await connection.executemany(statement, [_row(record) for record in records])
                    added = len(records)
            except BaseException:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except UNREACHABLE as error:
                raise CommitUnknown from error
            return added

        return await self._use(insert)

    async def delete(self, image_id: str, owner: str | None) -> bool:
        if owner is None:
            status = await self._use(lambda c: c.execute(f"DELETE FROM {TABLE} WHERE id = $1", image_id))
        else:
            status = await self._use(
                lambda c: c.execute(f"DELETE FROM {TABLE} WHERE id = $1 AND owner = $2", image_id, owner)
            )
        return status != "DELETE 0"

    async def delete_expired(
        self, now: float, max_age_s: float, max_images: int, max_per_subject: int, owner: str | None, added: int
    ) -> list[str]:
        """Delete the rows past the age limit, each subject's oldest beyond `max_per_subject` (`owner`'s
        alone when given) and the oldest beyond the count; their ids. The `added` newest of `owner`'s
        (just added) stay even past the limits.

        Under a transaction-scoped lock: two replicas applying the count limit
        at once would otherwise each remove the same excess.
        """

        async def expire(connection: asyncpg.Connection) -> list[str]:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", RETENTION_LOCK)
                expired: list[str] = []
                if max_age_s:
                    rows = await connection.fetch(f"DELETE FROM {TABLE} WHERE created_at < $1 RETURNING id", now - max_age_s)
                    expired += [row["id"] for row in rows]
                if max_per_subject:
                    # Each subject's newest first; those past its limit go.
                    if owner is not None:
                        beyond = f"SELECT seq FROM {TABLE} WHERE owner = $2 ORDER BY created_at DESC, seq DESC OFFSET $1"
                        arguments: tuple[Any, ...] = (max(max_per_subject, added), owner)
                    else:
                        beyond = (
                            f"SELECT seq FROM (SELECT seq, row_number() OVER "
                            f"(PARTITION BY owner ORDER BY created_at DESC, seq DESC) AS newer FROM {TABLE}) ranked "
                            f"WHERE newer > $1"
                        )
                        arguments = (max_per_subject,)
                    rows = await connection.fetch(f"DELETE FROM {TABLE} WHERE seq IN ({beyond}) RETURNING id", *arguments)
                    expired += [row["id"] for row in rows]
                if max_images:
                    excess = await connection.fetchval(f"SELECT count(*) FROM {TABLE}") - max(max_images, added)
                    if excess > 0:
                        rows = await connection.fetch(
                            f"DELETE FROM {TABLE} WHERE seq IN "
                            f"(SELECT seq FROM {TABLE} ORDER BY created_at, seq LIMIT $1) RETURNING id",
                            excess,
                        )
                        expired += [row["id"] for row in rows]
                return expired

        return await self._use(expire)

    # ---- reading ------------------------------------------------------------

    async def get(self, image_id: str, owner: str | None) -> ImageRecord | None:
        if owner is None:
            row = await self._use(lambda c: c.fetchrow(f"{_SELECT} WHERE id = $1", image_id))
        else:
            row = await self._use(lambda c: c.fetchrow(f"{_SELECT} WHERE id = $1 AND owner = $2", image_id, owner))
        return record_from_values(tuple(row)) if row is not None else None

    def list_statements(self, query: ListQuery) -> tuple[str, str, list[Any]]:
        """The page's and the count's SQL for `query`, and their parameters (the page's adds limit and offset)."""
        conditions, parameters = [], []
        if query.owner is not None:
            parameters.append(query.owner)
            conditions.append(f"owner = ${len(parameters)}")
        if query.model is not None:
            parameters.append(query.model)
            conditions.append(f"model = ${len(parameters)}")
        if query.text:
            parameters.append(_like_pattern(query.text.casefold()))
            conditions.append(f"prompt_folded LIKE ${len(parameters)}")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        count = len(parameters)
        page = f"{_SELECT} {where} {_NEWEST_FIRST} LIMIT ${count + 1} OFFSET ${count + 2}"
        return page, f"SELECT count(*) FROM {TABLE} {where}", parameters

    async def list(self, query: ListQuery) -> tuple[list[ImageRecord], int]:
        page, count, parameters = self.list_statements(query)

        async def read(connection: asyncpg.Connection) -> tuple[list[ImageRecord], int]:
            # One snapshot for both: the total matches the page.
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                rows = await connection.fetch(page, *parameters, query.limit, query.offset)
                total = await connection.fetchval(count, *parameters)
            return [record_from_values(tuple(row)) for row in rows], total

        return await self._use(read)

    async def existing(self, ids: Sequence[str]) -> set[str]:
        """Which of `ids` have a row (one indexed lookup for the lot)."""
        rows = await self._use(lambda c: c.fetch(f"SELECT id FROM {TABLE} WHERE id = ANY($1::text[])", list(ids)))
        return {row["id"] for row in rows}

    async def ids_after(self, after: str, limit: int) -> list[str]:
        """Up to `limit` ids greater than `after`, in byte order (off the id index)."""
        rows = await self._use(lambda c: c.fetch(f"SELECT id FROM {TABLE} WHERE id > $1 ORDER BY id LIMIT $2", after, limit))
        return [row["id"] for row in rows]

    async def delete_ids(self, ids: Sequence[str]) -> int:
        status = await self._use(lambda c: c.execute(f"DELETE FROM {TABLE} WHERE id = ANY($1::text[])", list(ids)))
        return int(status.rsplit(" ", 1)[-1])

    async def explain(self, statement: str, *parameters: Any) -> list[str]:
        """The planner's plan for a statement, one line per step."""
        rows = await self._use(lambda c: c.fetch(f"EXPLAIN {statement}", *parameters))
        return [row[0] for row in rows]

    @contextlib.asynccontextmanager
    async def sweep_lock(self) -> AsyncIterator[bool]:
        """Whether this replica may sweep now: one sweep at a time across the cluster, the others skip."""
        async with self._database.connection() as connection:
            locked = await connection.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK)
            try:
                yield locked
            finally:
                if locked:
                    await connection.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK)
