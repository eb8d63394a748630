"""POST /generate: one generation, answered as PNG bytes or JSON."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from imagine.engine import generation
from imagine.security.tokens import check_model_grant, requires
from imagine.errors import field_error, validation_error
from imagine.http.app_keys import encode_pool_key, principal_key, queue_wait_key, registry_key
from imagine.http.negotiation import choose_format
from imagine.http.openapi import Component, content_response, error_response, obj, operation
from imagine.http.request_bodies import GenerateBody, parse_generate_body, read_json, resolve_request
from imagine.engine.generation import server_timing

NULLABLE_STRING = {"type": ["string", "null"]}

GENERATION_RESULT = Component(
    "GenerationResult",
    obj(
        {
            "images": {"type": "array", "items": {"type": "string", "description": "data:image/png;base64,..."}},
            "ids": {"type": "array", "items": {"type": "string"}, "description": "Gallery ids (empty when not stored)"},
            "seed": {"type": "integer"},
            "seeds": {"type": "array", "items": {"type": "integer"}},
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "negative_prompt": {"type": "string"},
            "generation_time": {"type": "number"},
            "queue_time": {"type": "number"},
            "vram_used": {"type": "number", "description": "GB at the peak of the run; 0.0 without a GPU"},
            "parameters": obj(
                {
                    "num_inference_steps": {"type": "integer"},
                    "guidance_scale": {"type": "number"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "scheduler": {"type": "string"},
                    "loras": {
                        "type": "array",
                        "items": obj({"name": {"type": "string"}, "weight": {"type": "number"}}),
                    },
                }
            ),
            "model_info": obj(
                {
                    "base_model": {"type": "string"},
                    "lora_applied": {"type": "boolean"},
                    "device": NULLABLE_STRING,
                    "dtype": NULLABLE_STRING,
                }
            ),
        }
    ),
)

# What every generating route can fail with, beside the validation and auth errors.
GENERATION_ERRORS = {
    400: error_response("Invalid body (`details.errors` lists each field)"),
    404: error_response("Unknown model (MODEL_NOT_AVAILABLE)"),
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
    body=GenerateBody,
    responses={
        200: content_response(
            "The image (`X-Seed`, `X-Model`, `X-Generation-Time`, `Content-Disposition`), or every image as JSON",
            {"image/png": {"type": "string", "contentMediaType": "image/png"}, "application/json": GENERATION_RESULT},
        ),
        **GENERATION_ERRORS,
    },
)
async def generate(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    started = time.perf_counter()
    body = parse_generate_body(await read_json(request))
    response_format = choose_format(body.response_format, request.headers.get("Accept"))
    generator = app[registry_key].resolve(body.model)
    check_model_grant(principal, generator.name)
    wanted = resolve_request(body, generator)
    if response_format == "png" and wanted.num_images > 1:
        raise validation_error(
            [field_error("num_images", 'a PNG response holds one image: send "response_format": "json" for several')]
        )
    timings = {"validate": time.perf_counter() - started}
    generated = await generation.generate(app, principal, wanted, generator, store=body.store)
    timings |= generated.timings()
    request[queue_wait_key] = generated.output.queue_time
    if response_format == "json":
        # Megabytes of base64: build and serialise them off the loop as well.
        serializing = time.perf_counter()
        payload = await asyncio.get_running_loop().run_in_executor(
            app[encode_pool_key], lambda: json.dumps(generation.result_json(generated)).encode()
        )
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
