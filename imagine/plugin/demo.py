"""What a plugin offers for the demo: tiny stand-in weights and the settings that serve them."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DemoModels:
    """What a plugin offers for the demo (`register_demo_models`)."""

    #: Names this offer among the others (the model it stands in for, say).
    name: str
    #: Bump when `build` writes something else: folders built before are built again.
    version: int
    #: Write the tiny weights under the demo folder given (in a child process: torch is fine here).
    build: Callable[[pathlib.Path], None]
    #: The settings, shaped like the TOML file, that point the plugin's models at what
    #: `build` wrote under the folder given, e.g. {"models": {"my-model": {"source": ".../my-model"}}}.
    settings: Callable[[pathlib.Path], Mapping[str, Mapping[str, Any]]]
    #: A model of this offer that answers a first request at once: the curl line
    #: `imagine serve` prints uses it, and it is loaded at start-up.
    try_it: str = ""
    #: `imagine demo-models --full-size DIR`: write the real architecture with
    #: random weights under the folder given, for benchmarks at the real cost,
    #: and return the settings that serve it (shaped like `settings`).
    full_size: Callable[[pathlib.Path], Mapping[str, Mapping[str, Any]]] | None = None
