"""GET /usage: the images a subject generated this UTC day and month, against its quotas, by model."""

from __future__ import annotations

from aiohttp import web

from imagine.errors import ApiError, validation_error
from imagine.http.app_keys import principal_key
from imagine.http.openapi import error_response, json_response, obj, operation, query_parameter
from imagine.http.quota_gate import quotas_key
from imagine.http.query_params import query_values
from imagine.security.tokens import requires

WINDOW = obj(
    {
        "images": {"type": "integer", "description": "Images charged in this window (refunds deducted)"},
        "limit": {"type": ["integer", "null"], "description": "The subject's quota of every model together; null: none"},
        "reset_seconds": {"type": "integer", "description": "Seconds until the window resets (UTC)"},
        "by_model": {"type": "object", "additionalProperties": {"type": "integer"}},
    }
)
USAGE = obj(
    {
        "sub": {"type": "string"},
        "day": WINDOW,
        "month": WINDOW,
        "cloud_credits": {"type": ["number", "null"], "description": "Not counted per subject: always null"},
    }
)


@requires("generate", "admin")
@operation(
    "Images generated this day and month, against the quotas",
    tags=["usage"],
    description="The caller's own usage; `sub` (admin only) reads another subject's, against the configured "
    "quotas (a token's `quota` claim applies to the token that carries it).",
    parameters=[query_parameter("sub", "Another subject (needs the admin scope)", {"type": "string", "minLength": 1})],
    responses={200: json_response("The usage", USAGE), 403: error_response("`sub` of another subject without admin")},
)
async def usage(request: web.Request) -> web.Response:
    principal = request[principal_key]
    sub = query_values(request, ("sub",)).get("sub", principal.sub)
    if not sub:
        raise validation_error([{"loc": ["query", "sub"], "msg": "must not be empty"}])
    if sub != principal.sub and not principal.has_scope("admin"):
        raise ApiError(403, "FORBIDDEN", "Reading another subject's usage needs the admin scope")
    claim = principal.quota if sub == principal.sub else None
    body = await request.app[quotas_key].usage(sub, claim)
    return web.json_response({**body, "cloud_credits": None})


def routes(base: str) -> list[web.RouteDef]:
    return [web.get(base + "/usage", usage)]
