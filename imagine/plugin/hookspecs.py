"""The hooks a generator plugin can implement (pluggy, in the style of simonw/llm).

A plugin owns everything about its backends: its generators and their request
`Options` (`imagine.plugin.generators`), the configuration it reads, and the
tiny stand-in weights `imagine serve` uses when no weights are configured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from imagine.plugin.demo import DemoModels
    from imagine.plugin.generators import Generator
    from imagine.settings import Settings

PROJECT = "imagine"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    """Register generators by calling `register(generator)` once for each.

    A generator's `[models.<name>]` table is the plugin's to read:
    `settings.models.table(name, YourTable)` parses it with the plugin's dataclass.
    """


@hookspec
def register_settings(register: Callable[[str, type], None]) -> None:
    """Claim top-level configuration sections with `register(name, dataclass)`.

    The core reads `[name]` from the TOML file and `IMAGINE_<NAME>_<KEY>` from
    the environment into the frozen dataclass (types checked, unknown keys
    refused, each mistake naming its setting); read it back with
    `settings.section(name, dataclass)`.
    """


@hookspec
def register_demo_models(register: Callable[[DemoModels], None]) -> None:
    """Offer tiny random-weight stand-ins for this plugin's models with `register(DemoModels(...))`."""
