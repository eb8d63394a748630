"""A fake Leonardo.ai: REST API v1 (POST /generations, GET and DELETE /generations/{id}) and its image CDN.

It speaks the documented shapes: `{"sdGenerationJob": {"generationId",
"apiCreditCost"}}`, `{"generations_by_pk": {"status", "generated_images": [{"url"}], "seed"}}`,
errors as `{"error", "path", "code"}`. It checks the bearer key on the API routes,
serves real JPEG bytes from its CDN route, and records what it saw; each test
sets the behaviour it needs through the attributes below.
"""

from __future__ import annotations

import asyncio
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

API_PREFIX = "/api/rest/v1"


def gradient(width: int, height: int) -> Image.Image:
    """A smooth test picture: JPEG keeps it close, so pixels can be compared."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    shape = (height, width)
    pixels = np.stack([np.broadcast_to(x, shape), np.broadcast_to(y, shape), np.full(shape, 96.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@dataclass
class Generation:
    request: dict[str, Any]
    seed: int
    polls: int = 0
    status: str = "PENDING"


@dataclass
class FakeLeonardo:
    api_key: str
    # Polls answered PENDING (with an empty generated_images) before the outcome.
    pending_polls: int = 2
    outcome: str = "COMPLETE"  # or "FAILED"
    # POSTs answered 429 before one is accepted.
    rate_limited_posts: int = 0
    # While set and not yet released, every poll answers PENDING: a slow upstream.
    hold: asyncio.Event | None = None
    # (status, body) answered to every POST instead of a job.
    post_error: tuple[int, dict[str, Any]] | None = None

    # What it saw.
    posts: list[dict[str, Any]] = field(default_factory=list)
    post_attempts: int = 0
    generations: dict[str, Generation] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)  # generation ids, in the order DELETE removed them
    cdn_request_headers: list[dict[str, str]] = field(default_factory=list)
    max_in_flight: int = 0
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(API_PREFIX + "/generations", self._create)
        app.router.add_get(API_PREFIX + "/generations/{id}", self._get)
        app.router.add_delete(API_PREFIX + "/generations/{id}", self._delete)
        app.router.add_get("/cdn/{id}/{index}.jpg", self._cdn)
        return app

    def jpeg_for(self, generation_id: str) -> bytes:
        request = self.generations[generation_id].request
        return jpeg_bytes(gradient(request.get("width", 1024), request.get("height", 1024)))

    @property
    def in_flight(self) -> int:
        return sum(1 for generation in self.generations.values() if generation.status == "PENDING")

    def _refused(self, request: web.Request) -> web.Response | None:
        presented = request.headers.get("authorization", "")
        if presented == f"Bearer {self.api_key}":
            return None
        # A careless upstream that echoes what it was sent: imagine must never pass the key on.
        return web.json_response(
            {"error": f"Invalid API key: {presented.removeprefix('Bearer ')}", "path": "$", "code": "access-denied"},
            status=401,
        )

    async def _create(self, request: web.Request) -> web.Response:
        if (refusal := self._refused(request)) is not None:
            return refusal
        self.post_attempts += 1
        if self.post_error is not None:
            status, body = self.post_error
            return web.json_response(body, status=status)
        if self.rate_limited_posts > 0:
            self.rate_limited_posts -= 1
            return web.json_response(
                {"error": "rate limit exceeded", "path": "$", "code": "rate-limit"}, status=429, headers={"Retry-After": "0"}
            )
        body = await request.json()
        self.posts.append(body)
        generation_id = f"0000-gen-{next(self._ids)}"
        self.generations[generation_id] = Generation(body, seed=body.get("seed", 123456789))
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return web.json_response({"sdGenerationJob": {"generationId": generation_id, "apiCreditCost": 8}})

    async def _delete(self, request: web.Request) -> web.Response:
        if (refusal := self._refused(request)) is not None:
            return refusal
        generation_id = request.match_info["id"]
        generation = self.generations.get(generation_id)
        if generation is None:
            return web.json_response({"delete_generations_by_pk": None})
        generation.status = "DELETED"  # no longer in flight, nor in the account's library
        self.deleted.append(generation_id)
        return web.json_response({"delete_generations_by_pk": {"id": generation_id}})

    async def _get(self, request: web.Request) -> web.Response:
        if (refusal := self._refused(request)) is not None:
            return refusal
        generation_id = request.match_info["id"]
        generation = self.generations.get(generation_id)
        if generation is None:
            return web.json_response({"generations_by_pk": None})
        generation.polls += 1
        held = self.hold is not None and not self.hold.is_set()
        if not held and generation.polls > self.pending_polls:
            generation.status = self.outcome
        images = []
        if generation.status == "COMPLETE":
            cdn = request.url.origin()
            images = [
                {"id": f"img-{index}", "url": str(cdn.with_path(f"/cdn/{generation_id}/{index}.jpg")), "nsfw": False}
                for index in range(generation.request.get("num_images", 1))
            ]
        body = generation.request
        return web.json_response(
            {
                "generations_by_pk": {
                    "id": generation_id,
                    "status": generation.status,
                    "generated_images": images,
                    "seed": generation.seed,
                    "modelId": body.get("modelId"),
                    "prompt": body.get("prompt"),
                    "negativePrompt": body.get("negative_prompt", ""),
                    "imageWidth": body.get("width"),
                    "imageHeight": body.get("height"),
                    "inferenceSteps": body.get("num_inference_steps"),
                    "guidanceScale": body.get("guidance_scale"),
                    "presetStyle": body.get("presetStyle"),
                    "public": False,
                }
            }
        )

    async def _cdn(self, request: web.Request) -> web.Response:
        self.cdn_request_headers.append(dict(request.headers))
        if request.match_info["id"] not in self.generations:
            raise web.HTTPNotFound()
        return web.Response(body=self.jpeg_for(request.match_info["id"]), content_type="image/jpeg")
