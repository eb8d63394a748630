"""Image to image and inpainting on the four local models, through the device executor (no HTTP).

The demo models load through the real loading code; requests carry an
`ImageInput` as the core prepares it (RGB at the request's size, a feathered
"L" mask). The demo VAE has random weights, so it does not give back the
picture it encodes: "keeps the input" is measured against what the model
itself makes of the input (its VAE's round trip), and by which of input and
seed decides the image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from imagine.engine.memory import NOTHING, ModelMemory
from imagine.engine.registry import ModelRegistry
from imagine.engine.work import GenerationOutput, WorkItem
from imagine.http.png import parameters_text
from imagine.plugin.generators import GenerationRequest, ImageInput, LocalGenerator, LoraWeight
from imagine.plugin.manager import collect_generators, plugin_manager
from imagine.settings import Settings
from imagine_plugins import sdxl
from imagine_plugins.diffusers_base import module_bytes
from tests.conftest import assert_same_image
from tests.test_executor import ExecutorUnderTest, started_executors

LIMIT_S = 60.0
LOCAL_MODELS = ("sdxl", "sdxl-lightning", "sdxl-turbo", "sd15-lora")
SIZE = 64


def picture(inverted: bool = False) -> Image.Image:
    """A colour ramp with a disc: smooth areas and an edge, as a photo has."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(255, 255, 0))
    if inverted:
        image = Image.fromarray(255 - np.asarray(image)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def centre_mask() -> Image.Image:
    """White (repaint) in the middle, feathered as `mask_blur` feathers it."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(2))


def mean_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(int) - second.astype(int)).mean())


class Progress:
    """A job observer that keeps every progress report."""

    wants_steps = True
    wants_preview = True

    def __init__(self) -> None:
        self.reports: list[tuple[int, int]] = []
        self.previews: list[Image.Image] = []

    def queued(self, position: int, eta_s: float) -> None:
        pass

    def started(self) -> None:
        pass

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.reports.append((step, total))
        if preview is not None:
            self.previews.append(preview)


class Device(ExecutorUnderTest):
    """The device executor over the built-in plugins' demo models, as the app builds it."""

    def __init__(self, settings: Settings, batch: int) -> None:
        registry = ModelRegistry(collect_generators(plugin_manager(), settings), settings.models.default)
        super().__init__(registry, capacity=16, batch=batch, preview_every=1)

    def generator(self, model: str) -> LocalGenerator:
        generator = self.registry.as_local(self.registry.resolve(model))
        assert generator is not None
        return generator

    def request(self, model: str = "sdxl", *, image: ImageInput | None = None, **changes: Any) -> GenerationRequest:
        defaults = self.generator(model).card.defaults
        request = GenerationRequest(
            prompt="a lighthouse at dusk",
            negative_prompt="",
            model=model,
            width=SIZE,
            height=SIZE,
            steps=defaults.steps,
            guidance=defaults.guidance,
            num_images=1,
            seed=3,
            scheduler=defaults.scheduler,
            image=image,
        )
        return dataclasses.replace(request, **changes)

    def submit(self, request: GenerationRequest, observer: Progress | None = None) -> WorkItem:
        return self.executor.submit(request, self.registry.resolve(request.model), LIMIT_S, observer=observer, owner="alice")

    async def run(self, request: GenerationRequest, observer: Progress | None = None) -> GenerationOutput:
        return await asyncio.wait_for(self.executor.wait(self.submit(request, observer)), LIMIT_S)

    async def pixels(self, request: GenerationRequest) -> np.ndarray:
        output = await self.run(request)
        assert len(output.images) == 1
        return np.asarray(output.images[0].convert("RGB"))

    async def on_device(self, task: Callable[[], Any]) -> Any:
        return await asyncio.wait_for(self.executor.call(task), LIMIT_S)

    def memory(self, model: str) -> tuple[int, ModelMemory]:
        """What /models and the memory budget see: all models together, and this one."""
        return self.registry.used_bytes(), self.registry.memory()[model]


@pytest.fixture
async def start_device(base_settings: Settings) -> AsyncIterator[Callable[..., Device]]:
    async with started_executors() as start:
        yield lambda batch=1, settings=None: start(Device(settings or base_settings, batch))


def round_trip(generator: Any, image: Image.Image) -> np.ndarray:
    """What the model makes of an image: its VAE's decoding of its encoding (device thread only)."""
    import torch

    pipe = generator.pipe
    with torch.inference_mode():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
        decoded = pipe.vae.decode(latents).sample
    return np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])


# ---- image to image ---------------------------------------------------------


async def test_an_image_request_differs_from_the_text_one_and_from_another_strength(start_device) -> None:
    device = start_device()
    text = await device.pixels(device.request())
    strong = await device.pixels(device.request(image=ImageInput(picture(), 0.75)))
    light = await device.pixels(device.request(image=ImageInput(picture(), 0.4)))
    assert mean_difference(strong, text) > 10
    assert mean_difference(strong, light) > 5


