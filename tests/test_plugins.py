"""The plugin manager: built-in and extra plugins through the same hook, clashes refused."""

from __future__ import annotations

import ast
import pathlib

import pytest

from imagine.plugin import hookspecs
from imagine.plugin.hookspecs import hookimpl
from imagine.plugin.manager import PluginError, collect_generators, plugin_manager
from imagine.settings import Settings
from tests.slow_plugin import SlowGenerator


class Claims:
    """A plugin registering a generator under a chosen name and aliases."""

    def __init__(self, name: str, aliases: tuple[str, ...] = ()) -> None:
        import dataclasses

        self.generator = SlowGenerator(0.0)
        self.generator.name = name
        self.generator.card = dataclasses.replace(SlowGenerator.card, aliases=aliases)

    @hookimpl
    def register_generators(self, register) -> None:  # settings is optional, as pluggy allows
        register(self.generator)


def test_builtin_and_extra_plugins_register_through_the_hook() -> None:
    generators = collect_generators(plugin_manager([Claims("extra")]), Settings())
    assert {"sdxl", "sdxl-turbo", "extra"} <= set(generators)


def test_a_duplicate_name_fails_with_both_plugins_named() -> None:
    manager = plugin_manager([Claims("sdxl")])
    with pytest.raises(PluginError) as refused:
        collect_generators(manager, Settings())
    message = str(refused.value)
    assert "'sdxl'" in message and "imagine_plugins.sdxl" in message and "Claims" in message


def test_an_alias_may_not_shadow_another_model() -> None:
    with pytest.raises(PluginError, match="stable-diffusion-xl"):
        collect_generators(plugin_manager([Claims("other", aliases=("stable-diffusion-xl",))]), Settings())


def test_registering_something_that_is_not_a_generator_fails() -> None:
    class Broken:
        @hookimpl
        def register_generators(self, register) -> None:
            register("sdxl-but-a-string")

    with pytest.raises(PluginError, match="not a Generator"):
        collect_generators(plugin_manager([Broken()]), Settings())


def test_every_hook_has_a_test() -> None:
    """As datasette does: a new hookspec must come with a test that names it."""
    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "imagine_spec")]
    assert hooks, "no hookspecs found"
    tests_text = "".join(
        path.read_text() for path in pathlib.Path(__file__).parent.glob("test_*.py") if path.name != "test_plugins.py"
    ) + pathlib.Path(__file__).read_text().split("def test_every_hook_has_a_test")[0]
    for hook in hooks:
        assert hook in tests_text, f"hook {hook} has no test"
    ast.parse(tests_text)
