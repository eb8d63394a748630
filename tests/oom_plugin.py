"""A test generator plugin whose models run out of device memory: one on demand, one when loaded beside it.
The first also fails as a bug would (a plain exception) when a prompt asks it to.

The tests install it as a third-party package would be: through the `imagine`
entry-point group of a distribution on sys.path. It raises torch's own CUDA
out-of-memory error; a failed generation holds a little memory in a reference
cycle the way a failed forward pass holds its tensors, so a test can see that
memory released.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

from PIL import Image

from imagine.plugin.generators import (
    GenerationRequest,
    Generator,
    ModelCard,
    ModelDefaults,
    ModelLimits,
    StepCallback,
)
from imagine.plugin.hookspecs import hookimpl
from tests.weightless import WeightlessGenerator

TRIGGER = "out of memory"
BUG_TRIGGER = "a bug"


class _Activations:
    """Stands in for the tensors of a forward pass: they reference each other, as autograd graphs do."""

    def __init__(self) -> None:
        self.data = bytearray(1024 * 1024)
        self.cycle = self


class OutOfMemoryGenerator(WeightlessGenerator):
    name = "oom"
    card = ModelCard(
        description="test: runs out of memory when the prompt says so",
        defaults=ModelDefaults(steps=1, guidance=0.0, width=64, height=64, scheduler="euler"),
        limits=ModelLimits(min_size=8, max_size=256, max_steps=10, schedulers=("euler",)),
        vram_required="none",
    )

    def __init__(self) -> None:
        # The activations of the last failed run, while anything keeps them alive.
        self.failed_activations: weakref.ref[_Activations] | None = None

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        import torch

        if TRIGGER in requests[0].prompt:
            activations = _Activations()
            self.failed_activations = weakref.ref(activations)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if any(BUG_TRIGGER in request.prompt for request in requests):
            raise TypeError("'NoneType' object cannot be interpreted as an integer")
        return [[Image.new("RGB", (r.width, r.height), "gray") for _ in r.seeds] for r in requests]


class LargeGenerator(OutOfMemoryGenerator):
    """A model that fits on the device only alone: loading it beside its neighbour runs out of memory."""

    name = "oom-large"

    def __init__(self, neighbour: Generator) -> None:
        super().__init__()
        self.neighbour = neighbour
        self.failed_loads = 0

    def load(self) -> None:
        import torch

        if self.neighbour.loaded:
            self.failed_loads += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        super().load()


@hookimpl
def register_generators(register: Callable[[Generator], None]) -> None:
    small = OutOfMemoryGenerator()
    register(small)
    register(LargeGenerator(neighbour=small))
