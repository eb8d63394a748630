"""What models there are, how they are configured, and whether they are loaded."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from imagine.generators import CloudGenerator, Generator
from imagine.keys import executor_key, registry_key
from imagine.openapi import Component, json_response, obj, operation

NULLABLE_STRING = {"type": ["string", "null"]}
STRINGS = {"type": "array", "items": {"type": "string"}}

LOCAL_MODEL = Component(
    "LocalModel",
    obj(
        {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "aliases": STRINGS,
            "loaded": {"type": "boolean"},
            "device": NULLABLE_STRING,
            "dtype": NULLABLE_STRING,
            "defaults": obj(
                {
                    "steps": {"type": "integer"},
                    "guidance": {"type": "number"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "scheduler": {"type": "string"},
                }
            ),
            "limits": obj(
                {
                    "min_size": {"type": "integer"},
                    "max_size": {"type": "integer"},
                    "max_steps": {"type": "integer"},
                    "step_choices": {"type": ["array", "null"], "items": {"type": "integer"}},
                    "schedulers": STRINGS,
                }
            ),
            "vram_required": {"type": "string"},
        }
    ),
)

CLOUD_MODEL = Component(
    "CloudModel",
    obj(
        {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "aliases": STRINGS,
            "configured": {"type": "boolean", "description": "An API key is set"},
            "models": {"type": "object"},
            "aspect_ratios": {"type": "array"},
            "preset_styles": {"type": "array"},
            "quality_levels": {"type": "array"},
        },
        required=["name", "configured"],
    ),
)

MODELS = obj(
    {
        "local_models": {"type": "object", "additionalProperties": LOCAL_MODEL},
        "cloud_models": {"type": "object", "additionalProperties": CLOUD_MODEL},
    }
)

MODEL_STATUS = obj({"loaded": {"type": "boolean"}, "lora_available": {"type": "boolean"}, "device": {"type": "string"}})


def local_model(generator: Generator) -> dict[str, Any]:
    card = generator.card
    runtime = generator.runtime_info()
    entry: dict[str, Any] = {
        "name": generator.name,
        "description": card.description,
        "aliases": list(card.aliases),
        "loaded": generator.loaded,
        "device": runtime.get("device"),
        "dtype": runtime.get("dtype"),
        "defaults": {
            "steps": card.defaults.steps,
            "guidance": card.defaults.guidance,
            "width": card.defaults.width,
            "height": card.defaults.height,
            "scheduler": card.defaults.scheduler,
        },
        "limits": {
            "min_size": card.limits.min_size,
            "max_size": card.limits.max_size,
            "max_steps": card.limits.max_steps,
            "step_choices": list(card.limits.step_choices) if card.limits.step_choices else None,
            "schedulers": list(card.limits.schedulers),
        },
        "vram_required": card.vram_required,
    }
    return entry


def cloud_model(generator: CloudGenerator) -> dict[str, Any]:
    """Seed 003's shape: the backend's models, aspect ratios, styles and quality levels, and whether a key is set."""
    return {
        "name": generator.name,
        "description": generator.card.description,
        "aliases": list(generator.card.aliases),
        **generator.catalog(),
        "configured": generator.configured,
    }


@operation(
    "Every model: local ones with defaults and limits, cloud ones with their catalog (seed 003)",
    tags=["models"],
    responses={200: json_response("The models", MODELS)},
)
async def list_models(request: web.Request) -> web.Response:
    generators = request.app[registry_key].generators()
    return web.json_response(
        {
            "local_models": {g.name: local_model(g) for g in generators if g.uses_device},
            "cloud_models": {g.name: cloud_model(g) for g in generators if isinstance(g, CloudGenerator)},
        }
    )


@operation(
    "The default model's state (seed 000)",
    tags=["models"],
    responses={200: json_response("Loaded, LoRA support and device", MODEL_STATUS)},
)
async def default_model_status(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    generator = registry.resolve(None)
    return web.json_response(
        {
            "loaded": generator.loaded,
            "lora_available": bool(generator.card.extra.get("takes_loras")),
            "device": generator.runtime_info().get("device", request.app[executor_key].report.device),
        }
    )


def routes(base: str) -> list[web.RouteDef]:
    return [web.get(base + "/models", list_models), web.get(base + "/models/status", default_model_status)]
