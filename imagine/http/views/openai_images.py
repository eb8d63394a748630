"""POST /v1/images/generations: OpenAI's Images API, for OpenAI's client libraries.

Point a client's `base_url` at `<server>/imagine/v1` and use a service token
as its API key. Errors on every `/v1/` route use OpenAI's shape (see
`imagine.http.openai_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from imagine.engine import generation
from imagine.security.tokens import requires
from imagine.errors import ApiError, field_error, validation_error
from imagine.http.app_keys import principal_key
from imagine.http.front_door import admit
from imagine.http.openapi import Component, json_response, obj, operation
from imagine.http.request_bodies import Prompt, parse_body, read_json
from imagine.http.urls import signed_image_url
from imagine.http.views.generate import GENERATION_ERRORS

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
# Our /generate fields as OpenAI names them, for error messages and `param`.
_OPENAI_FIELDS = {"width": "size", "height": "size", "img_size": "size", "num_images": "n"}


class ImagesGenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # /generate's length rules, so the document states them; not blank is checked by /generate's body.
    prompt: Prompt
    model: str | None = None
    n: int | None = Field(None, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    # OpenAI knobs our models do not have: accepted so that clients which
    # always send them work, and ignored.
    quality: str | None = None
    style: str | None = None
    output_format: str | None = None
    background: str | None = None
    moderation: str | None = None


OPENAI_ERROR = Component(
    "OpenAIError",
    obj(
        {
            "error": obj(
                {
                    "message": {"type": "string"},
                    "type": {"enum": ["invalid_request_error", "requests", "server_error"]},
                    "param": {"type": ["string", "null"], "description": "The first offending body field"},
                    "code": {
                        "type": "string",
                        "description": "OpenAI's code where it has one, else the contract's code in lower case",
                        "examples": ["model_not_found", "invalid_api_key", "validation_error"],
                    },
                }
            )
        },
        description="Every error on the /v1/ routes, in OpenAI's shape (see imagine.http.openai_errors).",
    ),
)
IMAGES = obj(
    {
        "created": {"type": "integer", "description": "Unix time"},
        "data": {
            "type": "array",
            "items": {
                "oneOf": [
                    obj({"b64_json": {"type": "string", "contentEncoding": "base64"}}),
                    obj(
                        {
                            "url": {
                                "type": "string",
                                "format": "uri",
                                "description": "The gallery PNG, fetchable without a token until its signature "
                                "expires (gallery.url_ttl_s)",
                            }
                        }
                    ),
                ]
            },
        },
    }
)


def openai_error(description: str) -> dict[str, Any]:
    return json_response(description, OPENAI_ERROR)


# Everything the build would otherwise add in the contract's error shape (401, 403, 429, any other) is declared
# here in OpenAI's, as is every error /generate can give (but 406: there is no content negotiation here).
OPENAI_ERRORS: dict[Any, dict[str, Any]] = {
    **{status: openai_error(answer["description"]) for status, answer in GENERATION_ERRORS.items() if status != 406},
    400: openai_error("Invalid body (`param` names the first offending field)"),
    401: openai_error("Missing or invalid token (`invalid_api_key`, with `WWW-Authenticate: Bearer`)"),
    403: openai_error("The token lacks the scope generate, or the model"),
    404: openai_error("Unknown model (`model_not_found`)"),
    429: openai_error("A rate-limit bucket is empty (type `requests`, with `Retry-After`)"),
    "default": openai_error("Any other error"),
}


def _in_openai_terms(error: ApiError) -> ApiError:
    """Rename our field names in a validation error to the ones the caller sent."""
    errors = error.details.get("errors")
    if error.code != "VALIDATION_ERROR" or not errors:
        return error
    renamed = []
    for entry in errors:
        loc = list(entry["loc"])
        if len(loc) > 1 and loc[0] == "body" and loc[1] in _OPENAI_FIELDS:
            loc[1] = _OPENAI_FIELDS[loc[1]]
        renamed.append({**entry, "loc": loc})
    return validation_error(renamed)


def _generate_fields(body: ImagesGenerationBody) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": body.prompt, "model": body.model, "num_images": body.n or 1}
    if body.size not in (None, "auto"):
        match = _SIZE.fullmatch(body.size)
        if match is None:
            raise validation_error([field_error("size", "must be 'auto' or WIDTHxHEIGHT, e.g. '1024x1024'")])
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    return fields


@requires("generate")
@operation(
    "Generate images, OpenAI's Images API",
    tags=["generation"],
    description="For OpenAI's client libraries: `base_url` `<server>/imagine/v1`, a service token as the API key. "
    "`size` is `auto` or WIDTHxHEIGHT; `quality`, `style`, `output_format`, `background` and `moderation` are "
    "accepted and ignored. Images are always kept in the gallery. Every error is in OpenAI's shape.",
    body=ImagesGenerationBody,
    responses={200: json_response("The images, as `b64_json` or as signed `url`s", IMAGES), **OPENAI_ERRORS},
)
async def create_images(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    openai_body = parse_body(ImagesGenerationBody, await read_json(request))
    try:
        admitted = admit(app, principal, _generate_fields(openai_body))
    except ApiError as error:
        raise _in_openai_terms(error) from None
    # Always stored: a `url` points into the gallery, and OpenAI's API has no `store`.
    generated = await generation.submit(app, principal, admitted.request, admitted.generator, store=True)
    if openai_body.response_format == "url":
        data = [{"url": signed_image_url(request, image_id)} for image_id in generated.ids]
    else:
        encoded = await asyncio.to_thread(lambda: [base64.b64encode(png).decode("ascii") for png in generated.pngs])
        data = [{"b64_json": b64} for b64 in encoded]
    return web.json_response({"created": int(time.time()), "data": data})


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/v1/images/generations", create_images)]
