"""The hooks a generator plugin can implement (pluggy, in the style of simonw/llm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from imagine.plugin.generators import Generator
    from imagine.settings import Settings

PROJECT = "imagine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    """Register generators by calling `register(generator)` once for each."""
