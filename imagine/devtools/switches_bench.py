"""`imagine bench --mode switches`: one model's pipeline calls with the GPU switches added one at a time.

Each row loads the model afresh, in a process of its own, with the switches of
the rows before it plus its own: TF32 is process-wide torch state and compiled
graphs stay cached in a process, so a row run beside another would measure
both. A switch the device cannot honour (TF32 or CUDA graphs on a CPU) is
refused by the load with its reason, shown in its row, and left out of the
rows after it. Every row makes the same seeds, so its images are compared with
the first row's: a switch that changes only how the arithmetic runs leaves
them within a few levels of 255.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagine.devtools.bench import PROMPT, Row, plugin_registry, print_table
from imagine.settings import Settings

# Each step's `[models]` settings, added to those of the steps before it.
STEPS: Mapping[str, Mapping[str, Any]] = {
    "float32": {"dtype": "float32"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
    "eager": {"attention": "eager"},
    "sdpa": {"attention": "sdpa"},
    "channels_last": {"channels_last": True},
    "tf32": {"tf32": True},
    "compile": {"compile": "default"},
    "max-autotune": {"compile": "max-autotune"},
    "cuda-graphs": {"compile": "reduce-overhead"},
    "trace": {"compile": "trace"},
}
DEFAULT_STEPS = ("eager", "sdpa", "channels_last", "tf32", "compile", "cuda-graphs")


@dataclass
class SwitchRun:
    """What one row measured, or why its load was refused."""

    refused: str = ""
    device: str = ""
    dtype: str = ""
    load_s: float = 0.0
    compile_s: float = 0.0
    first_call_s: float = 0.0
    call_s: list[float] = field(default_factory=list)
    memory_gb: float = 0.0
    # The first call's first image, RGB, for the comparison with the first row.
    pixels: bytes = b""
    shape: tuple[int, ...] = ()


def measure(settings: Settings, model: str, size: int, steps: int, batch: int, calls: int) -> SwitchRun:
    """In a child process: load `model` with `settings`' switches, then time `calls` calls of `batch` images."""
    from imagine.engine import device
    from imagine.errors import ApiError
    from imagine.plugin.generators import GenerationRequest, LocalGenerator

    registry = plugin_registry(settings)
    generator = registry.resolve(model)
    if not isinstance(generator, LocalGenerator):
        return SwitchRun(refused=f"{model} runs remotely: the switches apply to local pipelines")
    started = time.perf_counter()
    try:
        registry.ensure_loaded(generator)
    except ApiError as error:
        return SwitchRun(refused=error.message)
    run = SwitchRun(load_s=time.perf_counter() - started)
    info = generator.runtime_info()
    run.device, run.dtype = str(info.get("device", "")), str(info.get("dtype", ""))
    run.compile_s = float(info.get("speed_ups", {}).get("compile_s", 0.0))
    defaults = generator.card.defaults
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt="", model=generator.name, width=size, height=size, steps=steps,
        guidance=defaults.guidance, num_images=batch, seed=0, scheduler=defaults.scheduler,
    )
    for number in range(calls + 1):
        started = time.perf_counter()
        images = generator.generate([request], lambda progress: False)[0]
        elapsed = time.perf_counter() - started
        if number == 0:
            # The first call at this size pays for what compiles per shape, and for lazy allocations.
            run.first_call_s = elapsed
            first = np.asarray(images[0].convert("RGB"))
            run.pixels, run.shape = first.tobytes(), first.shape
        else:
            run.call_s.append(elapsed)
    run.memory_gb = device.generation_memory_gb(run.device)
    return run


def _label(switches: Mapping[str, Any]) -> str:
    parts = [f"{switches.get('attention', 'sdpa')} attention"]
    if "dtype" in switches:
        parts.append(switches["dtype"])
    if switches.get("channels_last"):
        parts.append("channels_last")
    if switches.get("tf32"):
        parts.append("tf32")
    if switches.get("compile", "off") != "off":
        parts.append(f"compile {switches['compile']}")
    return ", ".join(parts)


def _pixels(run: SwitchRun) -> np.ndarray:
    return np.frombuffer(run.pixels, dtype=np.uint8).reshape(run.shape).astype(np.int16)


def _in_child(settings: Settings, arguments: argparse.Namespace) -> SwitchRun:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
        return child.submit(
            measure, settings, arguments.model, arguments.size, arguments.steps, arguments.batch, arguments.requests
        ).result()


def switches(settings: Settings, arguments: argparse.Namespace) -> None:
    steps: Sequence[str] = arguments.switches.split(",") if arguments.switches else DEFAULT_STEPS
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        raise ValueError(f"unknown switches {', '.join(unknown)}; known: {', '.join(STEPS)}")
    if arguments.batch < 1 or arguments.requests < 1:
        raise ValueError("--batch and --requests must be at least 1")
    switched: dict[str, Any] = {}
    reference: SwitchRun | None = None
    rows = []
    for step in steps:
        trial = {**switched, **STEPS[step]}
        run = _in_child(settings.replace(models=trial), arguments)
        if run.refused:
            rows.append(Row(f"+ {step}", {"note": f"refused: {run.refused}"}))
            continue  # the rows after it go on without it
        switched = trial
        reference = reference or run
        p50 = statistics.median(run.call_s)
        reference_p50 = statistics.median(reference.call_s)
        difference = np.abs(_pixels(run) - _pixels(reference))
        rows.append(
            Row(
                _label(switched),
                {
                    "device, dtype": f"{run.device}, {run.dtype}",
                    "load (s)": f"{run.load_s:.1f}",
                    "compile (s)": f"{run.compile_s:.1f}" if run.compile_s else "",
                    "first call (s)": f"{run.first_call_s:.3f}",
                    "call p50 (s)": f"{p50:.3f}",
                    "images/s": f"{arguments.batch / p50:.2f}",
                    "speed-up": f"{reference_p50 / p50:.2f}x",
                    "max |diff|": str(int(difference.max())),
                    "mean |diff|": f"{difference.mean():.2f}",
                    "peak memory (GB)": f"{run.memory_gb:.2f}" if run.memory_gb else "",
                },
            )
        )
    columns = (
        "device, dtype", "load (s)", "compile (s)", "first call (s)", "call p50 (s)", "images/s", "speed-up",
        "max |diff|", "mean |diff|", "peak memory (GB)", "note",
    )
    print_table(
        f"switches: {arguments.model} {arguments.size}x{arguments.size}, {arguments.steps} steps, {arguments.batch} "
        f"image(s) a call, {arguments.requests} timed calls a row (pixel differences against the first row, of 255)",
        [Row(row.name, {column: row.values.get(column, "") for column in columns}) for row in rows],
    )
