"""A test generator plugin whose steps take real time, to watch the executor stop and queue jobs.

It is registered through the real plugin hook; it draws flat-colour images so
it needs no weights, and it counts the steps it actually ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from PIL import Image

from imagine.plugin.generators import (
    GenerationInterrupted,
    GenerationRequest,
    Generator,
    ModelCard,
    ModelDefaults,
    ModelLimits,
    StepCallback,
    StepProgress,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from tests.weightless import WeightlessGenerator


class SlowGenerator(WeightlessGenerator):
    name = "slow"
    card = ModelCard(
        description="test: one step per step_seconds",
        defaults=ModelDefaults(steps=10, guidance=0.0, width=64, height=64, scheduler="euler"),
        limits=ModelLimits(min_size=8, max_size=256, max_steps=1000, schedulers=("euler",)),
        vram_required="none",
    )

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds = step_seconds
        self.steps_run = 0
        self.started = threading.Event()
        self.finished_runs: list[str] = []  # "completed" or "interrupted", one per run
        self.batches: list[list[str]] = []  # the prompts of each call, in order

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        self.started.set()
        self.batches.append([r.prompt for r in requests])
        request = requests[0]
        for step in range(1, request.steps + 1):
            time.sleep(self.step_seconds)
            self.steps_run += 1
            if on_step(StepProgress(step, request.steps)):
                self.finished_runs.append("interrupted")
                raise GenerationInterrupted()
        self.finished_runs.append("completed")
        return [[Image.new("RGB", (r.width, r.height), (r.seed % 256, 0, 0)) for _ in r.seeds] for r in requests]


class SlowPlugin:
    def __init__(self, step_seconds: float = 0.02) -> None:
        self.generator = SlowGenerator(step_seconds)

    @hookimpl
    def register_generators(self, register: Callable[[Generator], None], settings: Settings) -> None:
        register(self.generator)
