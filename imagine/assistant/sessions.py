"""Chat sessions: what a store keeps, and which store the settings ask for.

A session belongs to its owner (the token's `sub`) and is named by the owner:
("alice", "default") and ("bob", "default") are two sessions that never meet.
Each keeps its newest `keep` messages; each owner keeps their `max_sessions`
most recently used sessions.

Two stores, chosen as the gallery's are (`imagine.assistant.service.build_sessions`):
the gallery's own SQLite file by default (`imagine.assistant.sqlite_sessions`), the
shared gallery's PostgreSQL database when `gallery.database` names one
(`imagine.assistant.postgres_sessions`).
A store that cannot reach its database raises `sessions_unavailable` (503).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from imagine.errors import ApiError

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class StoredMessage:
    role: str  # "user" or "assistant"
    content: str
    created_at: float  # unix seconds
    image_id: str | None = None  # the gallery image a `#generate` answer made


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    created_at: float
    updated_at: float
    messages: int


def sessions_unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        f"Chat sessions are unavailable ({what}); try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class SessionStore(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the tables."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def history(self, owner: str, session_id: str, limit: int) -> list[StoredMessage]:
        """The session's newest `limit` messages, oldest first (none for a new session)."""

    @abc.abstractmethod
    async def append(
        self, owner: str, session_id: str, messages: Sequence[StoredMessage], *, keep: int, max_sessions: int
    ) -> None:
        """Add messages (creating the session), then drop all but the newest `keep` of it and all but the
        owner's `max_sessions` most recently used sessions, in one transaction."""

    @abc.abstractmethod
    async def sessions(self, owner: str) -> list[SessionSummary]:
        """The owner's sessions, most recently used first."""

    @abc.abstractmethod
    async def messages(self, owner: str, session_id: str) -> list[StoredMessage] | None:
        """Every message kept, oldest first; None when the owner has no such session."""

    @abc.abstractmethod
    async def delete(self, owner: str, session_id: str) -> bool:
        """Remove the session and its messages; False when the owner had none by that id."""

