"""The assistant: conversations kept per subject, answers from the Ollama server, and what that server has.

`Assistant` is what the HTTP views ask. Without `assistant.ollama_url` it is
there but off: `require` answers 503 saying how to turn it on, and its state
says `configured: false`.

A conversation is the system prompt, the session's newest
`assistant.max_history_messages` messages and the new one; an exchange is
kept (both messages) only once the model has answered in full, so a failed or
abandoned answer leaves the session as it was.

What the server has (`state`) is looked at in the background and trusted for
`assistant.status_ttl_s`: /status and /health read it without ever waiting
for the server; a failed call updates it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from imagine.assistant.ollama import Ollama, OllamaTelemetry, Reply, Turn, same_model
from imagine.assistant.prompts import clean_prompt, enhance_turns
from imagine.assistant.sessions import SessionStore, SessionSummary, StoredMessage
from imagine.assistant.sqlite_sessions import SqliteSessions
from imagine.errors import ApiError
from imagine.settings import AssistantSettings, Settings
from imagine.storage.gallery import INDEX_FILE, storage_folder

log = logging.getLogger(__name__)

NOT_CONFIGURED = (
    "The assistant is not configured: set assistant.ollama_url (or IMAGINE_ASSISTANT_OLLAMA_URL) to an Ollama "
    "server, e.g. http://127.0.0.1:11434, and restart"
)
# Descriptions should stick to what is in the image; prompts may be inventive.
ANALYSIS_TEMPERATURE = 0.2
ANALYSIS_MAX_TOKENS = 1024
ENHANCE_TEMPERATURE = 0.7
ENHANCE_MAX_TOKENS = 300


@dataclass(frozen=True)
class ServerState:
    """What /status and /health say about the assistant."""

    configured: bool
    reachable: bool = False
    chat_model: bool = False
    vision_model: bool = False
    # Why it is not usable; None when it is, or before the first look.
    error: str | None = None


def build_sessions(settings: Settings) -> SessionStore:
    """In the shared gallery's PostgreSQL when there is one, else in the embedded gallery's SQLite file."""
    if settings.gallery.shared:
        # Only deployments with a shared gallery need asyncpg (the `shared-gallery` extra).
        from imagine.assistant.postgres_sessions import PostgresSessions

        return PostgresSessions(settings.gallery.database)
    return SqliteSessions(storage_folder(settings) / INDEX_FILE)


class Assistant:
    def __init__(
        self,
        settings: AssistantSettings,
        sessions: SessionStore | None = None,
        ollama: Ollama | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._ollama = ollama
        self._clock = clock
        self._state = ServerState(configured=ollama is not None)
        self._checked_at = float("-inf")
        self._look: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return self._ollama is not None

    def require(self) -> tuple[Ollama, SessionStore]:
        """The server and the sessions, or 503 saying how to configure them."""
        if self._ollama is None or self._sessions is None:
            raise ApiError(503, "SERVICE_UNAVAILABLE", NOT_CONFIGURED, details={"reason": "not_configured"})
        return self._ollama, self._sessions

    # ---- conversations ----------------------------------------------------------

    async def _conversation(self, owner: str, session_id: str, message: str) -> list[Turn]:
        _, sessions = self.require()
        history = await sessions.history(owner, session_id, self.settings.max_history_messages)
        return [
            Turn("system", self.settings.system_prompt),
            *(Turn(kept.role, kept.content) for kept in history),
            Turn("user", message),
        ]

    async def chat(self, owner: str, session_id: str, message: str, *, temperature: float, max_tokens: int) -> Reply:
        """The chat model's answer to `message` in the session, kept in it."""
        ollama, _ = self.require()
        turns = await self._conversation(owner, session_id, message)
        reply = await self._noting(ollama.chat(self.settings.chat_model, turns, temperature=temperature, max_tokens=max_tokens))
        await self.remember(owner, session_id, message, reply.text)
        return reply

    async def stream(
        self, owner: str, session_id: str, message: str, *, temperature: float, max_tokens: int
    ) -> AsyncIterator[str | Reply]:
        """As `chat`, token by token: text pieces, then the `Reply`, yielded once the exchange is kept."""
        ollama, _ = self.require()
        turns = await self._conversation(owner, session_id, message)
        try:
            async for part in ollama.stream(self.settings.chat_model, turns, temperature=temperature, max_tokens=max_tokens):
                if isinstance(part, Reply):
                    await self.remember(owner, session_id, message, part.text)
                yield part
        except ApiError as error:
            self._note(error)
            raise

    async def remember(self, owner: str, session_id: str, message: str, answer: str, image_id: str | None = None) -> None:
        """Keep one exchange: the caller's message and the answer (with the gallery image it made, if any)."""
        _, sessions = self.require()
        now = self._clock()
        await sessions.append(
            owner,
            session_id,
            [StoredMessage("user", message, now), StoredMessage("assistant", answer, now, image_id)],
            keep=self.settings.max_history_messages,
            max_sessions=self.settings.max_sessions,
        )

    async def sessions(self, owner: str) -> list[SessionSummary]:
        return await self.require()[1].sessions(owner)

    async def messages(self, owner: str, session_id: str) -> list[StoredMessage] | None:
        return await self.require()[1].messages(owner, session_id)

    async def forget(self, owner: str, session_id: str) -> bool:
        return await self.require()[1].delete(owner, session_id)

    # ---- single questions ---------------------------------------------------------

    async def analyze(self, png: bytes, question: str) -> str:
        """The vision model's answer to `question` about the image."""
        ollama, _ = self.require()
        turns = [Turn("user", question, images=(png,))]
        reply = await self._noting(
            ollama.chat(self.settings.vision_model, turns, temperature=ANALYSIS_TEMPERATURE, max_tokens=ANALYSIS_MAX_TOKENS)
        )
        return reply.text.strip()

    async def enhance(self, idea: str, model: str, guide: str, style: str | None) -> str:
        """A detailed prompt for `model` from a short idea, written by the chat model; "" if it wrote none."""
        ollama, _ = self.require()
        turns = enhance_turns(idea, model, guide, style)
        reply = await self._noting(
            ollama.chat(self.settings.chat_model, turns, temperature=ENHANCE_TEMPERATURE, max_tokens=ENHANCE_MAX_TOKENS)
        )
        return clean_prompt(reply.text)

    # ---- what the server has ------------------------------------------------------

    def state(self) -> ServerState:
        """The last look at the server, at once; a new look starts in the background once it is stale."""
        if self._ollama is not None and self._clock() - self._checked_at > self.settings.status_ttl_s:
            if self._look is None or self._look.done():
                self._look = asyncio.create_task(self.look())
        return self._state

    async def look(self) -> None:
        """Ask the server which models it has (bounded by the connect timeout: it is a small answer)."""
        assert self._ollama is not None
        self._checked_at = self._clock()
        chat_model, vision_model = self.settings.chat_model, self.settings.vision_model
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                listed = await self._ollama.models()
        except TimeoutError:
            self._state = ServerState(True, error=f"the Ollama server at {self._ollama.url} did not list its models in time")
            return
        except ApiError as error:
            self._state = ServerState(True, error=error.message)
            return
        has_chat = any(same_model(chat_model, name) for name in listed)
        has_vision = any(same_model(vision_model, name) for name in listed)
        missing = [name for name, present in ((chat_model, has_chat), (vision_model, has_vision)) if not present]
        error = f"not on the Ollama server: {', '.join(missing)}" if missing else None
        self._state = ServerState(True, reachable=True, chat_model=has_chat, vision_model=has_vision, error=error)

    async def _noting(self, call: Awaitable[Reply]) -> Reply:
        try:
            return await call
        except ApiError as error:
            self._note(error)
            raise

    def _note(self, error: ApiError) -> None:
        """A failed call tells about the server at once, without waiting for the next look."""
        reason = error.details.get("reason")
        if reason in ("unreachable", "timeout", "unauthorized"):
            self._state = ServerState(True, error=error.message)
            self._checked_at = self._clock()
        elif reason == "model_missing":
            model = error.details.get("model")
            self._state = ServerState(
                True,
                reachable=True,
                chat_model=self._state.chat_model and model != self.settings.chat_model,
                vision_model=self._state.vision_model and model != self.settings.vision_model,
                error=error.message,
            )
            self._checked_at = self._clock()

    async def close(self) -> None:
        if self._look is not None:
            self._look.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._look


@contextlib.asynccontextmanager
async def started_assistant(settings: Settings, telemetry: OllamaTelemetry) -> AsyncIterator[Assistant]:
    """The assistant the settings ask for, open for as long as the block runs (off without an ollama_url)."""
    own = settings.assistant
    if not own.configured:
        yield Assistant(own)
        return
    ollama = Ollama(own, telemetry)
    sessions = build_sessions(settings)
    try:
        await sessions.open()
    except BaseException:
        await ollama.close()
        raise
    assistant = Assistant(own, sessions, ollama)
    assistant.state()
    try:
        yield assistant
    finally:
        await assistant.close()
        await ollama.close()
        await sessions.close()
