"""What models there are, how they are configured, what they hold in memory; loading and unloading them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from imagine.engine import device
from imagine.security.tokens import requires
from imagine.errors import validation_error
from imagine.engine.registry import ModelRegistry
from imagine.plugin.generators import CloudGenerator, Generator, LocalGenerator
from imagine.http.app_keys import executor_key, registry_key, settings_key
from imagine.engine.memory import ModelMemory
from imagine.http.openapi import Component, error_response, json_response, obj, operation, path_parameter
from imagine.http.request_bodies import LoadModelBody, parse_body, read_json
from imagine.http.views.system import SYSTEM_INFO, model_memory

NULLABLE_STRING = {"type": ["string", "null"]}
STRINGS = {"type": "array", "items": {"type": "string"}}
INPUTS = {
    "type": "array",
    "items": {"enum": ["text", "image", "mask"]},
    "description": "What requests may give: text; image (init_image); mask (mask_image, outpaint)",
}

MODEL_MEMORY = Component(
    "ModelMemory",
    obj(
        {
            "bytes": {"type": "integer", "description": "Counted for this model in the total; 0 when not loaded"},
            "shared_bytes": {"type": "integer", "description": "Used by this model, counted for another one"},
            "shared_with": {**STRINGS, "description": "The models it shares those parts with"},
        },
        description="What a model holds in memory; a part several models share is counted for the one loaded first.",
    ),
)
# model_memory()'s shape, declared once as SystemInfo's `models_memory`.
MODELS_MEMORY = SYSTEM_INFO.schema["properties"]["models_memory"]

LOCAL_MODEL = Component(
    "LocalModel",
    obj(
        {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "aliases": STRINGS,
            "loaded": {"type": "boolean"},
            "device": {
                **NULLABLE_STRING,
                "description": "Where it runs, or will load when not loaded yet; null for `auto` until the device "
                "thread has chosen (seconds after startup)",
            },
            "dtype": {**NULLABLE_STRING, "description": "The weights' dtype, or the one it will load with"},
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
            "inputs": INPUTS,
            "memory": MODEL_MEMORY,
            # From generator.listing(): only models that take LoRAs list them.
            "loras": {**STRINGS, "description": "The LoRAs on offer (file names in the LoRA folder)"},
            "default_loras": {
                "type": "array",
                "items": obj({"name": {"type": "string"}, "weight": {"type": "number"}}),
                "description": "Applied when a request names none",
            },
            "speed_ups": {
                "type": "object",
                "description": "While loaded: the GPU switches it loaded with (models.attention, channels_last, tf32, "
                "compile) and `compile_s`, the seconds compiling took at load",
            },
        },
        required=[
            "name",
            "description",
            "aliases",
            "loaded",
            "device",
            "dtype",
            "defaults",
            "limits",
            "vram_required",
            "inputs",
            "memory",
        ],
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
            "inputs": INPUTS,
            "models": {"type": "object"},
            "default_model": {"type": "string"},
            "aspect_ratios": {"type": "array"},
            "preset_styles": {"type": "array"},
            "quality_levels": {"type": "array"},
        },
        required=["name", "configured", "inputs"],
    ),
)

MODELS = obj(
    {
        "local_models": {"type": "object", "additionalProperties": LOCAL_MODEL},
        "cloud_models": {"type": "object", "additionalProperties": CLOUD_MODEL},
        "memory": {**MODELS_MEMORY, "description": "The loaded models together, shared parts once"},
    }
)

MODEL_STATUS = obj({"loaded": {"type": "boolean"}, "lora_available": {"type": "boolean"}, "device": {"type": "string"}})


MODEL_NAME = path_parameter("name", "A model name or alias")
MODEL_CHANGE = obj(
    {
        "message": {"type": "string"},
        "model": {"type": "string", "description": "The resolved name"},
        "loaded": {"type": "boolean"},
        "vram_used": {"type": "number", "description": "GPU memory in use now, GB; 0.0 without a GPU"},
        "load_time": {"type": ["number", "null"], "description": "Seconds; 0.0 when already loaded, null on unload"},
        "memory": MODEL_MEMORY,
        "device": {"type": "string"},
    }
)
UNKNOWN_MODEL = {404: error_response("Unknown model (MODEL_NOT_AVAILABLE)")}
LOAD_ERRORS = {
    **UNKNOWN_MODEL,
    503: error_response("The model failed to load (MODEL_NOT_AVAILABLE, with why) or the service is shutting down"),
}


def placement(app: web.Application, generator: Generator) -> tuple[str | None, str | None]:
    """Device and dtype: the loaded model's, else the ones it will load with (the device memory.device names)."""
    if generator.loaded:
        runtime = generator.runtime_info()
        return runtime.get("device"), runtime.get("dtype")
    executor = app[executor_key]
    models = app[settings_key].models
    # The device thread publishes its first report once it has resolved the device.
    chosen = None if executor.report is device.UNPROBED else executor.device
    return device.planned(models.device, models.dtype, chosen)


