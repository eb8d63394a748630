"""The registered generators: name and alias resolution, and their load state.

Loading and unloading happen on the device thread; the event loop only reads
the state recorded here (plain attributes, written by one thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from imagine.errors import model_not_available
from imagine.generators import Generator
from imagine.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)


@dataclass
class LoadState:
    error: str | None = None
    load_time_s: float | None = None
    last_used: float = 0.0


class ModelRegistry:
    def __init__(self, generators: Mapping[str, Generator], default: str, telemetry: Telemetry = NO_TELEMETRY) -> None:
        self._generators = dict(generators)
        self._telemetry = telemetry
        self._aliases = {alias: g.name for g in generators.values() for alias in g.card.aliases}
        self.default = default
        self.states = {name: LoadState() for name in generators}
        self.current: str | None = None  # the most recently used loaded model

    @property
    def names(self) -> list[str]:
        return list(self._generators)

    def generators(self) -> list[Generator]:
        return list(self._generators.values())

    def resolve(self, name: str | None) -> Generator:
        """A name, an alias or None (the default) to its generator; 404 for unknown names."""
        wanted = name if name is not None else self.default
        canonical = self._aliases.get(wanted, wanted)
        generator = self._generators.get(canonical)
        if generator is None:
            raise model_not_available(wanted, self.names)
        return generator

    def ensure_loaded(self, generator: Generator) -> None:
        """Load on first use (device thread); a failure is recorded and raised as 503."""
        state = self.states[generator.name]
        if not generator.loaded:
            started = time.perf_counter()
            try:
                generator.load()
            except Exception as error:  # a broken model must not take the service down
                state.error = f"{type(error).__name__}: {error}"
                log.error("model %s failed to load: %s", generator.name, state.error)
                self._telemetry.model_loaded(generator.name, time.perf_counter() - started, ok=False)
                raise model_not_available(generator.name, self.names, reason=state.error) from None
            state.error = None
            state.load_time_s = time.perf_counter() - started
            self._telemetry.model_loaded(generator.name, state.load_time_s, ok=True)
            log.info("model %s loaded in %.2f s", generator.name, state.load_time_s)
        state.last_used = time.monotonic()
        self.current = generator.name

    def unload(self, generator: Generator) -> None:
        if generator.loaded:
            generator.unload()
        if self.current == generator.name:
            self.current = None

    def failed(self) -> dict[str, str]:
        return {name: state.error for name, state in self.states.items() if state.error}
