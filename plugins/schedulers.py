"""The schedulers a diffusers model may offer, by our name: a diffusers class and what changes in its config.

Each is built from the model's own scheduler config (`DiffusersGenerator.scheduler`),
so a checkpoint's timestep settings carry over. The names are those of
`/generate`'s `scheduler` field; `imagine.http.png.SAMPLER_LABELS` gives each its
AUTOMATIC1111 name, which the A1111-compatible routes take and the PNGs record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# What the full-step SDXL and SD 1.5 models offer beyond their own first choices.
COMMON = ("euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde", "dpmpp_sde_karras", "ddim", "unipc")


def build(name: str, config: Mapping[str, Any]) -> Any:
    import diffusers

    class_name, changes = SCHEDULERS[name]
    # `config` may be another named scheduler's (the one the pipeline held last): its Karras sigmas must not carry over.
    return getattr(diffusers, class_name).from_config({**config, "use_karras_sigmas": False, **changes})


def seed_noise(scheduler: Any, seeds: Sequence[int]) -> None:
    """Schedulers that draw their own noise (DPM++ SDE's Brownian tree) draw it from the images' seeds.

    Unseeded, the tree takes a seed from torch's global generator: no image
    could be made again. One seed per image keeps a batched image the one it is alone.
    """
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = list(seeds)
        scheduler.noise_sampler = None
