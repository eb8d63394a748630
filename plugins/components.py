"""Pipeline components already in memory, found again by what they were loaded from.

SDXL and SDXL-Lightning load the same text encoders, tokenizers and VAE from
the same base weights. A pipeline that finds them here is built around the
very same objects (diffusers takes ready components as `from_pretrained`
arguments and loads only the rest), so two models hold one copy.

References are weak: the pool never keeps anything alive on its own, so
unloading every model that uses a component frees it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

# (weights source, component name, device, dtype)
ComponentKey = tuple[str, str, str, str]


class ComponentPool:
    def __init__(self) -> None:
        self._components: weakref.WeakValueDictionary[ComponentKey, Any] = weakref.WeakValueDictionary()

    def find(self, source: str, names: Iterable[str], device: str, dtype: str) -> dict[str, Any]:
        """The named components loaded from `source` for this device and dtype that are still alive."""
        found = {}
        for name in names:
            component = self._components.get((source, name, device, dtype))
            if component is not None:
                found[name] = component
        return found

    def add(self, source: str, pipe: Any, names: Iterable[str], device: str, dtype: str) -> None:
        for name in names:
            component = getattr(pipe, name, None)
            if component is not None:
                self._components[(source, name, device, dtype)] = component


# One per process: components are shared by every pipeline that loads the same weights.
POOL = ComponentPool()
