"""The demo models: tiny random-weight stand-ins that `imagine serve` uses when no weights are configured.

Each plugin offers its own (`register_demo_models`): a build that writes tiny
weights in the real on-disk layout, so the real loading code runs against them
unchanged, and the settings that point its models at them. This module builds
them all into one folder, once, and knows whether a folder is current.

Only the builds import torch, in a child process: importing this module stays
cheap for code that only needs to decide that nothing has to be built.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from imagine.plugin.demo import DemoModels

if TYPE_CHECKING:
    from imagine.settings import Settings

# Bump whenever what this module writes around the builds changes; each
# plugin versions its own build (`DemoModels.version`).
DEMO_MODELS_VERSION: int = 1

MARKER_NAME = ".demo-models-version"
# Which builds, at which versions, a folder holds: one "name version" line each.
CONTENTS_NAME = ".demo-models-contents"


def offered_demo_models() -> list[DemoModels]:
    """What the built-in and installed plugins offer for the demo."""
    from imagine.plugin.manager import collect_demo_models, plugin_manager

    return collect_demo_models(plugin_manager())


def build_demo_models(target: pathlib.Path) -> None:
    """Write every plugin's demo models under `target`, deterministically; marker last."""
    offered = offered_demo_models()
    target.mkdir(parents=True, exist_ok=True)
    for demo in offered:
        demo.build(target)
    _make_world_readable(target)
    (target / CONTENTS_NAME).write_text(_contents(offered))
    # Written last: a folder without it is incomplete whatever else it holds.
    (target / MARKER_NAME).write_text(f"{DEMO_MODELS_VERSION}\n")


def demo_configuration(folder: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Every plugin's demo settings for models built in `folder`, merged (model tables key by key)."""
    merged: dict[str, dict[str, Any]] = {}
    for demo in offered_demo_models():
        for section, values in demo.settings(folder).items():
            target = merged.setdefault(section, {})
            for key, value in values.items():
                if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
                    target[key] = {**target[key], **value}
                else:
                    target[key] = value
    return merged


def demo_settings(settings: Settings, folder: pathlib.Path) -> Settings:
    """The same settings with the plugins' demo settings laid over them (the demo models built in `folder`)."""
    changes: dict[str, dict[str, Any]] = {}
    for section, values in demo_configuration(folder).items():
        if section != "models":
            changes[section] = values
            continue
        # [models] holds plain settings and one table per model: each table is laid over the configured one.
        options = {name: dict(table) for name, table in settings.models.options.items()}
        plain = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                options[key] = {**options.get(key, {}), **value}
            else:
                plain[key] = value
        changes["models"] = {**plain, "options": options}
    return settings.replace(**changes)


def names_weights(settings: Settings) -> bool:
    """True when the configuration names weights of its own, so the demo models must not stand in.

    It does when a `[models.<name>]` table sets a key that the plugins' demo
    settings set for that model (its source, say).
    """
    # Which folder the demo would be built in does not change which keys it sets.
    demo_models = demo_configuration(pathlib.Path(settings.server.cache_dir)).get("models", {})
    demo_keys = {(name, key) for name, table in demo_models.items() if isinstance(table, Mapping) for key in table}
    return any((name, key) in demo_keys for name, table in settings.models.options.items() for key in table)


def prepare_demo_models(target: pathlib.Path) -> bool:
    """`ensure_demo_models` in a child process; True if it built them.

    Building runs torch, and a process serves fastest when its device thread is
    the only thread that ever did: a live thread with an OpenMP team of its own
    (the main thread is always live) halves the device thread's speed on a CPU.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(ensure_demo_models, target).result()


def ensure_demo_models(target: pathlib.Path) -> bool:
    """Build the demo models unless `target` holds the current ones.

    Returns True if it built them. The build goes to a temporary sibling folder
    that is renamed into place, so a crash never leaves a broken `target`.
    """
    if _is_current(target, offered_demo_models()):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_demo_models(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _contents(offered: Sequence[DemoModels]) -> str:
    return "".join(f"{demo.name} {demo.version}\n" for demo in offered)


def _is_current(target: pathlib.Path, offered: Sequence[DemoModels]) -> bool:
    """Complete, written by this version, and holding exactly the builds the plugins offer now."""
    try:
        version = int((target / MARKER_NAME).read_text().strip())
        contents = (target / CONTENTS_NAME).read_text()
    except (OSError, ValueError):
        return False
    return version == DEMO_MODELS_VERSION and contents == _contents(offered)


def _make_world_readable(root: pathlib.Path) -> None:
    # safetensors writes owner-only (0600) files and mkdtemp makes a 0700
    # folder, yet the models are often built by another user (at image-build
    # time, say) than the one serving them.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
