"""The plugin manager: built-in plugins and the `imagine` entry-point group.

Built-in plugins are loaded exactly like third-party ones, so the same hooks
serve both; a model name or alias, a settings section or a demo claimed twice
stops the start with both plugins named.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from imagine.plugin import hookspecs
from imagine.plugin.generators import Generator
from imagine.settings import SECTIONS, Settings, SettingsError

if TYPE_CHECKING:
    from imagine.plugin.demo import DemoModels

# The package of the built-in plugins; its PLUGINS lists their modules, so the core names no model.
BUILTIN_PACKAGE = "imagine_plugins"


class PluginError(RuntimeError):
    """Plugins disagree (a duplicate name) or registered something unusable."""


def plugin_manager(extra_plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in importlib.import_module(BUILTIN_PACKAGE).PLUGINS:
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


def _each_plugin(hook: Any, arguments: Callable[[str], Mapping[str, Any]]) -> None:
    """Call a hook one implementation at a time, so that a clash can name the plugin it came from.

    Like pluggy itself, an implementation gets only the arguments it names.
    """
    for implementation in hook.get_hookimpls():
        given = arguments(implementation.plugin_name)
        implementation.function(**{name: given[name] for name in implementation.argnames})


class _Claims:
    """Who claimed which name first, for the error message of the second claim."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._owners: dict[str, str] = {}

    def claim(self, name: str, plugin_name: str) -> None:
        if name in self._owners:
            raise PluginError(f"{self._what} '{name}' is registered by both {self._owners[name]} and {plugin_name}")
        self._owners[name] = plugin_name


def generators_by_plugin(manager: pluggy.PluginManager, settings: Settings) -> dict[str, list[Generator]]:
    """The generators each plugin registers, by plugin name; names and aliases must not clash."""
    registered: dict[str, list[Generator]] = {}
    claims = _Claims("model name")

    def arguments(plugin_name: str) -> Mapping[str, Any]:
        def register(generator: Generator) -> None:
            if not isinstance(generator, Generator):
                raise PluginError(f"plugin {plugin_name} registered {generator!r}, which is not a Generator")
            for claimed in (generator.name, *generator.card.aliases):
                claims.claim(claimed, plugin_name)
            registered.setdefault(plugin_name, []).append(generator)

        return {"register": register, "settings": settings}

    _each_plugin(manager.hook.register_generators, arguments)
    return registered


def collect_generators(manager: pluggy.PluginManager, settings: Settings) -> dict[str, Generator]:
    """Every generator the plugins register, by name."""
    generators = {g.name: g for plugin in generators_by_plugin(manager, settings).values() for g in plugin}
    # A table no plugin reads is a mistake (a misspelt model name, say), not a setting to ignore.
    for name in settings.models.options:
        if name not in generators:
            raise SettingsError(
                f"unknown setting models.{name}: no plugin registers a model named '{name}' "
                f"(known: {', '.join(generators)})"
            )
    return generators


@dataclasses.dataclass(frozen=True)
class PluginDescription:
    """One loaded plugin, as `imagine plugins` lists it."""

    name: str
    source: str  # "built in", "<distribution> <version> (entry point)", or "passed to create_app"
    models: tuple[str, ...]  # each with its aliases, e.g. "my-model (my-alias)"
    sections: tuple[str, ...]  # the settings sections it claims


def describe_plugins(manager: pluggy.PluginManager, settings: Settings) -> list[PluginDescription]:
    """Every loaded plugin, where it comes from, and what it registers, in loading order."""
    builtin = set(importlib.import_module(BUILTIN_PACKAGE).PLUGINS)
    distributions = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    registered = generators_by_plugin(manager, settings)
    sections: dict[str, list[str]] = {}

    def arguments(plugin_name: str) -> Mapping[str, Any]:
        return {"register": lambda name, _section: sections.setdefault(plugin_name, []).append(name)}

    _each_plugin(manager.hook.register_settings, arguments)
    described = []
    for name, plugin in manager.list_name_plugin():
        if name in builtin:
            source = "built in"
        elif id(plugin) in distributions:
            dist = distributions[id(plugin)]
            source = f"{dist.project_name} {dist.version} (entry point)"
        else:
            source = "passed to create_app"
        models = tuple(
            g.name + (f" ({', '.join(g.card.aliases)})" if g.card.aliases else "") for g in registered.get(name, [])
        )
        described.append(PluginDescription(name, source, models, tuple(sections.get(name, []))))
    return described


def settings_sections(manager: pluggy.PluginManager) -> dict[str, type]:
    """The top-level configuration sections the plugins claim, each with its dataclass."""
    sections: dict[str, type] = {}
    claims = _Claims("settings section")
    for core_section in SECTIONS:
        claims.claim(core_section, "the core")

    def arguments(plugin_name: str) -> Mapping[str, Any]:
        def register(name: str, section: type) -> None:
            if not (isinstance(section, type) and dataclasses.is_dataclass(section)):
                raise PluginError(f"plugin {plugin_name} registered settings section '{name}' as {section!r}, not a dataclass")
            claims.claim(name, plugin_name)
            sections[name] = section

        return {"register": register}

    _each_plugin(manager.hook.register_settings, arguments)
    return sections


def collect_demo_models(manager: pluggy.PluginManager) -> list[DemoModels]:
    """The demo models every plugin offers, in plugin order; their names must not clash."""
    from imagine.plugin.demo import DemoModels

    offered: list[DemoModels] = []
    claims = _Claims("demo models")

    def arguments(plugin_name: str) -> Mapping[str, Any]:
        def register(demo: DemoModels) -> None:
            if not isinstance(demo, DemoModels):
                raise PluginError(f"plugin {plugin_name} registered {demo!r}, which is not DemoModels")
            claims.claim(demo.name, plugin_name)
            offered.append(demo)

        return {"register": register}

    _each_plugin(manager.hook.register_demo_models, arguments)
    return offered