async def test_a_low_strength_keeps_the_input_and_full_strength_ignores_it(start_device) -> None:
    device = start_device()
    # 20 steps at 0.05: diffusers runs int(20 x 0.05) = 1 step, at the lowest noise.
    low = device.request(steps=20, image=ImageInput(picture(), 0.05))
    kept = await device.pixels(low)
    model_view = await device.on_device(lambda: round_trip(device.generator("sdxl"), picture()))
    assert mean_difference(kept, model_view) < 4
    assert mean_difference(kept, await device.pixels(dataclasses.replace(low, seed=4))) < 5
    assert mean_difference(kept, await device.pixels(dataclasses.replace(low, image=ImageInput(picture(inverted=True), 0.05)))) > 20

    full = device.request(steps=20, image=ImageInput(picture(), 1.0))
    made = await device.pixels(full)
    assert mean_difference(made, model_view) > 20
    assert mean_difference(made, await device.pixels(dataclasses.replace(full, image=ImageInput(picture(inverted=True), 1.0)))) < 6
    assert mean_difference(made, await device.pixels(dataclasses.replace(full, seed=4))) > 20


async def test_strength_zero_gives_the_input_back_as_it_is(start_device) -> None:
    device = start_device()
    same = await device.pixels(device.request(image=ImageInput(picture(), 0.0)))
    assert np.array_equal(same, np.asarray(picture()))


async def test_progress_counts_the_steps_an_image_request_really_runs_with_previews(start_device) -> None:
    device = start_device()
    progress = Progress()
    await device.run(device.request(steps=20, image=ImageInput(picture(), 0.5)), progress)
    assert progress.reports == [(step, 10) for step in range(1, 11)]
    assert len(progress.previews) == 10

    # SDXL-Turbo's one step at 0.75 would run none (int(1 x 0.75) = 0): the schedule is lengthened so one runs.
    turbo = Progress()
    output = await device.run(device.request("sdxl-turbo", steps=1, image=ImageInput(picture(), 0.75)), turbo)
    assert turbo.reports == [(1, 1)]
    assert len(output.images) == 1


@pytest.mark.parametrize("model", LOCAL_MODELS)
async def test_every_local_model_takes_an_image_and_a_mask(start_device, model) -> None:
    device = start_device()
    assert device.generator(model).card.inputs == ("text", "image", "mask")
    text = await device.pixels(device.request(model))
    varied = await device.pixels(device.request(model, image=ImageInput(picture(), 0.75)))
    assert mean_difference(varied, text) > 10

    mask = centre_mask()
    repainted = await device.pixels(device.request(model, image=ImageInput(picture(), 0.75, mask)))
    original = np.asarray(picture())
    keep, repaint = np.asarray(mask) == 0, np.asarray(mask) == 255
    assert keep.sum() > 2000 and repaint.sum() > 400
    assert np.array_equal(repainted[keep], original[keep])
    assert mean_difference(repainted[repaint], original[repaint]) > 20


# ---- batches, LoRAs, memory ----------------------------------------------------


async def test_a_batched_image_request_matches_the_same_request_alone(start_device) -> None:
    device = start_device(batch=4)
    requests = [
        device.request(steps=8, image=ImageInput(picture(), 0.6), num_images=2, seed=5),
        device.request(steps=8, image=ImageInput(picture(inverted=True), 0.6), prompt="a fox in the snow", seed=9),
    ]
    masked = ImageInput(picture(), 0.6, centre_mask())
    inpainting = [device.request(steps=8, image=masked, seed=5), device.request(steps=8, image=masked, prompt="a red door", seed=9)]
    alone = [await device.run(request) for request in (*requests, *inpainting)]

    # Held by a control task, the device thread finds each pair queued together.
    gate = threading.Event()
    holding = asyncio.create_task(device.on_device(lambda: gate.wait(LIMIT_S)))
    await asyncio.sleep(0)  # the control task is queued, ahead of what is submitted next
    items = [device.submit(request) for request in (*requests, *inpainting)]
    gate.set()
    await holding
    batched = [await asyncio.wait_for(device.executor.wait(item), LIMIT_S) for item in items]

    # Alone: one call each; then the image pair in one call, the inpainting pair in another.
    assert device.telemetry.sizes == [1, 1, 1, 1, 2, 2]
    for together, by_itself in zip(batched, alone, strict=True):
        assert len(together.images) == len(by_itself.images)
        for first, second in zip(together.images, by_itself.images, strict=True):
            assert_same_image(np.asarray(first), np.asarray(second))
    # Each member got its own input: the two images differ, the inpainted ones keep theirs.
    assert mean_difference(np.asarray(batched[0].images[0]), np.asarray(batched[1].images[0])) > 10
    keep = np.asarray(masked.mask) == 0
    for output in batched[2:]:
        assert np.array_equal(np.asarray(output.images[0])[keep], np.asarray(picture())[keep])


