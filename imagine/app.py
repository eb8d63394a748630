"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from imagine.auth import KeyMaterial, TokenVerifier, load_key_material
from imagine.executor import DeviceExecutor
from imagine.keys import (
    encode_pool_key,
    executor_key,
    limiter_key,
    registry_key,
    settings_key,
    trusted_networks_key,
    verifier_key,
)
from imagine.memory import GIB
from imagine.middlewares import auth_middleware, cors_middleware, error_middleware, ratelimit_middleware
from imagine.models import ModelRegistry
from imagine.plugins import collect_generators, plugin_manager
from imagine.ratelimit import MemoryBucketStore, RateLimiter, parse_networks
from imagine.settings import Settings, SettingsError
from imagine.views import generate, models, system


def _registry(settings: Settings, extra_plugins: Iterable[Any]) -> ModelRegistry:
    generators = collect_generators(plugin_manager(extra_plugins), settings)
    budget_gb = settings.models.memory_budget_gb
    registry = ModelRegistry(generators, settings.models.default, int(budget_gb * GIB) if budget_gb else None)
    for name in (settings.models.default, *settings.models.preload):
        try:
            registry.resolve(name)
        except Exception:
            raise SettingsError(f"model '{name}' is not registered; known: {', '.join(registry.names)}") from None
    return registry


async def _device_executor(app: web.Application) -> AsyncIterator[None]:
    app[executor_key].start()
    yield
    await app[executor_key].stop()


async def _encode_pool(app: web.Application) -> AsyncIterator[None]:
    workers = app[settings_key].output.encode_workers
    app[encode_pool_key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagine-encode")
    yield
    app[encode_pool_key].shutdown(wait=True)


def create_app(
    settings: Settings, *, keys: KeyMaterial | None = None, extra_plugins: Iterable[Any] = ()
) -> web.Application:
    """Build the service. `extra_plugins` are registered beside the built-in and installed ones."""
    app = web.Application(
        middlewares=[cors_middleware, error_middleware, ratelimit_middleware, auth_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    app[settings_key] = settings
    keys = keys or load_key_material(settings.auth, Path(settings.server.state_dir))
    app[verifier_key] = TokenVerifier(keys, settings.auth)
    app[limiter_key] = RateLimiter(settings.ratelimit, MemoryBucketStore())
    app[trusted_networks_key] = parse_networks(settings.server.trusted_proxies)
    registry = _registry(settings, extra_plugins)
    app[registry_key] = registry
    app[executor_key] = DeviceExecutor(
        registry,
        max_queue=settings.queue.max_size,
        device_preference=settings.models.device,
        preload=settings.models.preload,
    )
    app.cleanup_ctx.extend([_encode_pool, _device_executor])
    base = settings.server.base_path
    for module in (system, models, generate):
        app.router.add_routes(module.routes(base))
    return app
