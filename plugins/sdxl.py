"""sdxl: Stable Diffusion XL base 1.0."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imagine.plugin.demo import DemoModels
from imagine.plugin.generators import Generator, ModelCard, ModelDefaults, ModelExample, ModelLimits
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from imagine_plugins import demo_weights
from imagine_plugins.schedulers import COMMON
from imagine_plugins.diffusers_base import DiffusersGenerator, DiffusersTable
from imagine_plugins.full_size_sdxl import build_full_size_sdxl

NAME = "sdxl"
DEFAULT_SOURCE = "stabilityai/stable-diffusion-xl-base-1.0"
# Where the demo pipeline goes in the demo folder.
DEMO_FOLDER = "sdxl"
# A tiny inpainting UNet for `inpaint_source`; the demo settings leave it unset.
DEMO_INPAINT_FOLDER = "sdxl-inpaint"

CARD = ModelCard(
    description="Stable Diffusion XL 1.0 base: high quality at 1024x1024, 20+ steps",
    defaults=ModelDefaults(steps=20, guidance=7.5, width=1024, height=1024, scheduler="euler"),
    limits=ModelLimits(min_size=512, max_size=1024, max_steps=100, schedulers=COMMON),
    vram_required="8-10 GB (float16)",
    aliases=("stable-diffusion-xl",),
    inputs=("text", "image", "mask"),
    examples=(ModelExample("Lighthouse", "a lighthouse at dusk, dramatic clouds, oil painting", "blurry, low quality"),),
    prompt_guide=(
        "SDXL understands natural language and comma-separated phrases alike: name the subject first, then the "
        "setting, composition, medium or art style, lighting, colour palette and mood; add a camera or lens for "
        "photographs. About 40-75 words; no negative terms in the prompt itself."
    ),
)


class SDXLGenerator(DiffusersGenerator):
    pipeline_class = "StableDiffusionXLPipeline"
    # The SDXL family keeps its base's text encoders and VAE: models loaded from
    # the same base weights (sdxl and sdxl-lightning) hold one copy of them.
    shared_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


def source(settings: Settings) -> str:
    """The weights sdxl loads: what its table names, else the published base."""
    return settings.models.table(NAME, DiffusersTable).source or DEFAULT_SOURCE


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    register(SDXLGenerator(NAME, CARD, source(settings), settings.models, settings.models.table(NAME, DiffusersTable)))


def _build_demo(folder: Path) -> None:
    demo_weights.save_sdxl(folder / DEMO_FOLDER, seed=0, scheduler=demo_weights.sdxl_base_scheduler())
    demo_weights.save_sdxl_inpaint_unet(folder / DEMO_INPAINT_FOLDER, seed=1)


def _demo_settings(folder: Path) -> Mapping[str, Mapping[str, Any]]:
    return {"models": {NAME: {"source": str(folder / DEMO_FOLDER)}}}


@hookimpl
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    register(DemoModels(NAME, version=3, build=_build_demo, settings=_demo_settings, full_size=build_full_size_sdxl))
