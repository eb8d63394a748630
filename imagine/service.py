"""One generation from validated request to encoded PNGs: what every generating route shares."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from imagine.auth import Principal
from imagine.executor import GenerationOutput
from imagine.gallery import ImageMetadata
from imagine.generators import GenerationRequest, Generator
from imagine.keys import encode_pool_key, executor_key, gallery_key, settings_key
from imagine.png import encode_png, parameters_text


@dataclass(frozen=True)
class Generated:
    request: GenerationRequest
    generator: Generator
    output: GenerationOutput
    pngs: list[bytes]
    ids: list[str]  # gallery ids; empty when not stored


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


def image_metadata(request: GenerationRequest, output: GenerationOutput, seed: int) -> ImageMetadata:
    """What the gallery keeps about one image of a generation."""
    return ImageMetadata(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        model=request.model,
        seed=seed,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
        loras=tuple((lora.name, lora.weight) for lora in request.loras),
        generation_time=round(output.generation_time, 3),
        vram_used=output.vram_used,
    )


async def generate(
    app: web.Application, principal: Principal, request: GenerationRequest, generator: Generator, *, store: bool
) -> Generated:
    """Generate, encode and (unless `store` is False) keep the images in the caller's gallery."""
    output = await run_generation(app, request, generator)
    pngs = await encode_images(app, request, output)
    ids: list[str] = []
    if store:
        images = [(png, image_metadata(request, output, seed)) for png, seed in zip(pngs, output.seeds, strict=True)]
        ids = await app[gallery_key].add(principal.sub, images)
    return Generated(request, generator, output, pngs, ids=ids)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def result_json(generated: Generated) -> dict[str, Any]:
    """The JSON result of /generate, also used inside batch results."""
    request, output = generated.request, generated.output
    runtime = output.runtime
    return {
        "images": [data_url(png) for png in generated.pngs],
        "ids": generated.ids,
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
            "base_model": generated.generator.card.extra.get("base_model", generated.generator.name),
            "lora_applied": bool(request.loras),
            "device": runtime.get("device"),
            "dtype": runtime.get("dtype"),
        },
    }
