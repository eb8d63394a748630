"""The plugin manager: built-in plugins and the `imagine` entry-point group.

Built-in plugins are loaded exactly like third-party ones, so the same hooks
serve both; a name or alias claimed twice stops the start with both plugins named.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterable
from typing import Any

import pluggy

from imagine.plugin import hookspecs
from imagine.plugin.generators import Generator
from imagine.settings import Settings

BUILTIN_PLUGINS = ("imagine_plugins.sdxl", "imagine_plugins.lightning", "imagine_plugins.turbo", "imagine_plugins.sd15_lora", "imagine_plugins.leonardo")


class PluginError(RuntimeError):
    """Plugins disagree (a duplicate name) or registered something unusable."""


def plugin_manager(extra_plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)
    manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra_plugins:
        manager.register(plugin, name=_readable_name(manager, plugin))
    return manager


def _readable_name(manager: pluggy.PluginManager, plugin: Any) -> str:
    """Module or class path, so error messages name plugins a person can find."""
    if isinstance(plugin, types.ModuleType):
        base = plugin.__name__
    else:
        base = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    name, number = base, 1
    while manager.has_plugin(name):
        number += 1
        name = f"{base}#{number}"
    return name


def collect_generators(manager: pluggy.PluginManager, settings: Settings) -> dict[str, Generator]:
    """Every generator the plugins register, by name; aliases must not clash either."""
    generators: dict[str, Generator] = {}
    owners: dict[str, str] = {}  # name or alias -> plugin that claimed it
    for implementation in manager.hook.register_generators.get_hookimpls():
        plugin_name = implementation.plugin_name

        def register(generator: Generator, plugin_name: str = plugin_name) -> None:
            if not isinstance(generator, Generator):
                raise PluginError(f"plugin {plugin_name} registered {generator!r}, which is not a Generator")
            for claimed in (generator.name, *generator.card.aliases):
                if claimed in owners:
                    raise PluginError(
                        f"model name '{claimed}' is registered by both {owners[claimed]} and {plugin_name}"
                    )
                owners[claimed] = plugin_name
            generators[generator.name] = generator

        # Called one implementation at a time to know whose registration clashed;
        # like pluggy itself, pass only the arguments the implementation names.
        arguments = {"register": register, "settings": settings}
        implementation.function(**{name: arguments[name] for name in implementation.argnames})
    return generators
