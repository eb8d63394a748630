"""sd15-lora: Stable Diffusion 1.5 with any set of LoRAs from the LoRA folder, per request.

LoRAs become peft adapters of the pipeline, loaded once and kept (up to
`max_cached_loras`, least recently used dropped first), then chosen for each
pipeline call with `set_adapters`. The device thread runs one call at a time
and a batch only holds requests with equal LoRA sets, so no request ever runs
with another's adapters.

    [models]
    lora_dir = "/srv/loras"
    [models.sd15-lora]
    source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_loras = { pixel-art = 0.8 }    # used when a request sends no "loras" field
    max_cached_loras = 8
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagine.plugin.demo import DemoModels
from imagine.errors import validation_error
from imagine.plugin.generators import (
    GenerationRequest,
    Generator,
    LoraWeight,
    ModelCard,
    ModelDefaults,
    ModelLimits,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import ModelsSettings, Settings, SettingsError
from imagine_plugins import demo_weights
from imagine_plugins.schedulers import COMMON
from imagine_plugins.diffusers_base import DiffusersGenerator, DiffusersTable
from imagine_plugins.loras import LoraFolder, is_path_like

log = logging.getLogger(__name__)

NAME = "sd15-lora"
# The runwayml repository is gone from the hub; this is its official continuation.
DEFAULT_SOURCE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MAX_CACHED = 8
# The demo: a tiny SD 1.5 pipeline and random LoRAs for it, in these folders of the demo folder.
DEMO_FOLDER = "sd15"
DEMO_LORA_DIR = "loras"
DEMO_LORAS = ("pixel-art", "watercolor")

CARD = ModelCard(
    description="Stable Diffusion 1.5 with LoRAs from the LoRA folder, chosen per request with their weights",
    defaults=ModelDefaults(steps=20, guidance=7.5, width=512, height=512, scheduler="dpmpp_2m"),
    limits=ModelLimits(min_size=256, max_size=1024, max_steps=100, schedulers=("dpmpp_2m", *(name for name in COMMON if name != "dpmpp_2m"), "pndm")),
    vram_required="3-4 GB (float16), plus 10-150 MB per cached LoRA",
    aliases=("stable-diffusion-1.5", "sd15"),
    takes_loras=True,
    inputs=("text", "image", "mask"),
    prompt_guide=(
        "Stable Diffusion 1.5 reads at most 77 tokens and likes comma-separated tags: the subject first, then "
        "details, style, lighting and quality tags (masterpiece, best quality, highly detailed); under 60 words."
    ),
)


@dataclass(frozen=True)
class LoraTable(DiffusersTable):
    """`[models.sd15-lora]`: the weights, and the LoRAs."""

    # name = weight, used when a request sends no "loras" field
    default_loras: Mapping[str, Any] | None = None
    max_cached_loras: int = DEFAULT_MAX_CACHED

    def __post_init__(self) -> None:
        if self.max_cached_loras < 1:
            raise SettingsError(f"models.{NAME}.max_cached_loras must be a positive integer")


def parse_default_loras(table: Any) -> tuple[LoraWeight, ...]:
    """default_loras = { name = weight, ... }"""
    where = f"models.{NAME}.default_loras"
    if not isinstance(table, Mapping):
        raise SettingsError(f"{where} must be a table of LoRA name = weight")
    loras = []
    for name, weight in table.items():
        if is_path_like(name):
            raise SettingsError(f"{where}: '{name}' must be a LoRA file name without a path")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -2 <= weight <= 2:
            raise SettingsError(f"{where}.{name} must be a weight between -2 and 2")
        loras.append(LoraWeight(name, float(weight)))
    return tuple(loras)


class LoraUnavailable(Exception):
    """A LoRA named by a request (or by the defaults) cannot be applied; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Adapter:
    adapter_name: str
    # (modification time, size) of the file it came from: a replaced file is loaded again.
    file_version: tuple[int, int]


