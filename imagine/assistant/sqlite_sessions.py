"""Chat sessions in SQLite: two tables in the embedded gallery's own index file, beside its images table.

The gallery's file is the service's one embedded database: one more file to
back up would be one more to forget. This store opens the file with a
connection of its own (WAL lets the two connections read while either
writes; a busy timeout lets their writes take turns) and never touches the
gallery's table or its `user_version`; its own schema version is a row of
`chat_schema`.

Threads: one dedicated thread owns the connection (`imagine.storage.sqlite_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from imagine.assistant.sessions import SessionStore, SessionSummary, StoredMessage
from imagine.storage.sqlite_thread import SqliteThread

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS chat_schema (only_row INTEGER PRIMARY KEY CHECK (only_row = 1), version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS chat_sessions (
    owner TEXT NOT NULL,
    session_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (owner, session_id)
)""",
    # An owner's sessions by last use: the listing, and which go past max_sessions.
    "CREATE INDEX IF NOT EXISTS chat_sessions_by_use ON chat_sessions (owner, updated_at)",
    """CREATE TABLE IF NOT EXISTS chat_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    image_id TEXT
)""",
    "CREATE INDEX IF NOT EXISTS chat_messages_by_session ON chat_messages (owner, session_id, seq)",
)


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE: the write lock up front, so a write never fails half-way on the gallery's lock.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _message(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(row[0], row[1], row[2], row[3])


class SqliteSessions(SessionStore):
    def __init__(self, path: Path) -> None:
        # Durable: the conversations are what callers wrote, and the gallery's connection shares the file.
        self._database = SqliteThread(path, _SCHEMA, "imagine-chat-db", durable=True, prepare=_check_version)

    async def open(self) -> None:
        # Connected now, so a file of a newer version refuses the start rather than the first chat.
        await self._database.call(lambda sql: None)

    async def close(self) -> None:
        await self._database.close()

    async def history(self, owner: str, session_id: str, limit: int) -> list[StoredMessage]:
        return await self._database.call(lambda sql: _history(sql, owner, session_id, limit))

    async def append(
        self, owner: str, session_id: str, messages: Sequence[StoredMessage], *, keep: int, max_sessions: int
    ) -> None:
        # Shielded: a client that goes away mid-write must not leave half an exchange.
        await asyncio.shield(self._database.call(lambda sql: _append(sql, owner, session_id, messages, keep, max_sessions)))

    async def sessions(self, owner: str) -> list[SessionSummary]:
        return await self._database.call(lambda sql: _sessions(sql, owner))

    async def messages(self, owner: str, session_id: str) -> list[StoredMessage] | None:
        return await self._database.call(lambda sql: _messages(sql, owner, session_id))

    async def delete(self, owner: str, session_id: str) -> bool:
        return await asyncio.shield(self._database.call(lambda sql: _delete_session(sql, owner, session_id)))


def _check_version(sql: sqlite3.Connection) -> None:
    with _transaction(sql):
        row = sql.execute("SELECT version FROM chat_schema").fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise RuntimeError(f"the chat sessions were written by a newer version (schema {row[0]})")
        sql.execute("INSERT OR REPLACE INTO chat_schema (only_row, version) VALUES (1, ?)", (SCHEMA_VERSION,))


def _history(sql: sqlite3.Connection, owner: str, session_id: str, limit: int) -> list[StoredMessage]:
    rows = sql.execute(
        "SELECT role, content, created_at, image_id FROM chat_messages WHERE owner = ? AND session_id = ? "
        "ORDER BY seq DESC LIMIT ?",
        (owner, session_id, limit),
    ).fetchall()
    return [_message(row) for row in reversed(rows)]


def _append(
    sql: sqlite3.Connection, owner: str, session_id: str, messages: Sequence[StoredMessage], keep: int, max_sessions: int
) -> None:
    now = messages[-1].created_at
    with _transaction(sql):
        sql.execute(
            "INSERT INTO chat_sessions (owner, session_id, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (owner, session_id) DO UPDATE SET updated_at = excluded.updated_at",
            (owner, session_id, messages[0].created_at, now),
        )
        sql.executemany(
            "INSERT INTO chat_messages (owner, session_id, role, content, created_at, image_id) VALUES (?, ?, ?, ?, ?, ?)",
            [(owner, session_id, m.role, m.content, m.created_at, m.image_id) for m in messages],
        )
        sql.execute(
            "DELETE FROM chat_messages WHERE owner = ? AND session_id = ? AND seq <= ("
            "SELECT seq FROM chat_messages WHERE owner = ? AND session_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (owner, session_id, owner, session_id, keep),
        )
        stale = sql.execute(
            "SELECT session_id FROM chat_sessions WHERE owner = ? ORDER BY updated_at DESC LIMIT -1 OFFSET ?",
            (owner, max_sessions),
        ).fetchall()
        for (old,) in stale:
            _delete(sql, owner, old)


def _sessions(sql: sqlite3.Connection, owner: str) -> list[SessionSummary]:
    rows = sql.execute(
        "SELECT s.session_id, s.created_at, s.updated_at, "
        "(SELECT COUNT(*) FROM chat_messages m WHERE m.owner = s.owner AND m.session_id = s.session_id) "
        "FROM chat_sessions s WHERE s.owner = ? ORDER BY s.updated_at DESC",
        (owner,),
    ).fetchall()
    return [SessionSummary(*row) for row in rows]


def _messages(sql: sqlite3.Connection, owner: str, session_id: str) -> list[StoredMessage] | None:
    # One read transaction: the session and its messages from the same moment.
    sql.execute("BEGIN DEFERRED")
    try:
        known = sql.execute("SELECT 1 FROM chat_sessions WHERE owner = ? AND session_id = ?", (owner, session_id)).fetchone()
        rows = sql.execute(
            "SELECT role, content, created_at, image_id FROM chat_messages WHERE owner = ? AND session_id = ? ORDER BY seq",
            (owner, session_id),
        ).fetchall()
    finally:
        sql.execute("COMMIT")
    return [_message(row) for row in rows] if known else None


def _delete_session(sql: sqlite3.Connection, owner: str, session_id: str) -> bool:
    with _transaction(sql):
        return _delete(sql, owner, session_id)


def _delete(sql: sqlite3.Connection, owner: str, session_id: str) -> bool:
    sql.execute("DELETE FROM chat_messages WHERE owner = ? AND session_id = ?", (owner, session_id))
    cursor = sql.execute("DELETE FROM chat_sessions WHERE owner = ? AND session_id = ?", (owner, session_id))
    return cursor.rowcount > 0