async def test_loras_apply_to_image_requests(start_device) -> None:
    device = start_device()
    lora = (LoraWeight("pixel-art", 1.0),)
    image = ImageInput(picture(), 0.75)
    plain = await device.pixels(device.request("sd15-lora", image=image))
    styled = await device.pixels(device.request("sd15-lora", image=image, loras=lora))
    assert mean_difference(plain, styled) > 5
    assert mean_difference(styled, await device.pixels(device.request("sd15-lora", loras=lora))) > 10

    masked = ImageInput(picture(), 0.75, centre_mask())
    plain = await device.pixels(device.request("sd15-lora", image=masked))
    styled = await device.pixels(device.request("sd15-lora", image=masked, loras=lora))
    repaint = np.asarray(masked.mask) == 255
    assert mean_difference(plain[repaint], styled[repaint]) > 5
    keep = np.asarray(masked.mask) == 0
    assert np.array_equal(styled[keep], np.asarray(picture())[keep])


@pytest.mark.parametrize("model", ["sdxl", "sdxl-lightning"])
async def test_image_requests_cost_no_memory_beyond_the_loaded_weights(start_device, model) -> None:
    device = start_device()
    text = await device.pixels(device.request(model))
    loaded = device.memory(model)
    assert loaded[0] > 0
    varied = await device.pixels(device.request(model, image=ImageInput(picture(), 0.75)))
    await device.pixels(device.request(model, image=ImageInput(picture(), 0.75, centre_mask())))
    assert device.memory(model) == loaded
    assert mean_difference(varied, text) > 10
    # The image pipelines leave the loaded one as it was: text to image gives the same image again.
    assert_same_image(await device.pixels(device.request(model)), text)

    # Unloaded, nothing of the image pipelines stays; loaded again, they are built anew.
    generator = device.generator(model)
    assert await device.on_device(lambda: device.registry.unload(generator))
    assert device.memory(model) == (0, NOTHING)
    again = await device.pixels(device.request(model, image=ImageInput(picture(), 0.75)))
    assert device.memory(model) == loaded
    assert_same_image(again, varied)


def with_inpaint_source(settings: Settings, demo_folder: Path) -> Settings:
    """sdxl with the demo's dedicated inpainting UNet."""
    options = dict(settings.models.options)
    options["sdxl"] = {**options["sdxl"], "inpaint_source": str(demo_folder / sdxl.DEMO_INPAINT_FOLDER)}
    return settings.replace(models={"options": options})


async def test_dedicated_inpainting_weights_serve_masked_requests_and_count_while_held(
    start_device, base_settings, demo_folder
) -> None:
    masked = ImageInput(picture(), 0.75, centre_mask())
    base = start_device()
    base_text = await base.pixels(base.request())
    base_inpainted = await base.pixels(base.request(image=masked))
    await base.executor.stop()

    device = start_device(settings=with_inpaint_source(base_settings, demo_folder))
    assert_same_image(await device.pixels(device.request()), base_text)
    loaded = device.memory("sdxl")
    inpainted = await device.pixels(device.request(image=masked))
    keep, repaint = np.asarray(masked.mask) == 0, np.asarray(masked.mask) == 255
    assert np.array_equal(inpainted[keep], np.asarray(picture())[keep])
    assert mean_difference(inpainted[repaint], base_inpainted[repaint]) > 5

    # Held, the inpainting UNet is counted on top of the loaded weights; text to image is unchanged.
    generator = device.generator("sdxl")
    unet_bytes = await device.on_device(lambda: module_bytes(generator.pipeline_for(masked).unet))
    assert unet_bytes > 0
    assert device.memory("sdxl")[1].counted_bytes == loaded[1].counted_bytes + unet_bytes
    assert device.memory("sdxl")[0] == loaded[0] + unet_bytes
    assert_same_image(await device.pixels(device.request()), base_text)
    # Unloaded, it goes; loaded again for text only, the memory is the base weights' again.
    assert await device.on_device(lambda: device.registry.unload(generator))
    assert device.memory("sdxl") == (0, NOTHING)
    await device.pixels(device.request())
    assert device.memory("sdxl") == loaded


# ---- provenance ---------------------------------------------------------------


def test_the_png_parameters_say_an_input_image_was_used() -> None:
    request = GenerationRequest(
        prompt="a lighthouse",
        negative_prompt="",
        model="sdxl",
        width=SIZE,
        height=SIZE,
        steps=20,
        guidance=7.5,
        num_images=1,
        seed=42,
        scheduler="euler",
        image=ImageInput(picture(), 0.6, centre_mask(), image_hash="1a2b3c4d5e", mask_hash="f6e5d4c3b2"),
    )
    assert parameters_text(request, 42) == (
        "a lighthouse\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: sdxl, "
        "Denoising strength: 0.6, Init image hash: 1a2b3c4d5e, Mask hash: f6e5d4c3b2"
    )
    text_only = dataclasses.replace(request, image=None)
    assert "Denoising strength" not in parameters_text(text_only, 42)
