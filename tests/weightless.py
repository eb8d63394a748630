"""A base for test generators that hold no weights: loading only flips a flag."""

from __future__ import annotations

from imagine.plugin.generators import LocalGenerator


class WeightlessGenerator(LocalGenerator):
    _loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False
