"""The assistant's routes (seed 004): /chat with its sessions and `#generate`, /analyze-image, /prompt/enhance.

`#generate <prompt>` in a chat message goes through the same front door and
generation path as /generate (the caller's scopes, `models` claim, rate
limits, queue and gallery apply); a generation that fails is told in the
chat answer with its error code, and the exchange is kept either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from aiohttp import web
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from imagine.assistant.ollama import Reply
from imagine.assistant.service import Assistant
from imagine.assistant.sessions import StoredMessage
from imagine.http import generation
from imagine.errors import ApiError
from imagine.http import image_inputs
from imagine.http.app_keys import assistant_key, input_pool_key, metrics_key, principal_key, registry_key, settings_key
from imagine.http.front_door import admit
from imagine.http.openapi import content_response, error_response, json_response, obj, operation, path_parameter
from imagine.http.request_bodies import IMAGE_SOURCE, Prompt, parse_body, read_json
from imagine.http.stream_slots import stream_slots_key
from imagine.http.urls import gallery_path
from imagine.security.tokens import Principal, check_model_grant, requires

GENERATE_COMMAND = re.compile(r"^\s*#generate(?:\s+|$)", re.IGNORECASE)
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
MAX_MESSAGE_CHARS = 8000
# Vision models work on a fraction of this; larger images only cost upload time.
MAX_ANALYSIS_SIDE = 2048
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class ChatBody(BaseModel):
    """Seed 004's chat body, plus `stream`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    message: Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_CHARS)] = Field(
        description="The message; `#generate <prompt>` generates an image instead of asking the model"
    )
    session_id: SessionId = Field("default", description="Which of the caller's conversations (letters, digits, _.:@-)")
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: int = Field(256, ge=1, le=8192, description="The most tokens the answer may have")
    stream: bool = Field(False, description="Answer with Server-Sent Events (as `Accept: text/event-stream` does)")

    _message_not_blank = field_validator("message")(_not_blank)


