"""sdxl-turbo: adversarially distilled SDXL, one to four steps without guidance."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from imagine.plugin.generators import Generator, ModelCard, ModelDefaults, ModelLimits
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from imagine_plugins.sdxl import SDXLGenerator

DEFAULT_SOURCE = "stabilityai/sdxl-turbo"

CARD = ModelCard(
    description="SDXL-Turbo: real-time 512x512 images in 1-4 steps, guidance 0",
    defaults=ModelDefaults(steps=1, guidance=0.0, width=512, height=512, scheduler="euler_a"),
    limits=ModelLimits(min_size=512, max_size=1024, max_steps=4, schedulers=("euler_a", "euler")),
    vram_required="8 GB (float16)",
)


class TurboGenerator(SDXLGenerator):
    def scheduler_config(self, name: str) -> Mapping[str, Any]:
        # Distilled for the last timesteps: spacing must stay "trailing" whatever the sampler.
        return {**self.pipe.scheduler.config, "timestep_spacing": "trailing"}


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    source = settings.models.model_options("sdxl-turbo").get("source", DEFAULT_SOURCE)
    register(TurboGenerator("sdxl-turbo", CARD, source, settings.models))
