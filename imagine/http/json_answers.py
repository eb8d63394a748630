"""JSON answers that carry images, megabytes of base64: serialised on the encoding pool, not on the loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from imagine.http.app_keys import encode_pool_key


async def json_bytes(app: web.Application, build: Callable[[], Any]) -> bytes:
    """`build()`'s value as JSON bytes, both done on the app's encoding pool."""
    return await asyncio.get_running_loop().run_in_executor(app[encode_pool_key], lambda: json.dumps(build()).encode())