class AnalyzeBody(BaseModel):
    """Seed 004's `image_base64`, or `image` (which also takes `gallery:<id>`); one of the two."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_base64: str | None = Field(None, description=IMAGE_SOURCE)
    image: str | None = Field(None, description=IMAGE_SOURCE)
    question: Annotated[str, StringConstraints(min_length=1, max_length=2000)] = "Describe this image in detail"

    _question_not_blank = field_validator("question")(_not_blank)

    @model_validator(mode="after")
    def _one_image(self) -> AnalyzeBody:
        if (self.image_base64 is None) == (self.image is None):
            raise ValueError("send the image as image_base64 or as image (one of the two)")
        return self


class EnhanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt = Field(description="A short idea")
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="The model the prompt is for; the default model when absent"
    )
    style: Annotated[str, StringConstraints(max_length=200)] | None = Field(None, description="e.g. 'watercolour', 'film noir'")

    _prompt_not_blank = field_validator("prompt")(_not_blank)


CHAT_ANSWER = obj(
    {
        "response": {"type": "string"},
        "session_id": {"type": "string"},
        "image_id": {"type": "string", "description": "`#generate` only: the new image's gallery id"},
        "image_url": {"type": "string", "description": "`#generate` only: its path, <base>/gallery/<id>.png"},
    },
    required=["response", "session_id"],
)
SSE_EVENT = obj(
    {
        "event": {"enum": ["token", "done", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "token: {text}; done: the JSON answer; error: the contract's error JSON",
        },
    }
)
MESSAGE = obj(
    {
        "role": {"enum": ["user", "assistant"]},
        "content": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "image_id": {"type": "string"},
    },
    required=["role", "content", "created_at"],
)
SESSION_LIST = obj(
    {
        "sessions": {
            "type": "array",
            "items": obj(
                {
                    "session_id": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "messages": {"type": "integer"},
                }
            ),
            "description": "Most recently used first",
        }
    }
)
SESSION = obj({"session_id": {"type": "string"}, "messages": {"type": "array", "items": MESSAGE}})
SESSION_PARAMETER = {**path_parameter("session_id", "A session id of the caller's"), "schema": {"type": "string"}}
UNAVAILABLE = {
    503: error_response(
        "No assistant configured, the Ollama server unreachable or too slow, or the model not on it (`details.reason`)"
    )
}
UPSTREAM = {502: error_response("The Ollama server failed")}
NO_SESSION = {404: error_response("The caller has no session by that id")}


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message_json(message: StoredMessage) -> dict[str, Any]:
    answer: dict[str, Any] = {"role": message.role, "content": message.content, "created_at": _timestamp(message.created_at)}
    if message.image_id is not None:
        answer["image_id"] = message.image_id
    return answer


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _wants_stream(request: web.Request, body: ChatBody) -> bool:
    return body.stream or "text/event-stream" in request.headers.get("Accept", "").lower()


def _counted(request: web.Request, route: str, outcome: str) -> None:
    request.app[metrics_key].assistant_request(route, outcome)


# ---- /chat ----------------------------------------------------------------------------


async def _generate_from_chat(request: web.Request, principal: Principal, prompt: str) -> tuple[str, str | None]:
    """The `#generate` answer, and the image id when there is one: what /generate would make, said in words."""
    app = request.app
    raw: dict[str, Any] = {"prompt": prompt}
    if app[assistant_key].settings.generate_model:
        raw["model"] = app[assistant_key].settings.generate_model
    try:
        admitted = await admit(app, principal, raw)
        generated = await generation.generate(app, principal, admitted.request, admitted.generator, store=True)
    except ApiError as error:
        _counted(request, "generate", error.code)
        return f"The image could not be generated ({error.code}): {error.message}", None
    _counted(request, "generate", "ok")
    image_id = generated.ids[0]
    url = gallery_path(app[settings_key].server.base_path, image_id)
    seed = generated.output.seeds[0]
    return f"Here is your image: {url} (gallery id {image_id}, model {generated.generator.name}, seed {seed}).", image_id


def _chat_answer(request: web.Request, response: str, session_id: str, image_id: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"response": response, "session_id": session_id}
    if image_id is not None:
        answer |= {"image_id": image_id, "image_url": gallery_path(request.app[settings_key].server.base_path, image_id)}
    return answer


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    return response


@requires("generate")
@operation(
    "Chat with the assistant's model, in one of the caller's sessions (seed 004)",
    tags=["assistant"],
    description="The session keeps the newest `assistant.max_history_messages` messages and is the caller's own: "
    "another caller's `session_id` is simply another session of this caller's. `#generate <prompt>` generates "
    "an image as /generate does (stored in the gallery) and answers with its id and URL; a failed generation is "
    "told in the answer with its error code. With `\"stream\": true` or `Accept: text/event-stream` the answer "
    "comes as Server-Sent Events: `token` ({text}) as the model writes, then `done` (the JSON answer), or "
    "`error` (the error JSON) if the model fails midway.",
    body=ChatBody,
    responses={
        200: content_response("The answer", {"application/json": CHAT_ANSWER, "text/event-stream": SSE_EVENT}),
        400: error_response("Invalid body (`details.errors` lists each field)"),
        413: error_response("Body larger than server.max_body_bytes"),
        429: error_response("Streamed: the caller holds jobs.max_streams_per_subject streams already"),
        **UPSTREAM,
        **UNAVAILABLE,
    },
)
async def chat(request: web.Request) -> web.StreamResponse:
    assistant = request.app[assistant_key]
    body = parse_body(ChatBody, await read_json(request))
    assistant.require()
    principal = request[principal_key]
    if GENERATE_COMMAND.match(body.message):
        text, image_id = await _generate_from_chat(request, principal, GENERATE_COMMAND.sub("", body.message, count=1))
        await assistant.remember(principal.sub, body.session_id, body.message, text, image_id)
        answer = _chat_answer(request, text, body.session_id, image_id)
        if not _wants_stream(request, body):
            return web.json_response(answer)
        response = await _event_stream(request)
        await response.write(_sse("token", {"text": text}))
        await response.write(_sse("done", answer))
        await response.write_eof()
        return response
    options = {"temperature": body.temperature, "max_tokens": body.max_tokens}
    if not _wants_stream(request, body):
        try:
            reply = await assistant.chat(principal.sub, body.session_id, body.message, **options)
        except ApiError as error:
            _counted(request, "chat", error.code)
            raise
        _counted(request, "chat", "ok")
        return web.json_response(_chat_answer(request, reply.text, body.session_id, None))
    return await _stream_chat(request, assistant, principal, body)


async def _stream_chat(request: web.Request, assistant: Assistant, principal: Principal, body: ChatBody) -> web.StreamResponse:
    with request.app[stream_slots_key].held(principal.sub):
        return await _streamed_chat(request, assistant, principal, body)


async def _streamed_chat(request: web.Request, assistant: Assistant, principal: Principal, body: ChatBody) -> web.StreamResponse:
    parts = assistant.stream(principal.sub, body.session_id, body.message, temperature=body.temperature, max_tokens=body.max_tokens)
    async with contextlib.aclosing(parts):
        # Until the first piece arrives nothing is sent, so a server that is down is an ordinary error answer.
        try:
            first = await anext(parts)
        except ApiError as error:
            _counted(request, "chat_stream", error.code)
            raise
        response = await _event_stream(request)
        try:
            async for part in _starting_with(first, parts):
                if isinstance(part, Reply):
                    await response.write(_sse("done", _chat_answer(request, part.text, body.session_id, None)))
                else:
                    await response.write(_sse("token", {"text": part}))
        except ApiError as error:
            _counted(request, "chat_stream", error.code)
            await response.write(_sse("error", error.body()))
        else:
            _counted(request, "chat_stream", "ok")
    await response.write_eof()
    return response


async def _starting_with(first: str | Reply, rest: AsyncIterator[str | Reply]) -> AsyncIterator[str | Reply]:
    yield first
    async for part in rest:
        yield part


@requires("generate")
@operation(
    "The caller's chat sessions",
    tags=["assistant"],
    responses={200: json_response("Most recently used first", SESSION_LIST), **UNAVAILABLE},
)
async def list_sessions(request: web.Request) -> web.Response:
    summaries = await request.app[assistant_key].sessions(request[principal_key].sub)
    return web.json_response(
        {
            "sessions": [
                {
                    "session_id": summary.session_id,
                    "created_at": _timestamp(summary.created_at),
                    "updated_at": _timestamp(summary.updated_at),
                    "messages": summary.messages,
                }
                for summary in summaries
            ]
        }
    )


def _no_session() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Chat session not found")


@requires("generate")
@operation(
    "One of the caller's chat sessions, with the messages it keeps",
    tags=["assistant"],
    parameters=[SESSION_PARAMETER],
    responses={200: json_response("Oldest message first", SESSION), **NO_SESSION, **UNAVAILABLE},
)
async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    messages = await request.app[assistant_key].messages(request[principal_key].sub, session_id)
    if messages is None:
        raise _no_session()
    return web.json_response({"session_id": session_id, "messages": [_message_json(message) for message in messages]})


@requires("generate")
@operation(
    "Delete one of the caller's chat sessions and its messages",
    tags=["assistant"],
    parameters=[SESSION_PARAMETER],
    responses={204: {"description": "Deleted"}, **NO_SESSION, **UNAVAILABLE},
)
async def delete_session(request: web.Request) -> web.Response:
    if not await request.app[assistant_key].forget(request[principal_key].sub, request.match_info["session_id"]):
        raise _no_session()
    return web.Response(status=204)


# ---- /analyze-image --------------------------------------------------------------------


def _for_vision(image: Image.Image) -> bytes:
    """The decoded image (upright, RGB) as a PNG, no larger than the vision model can use."""
    if max(image.size) > MAX_ANALYSIS_SIDE:
        image = image.copy()
        image.thumbnail((MAX_ANALYSIS_SIDE, MAX_ANALYSIS_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@requires("generate")
@operation(
    "Ask the vision model about an image (seed 004)",
    tags=["assistant"],
    description="The image follows /generate's input-image rules (PNG, JPEG or WebP, at most "
    "`server.max_input_pixels`, EXIF orientation applied); `gallery:<id>` names one of the caller's images.",
    body=AnalyzeBody,
    responses={
        200: json_response("The answer", obj({"analysis": {"type": "string"}})),
        400: error_response("Invalid body, or an image that is unreadable, of another format or too large"),
        404: error_response("A `gallery:<id>` that is not the caller's"),
        413: error_response("Body larger than server.max_body_bytes"),
        **UPSTREAM,
        **UNAVAILABLE,
    },
)
async def analyze_image(request: web.Request) -> web.Response:
    app = request.app
    body = parse_body(AnalyzeBody, await read_json(request))
    app[assistant_key].require()
    field, value = ("image", body.image) if body.image is not None else ("image_base64", body.image_base64)
    assert value is not None
    sent = await image_inputs.read_image(app, request[principal_key], field, value)
    png = await asyncio.get_running_loop().run_in_executor(app[input_pool_key], _for_vision, sent.image)
    try:
        analysis = await app[assistant_key].analyze(png, body.question)
    except ApiError as error:
        _counted(request, "analyze", error.code)
        raise
    _counted(request, "analyze", "ok")
    return web.json_response({"analysis": analysis})


# ---- /prompt/enhance --------------------------------------------------------------------


@requires("generate")
@operation(
    "Turn a short idea into a detailed prompt for a model",
    tags=["assistant"],
    description="The chat model writes it, told how prompts for that model are best written (its plugin's "
    "`prompt_guide`). The answer is one line of at most 2000 characters, ready for /generate.",
    body=EnhanceBody,
    responses={
        200: json_response("The prompt", obj({"prompt": {"type": "string"}})),
        400: error_response("Invalid body (`details.errors` lists each field)"),
        404: error_response("Unknown model"),
        **UPSTREAM,
        **UNAVAILABLE,
    },
)
async def enhance_prompt(request: web.Request) -> web.Response:
    app = request.app
    body = parse_body(EnhanceBody, await read_json(request))
    app[assistant_key].require()
    generator = app[registry_key].resolve(body.model)
    check_model_grant(request[principal_key], generator.name)
    try:
        prompt = await app[assistant_key].enhance(body.prompt, generator.name, generator.card.prompt_guide, body.style)
    except ApiError as error:
        _counted(request, "enhance", error.code)
        raise
    if not prompt:
        _counted(request, "enhance", "UPSTREAM_ERROR")
        raise ApiError(502, "UPSTREAM_ERROR", "The chat model answered without a prompt")
    _counted(request, "enhance", "ok")
    return web.json_response({"prompt": prompt})


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.post(base + "/chat", chat),
        web.get(base + "/chat/sessions", list_sessions),
        web.get(base + "/chat/sessions/{session_id}", get_session),
        web.delete(base + "/chat/sessions/{session_id}", delete_session),
        web.post(base + "/analyze-image", analyze_image),
        web.post(base + "/prompt/enhance", enhance_prompt),
    ]
