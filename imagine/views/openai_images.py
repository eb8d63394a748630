"""POST /v1/images/generations: OpenAI's Images API, for OpenAI's client libraries.

Point a client's `base_url` at `<server>/imagine/v1` and use a service token
as its API key. Errors on every `/v1/` route use OpenAI's shape (see
`imagine.openai_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagine import service
from imagine.auth import check_model_grant, requires
from imagine.errors import ApiError, field_error, validation_error
from imagine.keys import principal_key, registry_key
from imagine.schemas import parse_generate_body, pydantic_errors, read_json, resolve_request
from imagine.urls import signed_image_url

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
# Our /generate fields as OpenAI names them, for error messages and `param`.
_OPENAI_FIELDS = {"width": "size", "height": "size", "img_size": "size", "num_images": "n"}


class ImagesGenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
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
async def create_images(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise validation_error([{"loc": ["body"], "msg": "must be a JSON object"}])
    try:
        openai_body = ImagesGenerationBody.model_validate(raw)
    except ValidationError as error:
        raise validation_error(pydantic_errors(error)) from None
    try:
        body = parse_generate_body(_generate_fields(openai_body))
        generator = app[registry_key].resolve(body.model)
        check_model_grant(principal, generator.name)
        generation = resolve_request(body, generator)
    except ApiError as error:
        raise _in_openai_terms(error) from None
    # Always stored: a `url` points into the gallery, and OpenAI's API has no `store`.
    generated = await service.generate(app, principal, generation, generator, store=True)
    if openai_body.response_format == "url":
        data = [{"url": signed_image_url(request, image_id)} for image_id in generated.ids]
    else:
        encoded = await asyncio.to_thread(lambda: [base64.b64encode(png).decode("ascii") for png in generated.pngs])
        data = [{"b64_json": b64} for b64 in encoded]
    return web.json_response({"created": int(time.time()), "data": data})


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/v1/images/generations", create_images)]
