"""sdxl-lightning: SDXL base with ByteDance's step-distilled UNet, 1 to 8 steps without guidance.

Each Lightning checkpoint is a whole SDXL UNet trained for one step count. The
pipeline is the SDXL base with its UNet replaced (the base UNet is never
loaded), sharing the base's text encoders and VAE with `sdxl` when both are
loaded. One UNet stays in memory: a request for another configured step count
loads that checkpoint's weights into it.

    [models.sdxl-lightning]
    base = "stabilityai/stable-diffusion-xl-base-1.0"    # default: the sdxl model's source
    [models.sdxl-lightning.checkpoints]                  # steps = local file or "owner/repo/file"
    4 = "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors"
    1 = { file = "/srv/lightning/sdxl_lightning_1step_unet_x0.safetensors", prediction_type = "sample" }
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagine.plugin.demo import DemoModels
from imagine.errors import ApiError
from imagine.plugin.generators import GenerationRequest, Generator, ModelCard, ModelDefaults, ModelLimits
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import ModelsSettings, Settings, SettingsError
from imagine_plugins import demo_weights, sdxl
from imagine_plugins.diffusers_base import CardTable
from imagine_plugins.sdxl import SDXLGenerator

NAME = "sdxl-lightning"
HUB_REPO = "ByteDance/SDXL-Lightning"
PREDICTION_TYPES = ("epsilon", "sample")
# The default steps when their checkpoint is configured: ByteDance's recommended balance.
PREFERRED_STEPS = 4
# The demo's checkpoints: one tiny UNet per step count, in the demo folder's DEMO_FOLDER.
DEMO_STEPS = (1, 2, 4, 8)
DEMO_FOLDER = "sdxl-lightning"

CARD = ModelCard(
    description="SDXL-Lightning: SDXL distilled by ByteDance for 1, 2, 4 or 8 steps, guidance 0",
    defaults=ModelDefaults(steps=PREFERRED_STEPS, guidance=0.0, width=1024, height=1024, scheduler="euler"),
    limits=ModelLimits(min_size=512, max_size=1024, max_steps=8, schedulers=("euler",)),
    vram_required="8-10 GB (float16); about 5 GB when sdxl is loaded too (shared text encoders and VAE)",
    inputs=("text", "image", "mask"),
    prompt_guide=(
        "SDXL-Lightning runs in a few steps without guidance, so negative prompts do nothing: write one concrete "
        "sentence or a short list of comma-separated phrases (under 50 words): subject, setting, medium, style, light."
    ),
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    steps: int
    file: str  # a local path or "owner/repo/path/in/repo"
    # ByteDance's 1-step UNet predicts the clean image ("sample"); the others the noise.
    prediction_type: str = "epsilon"


# Without configuration: every checkpoint ByteDance publishes, fetched from the hub when first used.
DEFAULT_CHECKPOINTS = {
    1: Checkpoint(1, f"{HUB_REPO}/sdxl_lightning_1step_unet_x0.safetensors", "sample"),
    2: Checkpoint(2, f"{HUB_REPO}/sdxl_lightning_2step_unet.safetensors"),
    4: Checkpoint(4, f"{HUB_REPO}/sdxl_lightning_4step_unet.safetensors"),
    8: Checkpoint(8, f"{HUB_REPO}/sdxl_lightning_8step_unet.safetensors"),
}


@dataclass(frozen=True)
class LightningTable(CardTable):
    """`[models.sdxl-lightning]`: the base pipeline and the checkpoints (unset: sdxl's source, every published one)."""

    base: str = ""
    checkpoints: Mapping[str, Any] | None = None


def parse_checkpoints(table: Mapping[str, Any]) -> dict[int, Checkpoint]:
    """[models.sdxl-lightning.checkpoints]: step count -> file, or -> {file, prediction_type}."""
    where = f"models.{NAME}.checkpoints"
    checkpoints = {}
    for key, value in table.items():
        if not str(key).isdigit() or int(key) < 1:
            raise SettingsError(f"{where}: '{key}' is not a step count")
        steps = int(key)
        if isinstance(value, str):
            checkpoints[steps] = Checkpoint(steps, value)
        elif isinstance(value, Mapping) and isinstance(value.get("file"), str) and set(value) <= {"file", "prediction_type"}:
            prediction_type = value.get("prediction_type", "epsilon")
            if prediction_type not in PREDICTION_TYPES:
                raise SettingsError(f"{where}.{key}.prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
            checkpoints[steps] = Checkpoint(steps, value["file"], prediction_type)
        else:
            raise SettingsError(f'{where}.{key} must be a file name or {{ file = "...", prediction_type = "..." }}')
    if not checkpoints:
        raise SettingsError(f"{where} is empty: name at least one checkpoint")
    return checkpoints


def checkpoint_path(file: str) -> str:
    """A local file as it is; "owner/repo/file" fetched from the hub (once, then from its cache)."""
    path = Path(file).expanduser()
    if path.is_file():
        return str(path)
    parts = file.split("/")
    if path.is_absolute() or len(parts) < 3:
        raise FileNotFoundError(f"Lightning checkpoint {file} is neither a file nor a hub id owner/repo/file")
    from huggingface_hub import hf_hub_download

    return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))


