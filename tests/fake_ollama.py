"""A fake Ollama server: POST /api/chat (NDJSON streaming by default, or one JSON object) and GET /api/tags.

It speaks Ollama's documented shapes: chat parts `{"model", "created_at",
"message": {"role", "content"}, "done"}` with the last part carrying
`done_reason`, `prompt_eval_count` and `eval_count`; errors as `{"error"}`
with Ollama's statuses (404 for a model it does not have); images as base64
in a message's `images`, which it decodes (a vision model only). Its answers
are a function of the conversation, so tests can tell what it was sent:
- a message with an image: the image's size and main colour, and the question;
- a request whose system prompt asks for a text-to-image prompt: a prompt
  built from the idea and style, wrapped as chat models wrap them;
- anything else: the last message echoed, with how many earlier messages it saw.
`options.num_predict` cuts the answer to that many tokens (words).
Slow and failing modes are the attributes below; what it saw is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

CREATED_AT = "2025-01-01T00:00:00.000000Z"
_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def tokens(text: str) -> list[str]:
    """Words with their trailing spaces: joined again they are the text."""
    return re.findall(r"\S+\s*", text)


@dataclass
class FakeOllama:
    models: list[str] = field(default_factory=lambda: ["llama3.2:latest", "llava:latest"])
    vision_models: tuple[str, ...] = ("llava:latest",)
    # A bearer token every request must carry; None: none needed.
    token: str | None = None
    # Seconds before the answer starts (a model loading), and between streamed tokens.
    answer_delay_s: float = 0.0
    token_delay_s: float = 0.0
    # (status, message) answered to every chat instead.
    chat_error: tuple[int, str] | None = None
    # A streamed answer fails after this many tokens with an in-stream error line.
    fail_after_tokens: int | None = None
    # A server that does not speak Ollama's protocol: this JSON answered to every chat (as the whole
    # body, or as the line after the first streamed token).
    garbage: Any = None

    # What it saw.
    chats: list[dict[str, Any]] = field(default_factory=list)
    tags_requests: int = 0
    authorizations: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/api/chat", self._chat)
        app.router.add_get("/api/tags", self._tags)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sent = request.headers.get("Authorization")
        self.authorizations.append(sent)
        if self.token is not None and sent != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    def _has(self, name: str, names: Any) -> bool:
        tagged = name if ":" in name else f"{name}:latest"
        return tagged in names

    async def _tags(self, request: web.Request) -> web.Response:
        self.tags_requests += 1
        listed = [
            {
                "name": name,
                "model": name,
                "modified_at": CREATED_AT,
                "size": 2_019_393_189,
                "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
                "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
            }
            for name in self.models
        ]
        return web.json_response({"models": listed})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.chats.append(body)
        model = body.get("model", "")
        if not self._has(model, self.models):
            return web.json_response({"error": f'model "{model}" not found, try pulling it first'}, status=404)
        if self.chat_error is not None:
            status, message = self.chat_error
            return web.json_response({"error": message}, status=status)
        if self.garbage is not None and body.get("stream") is False:
            return web.json_response(self.garbage)
        messages = body.get("messages") or []
        images = [image for message in messages for image in message.get("images") or []]
        if images and not self._has(model, self.vision_models):
            return web.json_response({"error": "this model is missing data required for image input"}, status=500)
        try:
            text = self._answer(messages)
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)
        limit = (body.get("options") or {}).get("num_predict")
        pieces = tokens(text)[:limit] if isinstance(limit, int) and limit > 0 else tokens(text)
        prompt_count = sum(len(tokens(message.get("content", ""))) for message in messages)
        await asyncio.sleep(self.answer_delay_s)
        final = {
            "model": model,
            "created_at": CREATED_AT,
            "done": True,
            "done_reason": "stop",
            "total_duration": 1_000_000,
            "load_duration": 1000,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": 1000,
            "eval_count": len(pieces),
            "eval_duration": 1000,
        }
        if body.get("stream") is False:
            return web.json_response({**final, "message": {"role": "assistant", "content": "".join(pieces)}})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for number, piece in enumerate(pieces):
            if self.fail_after_tokens is not None and number == self.fail_after_tokens:
                await response.write(json.dumps({"error": "an error was encountered while running the model"}).encode() + b"\n")
                await response.write_eof()
                return response
            part = {"model": model, "created_at": CREATED_AT, "message": {"role": "assistant", "content": piece}, "done": False}
            await response.write(json.dumps(part).encode() + b"\n")
            if self.garbage is not None:
                await response.write(json.dumps(self.garbage).encode() + b"\n")
                await response.write_eof()
                return response
            await asyncio.sleep(self.token_delay_s)
        await response.write(json.dumps({**final, "message": {"role": "assistant", "content": ""}}).encode() + b"\n")
        await response.write_eof()
        return response

    def _answer(self, messages: list[dict[str, Any]]) -> str:
        last = messages[-1] if messages else {"content": ""}
        question = last.get("content", "")
        if last.get("images"):
            return f"{describe(last['images'][0])} You asked: {question}"
        system = next((message["content"] for message in messages if message.get("role") == "system"), "")
        if "text-to-image" in system:
            idea = re.search(r"Idea: (.*)", question).group(1)
            style = re.search(r"Style: (.*)", question)
            styled = f", in {style.group(1)} style" if style else ""
            return f'Here is your prompt:\n"{idea}{styled}, intricate detail, soft golden light, wide shot"'
        earlier = sum(1 for message in messages[:-1] if message.get("role") in ("user", "assistant"))
        return f"You said: {question} I remember {earlier} earlier messages."


def describe(image_base64: str) -> str:
    try:
        data = base64.b64decode(image_base64, validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, OSError, ValueError):
        raise ValueError("invalid image input") from None
    mean = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0)
    colour = min(_COLOURS, key=lambda name: float(np.sum((mean - np.array(_COLOURS[name])) ** 2)))
    return f"A {image.width}x{image.height} {image.format} image, mostly {colour}."
