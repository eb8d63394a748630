"""How many images a batch may hold, learnt per shape: the size that has made the most images per second.

A bigger pipeline call is not always faster per image: on a CPU a 512² batch of
four images runs slower per image than four calls of one, and on a GPU the
best size depends on the card, the resolution and the step count. So the
device measures each call (images per second of device time) under the
batch's shape, and caps the next batch of that shape at the size measured
best. The candidate sizes (the powers of two up to `batch.max_size`, and
the maximum) are tried first, each `SAMPLES_TO_TRUST` times, and judged by
the fastest of their recent measurements: timing noise on a busy machine only
ever slows a call down (another process, a cold cache, a lazy allocation), so
a size's best recent call is the steadiest estimate of what it can do, and a
cold first call does not decide. After that one batch in
`EXPLORE_EVERY` tries a size next to the best (the one measured longer
ago), so a change (a model loaded beside, a LoRA, a warmer GPU) is noticed
and followed a step at a time; a size far from the best is not worth a whole
slow batch to measure again. Each exploration that leaves the best as it was
doubles the wait for the next, up to `EXPLORE_BACKOFF_MAX` times as long: on a
steady device an exploring batch is a slower batch with no news. A change of
the best, found by exploring or because the best itself slowed down, brings
the first pace back. `batch.max_size` stays the upper bound, and a size
slower than one image at a time never wins.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from imagine.plugin.generators import GenerationRequest

# One batch in this many, per shape, measures a size other than the best, at first...
EXPLORE_EVERY = 24
# ...and up to this many times fewer while explorations keep finding the same best.
EXPLORE_BACKOFF_MAX = 16
# Measurements of a size before it is judged.
SAMPLES_TO_TRUST = 3
# How many of a size's latest measurements its rate is the best of: the same for every size, so a
# size measured more often (the one in use) does not look faster for having had more tries.
RECENT = SAMPLES_TO_TRUST


class BatchShape(NamedTuple):
    """What decides the cost of an image: the model, its size, its steps, and whether an input image is given."""

    model: str
    width: int
    height: int
    steps: int
    with_input: bool


def shape(request: GenerationRequest) -> BatchShape:
    return BatchShape(request.model, request.width, request.height, request.steps, request.image is not None)


class _Exploration(NamedTuple):
    size: int
    best: int  # the best when the exploration was chosen
    decision: int


@dataclass
class _Shape:
    # batch size -> images/s of its latest calls
    rates: dict[int, collections.deque[float]] = field(default_factory=dict)
    measured_at: dict[int, int] = field(default_factory=dict)  # batch size -> decision number of its last measurement
    decisions: int = 0
    # Decisions between explorations now, and the decision number of the next one.
    explore_every: int = EXPLORE_EVERY
    next_exploration: int = EXPLORE_EVERY
    exploring: _Exploration | None = None  # until its call is measured
    best_seen: int | None = None

    def rate(self, size: int) -> float:
        return max(self.rates[size])

    def samples(self, size: int) -> int:
        return len(self.rates.get(size, ()))


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
            untried = [size for size in self._candidates if learnt.samples(size) < SAMPLES_TO_TRUST]
            if untried:
                # The least measured first, the largest among equals.
                return min(untried, key=learnt.samples)
            best = self._best(learnt)
            if learnt.decisions >= learnt.next_exploration:
                # Every candidate is measured by now, so the best is one of them.
                at = self._candidates.index(best)
                neighbours = [size for size in self._candidates[max(0, at - 1) : at + 2] if size != best] or [best]
                chosen = min(neighbours, key=lambda size: learnt.measured_at.get(size, 0))
                # Counted as tried now even if too few wait to fill it, so the next exploration tries the other.
                learnt.measured_at[chosen] = learnt.decisions
                learnt.next_exploration = learnt.decisions + learnt.explore_every
                learnt.exploring = _Exploration(chosen, best, learnt.decisions)
                return chosen
            return best

    def observe(self, request: GenerationRequest, images: int, device_s: float) -> None:
        """One pipeline call of `images` images of `request`'s shape took `device_s` seconds."""
        if device_s <= 0:
            return
        with self._lock:
            learnt = self._shapes.setdefault(shape(request), _Shape())
            learnt.rates.setdefault(images, collections.deque(maxlen=RECENT)).append(images / device_s)
            learnt.measured_at[images] = learnt.decisions
            self._pace_explorations(learnt, images)

    def _pace_explorations(self, learnt: _Shape, images: int) -> None:
        best = self._best(learnt)
        if learnt.best_seen is not None and best != learnt.best_seen:
            # Conditions changed: explore at the first pace again, from now.
            learnt.explore_every = EXPLORE_EVERY
            learnt.next_exploration = min(learnt.next_exploration, learnt.decisions + EXPLORE_EVERY)
        elif learnt.exploring is not None and (learnt.exploring.size, learnt.exploring.best) == (images, best):
            # The explored size was measured and the best stands: the next exploration can wait longer.
            learnt.explore_every = min(2 * learnt.explore_every, EXPLORE_BACKOFF_MAX * EXPLORE_EVERY)
            learnt.next_exploration = learnt.exploring.decision + learnt.explore_every
        learnt.best_seen = best
        learnt.exploring = None

    def best(self, request: GenerationRequest) -> int | None:
        """The size now chosen for `request`'s shape; None before anything was measured."""
        return self.learnt().get(shape(request))

    def learnt(self) -> dict[BatchShape, int]:
        """The size chosen now for every shape measured so far."""
        with self._lock:
            return {key: self._best(learnt) for key, learnt in self._shapes.items() if learnt.rates}

    def _best(self, learnt: _Shape) -> int:
        """The fastest candidate measured enough (else the fastest measured at all); ties to the smaller."""
        trusted = [size for size in self._candidates if learnt.samples(size) >= SAMPLES_TO_TRUST]
        return max(sorted(trusted or learnt.rates), key=learnt.rate)
