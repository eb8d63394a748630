"""Liveness, health, status and information routes."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from typing import Any

import psutil
from aiohttp import web
from redis.exceptions import RedisError

from imagine.engine import device
from imagine.security.tokens import public
from imagine.plugin.generators import Generator
from imagine.http.app_keys import assistant_key, cluster_key, executor_key, gallery_key, limiter_key, registry_key, role_key
from imagine.engine.memory import gigabytes
from imagine.engine.registry import ModelRegistry
from imagine.http.openapi import Component, error_response, json_response, obj, operation, query_parameter
from imagine.http.query_params import query_values
from imagine.security.ratelimit import operational


# Examples for whatever model is the default; each model's own come from its card.
EXAMPLES = [
    {
        "name": "Geometric",
        "prompt": "abstract geometric patterns in vibrant colors, artistic composition",
        "negative_prompt": "photorealistic, realistic, photographic",
    },
    {
        "name": "Mountains",
        "prompt": "a serene mountain landscape at sunset, reflections in a lake",
        "negative_prompt": "low quality, blurry",
    },
]


def model_memory(app: web.Application) -> dict[str, Any]:
    """The loaded models' measured memory together (shared parts once), and where it lives."""
    registry = app[registry_key]
    used = registry.used_bytes()
    budget = registry.memory_budget_bytes
    return {
        # "cpu": the weights sit in this process's RAM; "cuda" or "mps": in GPU memory.
        "device": app[executor_key].device,
        "total_bytes": used,
        "total_gb": gigabytes(used),
        "budget_gb": gigabytes(budget) if budget is not None else None,
    }


NUMBER_OR_NULL = {"type": ["number", "null"]}
STRING_OR_NULL = {"type": ["string", "null"]}

SYSTEM_INFO = Component(
    "SystemInfo",
    obj(
        {
            "cpu_usage": {"type": "number"},
            "available_memory": {"type": "number", "description": "GB"},
            "total_memory": {"type": "number", "description": "GB"},
            "total_vram": NUMBER_OR_NULL,
            "available_vram": NUMBER_OR_NULL,
            "vram_usage": NUMBER_OR_NULL,
            "process_memory": {"type": "number", "description": "GB resident in this process"},
            "models_memory": obj(
                {
                    "device": {"type": "string"},
                    "total_bytes": {"type": "integer"},
                    "total_gb": {"type": "number"},
                    "budget_gb": NUMBER_OR_NULL,
                }
            ),
            "python_version": {"type": "string"},
            "torch_version": STRING_OR_NULL,
        }
    ),
)

HEALTH = Component(
    "Health",
    obj(
        {
            "status": {"enum": ["healthy", "degraded", "unhealthy"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "model_loaded": {"type": "boolean"},
            "model_status": {
                "type": "object",
                "additionalProperties": obj(
                    {"loaded": {"type": "boolean"}, "error": STRING_OR_NULL, "configured": {"type": "boolean"}},
                    required=["loaded", "error"],
                ),
            },
            "queue": obj(
                {
                    "depth": {"type": "integer", "description": "Jobs waiting: in the whole cluster with a shared queue"},
                    "capacity": {"type": "integer"},
                    "workers": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Shared queue only: the workers seen alive in the last minute",
                    },
                },
                required=["depth", "capacity"],
            ),
            "gallery": obj(
                {
                    "backend": {"enum": ["embedded", "shared"]},
                    "ok": {"type": "boolean", "description": "Whether its database and object storage answer"},
                }
            ),
            "assistant": obj(
                {
                    "configured": {"type": "boolean", "description": "Whether assistant.ollama_url names a server"},
                    "reachable": {"type": "boolean", "description": "Whether the Ollama server answered the last look"},
                    "chat_model": {"type": "boolean", "description": "Whether the server has assistant.chat_model"},
                    "vision_model": {"type": "boolean", "description": "Whether the server has assistant.vision_model"},
                    "error": STRING_OR_NULL,
                },
                description="Reported, never degrading: generation does not need the assistant",
            ),
            "reasons": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Why the status is not healthy (empty when it is)",
            },
        }
    ),
)

