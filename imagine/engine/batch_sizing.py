"""How many images a batch may hold, learnt per shape: the size that has made the most images per second.

A bigger pipeline call is not always faster per image: on a CPU a 512² batch of
four images runs slower per image than four calls of one, and on a GPU the
best size depends on the card, the resolution and the step count. So the
device measures each call (images per second of device time) under the
batch's shape, and caps the next batch of that shape at the size measured
best. Sizes never measured (the powers of two up to `batch.max_size`, and
the maximum) are tried first, each once; after that one batch in
`EXPLORE_EVERY` tries the size measured longest ago, so a change (a model
loaded beside, a LoRA, a warmer GPU) is noticed. `batch.max_size` stays the
upper bound, and a size slower than one image at a time never wins.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from imagine.plugin.generators import GenerationRequest

# One batch in this many, per shape, measures a size other than the best.
EXPLORE_EVERY = 24
# Weight of the newest measurement in a size's moving average.
SMOOTHING = 0.3


class BatchShape(NamedTuple):
    """What decides the cost of an image: the model, its size, its steps, and whether an input image is given."""

    model: str
    width: int
    height: int
    steps: int
    with_input: bool


def shape(request: GenerationRequest) -> BatchShape:
    return BatchShape(request.model, request.width, request.height, request.steps, request.image is not None)


@dataclass
class _Shape:
    rates: dict[int, float] = field(default_factory=dict)  # batch size -> images/s (moving average)
    measured_at: dict[int, int] = field(default_factory=dict)  # batch size -> decision number of its last measurement
    decisions: int = 0


class BatchSizer:
    """Called from the device thread (limit, observe) and read from the loop (`best`): a lock keeps them consistent."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        sizes = {1 << power for power in range(max_size.bit_length()) if 1 << power <= max_size}
        self._candidates = sorted(sizes | {max_size}, reverse=True)
        self._shapes: dict[BatchShape, _Shape] = {}
        self._lock = threading.Lock()

    def limit(self, request: GenerationRequest) -> int:
        """The most images the next batch headed by `request` may hold."""
        with self._lock:
            learnt = self._shapes.setdefault(shape(request), _Shape())
            learnt.decisions += 1
            untried = [size for size in self._candidates if size not in learnt.rates]
            if untried:
                return untried[0]
            if learnt.decisions % EXPLORE_EVERY == 0:
                return min(self._candidates, key=lambda size: learnt.measured_at.get(size, 0))
            return self._best(learnt)

    def observe(self, request: GenerationRequest, images: int, device_s: float) -> None:
        """One pipeline call of `images` images of `request`'s shape took `device_s` seconds."""
        if device_s <= 0:
            return
        with self._lock:
            learnt = self._shapes.setdefault(shape(request), _Shape())
            rate = images / device_s
            before = learnt.rates.get(images)
            learnt.rates[images] = rate if before is None else (1 - SMOOTHING) * before + SMOOTHING * rate
            learnt.measured_at[images] = learnt.decisions

    def best(self, request: GenerationRequest) -> int | None:
        """The size now chosen for `request`'s shape; None before anything was measured."""
        return self.learnt().get(shape(request))

    def learnt(self) -> dict[BatchShape, int]:
        """The size chosen now for every shape measured so far."""
        with self._lock:
            return {key: self._best(learnt) for key, learnt in self._shapes.items() if learnt.rates}

    def _best(self, learnt: _Shape) -> int:
        # Ties go to the smaller size: the same throughput with less waiting.
        return max(sorted(learnt.rates), key=lambda size: learnt.rates[size])
