"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from imagine import __version__
from imagine.http.access import access_middleware, add_request_id
from imagine.security.tokens import JwtKeys, Principal, TokenVerifier, load_jwt_keys
from imagine.security.cloud_api_keys import CloudKeys, started_cloud_generators
from imagine.engine.executor import DeviceExecutor
from imagine.engine.queue import MemoryQueue
from imagine.storage.factory import build_gallery
from imagine.http import generation
from imagine.engine.work import Generated
from imagine.engine.jobs import JobManager
from imagine.assistant.service import started_assistant
from imagine.http.app_keys import (
    assistant_key,
    client_session_key,
    cluster_key,
    cloud_keys_key,
    encode_pool_key,
    input_pool_key,
    executor_key,
    gallery_key,
    generate_body_key,
    jobs_key,
    limiter_key,
    metrics_key,
    openapi_key,
    png_encoder_key,
    registry_key,
    role_key,
    settings_key,
    trusted_networks_key,
    url_signer_key,
    verifier_key,
)
from imagine.engine.memory import GIB
from imagine.http.metrics import Metrics
from imagine.http.job_followups import followups_context, followups_key
from imagine.http.quota_gate import QuotaJobs, quota_headers_middleware, quotas_key
from imagine.http.stream_slots import StreamSlots, stream_slots_key
from imagine.http.middlewares import (
    add_response_headers,
    auth_middleware,
    cors_middleware,
    error_middleware,
    note_started_response,
    nul_middleware,
    ratelimit_middleware,
)
from imagine.engine.registry import ModelRegistry
from imagine.http.openapi import build_document
from imagine.plugin.generators import GenerationRequest, Generator
from imagine.plugin.manager import collect_generators, plugin_manager
from imagine.http.png import PngEncoder
from imagine.http.generation_result import GenerationResult
from imagine.http.request_bodies import generate_body_model
from imagine.security.ratelimit import MemoryBucketStore, RateLimiter, parse_networks
from imagine.settings import Settings, SettingsError
from imagine.http.shutdown import install as install_shutdown
from imagine.security.url_signing import UrlSigner, load_url_secret
from imagine.engine.telemetry import Telemetry
from imagine.http.views import sdapi
from imagine.http.views import (
    api_keys,
    assistant,
    generate_batch,
    docs,
    gallery,
    generate,
    generate_image,
    jobs,
    metrics,
    models,
    openai_images,
    system,
    ui,
    usage,
)

# "serve": HTTP and a device; "api": HTTP only; "worker": a device, with /livez and /metrics.
Role = Literal["serve", "api", "worker"]

# How often the gallery's upkeep runs (age retention, the shared gallery's orphan sweep); each generation also applies retention.
RETENTION_SWEEP_S = 600.0


def _registry(settings: Settings, extra_plugins: Iterable[Any], telemetry: Telemetry) -> ModelRegistry:
    generators = collect_generators(plugin_manager(extra_plugins), settings)
    budget_gb = settings.models.memory_budget_gb
    registry = ModelRegistry(
        generators, settings.models.default, int(budget_gb * GIB) if budget_gb else None, telemetry=telemetry
    )
    for name in (settings.models.default, *settings.models.preload):
        try:
            registry.resolve(name)
        except Exception:
            raise SettingsError(f"model '{name}' is not registered; known: {', '.join(registry.names)}") from None
    return registry


async def _rate_limiter(app: web.Application) -> AsyncIterator[None]:
    """Buckets in this process, or in Redis (`ratelimit.storage`) with a client that lives as long as the app."""
    settings = app[settings_key].ratelimit
    telemetry = app[metrics_key]
    telemetry.watch_limiter_store(lambda: app[limiter_key].problem() is None)
    if not settings.shared:
        app[limiter_key] = RateLimiter(settings, MemoryBucketStore(), telemetry)
        yield
        return
    # Only deployments that name Redis need its client.
    from imagine.security.redis_buckets import redis_bucket_store

    async with redis_bucket_store(settings) as store:
        app[limiter_key] = RateLimiter(settings, store, telemetry)
        yield


