"""POST /api-key (seed 003): set a cloud backend's API key at runtime; answered with a masked preview."""

from __future__ import annotations

import logging
from typing import Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StringConstraints

from imagine.security.tokens import requires
from imagine.security.cloud_api_keys import key_preview
from imagine.errors import ApiError, field_error, validation_error
from imagine.http.app_keys import cloud_keys_key, principal_key
from imagine.http.openapi import Component, FromApp, error_response, json_response, obj, operation
from imagine.http.request_bodies import parse_body, read_json

log = logging.getLogger(__name__)

# Printable ASCII without spaces: it travels in an HTTP header, where anything else could split it.
ApiKeyText = Annotated[str, StringConstraints(min_length=8, max_length=512, pattern=r"^[\x21-\x7e]+$")]


class ApiKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    service: str
    api_key: ApiKeyText


def _body_schema(app: web.Application) -> Component:
    """ApiKeyBody, its `service` limited to the key services of the cloud backends this app registered."""
    schema = ApiKeyBody.model_json_schema()
    schema["properties"]["service"]["enum"] = app[cloud_keys_key].services
    return Component(ApiKeyBody.__name__, schema)


@requires("admin")
@operation(
    "Set a cloud backend's API key (seed 003)",
    tags=["models"],
    description="Kept in the key file (owner-only) and used at once; never returned, only a masked preview.",
    body=FromApp(_body_schema),
    responses={
        200: json_response(
            "Stored",
            obj({"message": {"type": "string"}, "service": {"type": "string"}, "key_preview": {"type": "string"}}),
        ),
        400: error_response("Unknown service or malformed key"),
    },
)
async def set_api_key(request: web.Request) -> web.Response:
    keys = request.app[cloud_keys_key]
    # Field errors never echo the rejected value: here it may be a key.
    body = parse_body(ApiKeyBody, await read_json(request))
    if body.service not in keys.services:
        raise validation_error([field_error("service", f"must be one of: {', '.join(keys.services) or 'none configured'}")])
    try:
        await keys.set(body.service, body.api_key)
    except OSError as error:
        log.error("could not store the %s key in its key file: %s", body.service, error.strerror)
        raise ApiError(500, "INTERNAL_ERROR", "The API key could not be stored; the previous key stays in use") from None
    log.info("API key for %s set by %s", body.service, request[principal_key].sub)
    return web.json_response(
        {"message": "API key updated successfully", "service": body.service, "key_preview": key_preview(body.api_key)}
    )


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/api-key", set_api_key)]
