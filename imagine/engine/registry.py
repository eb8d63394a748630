"""The registered generators: name and alias resolution, load state, and memory.

Loading and unloading happen on the device thread; the event loop only reads
the state recorded here (plain attributes, written by one thread). With a
memory budget, loading a model first unloads the least recently used others
until the measured total fits; without one, a load that runs out of device
memory does the same and tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imagine.engine import device
from imagine.errors import model_not_available
from imagine.plugin.generators import CloudGenerator, GenerationRequest, Generator, LocalGenerator
from imagine.engine.memory import NOTHING, ModelMemory, account, gigabytes, total_bytes
from imagine.engine.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)


@dataclass
class LoadState:
    error: str | None = None
    load_time_s: float | None = None
    last_used: float = 0.0
    loaded_at: float = 0.0
    # The last measured footprint; kept after an unload to plan the next load.
    footprint: Mapping[int, int] = field(default_factory=dict)


class ModelRegistry:
    def __init__(
        self,
        generators: Mapping[str, Generator],
        default: str,
        memory_budget_bytes: int | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._generators = dict(generators)
        self._telemetry = telemetry
        self._aliases = {alias: g.name for g in generators.values() for alias in g.card.aliases}
        self.default = default
        self.memory_budget_bytes = memory_budget_bytes
        self.states = {name: LoadState() for name in generators}
        self.current: str | None = None  # the most recently used loaded model

    @property
    def names(self) -> list[str]:
        return list(self._generators)

    def generators(self) -> list[Generator]:
        return list(self._generators.values())

    def local(self) -> list[LocalGenerator]:
        """The generators that run on the device thread."""
        return [g for g in self._generators.values() if isinstance(g, LocalGenerator)]

    def cloud(self) -> list[CloudGenerator]:
        """The generators behind a remote API."""
        return [g for g in self._generators.values() if isinstance(g, CloudGenerator)]

    def as_local(self, generator: Generator) -> LocalGenerator | None:
        """The generator as a local one, or None for a cloud backend (which has nothing to load)."""
        return generator if isinstance(generator, LocalGenerator) else None

    def resolve(self, name: str | None) -> Generator:
        """A name, an alias or None (the default) to its generator; 404 for unknown names."""
        wanted = name if name is not None else self.default
        canonical = self._aliases.get(wanted, wanted)
        generator = self._generators.get(canonical)
        if generator is None:
            raise model_not_available(wanted, self.names)
        return generator

    def failed(self) -> dict[str, str]:
        return {name: state.error for name, state in self.states.items() if state.error}

    # ---- device thread ----------------------------------------------------

    def ensure_loaded(self, generator: LocalGenerator) -> bool:
        """Load on first use; a failure is recorded and raised as 503. True when it loaded now."""
        state = self.states[generator.name]
        loading = not generator.loaded
        if loading:
            self._make_room(generator)
            # A first request waits for this: say so, or a slow load looks like a hung server.
            log.info("loading model %s", generator.name)
            started = time.perf_counter()
            try:
                self._load(generator)
            except Exception as error:  # a broken model must not take the service down
                state.error = f"{type(error).__name__}: {error}"
                log.error("model %s failed to load: %s", generator.name, state.error)
                self._telemetry.model_loaded(generator.name, time.perf_counter() - started, ok=False)
                raise model_not_available(generator.name, self.names, reason=state.error) from None
            state.error = None
            state.load_time_s = time.perf_counter() - started
            self._telemetry.model_loaded(generator.name, state.load_time_s, ok=True)
            state.loaded_at = time.monotonic()
            state.footprint = dict(generator.memory_footprint())
            log.info(
                "model %s loaded in %.2f s, %.3f GB",
                generator.name,
                state.load_time_s,
                gigabytes(sum(state.footprint.values())),
            )
        state.last_used = time.monotonic()
        self.current = generator.name
        self._evict_until(lambda: self.used_bytes() <= self._budget, keep=generator)
        return loading

    def switch_cost_s(self, generator: Generator, request: GenerationRequest) -> float:
        """Seconds the device would spend getting ready for `request`: loading its model again
        (as long as its last load took) when it was unloaded, or what the loaded model must swap
        in; 0 when ready, when loading evicts nothing under the budget, or when never measured.
        """
        local = self.as_local(generator)
        if local is None:
            return 0.0
        if local.loaded:
            return local.switch_cost_s(request)
        state = self.states[local.name]
        if state.load_time_s is None or self._fits_beside_the_loaded(local):
            return 0.0
        return state.load_time_s

    def _fits_beside_the_loaded(self, generator: LocalGenerator) -> bool:
        """Under a budget, whether loading would unload nothing (without one it is not known)."""
        if self.memory_budget_bytes is None:
            return False
        return self.used_bytes() + self._bytes_to_load(generator) <= self.memory_budget_bytes

    def _load(self, generator: LocalGenerator) -> None:
        """Load; when the device runs out of memory, unload the least recently used model and try again.

        Its first load is where a model's size is not known yet, so no budget
        could have made room for it in advance.
        """
        while True:
            try:
                generator.load()
                return
            except Exception as error:
                if not device.is_out_of_memory(error) or not self._evict_one(keep=generator):
                    raise
            log.warning("out of memory loading %s; trying again with less loaded", generator.name)

    def remeasure(self, generator: LocalGenerator) -> None:
        """After a generation: a model can grow (LoRA adapters), so measure and apply the budget again."""
        if generator.loaded:
            self.states[generator.name].footprint = dict(generator.memory_footprint())
            self._evict_until(lambda: self.used_bytes() <= self._budget, keep=generator)

    def unload(self, generator: LocalGenerator) -> bool:
        """True when it was loaded. Components it shares stay with the models still using them."""
        was_loaded = generator.loaded
        if was_loaded:
            generator.unload()
        if self.current == generator.name:
            # The most recently used of the models still loaded, as /status reports it.
            still_loaded = [g for g in self._loaded() if g is not generator]
            latest = max(still_loaded, key=lambda g: self.states[g.name].last_used, default=None)
            self.current = None if latest is None else latest.name
        return was_loaded

    def _make_room(self, generator: LocalGenerator) -> None:
        """Before a load, evict for the size this model had last time (unknown on its first load)."""
        needed = self._bytes_to_load(generator)
        self._evict_until(lambda: self.used_bytes() + needed <= self._budget, keep=generator)

    def _bytes_to_load(self, generator: LocalGenerator) -> int:
        """What loading would add, by the size it had last time: parts other loaded models hold are there."""
        held = self._held_parts()
        return sum(size for part, size in self.states[generator.name].footprint.items() if part not in held)

    def _evict_until(self, fits: Callable[[], bool], keep: LocalGenerator) -> None:
        while not fits():
            if not self._evict_one(keep):
                log.warning("model %s alone exceeds the memory budget; keeping it loaded", keep.name)
                return

    def _evict_one(self, keep: LocalGenerator) -> bool:
        """Unload the least recently used model other than `keep`; False when there is none."""
        candidates = [g for g in self._loaded() if g is not keep]
        if not candidates:
            return False
        victim = min(candidates, key=lambda g: self.states[g.name].last_used)
        log.info("unloading %s, the least recently used model, to make room for %s", victim.name, keep.name)
        self.unload(victim)
        return True

    # ---- memory (read from any thread) -------------------------------------

    @property
    def _budget(self) -> float:
        return float("inf") if self.memory_budget_bytes is None else self.memory_budget_bytes

    def _loaded(self) -> list[LocalGenerator]:
        """Loaded generators in load order: shared parts are counted for the earliest."""
        loaded = [g for g in self.local() if g.loaded]
        return sorted(loaded, key=lambda g: self.states[g.name].loaded_at)

    def _held_parts(self) -> set[int]:
        return {part for g in self._loaded() for part in self.states[g.name].footprint}

    def used_bytes(self) -> int:
        return total_bytes([self.states[g.name].footprint for g in self._loaded()])

    def memory(self) -> dict[str, ModelMemory]:
        """Every model's memory; shared components are counted once, for the model loaded first."""
        counted = account([(g.name, self.states[g.name].footprint) for g in self._loaded()])
        return {name: counted.get(name, NOTHING) for name in self._generators}
