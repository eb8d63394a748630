"""sdxl: Stable Diffusion XL base 1.0."""

from __future__ import annotations

from collections.abc import Callable

from imagine.plugin.generators import Generator, ModelCard, ModelDefaults, ModelLimits
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from imagine_plugins.diffusers_base import DiffusersGenerator

DEFAULT_SOURCE = "stabilityai/stable-diffusion-xl-base-1.0"

CARD = ModelCard(
    description="Stable Diffusion XL 1.0 base: high quality at 1024x1024, 20+ steps",
    defaults=ModelDefaults(steps=20, guidance=7.5, width=1024, height=1024, scheduler="euler"),
    limits=ModelLimits(min_size=512, max_size=1024, max_steps=100, schedulers=("euler", "euler_a", "dpmpp_2m", "ddim")),
    vram_required="8-10 GB (float16)",
    aliases=("stable-diffusion-xl",),
)


class SDXLGenerator(DiffusersGenerator):
    pipeline_class = "StableDiffusionXLPipeline"
    # The SDXL family keeps its base's text encoders and VAE: models loaded from
    # the same base weights (sdxl and sdxl-lightning) hold one copy of them.
    shared_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    source = settings.models.model_options("sdxl").get("source", DEFAULT_SOURCE)
    register(SDXLGenerator("sdxl", CARD, source, settings.models))
