"""Every typed key stored on the application or on a request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from imagine.assistant.service import Assistant
from imagine.security.tokens import Principal, TokenVerifier
from imagine.security.cloud_api_keys import CloudKeys
from imagine.engine.executor import DeviceExecutor
from imagine.storage.interface import Gallery
from imagine.engine.jobs import JobStore
from imagine.http.metrics import Metrics
from imagine.engine.registry import ModelRegistry
from imagine.http.png import PngEncoder
from imagine.security.ratelimit import BucketDecision, IPNetwork, RateLimiter
from imagine.settings import Settings
from imagine.security.url_signing import UrlSigner

if TYPE_CHECKING:
    from imagine.cluster.service import Cluster
    from imagine.http.request_bodies import GenerateBody

settings_key = web.AppKey("settings", Settings)
verifier_key = web.AppKey("verifier", TokenVerifier)
limiter_key = web.AppKey("limiter", RateLimiter)
registry_key = web.AppKey("registry", ModelRegistry)
executor_key = web.AppKey("executor", DeviceExecutor)
jobs_key = web.AppKey("jobs", JobStore)
trusted_networks_key = web.AppKey("trusted_networks", tuple[IPNetwork, ...])
encode_pool_key = web.AppKey("encode_pool", ThreadPoolExecutor)
# Decodes and prepares input images: apart from the encoding pool, so that a caller sending large
# inputs delays other inputs, never the answers everyone waits for.
input_pool_key = web.AppKey("input_pool", ThreadPoolExecutor)
png_encoder_key = web.AppKey("png_encoder", PngEncoder)
client_session_key = web.AppKey("client_session", aiohttp.ClientSession)
cloud_keys_key = web.AppKey("cloud_keys", CloudKeys)
gallery_key = web.AppKey("gallery", Gallery)
url_signer_key = web.AppKey("url_signer", UrlSigner)
metrics_key = web.AppKey("metrics", Metrics)
# The assistant (Ollama chat, sessions); off without assistant.ollama_url.
assistant_key = web.AppKey("assistant", Assistant)
# "serve", "api" (no device) or "worker": see imagine.http.app.Role.
role_key = web.AppKey("role", str)
# The shared queue's parts, with queue.storage = "redis://..." only.
cluster_key: web.AppKey[Cluster] = web.AppKey("cluster")
# The OpenAPI document, built once the router is complete (at startup).
openapi_key = web.AppKey("openapi", dict[str, Any])
# The generation body with the registered generators' options (request_bodies.generate_body_model).
generate_body_key: web.AppKey[type[GenerateBody]] = web.AppKey("generate_body")

principal_key = web.RequestKey("principal", Principal)
rate_decisions_key = web.RequestKey("rate_decisions", list[BucketDecision])
request_id_key = web.RequestKey("request_id", str)
# Set by the routes that waited for the device, for the access log.
queue_wait_key = web.RequestKey("queue_wait", float)
# The contract error code of an error response, for the access log and metrics.
error_code_key = web.RequestKey("error_code", str)
# The response whose headers went out while its handler still runs (an event stream), once they have.
started_response_key = web.RequestKey("started_response", web.StreamResponse)
