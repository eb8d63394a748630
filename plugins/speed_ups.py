"""The GPU speed-ups a loaded diffusers pipeline can take (`models.attention`, `channels_last`, `tf32`, `compile`).

Applied once, on the device thread, right after a pipeline loads. Each either
changes how the same arithmetic runs (fused attention, memory layout,
compiled kernels: the same image within the tolerance the tests state) or
trades precision for speed where the device supports it (TF32 on CUDA).
A switch that cannot work on the chosen device fails the load with a message
naming it, rather than running without it unnoticed. Compiling happens at
load time, with one warm-up call at the model's default size, so no request
pays for it; its cost is reported in the model's runtime information.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from imagine.settings import ModelsSettings

log = logging.getLogger(__name__)

# torch.compile's arguments for each `models.compile` value.
COMPILE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "default": {},
    "max-autotune": {"mode": "max-autotune"},
    "reduce-overhead": {"mode": "reduce-overhead"},
    # Captures the graphs without generating code: checks that the pipeline compiles, on any device.
    "trace": {"backend": "eager"},
}


class SpeedUpError(RuntimeError):
    """A switch the chosen device cannot honour."""


def apply(pipe: Any, models: ModelsSettings, device: str, warm_up: Callable[[], None]) -> dict[str, Any]:
    """Apply the configured switches to `pipe` on `device`; what was applied, for the model's runtime info."""
    import torch

    cuda = device.startswith("cuda")
    if models.tf32 and not cuda:
        raise SpeedUpError(f"models.tf32 needs a CUDA device; this model runs on {device}")
    if models.compile == "reduce-overhead" and not cuda:
        raise SpeedUpError(f'models.compile = "reduce-overhead" (CUDA graphs) needs a CUDA device; this model runs on {device}')
    applied: dict[str, Any] = {"attention": models.attention}
    if models.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if models.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    if models.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if models.compile != "off":
        arguments = COMPILE_ARGUMENTS[models.compile]
        pipe.unet = torch.compile(pipe.unet, **arguments)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **arguments)
        started = time.perf_counter()
        warm_up()
        applied["compile"] = models.compile
        applied["compile_s"] = round(time.perf_counter() - started, 1)
        log.info("compiled %s's UNet and VAE decoder (%s) in %.1f s", type(pipe).__name__, models.compile, applied["compile_s"])
    return applied
