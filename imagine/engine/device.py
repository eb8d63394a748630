"""The accelerator: choice of device and dtype, memory figures, out-of-memory handling.

What needs torch imports it lazily and is called only on the device thread,
which publishes a `DeviceReport` that the event loop can read without torch.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import psutil

from imagine.engine.memory import GIB


@dataclass(frozen=True)
class DeviceReport:
    device: str  # "cuda", "mps" or "cpu"
    device_name: str
    gpu_backend: str | None  # "cuda" / "mps", None on the CPU
    torch_version: str
    vram_total_gb: float | None
    vram_used_gb: float | None
    vram_free_gb: float | None

    @property
    def gpu_available(self) -> bool:
        return self.gpu_backend is not None


# Before the device thread has looked at torch, /status reports the CPU.
UNPROBED = DeviceReport("cpu", platform.processor() or "cpu", None, "", None, None, None)


def choose_device(preference: str) -> str:
    """auto means cuda, then mps, then cpu."""
    import torch

    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(preference: str, device: str) -> str:
    """auto means float16 on a GPU, float32 on the CPU (where half precision is slow or missing)."""
    if preference != "auto":
        return preference
    return "float32" if device == "cpu" else "float16"


def planned(device_preference: str, dtype_preference: str, chosen_device: str | None) -> tuple[str | None, str | None]:
    """The device and dtype a model will load with, without torch (so the event loop may ask).

    `chosen_device` is what the device thread resolved `auto` to, None before it has looked: only
    `auto` needs it, and until then what depends on it is unknown (None).
    """
    where = chosen_device if device_preference == "auto" else device_preference
    if where is None:
        return None, None if dtype_preference == "auto" else dtype_preference
    return where, choose_dtype(dtype_preference, where)


def report(device: str) -> DeviceReport:
    import torch

    backend = device.split(":")[0]
    if backend == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return DeviceReport(
            "cuda",
            torch.cuda.get_device_name(torch.device(device)),
            "cuda",
            torch.__version__,
            round(total / GIB, 3),
            round(torch.cuda.memory_reserved(torch.device(device)) / GIB, 3),
            round(free / GIB, 3),
        )
    if backend == "mps":
        used = torch.mps.current_allocated_memory() / GIB
        return DeviceReport("mps", "Apple GPU (MPS)", "mps", torch.__version__, None, round(used, 3), None)
    return DeviceReport("cpu", platform.processor() or platform.machine(), None, torch.__version__, None, None, None)


def generation_memory_gb(device: str) -> float:
    """GPU memory the last generation peaked at, in GB; 0.0 without a GPU."""
    import torch

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(torch.device(device)) / GIB
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return round(peak, 3)
    return 0.0


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def process_memory_gb() -> float:
    """Resident memory of this process: what the models cost when they run on the CPU."""
    return round(psutil.Process().memory_info().rss / GIB, 3)
