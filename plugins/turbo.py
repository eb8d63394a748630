"""sdxl-turbo: adversarially distilled SDXL, one to four steps without guidance."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imagine.plugin.demo import DemoModels
from imagine.plugin.generators import Generator, ModelCard, ModelDefaults, ModelExample, ModelLimits
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from imagine_plugins import demo_weights
from imagine_plugins.diffusers_base import DiffusersTable
from imagine_plugins.sdxl import SDXLGenerator

NAME = "sdxl-turbo"
DEFAULT_SOURCE = "stabilityai/sdxl-turbo"
DEMO_FOLDER = "sdxl-turbo"

CARD = ModelCard(
    description="SDXL-Turbo: real-time 512x512 images in 1-4 steps, guidance 0",
    defaults=ModelDefaults(steps=1, guidance=0.0, width=512, height=512, scheduler="euler_a"),
    limits=ModelLimits(min_size=512, max_size=1024, max_steps=4, schedulers=("euler_a", "euler")),
    vram_required="8 GB (float16)",
    inputs=("text", "image", "mask"),
    examples=(ModelExample("Quick sketch", "a pencil sketch of a fox curled up asleep"),),
    prompt_guide=(
        "SDXL-Turbo runs in 1-4 steps without guidance, so negative prompts do nothing: write one short, concrete "
        "sentence (under 40 words) naming the subject, the setting, the medium and the light."
    ),
)


class TurboGenerator(SDXLGenerator):
    def scheduler_config(self, name: str) -> Mapping[str, Any]:
        # Distilled for the last timesteps: spacing must stay "trailing" whatever the sampler.
        return {**self.pipe.scheduler.config, "timestep_spacing": "trailing"}


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    table = settings.models.table(NAME, DiffusersTable)
    register(TurboGenerator(NAME, CARD, table.source or DEFAULT_SOURCE, settings.models, table))


def _build_demo(folder: Path) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**demo_weights.SCHEDULE, timestep_spacing="trailing")
    demo_weights.save_sdxl(folder / DEMO_FOLDER, seed=1, scheduler=scheduler)


def _demo_settings(folder: Path) -> Mapping[str, Mapping[str, Any]]:
    return {"models": {NAME: {"source": str(folder / DEMO_FOLDER)}}}


@hookimpl
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    # One step at 512²: the demo's fastest first request.
    register(DemoModels(NAME, version=2, build=_build_demo, settings=_demo_settings, try_it=NAME))
