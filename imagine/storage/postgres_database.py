"""A PostgreSQL database shared by every replica, through an asyncpg pool, with a versioned schema of its own.

What the shared gallery's index and the chat sessions both need: a pool that
opens even while the database is down (each use connects as needed), a
schema created and migrated once under an advisory lock (replicas starting
together migrate once), its version recorded in a one-row table, a replica
that finds a newer version than it knows refusing to go on, and a database
that cannot be reached turned into the caller's 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import asyncpg

from imagine.errors import ApiError

CONNECT_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 10.0

# What a database that is down, restarting or out of connections raises.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
T = TypeVar("T")


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer version of the service."""


class VersionedDatabase:
    def __init__(
        self,
        dsn: str,
        *,
        what: str,
        schema_table: str,
        lock: int,
        migrations: Mapping[int, Sequence[str]],
        pool_size: int,
        unavailable: Callable[[str], ApiError],
    ) -> None:
        """`migrations[n]`: the statements schema version n adds to n - 1; `what` names the data in messages;
        `unavailable(name of the connection error)`: the caller's 503 while the database cannot be reached."""
        self._dsn = dsn
        self._what = what
        self._schema_table = schema_table
        self._lock = lock
        self._migrations = migrations
        self.version = max(migrations)
        self._pool_size = pool_size
        self._unavailable = unavailable
        self._pool: asyncpg.Pool | None = None
        self._migrated = False

    async def open(self) -> None:
        """The pool, and the schema if the database answers now (else on first use)."""
        # min_size 0: the pool opens even while the database is down.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
        )
        with contextlib.suppress(ApiError):
            await self.use(lambda connection: connection.fetchval("SELECT 1"))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection to the migrated schema; an unreachable database becomes the caller's 503."""
        assert self._pool is not None, f"{self._what} not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as connection:
                if not self._migrated:
                    await self._migrate(connection)
                    self._migrated = True
                yield connection
        except UNREACHABLE as error:
            raise self._unavailable(type(error).__name__) from error

    async def use(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self.connection() as connection:
            return await work(connection)

    async def _migrate(self, connection: asyncpg.Connection) -> None:
        table = self._schema_table
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", self._lock)
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                "only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), version integer NOT NULL)"
            )
            found = await connection.fetchval(f"SELECT version FROM {table}") or 0
            if found > self.version:
                raise SchemaTooNew(
                    f"{self._what} has schema {found}, written by a newer version of imagine "
                    f"(this one knows {self.version}): upgrade this replica"
                )
            for added in range(found + 1, self.version + 1):
                for statement in self._migrations[added]:
                    await connection.execute(statement)
            await connection.execute(
                f"INSERT INTO {table} (version) VALUES ($1) ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version",
                self.version,
            )
