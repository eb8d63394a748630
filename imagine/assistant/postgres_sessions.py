"""Chat sessions in PostgreSQL: the shared gallery's database (`gallery.database`), so every replica sees them.

Its own asyncpg pool and its own tables beside the gallery's; the schema is
created at start-up under an advisory lock of its own (replicas starting
together create it once, see `imagine.storage.postgres_database`) and
versioned in `chat_schema`. A database that
does not answer makes the chat routes answer 503 until it is back, as the
gallery's routes do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from imagine.assistant.sessions import SessionStore, SessionSummary, StoredMessage, sessions_unavailable
from imagine.storage.postgres_database import VersionedDatabase

SCHEMA_LOCK = 0x1A6A_C4A7
POOL_SIZE = 5
# The two-key advisory locks (a key space of their own): (this, hash of the owner) serialises one caller's
# appends. Unserialised, two appends past max_sessions each deleted the row the other had just updated,
# a deadlock, and neither saw the other's session, so more than max_sessions were kept.
OWNER_LOCK_SPACE = 0x1A6A
T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS chat_sessions (
        owner text NOT NULL,
        session_id text NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (owner, session_id)
    )""",
    "CREATE INDEX IF NOT EXISTS chat_sessions_by_use ON chat_sessions (owner, updated_at)",
    """CREATE TABLE IF NOT EXISTS chat_messages (
        seq bigserial PRIMARY KEY,
        owner text NOT NULL,
        session_id text NOT NULL,
        role text NOT NULL,
        content text NOT NULL,
        created_at double precision NOT NULL,
        image_id text,
        FOREIGN KEY (owner, session_id) REFERENCES chat_sessions ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS chat_messages_by_session ON chat_messages (owner, session_id, seq)",
)
class PostgresSessions(SessionStore):
    def __init__(self, dsn: str) -> None:
        self._database = VersionedDatabase(
            dsn,
            what="the chat sessions' tables",
            schema_table="chat_schema",
            lock=SCHEMA_LOCK,
            migrations={1: _SCHEMA},
            pool_size=POOL_SIZE,
            unavailable=lambda error: sessions_unavailable(f"their database cannot be reached: {error}"),
        )

    async def open(self) -> None:
        # The service starts while the database is down; the schema is made on first use then.
        await self._database.open()

    async def close(self) -> None:
        await self._database.close()

    async def _use(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        return await self._database.use(work)

    async def history(self, owner: str, session_id: str, limit: int) -> list[StoredMessage]:
        rows = await self._use(
            lambda c: c.fetch(
                "SELECT role, content, created_at, image_id FROM chat_messages WHERE owner = $1 AND session_id = $2 "
                "ORDER BY seq DESC LIMIT $3",
                owner,
                session_id,
                limit,
            )
        )
        return [StoredMessage(*row) for row in reversed(rows)]

    async def append(
        self, owner: str, session_id: str, messages: Sequence[StoredMessage], *, keep: int, max_sessions: int
    ) -> None:
        async def append(connection: asyncpg.Connection) -> None:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", OWNER_LOCK_SPACE, owner)
                await connection.execute(
                    "INSERT INTO chat_sessions (owner, session_id, created_at, updated_at) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (owner, session_id) DO UPDATE SET updated_at = EXCLUDED.updated_at",
                    owner,
                    session_id,
                    messages[0].created_at,
                    messages[-1].created_at,
                )
                await connection.executemany(
                    "INSERT INTO chat_messages (owner, session_id, role, content, created_at, image_id) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    [(owner, session_id, m.role, m.content, m.created_at, m.image_id) for m in messages],
                )
                await connection.execute(
                    "DELETE FROM chat_messages WHERE owner = $1 AND session_id = $2 AND seq <= ("
                    "SELECT seq FROM chat_messages WHERE owner = $1 AND session_id = $2 ORDER BY seq DESC LIMIT 1 OFFSET $3)",
                    owner,
                    session_id,
                    keep,
                )
                # Their messages go with them (ON DELETE CASCADE).
                await connection.execute(
                    "DELETE FROM chat_sessions WHERE owner = $1 AND session_id IN ("
                    "SELECT session_id FROM chat_sessions WHERE owner = $1 ORDER BY updated_at DESC OFFSET $2)",
                    owner,
                    max_sessions,
                )

        await self._use(append)

    async def sessions(self, owner: str) -> list[SessionSummary]:
        rows = await self._use(
            lambda c: c.fetch(
                "SELECT s.session_id, s.created_at, s.updated_at, "
                "(SELECT count(*) FROM chat_messages m WHERE m.owner = s.owner AND m.session_id = s.session_id) "
                "FROM chat_sessions s WHERE s.owner = $1 ORDER BY s.updated_at DESC",
                owner,
            )
        )
        return [SessionSummary(*row) for row in rows]

    async def messages(self, owner: str, session_id: str) -> list[StoredMessage] | None:
        async def read(connection: asyncpg.Connection) -> list[StoredMessage] | None:
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                known = await connection.fetchval(
                    "SELECT true FROM chat_sessions WHERE owner = $1 AND session_id = $2", owner, session_id
                )
                rows = await connection.fetch(
                    "SELECT role, content, created_at, image_id FROM chat_messages "
                    "WHERE owner = $1 AND session_id = $2 ORDER BY seq",
                    owner,
                    session_id,
                )
            return [StoredMessage(*row) for row in rows] if known else None

        return await self._use(read)

    async def delete(self, owner: str, session_id: str) -> bool:
        status = await self._use(
            lambda c: c.execute("DELETE FROM chat_sessions WHERE owner = $1 AND session_id = $2", owner, session_id)
        )
        return status != "DELETE 0"