def local_model(app: web.Application, generator: Generator, memory: ModelMemory) -> dict[str, Any]:
    card = generator.card
    where, dtype = placement(app, generator)
    entry: dict[str, Any] = {
        "name": generator.name,
        "description": card.description,
        "aliases": list(card.aliases),
        "loaded": generator.loaded,
        "device": where,
        "dtype": dtype,
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
        "inputs": list(card.inputs),
        "memory": memory.as_json(),
        **generator.listing(),
    }
    if "speed_ups" in (runtime := generator.runtime_info()):
        entry["speed_ups"] = runtime["speed_ups"]
    return entry


def cloud_model(generator: CloudGenerator) -> dict[str, Any]:
    """Seed 003's shape: the backend's models, aspect ratios, styles and quality levels, and whether a key is set."""
    return {
        "name": generator.name,
        "description": generator.card.description,
        "aliases": list(generator.card.aliases),
        **generator.catalog(),
        "configured": generator.configured,
        "inputs": list(generator.card.inputs),
    }


@operation(
    "Every model: local ones with defaults and limits, cloud ones with their catalog (seed 003)",
    tags=["models"],
    responses={200: json_response("The models", MODELS)},
)
async def list_models(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    memory = registry.memory()
    return web.json_response(
        {
            "local_models": {g.name: local_model(request.app, g, memory[g.name]) for g in registry.local()},
            "cloud_models": {g.name: cloud_model(g) for g in registry.cloud()},
            "memory": model_memory(request.app),
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
            "lora_available": generator.card.takes_loras,
            "device": generator.runtime_info().get("device", request.app[executor_key].report.device),
        }
    )


def _change(request: web.Request, generator: Generator, message: str, load_time: float | None) -> web.Response:
    """Seed 003's answer to /load_model, with the model's own memory beside the device figure."""
    app = request.app
    vram = app[executor_key].report.vram_used_gb
    return web.json_response(
        {
            "message": message,
            "model": generator.name,
            "loaded": generator.loaded,
            # GPU memory in use now, in GB; 0.0 without a GPU (see "memory" for what the model holds).
            "vram_used": vram if vram is not None else 0.0,
            "load_time": None if load_time is None else round(load_time, 3),
            "memory": app[registry_key].memory()[generator.name].as_json(),
            "device": app[executor_key].device,
        }
    )


def _local(registry: ModelRegistry, name: str, loc: list[str]) -> LocalGenerator:
    """Only models on this device hold weights to load or unload; a cloud backend has none."""
    generator = registry.resolve(name)
    local = registry.as_local(generator)
    if local is None:
        raise validation_error([{"loc": loc, "msg": f"{generator.name} runs in the cloud: there is nothing to load or unload"}])
    return local


async def _load(request: web.Request, name: str, loc: list[str]) -> web.Response:
    registry = request.app[registry_key]
    generator = _local(registry, name, loc)
    # On the device thread, between jobs: no torch call ever runs on the loop.
    loaded_now = await request.app[executor_key].call(lambda: registry.ensure_loaded(generator))
    if loaded_now:
        return _change(request, generator, "Model loaded successfully", registry.states[generator.name].load_time_s)
    return _change(request, generator, "Model already loaded", 0.0)


@requires("admin")
@operation(
    "Load a model now rather than on first use",
    tags=["models"],
    description="On the device thread, between jobs; with a memory budget, least recently used models are "
    "unloaded first to make room.",
    parameters=[MODEL_NAME],
    responses={
        200: json_response("Loaded (or already loaded)", MODEL_CHANGE),
        400: error_response("A cloud backend: nothing to load"),
        **LOAD_ERRORS,
    },
)
async def load_model(request: web.Request) -> web.Response:
    return await _load(request, request.match_info["name"], ["path", "name"])


@requires("admin")
@operation(
    "Load a model, named in the body (seed 003)",
    tags=["models"],
    body=LoadModelBody,
    responses={
        200: json_response("Loaded (or already loaded)", MODEL_CHANGE),
        400: error_response("Invalid body, or a cloud backend: nothing to load"),
        **LOAD_ERRORS,
    },
)
async def load_model_seed003(request: web.Request) -> web.Response:
    body = parse_body(LoadModelBody, await read_json(request))
    return await _load(request, body.model, ["body", "model"])


@requires("admin")
@operation(
    "Unload a model, releasing its memory",
    tags=["models"],
    description="Parts it shares with other loaded models stay with them.",
    parameters=[MODEL_NAME],
    responses={
        200: json_response("Unloaded (or was not loaded)", MODEL_CHANGE),
        400: error_response("A cloud backend: nothing to unload"),
        503: error_response("The service is shutting down"),
        **UNKNOWN_MODEL,
    },
)
async def unload_model(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    generator = _local(registry, request.match_info["name"], ["path", "name"])
    was_loaded = await request.app[executor_key].call(lambda: registry.unload(generator))
    return _change(request, generator, "Model unloaded" if was_loaded else "Model was not loaded", None)


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.get(base + "/models", list_models),
        web.get(base + "/models/status", default_model_status),
        web.post(base + "/models/{name}/load", load_model),
        web.post(base + "/models/{name}/unload", unload_model),
        web.post(base + "/load_model", load_model_seed003),
    ]