async def _openapi(app: web.Application) -> None:
    """on_startup: the router is complete by now, whichever modules added routes."""
    app[openapi_key] = build_document(app, app[settings_key].server.base_path)


def _device_executor(device: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        if device:
            app[executor_key].start()
        yield
        await app[executor_key].stop()

    return run


def _jobs(device: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """Jobs in this process, or on the shared queue (`queue.storage`), where this replica's device pulls work."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        settings = app[settings_key]

        def run_here(principal: Principal, request: GenerationRequest, generator: Generator, store: bool, observer: Any) -> Any:
            return generation.submit_here(app, principal, request, generator, store, observer)

        async def to_json(generated: Generated) -> dict[str, Any]:
            # Megabytes of base64 for large images: built on the encoding pool, off the loop.
            return await asyncio.get_running_loop().run_in_executor(
                app[encode_pool_key], lambda: GenerationResult.of(generated).model_dump()
            )

        if not settings.queue.shared:
            jobs = settings.jobs
            manager = JobManager(
                ttl_s=jobs.ttl_s, max_per_subject=jobs.max_per_subject, keepalive_s=jobs.keepalive_s, run=run_here, to_json=to_json,
                on_end=app[followups_key].ended,
            )
            # Quotas are charged and refunded where the job store takes work (imagine.http.quota_gate).
            app[jobs_key] = quota_jobs = QuotaJobs(manager, app[quotas_key])
            yield
            await manager.close()
            # Refunds of the generations the runner stopped last (after the drain) land before the quota store closes.
            await quota_jobs.settle()
            return
        # Only deployments that name Redis need the cluster's parts.
        from imagine.cluster.service import shared_queue

        def finish(principal: Principal, request: GenerationRequest, generator: Generator, running: Any, store: bool) -> Any:
            return generation.finish(app, principal, request, generator, running, store)

        async with shared_queue(
            settings, app[executor_key], app[registry_key], device=device, run_here=run_here, finish=finish, to_json=to_json
        ) as cluster:
            app[cluster_key] = cluster
            app[jobs_key] = quota_jobs = QuotaJobs(cluster.jobs, app[quotas_key])
            yield
            await quota_jobs.settle()

    return run


async def _gallery(app: web.Application) -> AsyncIterator[None]:
    store = app[gallery_key]
    await store.open()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(RETENTION_SWEEP_S)
            await store.maintain()

    sweeper = asyncio.create_task(sweep()) if store.periodic_upkeep else None
    yield
    if sweeper is not None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
    await store.close()


async def _cpu_pools(app: web.Application) -> AsyncIterator[None]:
    """The threads for CPU work off the event loop: encoding answers (PNG, base64, JSON) and reading inputs."""
    output = app[settings_key].output
    app[encode_pool_key] = ThreadPoolExecutor(max_workers=output.encode_workers, thread_name_prefix="imagine-encode")
    app[input_pool_key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagine-inputs")
    # Each encoding thread deflates one piece itself and hands the others to these.
    helpers = (
        ThreadPoolExecutor(max_workers=output.encode_workers * (output.png_threads - 1), thread_name_prefix="imagine-deflate")
        if output.png_threads > 1
        else None
    )
    app[png_encoder_key] = PngEncoder(
        level=output.png_compress_level,
        engine=output.png_deflate,
        strategy=output.png_strategy,
        pieces=output.png_threads,
        helpers=helpers,
    )
    yield
    app[encode_pool_key].shutdown(wait=True)
    app[input_pool_key].shutdown(wait=True)
    if helpers is not None:
        helpers.shutdown(wait=True)


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One outgoing HTTP session for the whole app, handed to every cloud generator."""
    session = aiohttp.ClientSession(headers={"User-Agent": f"imagine/{__version__}"})
    app[client_session_key] = session
    try:
        async with started_cloud_generators(app[registry_key].cloud(), app[cloud_keys_key], session):
            yield
    finally:
        await session.close()


async def _assistant(app: web.Application) -> AsyncIterator[None]:
    """The assistant (an Ollama client, the chat sessions) when assistant.ollama_url names a server; off otherwise."""
    async with started_assistant(app[settings_key], app[metrics_key]) as running:
        app[assistant_key] = running
        yield


def create_app(
    settings: Settings,
    *,
    keys: JwtKeys | None = None,
    extra_plugins: Iterable[Any] = (),
    handle_signals: bool = False,
    role: Role = "serve",
) -> web.Application:
    """Build the service. `extra_plugins` are registered beside the built-in and installed ones.

    With `handle_signals` (`imagine serve`), SIGTERM and SIGINT start the drain of accepted
    work while the service still answers (see `imagine.http.shutdown`); apps under test leave them alone.
    `role` "serve" is HTTP and a device; "api" (`serve --no-device`) runs no device, and "worker"
    (`imagine worker`) answers only /livez and /metrics: both need the shared queue.
    """
    if role != "serve" and not settings.queue.shared:
        raise SettingsError(f'the {role} role needs queue.storage = "redis://...": no other process would run its work')
    device = role != "api"
    app = web.Application(
        middlewares=[
            access_middleware, cors_middleware, error_middleware, nul_middleware, ratelimit_middleware, auth_middleware,
            quota_headers_middleware,
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app[settings_key] = settings
    app[role_key] = role
    keys = keys or load_jwt_keys(settings.auth, Path(settings.server.state_dir))
    app[verifier_key] = TokenVerifier(keys, settings.auth)
    app[metrics_key] = telemetry = Metrics()
    app[trusted_networks_key] = parse_networks(settings.server.trusted_proxies)
    registry = _registry(settings, extra_plugins, telemetry)
    app[registry_key] = registry
    app[generate_body_key] = generate_body_model(registry.generators())
    app[executor_key] = DeviceExecutor(
        registry,
        queue=MemoryQueue(settings.queue.max_size),
        device_preference=settings.models.device,
        preload=settings.models.preload,
        preview_every=settings.jobs.preview_every,
        batch_max_images=settings.batch.max_size,
        batch_max_wait_ms=settings.batch.max_wait_ms,
        adaptive_batches=settings.batch.adaptive,
        defer_switches=settings.queue.defer_switches,
        telemetry=telemetry,
        # The encoder opens with the app (_cpu_pools), before the device thread starts.
        encoder=lambda request, image, seed: app[png_encoder_key].encode_for(request, image, seed),
    )
    telemetry.watch_queue(lambda: app[executor_key].depth, settings.queue.max_size)
    app[cloud_keys_key] = CloudKeys(g.key_spec for g in registry.cloud())
    gallery_settings = settings.gallery
    app[gallery_key] = build_gallery(settings)
    url_secret = load_url_secret(
        Path(settings.server.state_dir), secret_file=gallery_settings.url_secret_file, shared=gallery_settings.shared
    )
    app[url_signer_key] = UrlSigner(url_secret, gallery_settings.url_ttl_s)
    app[stream_slots_key] = StreamSlots(settings.jobs.max_streams_per_subject)
    app.on_response_prepare.extend([note_started_response, add_response_headers, add_request_id])
    app.on_startup.append(_openapi)
    # The gallery opens first and closes last: generations in flight may still store.
    # followups_context (quotas, webhooks) opens before the jobs and closes after them: ending jobs still refund and notify.
    app.cleanup_ctx.extend(
        [_gallery, _rate_limiter, _cpu_pools, _device_executor(device), _client_session, followups_context, _jobs(device)]
    )
    # Accepted work drains before any of these closes.
    install_shutdown(app, handle_signals=handle_signals)
    base = settings.server.base_path
    if role == "worker":
        app.router.add_routes([web.get(base + "/livez", system.livez), *metrics.routes(base)])
        return app
    for module in (system, models, generate, jobs, api_keys, generate_batch, generate_image, gallery, openai_images, metrics, docs, ui):
        app.router.add_routes(module.routes(base))
    app.router.add_routes(usage.routes(base))
    sdapi.setup(app)
    app.router.add_routes(sdapi.routes(base))
    # After the gallery (cleanup_ctx above): a `#generate` in a chat stores its image there.
    app.cleanup_ctx.append(_assistant)
    app.router.add_routes(assistant.routes(base))
    return app
