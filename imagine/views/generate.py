"""POST /generate: one generation, answered as PNG bytes or JSON."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from imagine import service
from imagine.auth import check_model_grant, requires
from imagine.errors import field_error, validation_error
from imagine.keys import encode_pool_key, principal_key, registry_key
from imagine.negotiation import choose_format
from imagine.schemas import parse_generate_body, read_json, resolve_request
from imagine.service import server_timing


@requires("generate")
async def generate(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    started = time.perf_counter()
    body = parse_generate_body(await read_json(request))
    response_format = choose_format(body.response_format, request.headers.get("Accept"))
    generator = app[registry_key].resolve(body.model)
    check_model_grant(principal, generator.name)
    generation = resolve_request(body, generator)
    if response_format == "png" and generation.num_images > 1:
        raise validation_error(
            [field_error("num_images", 'a PNG response holds one image: send "response_format": "json" for several')]
        )
    timings = {"validate": time.perf_counter() - started}
    generated = await service.generate(app, principal, generation, generator, store=body.store)
    timings |= generated.timings()
    if response_format == "json":
        # Megabytes of base64: build and serialise them off the loop as well.
        serializing = time.perf_counter()
        payload = await asyncio.get_running_loop().run_in_executor(
            app[encode_pool_key], lambda: json.dumps(service.result_json(generated)).encode()
        )
        timings["serialize"] = time.perf_counter() - serializing
        return web.Response(body=payload, content_type="application/json", headers={"Server-Timing": server_timing(timings)})
    seed = generated.output.seeds[0]
    headers = {
        "X-Seed": str(seed),
        "X-Model": generation.model,
        "X-Generation-Time": f"{generated.output.generation_time:.3f}",
        "Server-Timing": server_timing(timings),
        "Content-Disposition": f'inline; filename="{generated.ids[0] if generated.ids else f"{generation.model}-{seed}"}.png"',
    }
    if generated.ids:
        headers["X-Image-Id"] = generated.ids[0]
    return web.Response(body=generated.pngs[0], content_type="image/png", headers=headers)


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate", generate)]