INFO = obj(
    {
        "model": {"type": "string"},
        "is_loaded": {"type": "boolean"},
        "error": STRING_OR_NULL,
        "config": obj(
            {
                "default_steps": {"type": "integer"},
                "default_guidance": {"type": "number"},
                "min_img_size": {"type": "integer"},
                "max_img_size": {"type": "integer"},
                "default": {"type": "boolean"},
            }
        ),
        "system_info": SYSTEM_INFO,
    }
)

STATUS = obj(
    {
        "status": {"const": "running"},
        "device": {"type": "string"},
        "device_name": {"type": "string"},
        "vram_total": NUMBER_OR_NULL,
        "vram_used": NUMBER_OR_NULL,
        "vram_free": NUMBER_OR_NULL,
        "model_loaded": {"type": "boolean"},
        "current_model": STRING_OR_NULL,
        "current_generator_type": {"enum": ["local", "api", None]},
        "available_models": {"type": "object"},
        "available_generators": {"type": "object"},
        "models": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "gpu_available": {"type": "boolean"},
        "gpu_backend": STRING_OR_NULL,
        "system_info": SYSTEM_INFO,
    }
)

EXAMPLES_SCHEMA = obj(
    {
        "examples": {
            "type": "array",
            "items": obj(
                {
                    "name": {"type": "string"},
                    "prompt": {"type": "string"},
                    "negative_prompt": {"type": "string"},
                    "model": {"type": "string"},
                },
                required=["name", "prompt", "negative_prompt"],
            ),
        }
    }
)


def system_info(app: web.Application) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    report = app[executor_key].report
    return {
        "cpu_usage": psutil.cpu_percent(interval=None),
        "available_memory": gigabytes(memory.available),
        "total_memory": gigabytes(memory.total),
        "total_vram": report.vram_total_gb,
        "available_vram": report.vram_free_gb,
        "vram_usage": report.vram_used_gb,
        # On the CPU the models live in ordinary memory: this is what they cost.
        "process_memory": device.process_memory_gb(),
        "models_memory": model_memory(app),
        "python_version": platform.python_version(),
        "torch_version": report.torch_version or None,
    }


@public
@operation(
    "Liveness: the process answers",
    tags=["status"],
    rate_limited=False,
    responses={200: json_response("Alive", obj({"status": {"const": "ok"}}))},
)
async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _local_model_loaded(registry: ModelRegistry) -> bool:
    # A cloud backend holds no weights here: "a model is loaded" speaks of the device.
    return any(generator.loaded for generator in registry.local())


def _model_status(registry: ModelRegistry) -> dict[str, dict[str, Any]]:
    status = {g.name: {"loaded": g.loaded, "error": registry.states[g.name].error} for g in registry.local()}
    for cloud in registry.cloud():
        # Reported, never degrading: a missing or refused cloud key leaves local generation untouched.
        status[cloud.name] = {"loaded": cloud.loaded, "error": cloud.problem(), "configured": cloud.configured}
    return {g.name: status[g.name] for g in registry.generators()}


def _generator_summaries(registry: ModelRegistry) -> dict[str, dict[str, Any]]:
    def summary(generator: Generator, kind: str) -> dict[str, Any]:
        return {
            "name": generator.name,
            "type": kind,
            "description": generator.card.description,
            "loaded": generator.loaded,
            "error": registry.states[generator.name].error,
        }

    summaries = {g.name: summary(g, "local") for g in registry.local()}
    summaries |= {g.name: summary(g, "api") | {"configured": g.configured} for g in registry.cloud()}
    return {g.name: summaries[g.name] for g in registry.generators()}


