"""GET /metrics: Prometheus exposition, or seed 000's JSON summary for `Accept: application/json`."""

from __future__ import annotations

import contextlib

from aiohttp import web
from redis.exceptions import RedisError

from imagine import __version__
from imagine.security.tokens import requires
from imagine.http.app_keys import cluster_key, executor_key, metrics_key, registry_key
from imagine.http.negotiation import preferred
from imagine.http.openapi import content_response, obj, operation
from imagine.security.ratelimit import operational

# What a scraper may ask for; JSON only when the client ranks it first.
OFFERED = ("text/plain", "application/openmetrics-text", "application/json")

SEED_SUMMARY = obj(
    {
        "model_loaded": {"type": "boolean", "description": "A local model is loaded"},
        "lora_available": {"type": "boolean", "description": "The default model takes LoRAs"},
        "device": {"type": "string"},
        "torch_version": {"type": ["string", "null"], "description": "null until the device thread has started"},
        "api_version": {"type": "string"},
    }
)


@operational
@requires("metrics", "admin")
@operation(
    "Prometheus metrics",
    tags=["operations"],
    description=(
        "Prometheus text exposition (OpenMetrics when the scraper asks for it): requests by route and status, "
        "latency, queue depth, capacity and wait (and the shared queue's depth and live workers), generation seconds and images by model, rate-limit refusals "
        "by bucket, model loads, errors by code, cloud credits, batch sizes. With `Accept: application/json`, "
        "seed 000's summary instead."
    ),
    responses={
        200: content_response(
            "The metrics",
            {
                "text/plain": {"type": "string"},
                "application/openmetrics-text": {"type": "string"},
                "application/json": SEED_SUMMARY,
            },
        )
    },
)
async def metrics(request: web.Request) -> web.Response:
    accept = request.headers.get("Accept")
    if preferred(accept, OFFERED) == "application/json":
        return web.json_response(_seed_summary(request.app))
    cluster = request.app.get(cluster_key)
    if cluster is not None:
        with contextlib.suppress(RedisError):  # the shared queue's gauges keep their last values
            request.app[metrics_key].cluster_seen(await cluster.queue.depth(), len(await cluster.queue.workers()))
    body, content_type = request.app[metrics_key].exposition(accept)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _seed_summary(app: web.Application) -> dict[str, object]:
    registry = app[registry_key]
    report = app[executor_key].report
    default = registry.resolve(None)
    return {
        "model_loaded": any(generator.loaded for generator in registry.local()),
        "lora_available": default.card.takes_loras,
        "device": report.device,
        "torch_version": report.torch_version or None,
        "api_version": __version__,
    }


def routes(base: str) -> list[web.RouteDef]:
    return [web.get(base + "/metrics", metrics)]