class LoraGenerator(DiffusersGenerator):
    pipeline_class = "StableDiffusionPipeline"
    # Nothing shared: adapters are injected into the UNet and text encoder in place.
    shared_components = ()

    def __init__(self, table: LoraTable, loras: LoraFolder, models: ModelsSettings) -> None:
        defaults = parse_default_loras(table.default_loras or {})
        card = dataclasses.replace(CARD, defaults=dataclasses.replace(CARD.defaults, loras=defaults))
        super().__init__(NAME, card, table.source or DEFAULT_SOURCE, models, table)
        self.loras = loras
        self.max_cached = table.max_cached_loras
        # LoRA name -> its adapter, least recently used first.
        self._adapters: collections.OrderedDict[str, _Adapter] = collections.OrderedDict()
        # Adapter names are never reused, so peft never sees a stale one.
        self._serial = itertools.count()

    def load_arguments(self, torch_dtype: Any) -> dict[str, Any]:
        # As for the SDXL models, which have no safety checker at all: the caller decides.
        return {"safety_checker": None, "requires_safety_checker": False}

    def load(self) -> None:
        problems = self.loras.problems(self.card.defaults.loras)
        if problems:
            raise RuntimeError("default LoRA: " + "; ".join(problem["msg"] for problem in problems))
        super().load()
        try:
            for lora in self.card.defaults.loras:
                self._adapter(lora.name)  # the default set is ready before the first request
        except LoraUnavailable:
            self.unload()
            raise

    def unload(self) -> None:
        self._adapters.clear()
        super().unload()

    def validate(self, request: GenerationRequest) -> list[dict[str, Any]]:
        if request.loras == self.card.defaults.loras:
            return []  # checked when the model loads, where a missing file is the operator's to fix
        return self.loras.problems(request.loras)

    def listing(self) -> dict[str, Any]:
        return {
            "loras": sorted(self.loras.available()),
            "default_loras": [{"name": lora.name, "weight": lora.weight} for lora in self.card.defaults.loras],
        }

    def ready_for(self, requests: Sequence[GenerationRequest]) -> None:
        super().ready_for(requests)
        loras = requests[0].loras  # equal for the whole batch: LoRAs are part of the batch key
        if not loras:
            self.pipe.disable_lora()
            return
        try:
            adapter_names = [self._adapter(lora.name) for lora in loras]
        except LoraUnavailable as error:
            raise validation_error([{"loc": ["body", "loras"], "msg": str(error)}]) from None
        self._trim_cache(keep=set(adapter_names))
        self.pipe.enable_lora()
        # Only the listed adapters are active, each at its weight; every other cached one is off.
        self.pipe.set_adapters(adapter_names, adapter_weights=[lora.weight for lora in loras])

    def _adapter(self, name: str) -> str:
        """The adapter of a listed LoRA, loading it on first use or when its file changed."""
        try:
            path = self.loras.path(name)
            stat = path.stat()
        except (KeyError, OSError):
            raise LoraUnavailable(f"LoRA '{name}' is not in the LoRA folder (any more)") from None
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._adapters.get(name)
        if cached is not None and cached.file_version == version:
            self._adapters.move_to_end(name)
            return cached.adapter_name
        if cached is not None:
            self._forget(name)
        adapter_name = f"lora{next(self._serial)}"
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        except Exception as error:
            log.warning("LoRA %s did not load into %s: %s", name, self.name, error)
            self._delete_adapter(adapter_name)  # a failed load may leave part of it behind
            raise LoraUnavailable(f"LoRA '{name}' does not load into {self.name}: it must be a Stable Diffusion 1.5 LoRA") from None
        self._adapters[name] = _Adapter(adapter_name, version)
        self.weights_changed()
        return adapter_name

    def _trim_cache(self, keep: set[str]) -> None:
        for name, adapter in list(self._adapters.items()):
            if len(self._adapters) <= self.max_cached:
                break
            if adapter.adapter_name not in keep:
                self._forget(name)

    def _forget(self, name: str) -> None:
        self._delete_adapter(self._adapters.pop(name).adapter_name)
        self.weights_changed()

    def _delete_adapter(self, adapter_name: str) -> None:
        loaded = {adapter for adapters in self.pipe.get_list_adapters().values() for adapter in adapters}
        if adapter_name in loaded:
            self.pipe.delete_adapters(adapter_name)


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    table = settings.models.table(NAME, LoraTable)
    register(LoraGenerator(table, LoraFolder(settings.models.lora_dir), settings.models))


def _build_demo(folder: Path) -> None:
    """A tiny SD 1.5 pipeline, then random LoRAs on its UNet."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(2)
    pipe = StableDiffusionPipeline(
        vae=demo_weights.vae(scaling_factor=0.18215),
        text_encoder=demo_weights.text_encoder(),
        tokenizer=demo_weights.clip_tokenizer(pad_token="<|endoftext|>"),
        # Default generation size 512px, as the real SD1.5.
        unet=demo_weights.unet(sample_size=64, cross_attention_dim=demo_weights.TEXT_HIDDEN_SIZE),
        scheduler=PNDMScheduler(**demo_weights.SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / DEMO_FOLDER, safe_serialization=True)
    for offset, name in enumerate(DEMO_LORAS):
        demo_weights.save_random_lora(pipe, folder / DEMO_LORA_DIR, name, seed=20 + offset)


def _demo_settings(folder: Path) -> Mapping[str, Mapping[str, Any]]:
    return {"models": {"lora_dir": str(folder / DEMO_LORA_DIR), NAME: {"source": str(folder / DEMO_FOLDER)}}}


@hookimpl
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    register(DemoModels(NAME, version=2, build=_build_demo, settings=_demo_settings))