class LightningGenerator(SDXLGenerator):
    def __init__(self, base: str, checkpoints: Mapping[int, Checkpoint], models: ModelsSettings, table: CardTable) -> None:
        self.checkpoints = dict(sorted(checkpoints.items()))
        steps = PREFERRED_STEPS if PREFERRED_STEPS in self.checkpoints else max(self.checkpoints)
        card = dataclasses.replace(
            CARD,
            defaults=dataclasses.replace(CARD.defaults, steps=steps),
            limits=dataclasses.replace(CARD.limits, step_choices=tuple(self.checkpoints), max_steps=max(self.checkpoints)),
            base_model=f"{base} + SDXL-Lightning UNet",
        )
        super().__init__(NAME, card, base, models, table)
        if self.card.defaults.steps not in self.checkpoints:
            raise SettingsError(
                f"models.{NAME}.default_steps must be a configured step count: {', '.join(map(str, self.checkpoints))}"
            )
        # The checkpoint whose weights the UNet holds; None when unknown.
        self._active: Checkpoint | None = None
        # Step count -> seconds its last swap in took.
        self._swap_s: dict[int, float] = {}

    def load_arguments(self, torch_dtype: Any) -> dict[str, Any]:
        """The UNet built from the base's config and filled with the default step count's checkpoint."""
        import accelerate
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        checkpoint = self.checkpoints[self.card.defaults.steps]
        config = UNet2DConditionModel.load_config(self.source, subfolder="unet")
        # Empty (meta) weights: a random initialisation of 2.6 B parameters would be thrown away.
        with accelerate.init_empty_weights():
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(load_file(checkpoint_path(checkpoint.file)), strict=True, assign=True)
        self._active = checkpoint
        # The weights keep the file's dtype (ByteDance ships float16); cast only when it differs.
        return {"unet": unet if unet.dtype == torch_dtype else unet.to(dtype=torch_dtype)}

    def unload(self) -> None:
        self._active = None
        super().unload()

    def ready_for(self, requests: Sequence[GenerationRequest]) -> None:
        checkpoint = self.checkpoints[requests[0].steps]
        if checkpoint != self._active:
            self._swap_to(checkpoint)
        super().ready_for(requests)

    def switch_cost_s(self, request: GenerationRequest) -> float:
        checkpoint = self.checkpoints.get(request.steps)
        if checkpoint is None or checkpoint == self._active:
            return 0.0
        return self._swap_s.get(checkpoint.steps, 0.0)

    def _swap_to(self, checkpoint: Checkpoint) -> None:
        """Copy another checkpoint's weights into the UNet in place: memory stays that of one UNet."""
        from safetensors.torch import load_file

        # A failed copy may leave the UNet half-written: force a reload next time.
        self._active = None
        started = time.perf_counter()
        try:
            self.pipe.unet.load_state_dict(load_file(checkpoint_path(checkpoint.file)), strict=True)
        except Exception as error:
            reason = f"the {checkpoint.steps}-step checkpoint did not load: {type(error).__name__}: {error}"
            raise ApiError(503, "MODEL_NOT_AVAILABLE", f"Model '{NAME}' not available: {reason}", details={"reason": reason}) from None
        self._swap_s[checkpoint.steps] = time.perf_counter() - started
        self._active = checkpoint
        self._schedulers = {}  # their prediction type follows the checkpoint

    def scheduler_config(self, name: str) -> Mapping[str, Any]:
        assert self._active is not None
        # Lightning is distilled for the last timesteps of the schedule ("trailing").
        return {**self.pipe.scheduler.config, "timestep_spacing": "trailing", "prediction_type": self._active.prediction_type}


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    table = settings.models.table(NAME, LightningTable)
    # By default the base is whatever sdxl loads, so that the two share components.
    base = table.base or sdxl.source(settings)
    checkpoints = parse_checkpoints(table.checkpoints) if table.checkpoints is not None else DEFAULT_CHECKPOINTS
    register(LightningGenerator(base, checkpoints, settings.models, table))


def _demo_checkpoint(folder: Path, steps: int) -> Path:
    return folder / DEMO_FOLDER / f"sdxl_lightning_{steps}step_unet.safetensors"


def _build_demo(folder: Path) -> None:
    """One tiny SDXL UNet per step count: each fits the demo sdxl pipeline, as the real ones fit SDXL base."""
    import torch
    from safetensors.torch import save_file

    (folder / DEMO_FOLDER).mkdir(parents=True, exist_ok=True)
    for offset, steps in enumerate(DEMO_STEPS):
        torch.manual_seed(10 + offset)
        save_file(demo_weights.sdxl_unet().state_dict(), str(_demo_checkpoint(folder, steps)))


def _demo_settings(folder: Path) -> Mapping[str, Mapping[str, Any]]:
    checkpoints = {str(steps): str(_demo_checkpoint(folder, steps)) for steps in DEMO_STEPS}
    # The demo sdxl is the base, as sdxl's source is by default: the two share components here too.
    base = str(folder / sdxl.DEMO_FOLDER)
    return {"models": {NAME: {"base": base, "checkpoints": checkpoints}}}


@hookimpl
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    register(DemoModels(NAME, version=1, build=_build_demo, settings=_demo_settings))
