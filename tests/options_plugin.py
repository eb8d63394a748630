"""A third-party plugin as pip would install it: a model with a request option, a settings section,
a model table and a demo configuration of its own.

No file of the core names anything here (tests/test_plugin_options.py checks),
so everything reaches the service through the hooks alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field, field_validator

from imagine.plugin.demo import DemoModels
from imagine.errors import field_error
from imagine.plugin.generators import (
    GenerationRequest,
    Generator,
    ModelCard,
    ModelDefaults,
    ModelLimits,
    Options,
    StepCallback,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings, SettingsError
from tests.weightless import WeightlessGenerator

MODEL = "quilt"
OPTION = "patch_count"
SECTION = "quilting"
PALETTE_FILE = "quilt-palette.txt"


@dataclass(frozen=True)
class QuiltingSettings:
    """[quilting]"""

    max_patches: int = 64

    def __post_init__(self) -> None:
        if self.max_patches < 1:
            raise SettingsError("quilting.max_patches must be at least 1")


@dataclass(frozen=True)
class QuiltTable:
    """[models.quilt]: a file of "r,g,b" lines whose colours the patches take in turn."""

    palette: str = ""


class QuiltOptions(Options):
    patch_count: int = Field(2, ge=1, le=256, description="Patches along each side of the image")

    @field_validator(OPTION)
    @classmethod
    def _power_of_two(cls, count: int) -> int:
        if count & (count - 1):
            raise ValueError("must be a power of two")
        return count


class QuiltGenerator(WeightlessGenerator):
    """Draws a checkerboard of `patch_count` x `patch_count` flat patches."""

    name = MODEL
    card = ModelCard(
        description="test: flat patches, as many as the request's patch_count says",
        defaults=ModelDefaults(steps=1, guidance=0.0, width=64, height=64, scheduler="euler"),
        limits=ModelLimits(min_size=8, max_size=256, max_steps=1, schedulers=("euler",)),
        vram_required="none",
    )
    Options = QuiltOptions

    def __init__(self, section: QuiltingSettings, table: QuiltTable) -> None:
        self.max_patches = section.max_patches
        self.palette = table.palette
        self.received: list[int] = []  # the patch_count of every request it drew

    def validate(self, request: GenerationRequest) -> list[dict[str, Any]]:
        options = request.options
        assert isinstance(options, QuiltOptions)
        if options.patch_count > self.max_patches:
            return [field_error(OPTION, f"must be at most {self.max_patches} (quilting.max_patches)")]
        return []

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        colours = [(255, 255, 255), (0, 0, 0)]
        if self.palette:
            colours = [tuple(int(part) for part in line.split(",")) for line in Path(self.palette).read_text().split()]
        images = []
        for request in requests:
            options = request.options
            assert isinstance(options, QuiltOptions)
            self.received.append(options.patch_count)
            image = Image.new("RGB", (request.width, request.height))
            side = max(1, request.width // options.patch_count)
            for x in range(request.width):
                for y in range(request.height):
                    image.putpixel((x, y), colours[(x // side + y // side) % len(colours)])
            images.append([image] * request.num_images)
        return images


@hookimpl
def register_settings(register: Callable[[str, type], None]) -> None:
    register(SECTION, QuiltingSettings)


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    register(QuiltGenerator(settings.section(SECTION, QuiltingSettings), settings.models.table(MODEL, QuiltTable)))


def _build_demo(folder: Path) -> None:
    (folder / PALETTE_FILE).write_text("255,0,0\n0,0,255\n")


def _demo_settings(folder: Path) -> Mapping[str, Mapping[str, Any]]:
    return {"models": {MODEL: {"palette": str(folder / PALETTE_FILE)}}}


@hookimpl
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    register(DemoModels(MODEL, version=1, build=_build_demo, settings=_demo_settings))
