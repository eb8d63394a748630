"""POST /generate: one generation, answered as PNG bytes or JSON."""

from __future__ import annotations

import time

from aiohttp import web

from imagine.http import generation
from imagine.security.tokens import requires
from imagine.errors import field_error, validation_error
from imagine.http.json_answers import json_bytes
from imagine.http.app_keys import principal_key, queue_wait_key
from imagine.http.front_door import admit
from imagine.http.generation_result import GenerationResult
from imagine.http.negotiation import ResponseFormat, choose_format
from imagine.http.openapi import content_response, error_response, operation
from imagine.http.request_bodies import GENERATE_BODY, GenerateBody, read_json
from imagine.http.generation import server_timing

# What every generating route can fail with, beside the validation and auth errors.
GENERATION_ERRORS = {
    400: error_response("Invalid body (`details.errors` lists each field)"),
    404: error_response("Unknown model (MODEL_NOT_AVAILABLE), or a `gallery:<id>` input not the caller's (NOT_FOUND)"),
    406: error_response("`Accept` names neither PNG nor JSON"),
    413: error_response("Body larger than server.max_body_bytes"),
    502: error_response("A cloud backend failed"),
    503: error_response("Queue full, model unavailable or out of memory (with `Retry-After`)"),
    504: error_response("Not done within queue.timeout_s"),
}


@requires("generate")
@operation(
    "Generate images",
    tags=["generation"],
    description="PNG bytes of the first image by default (`curl --output`), JSON with every image when "
    '`"response_format": "json"` or `Accept: application/json`. `steps` and `guidance` are accepted for '
    "`num_inference_steps` and `guidance_scale`.",
    body=GENERATE_BODY,
    responses={
        200: content_response(
            "The image (`X-Seed`, `X-Model`, `X-Generation-Time`, `Content-Disposition`), or every image as JSON",
            {"image/png": {"type": "string", "contentMediaType": "image/png"}, "application/json": GenerationResult},
        ),
        **GENERATION_ERRORS,
    },
)
async def generate(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    started = time.perf_counter()
    accept = request.headers.get("Accept")

    def negotiate(body: GenerateBody) -> ResponseFormat:
        return choose_format(body.response_format, accept)

    # Negotiated before the model is looked up, as it always was: an Accept we cannot answer is the first error.
    admitted = await admit(app, principal, await read_json(request), check_body=negotiate)
    response_format = negotiate(admitted.body)
    wanted = admitted.request
    if response_format == "png" and wanted.num_images > 1:
        raise validation_error(
            [field_error("num_images", 'a PNG response holds one image: send "response_format": "json" for several')]
        )
    timings = {"validate": time.perf_counter() - started}
    generated = await generation.generate(app, principal, wanted, admitted.generator, store=admitted.body.store)
    timings |= generated.timings()
    request[queue_wait_key] = generated.output.queue_time
    if response_format == "json":
        # Megabytes of base64: build and serialise them off the loop as well.
        serializing = time.perf_counter()
        payload = await json_bytes(app, lambda: GenerationResult.of(generated).model_dump())
        timings["serialize"] = time.perf_counter() - serializing
        return web.Response(body=payload, content_type="application/json", headers={"Server-Timing": server_timing(timings)})
    seed = generated.output.seeds[0]
    headers = {
        "X-Seed": str(seed),
        "X-Model": wanted.model,
        "X-Generation-Time": f"{generated.output.generation_time:.3f}",
        "Server-Timing": server_timing(timings),
        "Content-Disposition": f'inline; filename="{generated.ids[0] if generated.ids else f"{wanted.model}-{seed}"}.png"',
    }
    if generated.ids:
        headers["X-Image-Id"] = generated.ids[0]
    return web.Response(body=generated.pngs[0], content_type="image/png", headers=headers)


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate", generate)]
