"""POST /generate/batch (seed 000): up to eight /generate bodies in one request.

Every item is checked and submitted on its own, all at once, so compatible
items queue together on the device and one bad item fails only itself. The
answer is 200 whenever the array itself is valid; each item says whether it
succeeded, with /generate's JSON result or the usual error JSON.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from imagine.http import generation
from imagine.security.tokens import Principal, requires
from imagine.errors import ApiError, error_body, validation_error
from imagine.http.json_answers import json_bytes
from imagine.http.app_keys import principal_key
from imagine.http.front_door import admit
from imagine.http.generation_result import GenerationResult
from imagine.http.negotiation import preferred
from imagine.http.openapi import ERROR, error_response, json_response, obj, operation
from imagine.http.request_bodies import GENERATE_BODY, read_json, refuse_nul
from imagine.http.views.generate import GENERATION_ERRORS

log = logging.getLogger(__name__)

MAX_ITEMS = 8

BATCH = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_ITEMS,
    # Any JSON is a valid item as far as the request goes: an item that is not a valid GenerateBody
    # fails only its own result, so the items are documented as GenerateBody or anything.
    "items": {"anyOf": [GENERATE_BODY, {}], "description": "A /generate body"},
}
BATCH_RESULTS = obj(
    {
        "results": {
            "type": "array",
            "description": "One per item, in the order sent",
            "items": {
                "oneOf": [
                    obj({"index": {"type": "integer"}, "success": {"const": True}, "result": GenerationResult}),
                    obj(
                        {
                            "index": {"type": "integer"},
                            "success": {"const": False},
                            "status": {"type": "integer", "description": "What /generate would have answered"},
                            "error": ERROR,
                        }
                    ),
                ]
            },
        }
    }
)


async def _run_item(app: web.Application, principal: Principal, index: int, item: Any) -> dict[str, Any]:
    try:
        refuse_nul(item)
        admitted = await admit(app, principal, item)
        generated = await generation.generate(
            app, principal, admitted.request, admitted.generator, store=admitted.body.store
        )
    except ApiError as error:
        return {"index": index, "success": False, "status": error.status, "error": error.body()}
    except Exception:
        # As the error middleware does for a whole request: a bug fails this item, not its siblings.
        log.exception("batch item %d failed", index)
        return {"index": index, "success": False, "status": 500, "error": error_body("INTERNAL_ERROR", "Internal server error")}
    return {"index": index, "success": True, "result": GenerationResult.of(generated).model_dump()}


@requires("generate")
@operation(
    "Generate for up to eight /generate bodies at once (seed 000)",
    tags=["generation"],
    description="Every item is checked and run on its own, so one bad item fails only itself: the answer is 200 "
    "whenever the array is valid, each result with /generate's JSON or the usual error JSON.",
    body=BATCH,
    responses={
        200: json_response("Every item's result", BATCH_RESULTS),
        400: error_response(f"Not a JSON array of 1 to {MAX_ITEMS} items"),
        406: error_response("`Accept` does not allow application/json"),
        413: GENERATION_ERRORS[413],
    },
)
async def generate_batch(request: web.Request) -> web.Response:
    accept = request.headers.get("Accept")
    if accept and accept.strip() and preferred(accept, ("application/json",)) is None:
        # JSON is all this route answers: an Accept without it is refused before any item runs.
        raise ApiError(406, "NOT_ACCEPTABLE", "Cannot answer with that Accept header: this route answers application/json")
    items = await read_json(request, items=True)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise validation_error([{"loc": ["body"], "msg": f"must be a JSON array of 1 to {MAX_ITEMS} /generate bodies"}])
    principal = request[principal_key]
    # gather starts every item at once: each is queued on the executor before the first one finishes.
    results = await asyncio.gather(*(_run_item(request.app, principal, index, item) for index, item in enumerate(items)))
    payload = await json_bytes(request.app, lambda: {"results": results})
    return web.Response(body=payload, content_type="application/json")


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/generate/batch", generate_batch)]
