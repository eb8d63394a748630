"""POST /generate-image (seed 004): one SDXL image as base64 inside a JSON object."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from imagine.http import generation
from imagine.security.tokens import requires
from imagine.http.app_keys import principal_key
from imagine.http.front_door import admit
from imagine.http.openapi import json_response, obj, operation
from imagine.http.request_bodies import MAX_SEED, Prompt, parse_body, read_json
from imagine.http.views.generate import GENERATION_ERRORS

MODEL = "sdxl"


class GenerateImageBody(BaseModel):
    """Seed 004's body and ranges; the prompt's own rules are /generate's (not blank is checked next)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: str = ""
    steps: int = Field(30, ge=10, le=100)
    guidance: float = Field(7.5, ge=1.0, le=20.0, allow_inf_nan=False)
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED)


GENERATED = obj(
    {
        "success": {"const": True},
        "image_base64": {"type": "string", "contentEncoding": "base64", "description": "The PNG, plain base64"},
        "message": {"type": "string", "examples": ["Image generated successfully! Seed: 12345"]},
        "seed": {"type": "integer"},
    }
)


@requires("generate")
@operation(
    "Generate one SDXL image as base64 JSON (seed 004)",
    tags=["generation"],
    description=f"Always on `{MODEL}` at its default size, and always kept in the gallery.",
    body=GenerateImageBody,
    responses={
        200: json_response("The image (`X-Image-Id` is its gallery id)", GENERATED, headers=["X-Image-Id"]),
        # No content negotiation here: the answer is always JSON.
        **{status: answer for status, answer in GENERATION_ERRORS.items() if status != 406},
    },
)
async def generate_image(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    seed004 = parse_body(GenerateImageBody, await read_json(request))
    # The same fields as /generate under the same names, so its errors read the same.
    admitted = await admit(app, principal, {**seed004.model_dump(), "model": MODEL})
    generated = await generation.generate(app, principal, admitted.request, admitted.generator, store=True)
    seed = generated.output.seeds[0]
    image_base64 = await asyncio.to_thread(lambda: base64.b64encode(generated.pngs[0]).decode("ascii"))
    return web.json_response(
        {
            "success": True,
            "image_base64": image_base64,
            "message": f"Image generated successfully! Seed: {seed}",
            "seed": seed,
        },
        headers={"X-Image-Id": generated.ids[0]},
    )


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate-image", generate_image)]
