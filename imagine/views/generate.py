"""POST /generate: one generation, answered as PNG bytes or JSON."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from imagine.auth import check_model_grant, requires
from imagine.errors import field_error, validation_error
from imagine.executor import GenerationOutput
from imagine.generators import GenerationRequest, Generator
from imagine.keys import encode_pool_key, executor_key, principal_key, registry_key, settings_key
from imagine.negotiation import choose_format
from imagine.png import encode_png, parameters_text
from imagine.schemas import parse_generate_body, read_json, resolve_request


async def run_generation(app: web.Application, request: GenerationRequest, generator: Generator) -> GenerationOutput:
    executor = app[executor_key]
    job = executor.submit(request, generator, app[settings_key].queue.timeout_s)
    return await executor.wait(job)


async def encode_images(app: web.Application, request: GenerationRequest, output: GenerationOutput) -> list[bytes]:
    """PNG-encode on the CPU pool, so neither the loop nor the device thread waits for zlib."""
    loop = asyncio.get_running_loop()
    level = app[settings_key].output.png_compress_level
    return await asyncio.gather(
        *(
            loop.run_in_executor(app[encode_pool_key], encode_png, image, parameters_text(request, seed), level)
            for image, seed in zip(output.images, output.seeds, strict=True)
        )
    )


def result_json(request: GenerationRequest, generator: Generator, output: GenerationOutput, pngs: list[bytes]) -> dict[str, Any]:
    runtime = output.runtime
    return {
        "images": ["data:image/png;base64," + base64.b64encode(png).decode("ascii") for png in pngs],
        "ids": [],
        "seed": output.seeds[0],
        "seeds": output.seeds,
        "model": request.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "generation_time": round(output.generation_time, 3),
        "queue_time": round(output.queue_time, 3),
        "vram_used": output.vram_used,
        "parameters": {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "width": request.width,
            "height": request.height,
            "scheduler": request.scheduler,
            "loras": [{"name": lora.name, "weight": lora.weight} for lora in request.loras],
        },
        "model_info": {
            "base_model": generator.card.extra.get("base_model", generator.name),
            "lora_applied": bool(request.loras),
            "device": runtime.get("device"),
            "dtype": runtime.get("dtype"),
        },
    }


@requires("generate")
async def generate(request: web.Request) -> web.Response:
    app = request.app
    body = parse_generate_body(await read_json(request))
    response_format = choose_format(body.response_format, request.headers.get("Accept"))
    generator = app[registry_key].resolve(body.model)
    check_model_grant(request[principal_key], generator.name)
    generation = resolve_request(body, generator)
    if response_format == "png" and generation.num_images > 1:
        raise validation_error(
            [field_error("num_images", 'a PNG response holds one image: send "response_format": "json" for several')]
        )
    output = await run_generation(app, generation, generator)
    pngs = await encode_images(app, generation, output)
    if response_format == "json":
        # Megabytes of base64: build and serialise them off the loop as well.
        payload = await asyncio.get_running_loop().run_in_executor(
            app[encode_pool_key], lambda: json.dumps(result_json(generation, generator, output, pngs)).encode()
        )
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=pngs[0],
        content_type="image/png",
        headers={
            "X-Seed": str(output.seeds[0]),
            "X-Model": generation.model,
            "X-Generation-Time": f"{output.generation_time:.3f}",
            "Content-Disposition": f'inline; filename="{generation.model}-{output.seeds[0]}.png"',
        },
    )


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate", generate)]
