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
