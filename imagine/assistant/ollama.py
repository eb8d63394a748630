"""The Ollama client: a chat answer whole or token by token, the models the server has, and what a failure means.

Built on the official `ollama` library's AsyncClient: it speaks Ollama's
documented HTTP API (`/api/chat` with and without NDJSON streaming,
`/api/tags`, images as base64 in messages) over httpx, which runs on asyncio,
so on aiohttp's own event loop. Nothing else in the service knows the library.

Every failure is an `ApiError` whose message names the cause: the server
cannot be reached or is too slow (503 with Retry-After), the model is not on
the server (503), the server refused the credentials (503), or the server
failed otherwise (502 UPSTREAM_ERROR).
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import ollama

from imagine.errors import ApiError
from imagine.settings import AssistantSettings, SettingsError

# The variable the ollama library itself reads for a bearer token.
API_KEY_ENV = "OLLAMA_API_KEY"
RETRY_AFTER_S = 5


class OllamaTelemetry(Protocol):
    def ollama_called(self, call: str, seconds: float, *, ok: bool) -> None:
        """One call to the Ollama server ("chat", "chat_stream", "tags") ended after `seconds`."""

    def assistant_tokens(self, prompt: int, completion: int) -> None:
        """The model read `prompt` tokens and wrote `completion` tokens for one answer."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation as the model sees it; `images` are encoded image files (PNG)."""

    role: str  # "system", "user" or "assistant"
    content: str
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Reply:
    """A whole answer, and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _bearer_token(settings: AssistantSettings) -> str:
    token = os.environ.get(API_KEY_ENV, "")
    if not token and settings.api_key_file:
        try:
            token = Path(settings.api_key_file).read_text().strip()
        except OSError as error:
            raise SettingsError(f"assistant.api_key_file: cannot read {settings.api_key_file}: {error.strerror}") from None
    return token


def same_model(wanted: str, listed: str) -> bool:
    """Ollama lists "llama3.2:latest" for a model pulled as "llama3.2"."""
    def tagged(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    return tagged(wanted) == tagged(listed)


def unavailable(message: str, reason: str, **details: Any) -> ApiError:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if reason in ("unreachable", "timeout") else None
    return ApiError(503, "SERVICE_UNAVAILABLE", message, details={"reason": reason, **details}, headers=headers)


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class Ollama:
    """One server, one connection pool; `close` when done."""

    def __init__(self, settings: AssistantSettings, telemetry: OllamaTelemetry) -> None:
        token = _bearer_token(settings)
        url = settings.ollama_url.rstrip("/")
        # The server as messages, /health and logs name it: without any user name and password in the URL.
        self.url = _without_credentials(url)
        self._timeout_s = settings.timeout_s
        self._telemetry = telemetry
        self._client = ollama.AsyncClient(
            host=url,
            # `read` bounds a whole answer, or one pause between streamed tokens.
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            headers={"Authorization": f"Bearer {token}"} if token else None,
        )

    async def close(self) -> None:
        await self._client.close()

    async def models(self) -> list[str]:
        """The names of the models the server has (GET /api/tags)."""
        started = time.perf_counter()
        ok = False
        try:
            listing = await self._client.list()
            ok = True
        except Exception as error:  # noqa: BLE001 - every failure is translated below
            raise self._failure(error, model=None) from None
        finally:
            self._telemetry.ollama_called("tags", time.perf_counter() - started, ok=ok)
        return [entry.model for entry in listing.models if entry.model]

    async def chat(self, model: str, turns: Sequence[Turn], *, temperature: float, max_tokens: int) -> Reply:
        """The model's whole answer to the conversation `turns`."""
        started = time.perf_counter()
        ok = False
        try:
            answer = await self._client.chat(
                model=model, messages=_messages(turns), stream=False, options=_options(temperature, max_tokens)
            )
            ok = True
        except Exception as error:  # noqa: BLE001 - every failure is translated below
            raise self._failure(error, model=model) from None
        finally:
            self._telemetry.ollama_called("chat", time.perf_counter() - started, ok=ok)
        reply = Reply(answer.message.content or "", answer.prompt_eval_count or 0, answer.eval_count or 0)
        self._telemetry.assistant_tokens(reply.prompt_tokens, reply.completion_tokens)
        return reply

    async def stream(
        self, model: str, turns: Sequence[Turn], *, temperature: float, max_tokens: int
    ) -> AsyncIterator[str | Reply]:
        """The answer as the model writes it: text pieces, then the whole `Reply` last."""
        started = time.perf_counter()
        ok = False
        pieces: list[str] = []
        try:
            parts = await self._client.chat(
                model=model, messages=_messages(turns), stream=True, options=_options(temperature, max_tokens)
            )
            async for part in parts:
                text = part.message.content or ""
                if text:
                    pieces.append(text)
                    yield text
                if part.done:
                    reply = Reply("".join(pieces), part.prompt_eval_count or 0, part.eval_count or 0)
                    ok = True
                    self._telemetry.assistant_tokens(reply.prompt_tokens, reply.completion_tokens)
                    yield reply
                    return
            raise httpx.RemoteProtocolError("the answer ended before its last part")
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is translated below
            raise self._failure(error, model=model) from None
        finally:
            self._telemetry.ollama_called("chat_stream", time.perf_counter() - started, ok=ok)

    def _failure(self, error: Exception, *, model: str | None) -> ApiError:
        server = {"server": self.url}
        if isinstance(error, httpx.TimeoutException):
            return unavailable(
                f"The Ollama server at {self.url} did not answer within {self._timeout_s:g} s", "timeout", **server
            )
        if isinstance(error, (ConnectionError, httpx.ConnectError)):
            return unavailable(f"The Ollama server at {self.url} cannot be reached", "unreachable", **server)
        if isinstance(error, httpx.TransportError):
            return unavailable(
                f"The connection to the Ollama server at {self.url} failed ({type(error).__name__})", "unreachable", **server
            )
        if isinstance(error, ollama.ResponseError):
            if error.status_code == 404 and model is not None:
                return unavailable(
                    f"Model '{model}' is not available on the Ollama server at {self.url} (ollama pull {model})",
                    "model_missing",
                    model=model,
                    **server,
                )
            if error.status_code in (401, 403):
                return unavailable(
                    f"The Ollama server at {self.url} refused the credentials ({API_KEY_ENV} or assistant.api_key_file)",
                    "unauthorized",
                    **server,
                )
            return ApiError(
                502, "UPSTREAM_ERROR", f"The Ollama server failed: {error.error}", details={"status": error.status_code, **server}
            )
        if isinstance(error, httpx.HTTPError):  # an answer that arrived but cannot be read (a body that does not decode)
            return ApiError(
                502, "UPSTREAM_ERROR", f"The answer of the Ollama server at {self.url} could not be read ({type(error).__name__})",
                details=server,
            )
        # JSON or fields that are not Ollama's: pydantic's errors are ValueErrors, and the library meets
        # JSON of another shape (a list, a number) with TypeError, AttributeError or KeyError.
        if isinstance(error, (ValueError, TypeError, AttributeError, KeyError)):
            return ApiError(502, "UPSTREAM_ERROR", f"The server at {self.url} does not answer as Ollama does", details=server)
        raise error


def _messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.images:
            # Bytes, never str: the library would take a str for a file path if one existed by that name.
            message["images"] = list(turn.images)
        messages.append(message)
    return messages


def _options(temperature: float, max_tokens: int) -> dict[str, Any]:
    return {"temperature": temperature, "num_predict": max_tokens}