@operational
@operation(
    "Health: models, queue and the rate-limit store",
    tags=["status"],
    description="`degraded` when a local model failed to load, the queue is full, the shared rate-limit store "
    "or the shared gallery is unreachable; `reasons` says which.",
    responses={
        200: json_response("Healthy or degraded", HEALTH),
        503: json_response("Unhealthy: the device thread is gone", HEALTH),
    },
)
async def health(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    executor = request.app[executor_key]
    failed = registry.failed()
    model_status = _model_status(registry)
    local = {generator.name for generator in registry.local()}
    reasons = [f"model {name} failed to load" for name in failed if name in local]
    queue = {"depth": executor.depth, "capacity": executor.capacity}
    cluster = request.app.get(cluster_key)
    if cluster is not None:
        try:
            queue = {"depth": await cluster.queue.depth(), "capacity": executor.capacity, "workers": await cluster.queue.workers()}
        except RedisError:
            reasons.append("the shared queue is unreachable")
        else:
            if not queue["workers"]:
                reasons.append("no worker was seen in the last minute")
    if queue["depth"] >= queue["capacity"]:
        reasons.append("the queue is full")
    limiter_problem = request.app[limiter_key].problem()
    if limiter_problem is not None:
        reasons.append(limiter_problem)
    gallery = await request.app[gallery_key].state()
    if not gallery.ok:
        reasons.append("the gallery's database or object storage is unreachable")
    if request.app[role_key] != "api" and not executor.alive:
        status = "unhealthy"
        reasons.insert(0, "the device thread is not running")
    else:
        status = "degraded" if reasons else "healthy"
    body = {
        "status": status,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        "model_loaded": _local_model_loaded(registry),
        "model_status": model_status,
        "queue": queue,
        "gallery": {"backend": gallery.backend, "ok": gallery.ok},
        "assistant": dataclasses.asdict(request.app[assistant_key].state()),
        "reasons": reasons,
    }
    return web.json_response(body, status=503 if status == "unhealthy" else 200)


@operation(
    "A model's configuration and the system's resources (seed 002)",
    tags=["status"],
    parameters=[query_parameter("model", "A model name or alias; the default model when absent", {"type": "string"})],
    responses={200: json_response("The model and the system", INFO), 404: error_response("Unknown model")},
)
async def info(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    generator = registry.resolve(query_values(request, ("model",)).get("model"))
    card = generator.card
    return web.json_response(
        {
            "model": generator.name,
            "is_loaded": generator.loaded,
            "error": registry.states[generator.name].error,
            "config": {
                "default_steps": card.defaults.steps,
                "default_guidance": card.defaults.guidance,
                "min_img_size": card.limits.min_size,
                "max_img_size": card.limits.max_size,
                "default": generator.name == registry.default,
            },
            "system_info": system_info(request.app),
        }
    )


@operation(
    "Device, memory and every generator's state (seeds 003, 004)",
    tags=["status"],
    responses={200: json_response("The service's state", STATUS)},
)
async def status(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    executor = request.app[executor_key]
    report = executor.report
    generators = registry.generators()
    assistant = request.app[assistant_key].state()
    # Seed 004's: whether the chat model and the vision model answer, when there is an assistant.
    seed004 = {"ollama": assistant.chat_model, "multimodal": assistant.vision_model} if assistant.configured else {}
    return web.json_response(
        {
            "status": "running",
            "device": report.device,
            "device_name": report.device_name,
            "vram_total": report.vram_total_gb,
            "vram_used": report.vram_used_gb,
            "vram_free": report.vram_free_gb,
            "model_loaded": _local_model_loaded(registry),
            "current_model": registry.current,
            "current_generator_type": (
                None if registry.current is None else _generator_summaries(registry)[registry.current]["type"]
            ),
            "available_models": {
                g.name: {
                    "name": g.name,
                    "description": g.card.description,
                    "vram_required": g.card.vram_required,
                    "error": registry.states[g.name].error,
                }
                for g in registry.local()
            },
            "available_generators": _generator_summaries(registry),
            "models": {g.name: g.loaded for g in generators} | seed004,
            "gpu_available": report.gpu_available,
            "gpu_backend": report.gpu_backend,
            "system_info": system_info(request.app),
        }
    )


@operation(
    "Example prompts for the registered models (seed 000)",
    tags=["status"],
    responses={200: json_response("Examples", EXAMPLES_SCHEMA)},
)
async def examples(request: web.Request) -> web.Response:
    own = [
        {"name": example.name, "prompt": example.prompt, "negative_prompt": example.negative_prompt, "model": generator.name}
        for generator in request.app[registry_key].generators()
        for example in generator.card.examples
    ]
    return web.json_response({"examples": own + EXAMPLES})


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.get(base + "/livez", livez),
        web.get(base + "/health", health),
        web.get(base + "/info", info),
        web.get(base + "/status", status),
        web.get(base + "/examples", examples),
    ]
