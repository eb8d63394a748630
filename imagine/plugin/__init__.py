"""The plugin interface: the one package a plugin author imports.

    from imagine.plugin import LocalGenerator, ModelCard, ModelDefaults, ModelLimits, Options, hookimpl

The hooks are in `hookspecs`, the generator types in `generators`, the demo
offer in `demo`; `manager` is the core's side (loading and checking plugins).
"""

from imagine.plugin.demo import DemoModels
from imagine.plugin.generators import (
    CloudGenerator,
    GenerationInterrupted,
    GenerationRequest,
    Generator,
    ImageInput,
    LocalGenerator,
    LoraWeight,
    ModelCard,
    ModelDefaults,
    ModelExample,
    ModelLimits,
    Options,
    RemoteImages,
    StepCallback,
    StepProgress,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import SettingsError

__all__ = [
    "CloudGenerator",
    "DemoModels",
    "GenerationInterrupted",
    "GenerationRequest",
    "Generator",
    "ImageInput",
    "LocalGenerator",
    "LoraWeight",
    "ModelCard",
    "ModelDefaults",
    "ModelExample",
    "ModelLimits",
    "Options",
    "RemoteImages",
    "SettingsError",
    "StepCallback",
    "StepProgress",
    "hookimpl",
]
