"""One generation from validated request to encoded PNGs: what every generating route shares.

`generate` is the routes' way in: the app's job store (`jobs_key`) decides where
a generation runs, here or on whichever replica's device is free.
`submit_here` runs it in this process: it queues the work at once and hands
back the coroutine that finishes it, whichever kind of generator runs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any

from aiohttp import web

from imagine.security.tokens import Principal
from imagine.engine.work import Generated, GenerationOutput, JobObserver, timeout_error
from imagine.storage.gallery import ImageMetadata
from imagine.plugin.generators import CloudGenerator, GenerationRequest, Generator
from imagine.http.app_keys import (
    encode_pool_key,
    executor_key,
    gallery_key,
    jobs_key,
    metrics_key,
    png_encoder_key,
    settings_key,
)
from imagine.engine.telemetry import Telemetry


def server_timing(timings: Mapping[str, float]) -> str:
    """Where the time went, as a Server-Timing header (milliseconds) that browsers' tools display."""
    return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in timings.items())


async def generate(
    app: web.Application, principal: Principal, request: GenerationRequest, generator: Generator, *, store: bool
) -> Generated:
    """Run a generation to its end, wherever the job store runs it, and keep its images unless `store` is False."""
    work = await app[jobs_key].submit_generation(principal, request, generator, store=store)
    return await work


def submit_here(
    app: web.Application,
    principal: Principal,
    request: GenerationRequest,
    generator: Generator,
    store: bool,
    observer: JobObserver | None = None,
) -> Coroutine[Any, Any, Generated]:
    """Queue a generation in this process now, so a full queue is refused at once (503); the returned
    coroutine finishes it: awaits the images, encodes them and keeps them in the caller's gallery
    unless `store` is False."""
    return finish(app, principal, request, generator, _run(app, principal, request, generator, observer), store)


def _run(
    app: web.Application,
    principal: Principal,
    request: GenerationRequest,
    generator: Generator,
    observer: JobObserver | None,
) -> Coroutine[Any, Any, GenerationOutput]:
    """Local work is queued on the device executor now; a cloud call only starts when awaited, on the loop."""
    timeout_s = app[settings_key].queue.timeout_s
    if isinstance(generator, CloudGenerator):
        return _run_remote(request, generator, timeout_s, observer, app[metrics_key])
    executor = app[executor_key]
    job = executor.submit(request, generator, timeout_s, observer, owner=principal.sub)
    return executor.wait(job)


def _unobserved() -> None:
    """The start of a cloud call nobody follows."""


async def _run_remote(
    request: GenerationRequest,
    generator: CloudGenerator,
    timeout_s: float,
    observer: JobObserver | None,
    telemetry: Telemetry,
) -> GenerationOutput:
    """A cloud call waits on the network, not the device: await it here, so the GPU queue keeps moving."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            remote = await generator.generate_remote(request, observer.started if observer is not None else _unobserved)
    except TimeoutError:
        raise timeout_error(timeout_s) from None
    elapsed = time.perf_counter() - started
    telemetry.generated(generator.name, elapsed - remote.queue_time, len(remote.images))
    telemetry.credits_spent(generator.name, remote.credits)
    return GenerationOutput(
        images=remote.images,
        seeds=remote.seeds,
        generation_time=elapsed - remote.queue_time,
        queue_time=remote.queue_time,
        vram_used=0.0,
        runtime=generator.runtime_info(),
    )


async def encode_images(app: web.Application, request: GenerationRequest, output: GenerationOutput) -> list[bytes]:
    """The PNGs the device thread encoded, or encoded now on the CPU pool, so neither the loop nor the
    device thread waits for deflate."""
    if output.pngs is not None:
        return output.pngs
    loop = asyncio.get_running_loop()
    encode = app[png_encoder_key].encode_for
    return await asyncio.gather(
        *(
            loop.run_in_executor(app[encode_pool_key], encode, request, image, seed)
            for image, seed in zip(output.images, output.seeds, strict=True)
        )
    )


def image_metadata(request: GenerationRequest, output: GenerationOutput, seed: int) -> ImageMetadata:
    """What the gallery keeps about one image of a generation."""
    image = request.image
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
        strength=None if image is None else image.strength,
        image_hash=None if image is None else image.image_hash,
        mask_hash=None if image is None else image.mask_hash or None,
    )


async def finish(
    app: web.Application,
    principal: Principal,
    request: GenerationRequest,
    generator: Generator,
    running: Awaitable[GenerationOutput],
    store: bool,
) -> Generated:
    """Await the images `running` makes, encode them, and store them in the caller's gallery with `store`."""
    output = await running
    encoding = time.perf_counter()
    pngs = await encode_images(app, request, output)
    storing = time.perf_counter()
    ids: list[str] = []
    if store:
        images = [(png, image_metadata(request, output, seed)) for png, seed in zip(pngs, output.seeds, strict=True)]
        ids = await app[gallery_key].add(principal.sub, images)
    return Generated(
        request,
        generator,
        output,
        pngs,
        ids=ids,
        encode_time=output.encode_time if output.pngs is not None else storing - encoding,
        store_time=time.perf_counter() - storing,
    )
