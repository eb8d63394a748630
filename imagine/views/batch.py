"""POST /generate/batch (seed 000): up to eight /generate bodies in one request.

Every item is checked and submitted on its own, all at once, so compatible
items queue together on the device and one bad item fails only itself. The
answer is 200 whenever the array itself is valid; each item says whether it
succeeded, with /generate's JSON result or the usual error JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from imagine import service
from imagine.auth import Principal, check_model_grant, requires
from imagine.errors import ApiError, error_body, validation_error
from imagine.keys import encode_pool_key, principal_key, registry_key
from imagine.schemas import parse_generate_body, read_json, resolve_request

log = logging.getLogger(__name__)

MAX_ITEMS = 8


async def _run_item(app: web.Application, principal: Principal, index: int, item: Any) -> dict[str, Any]:
    try:
        body = parse_generate_body(item)
        generator = app[registry_key].resolve(body.model)
        check_model_grant(principal, generator.name)
        generation = resolve_request(body, generator)
        generated = await service.generate(app, principal, generation, generator, store=body.store)
    except ApiError as error:
        return {"index": index, "success": False, "status": error.status, "error": error.body()}
    except Exception:
        # As the error middleware does for a whole request: a bug fails this item, not its siblings.
        log.exception("batch item %d failed", index)
        return {"index": index, "success": False, "status": 500, "error": error_body("INTERNAL_ERROR", "Internal server error")}
    return {"index": index, "success": True, "result": service.result_json(generated)}


@requires("generate")
async def generate_batch(request: web.Request) -> web.Response:
    items = await read_json(request)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise validation_error([{"loc": ["body"], "msg": f"must be a JSON array of 1 to {MAX_ITEMS} /generate bodies"}])
    principal = request[principal_key]
    # gather starts every item at once: each is queued on the executor before the first one finishes.
    results = await asyncio.gather(*(_run_item(request.app, principal, index, item) for index, item in enumerate(items)))
    payload = await asyncio.get_running_loop().run_in_executor(
        request.app[encode_pool_key], lambda: json.dumps({"results": results}).encode()
    )
    return web.Response(body=payload, content_type="application/json")


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate/batch", generate_batch)]
