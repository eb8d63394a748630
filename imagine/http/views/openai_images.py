"""POST /v1/images/generations and /v1/images/edits: OpenAI's Images API, for OpenAI's client libraries.

Point a client's `base_url` at `<server>/imagine/v1` and use a service token
as its API key. Errors on every `/v1/` route use OpenAI's shape (see
`imagine.http.openai_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from typing import Any, Literal

from aiohttp import BodyPartReader, web
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from imagine.http import generation
from imagine.security.tokens import requires
from imagine.errors import ApiError, field_error, renamed_fields, validation_error
from imagine.http.app_keys import input_pool_key, principal_key, settings_key
from imagine.http.front_door import Admitted, admit
from imagine.http.image_inputs import decode
from imagine.http.openapi import Component, json_response, obj, operation
from imagine.http.request_bodies import (
    NUL_MESSAGE,
    UNREADABLE_BODY,
    Prompt,
    parse_body,
    read_json,
    refuse_undecoded_coding,
    unreadable_body,
)
from imagine.http.urls import public_origin, signed_image_url
from imagine.http.views.generate import GENERATION_ERRORS

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
# Our /generate fields as OpenAI names them, for error messages and `param`.
_OPENAI_FIELDS = {
    "width": "size", "height": "size", "img_size": "size", "num_images": "n", "init_image": "image", "mask_image": "mask",
}


class _ImagesBody(BaseModel):
    """The fields OpenAI's generations and edits share."""

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
    output_format: str | None = None
    background: str | None = None
    moderation: str | None = None


class ImagesGenerationBody(_ImagesBody):
    style: str | None = None


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
    return renamed_fields(error, _OPENAI_FIELDS)


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
        admitted = await admit(app, principal, _generate_fields(openai_body))
    except ApiError as error:
        raise _in_openai_terms(error) from None
    return await _answer(request, openai_body.response_format, admitted)


class ImagesEditBody(_ImagesBody):
    """The text fields of POST /v1/images/edits (the files are `image` and `mask`)."""

    # More knobs the client may send on edits, ignored as well.
    output_compression: str | None = None
    input_fidelity: str | None = None
    safety_identifier: str | None = None


# The client sends one image as "image", a list as "image[]".
_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


async def _read_edit_form(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The form's text fields and files, within the body size and time limits that JSON bodies have."""
    if request.content_type != "multipart/form-data":
        raise validation_error([{"loc": ["header", "Content-Type"], "msg": "must be multipart/form-data"}])
    refuse_undecoded_coding(request)
    server = request.app[settings_key].server
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    received = 0
    try:
        async with asyncio.timeout(server.body_timeout_s):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    raise validation_error([{"loc": ["body"], "msg": "nested multipart bodies are not taken"}])
                data = bytearray()
                while chunk := await part.read_chunk():
                    received += len(chunk)
                    if received > server.max_body_bytes:
                        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"Request body larger than {server.max_body_bytes} bytes")
                    data.extend(chunk)
                name = _FILE_FIELDS.get(part.name)
                if name is not None:
                    if name in files:
                        raise validation_error([field_error(name, "send one file")])
                    files[name] = bytes(data)
                elif part.name in fields:
                    raise validation_error([field_error(part.name, "appears more than once")])
                else:
                    fields[part.name] = _form_value(part.name, bytes(data))
    except TimeoutError:
        raise ApiError(408, "REQUEST_TIMEOUT", f"The request body did not arrive within {server.body_timeout_s:g} seconds") from None
    except ValueError:  # a malformed multipart body
        raise validation_error([{"loc": ["body"], "msg": "malformed multipart/form-data body"}]) from None
    except UNREADABLE_BODY:
        raise unreadable_body() from None
    if "image" not in files:
        raise validation_error([field_error("image", "required: the image to edit")])
    return fields, files


def _form_value(name: str, data: bytes) -> Any:
    """A text field; `n` is a number in JSON and a string in a form."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise validation_error([field_error(name, "must be UTF-8 text")]) from None
    if "\x00" in text:
        raise validation_error([field_error(name, NUL_MESSAGE)])
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣" (which it reads as 3).
    return int(text) if name == "n" and text.isascii() and text.isdigit() and len(text) < 5 else text


def _mask_png(data: bytes, max_pixels: int) -> str:
    """OpenAI's mask (transparent = repaint) as ours (white = repaint): a grey PNG, in base64.

    A PNG with transparency, as OpenAI asks: any other mask would repaint nothing, quietly, and cost
    a generation all the same.
    """
    transparency = decode("mask", data, "RGBA", max_pixels).image.getchannel("A")
    with Image.open(io.BytesIO(data)) as sent:  # read by decode already: only its header is looked at again
        has_alpha = sent.format == "PNG" and ("A" in sent.getbands() or "transparency" in sent.info)
    if not has_alpha:
        raise validation_error([field_error("mask", "must be a PNG with transparency: its transparent pixels mark what to repaint")])
    buffer = io.BytesIO()
    ImageOps.invert(transparency).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def mask_from_transparency(app: web.Application, data: bytes) -> str:
    max_pixels = app[settings_key].server.max_input_pixels
    return await asyncio.get_running_loop().run_in_executor(app[input_pool_key], _mask_png, data, max_pixels)


@requires("generate")
@operation(
    "Edit an image, OpenAI's Images API",
    tags=["generation"],
    description="multipart/form-data as OpenAI's client sends it: `image` (PNG, JPEG or WebP), optional `mask` "
    "(a PNG whose transparent pixels mark what to repaint; without one the whole image is varied), `prompt`, "
    "`model`, `n`, `size` (default: the image's own), `response_format`. Every error is in OpenAI's shape.",
    multipart={"image": "The image to edit", "mask": "PNG; transparent pixels are repainted"},
    body=ImagesEditBody,
    responses={200: json_response("The images, as `b64_json` or as signed `url`s", IMAGES), **OPENAI_ERRORS},
)
async def edit_images(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    fields, files = await _read_edit_form(request)
    openai_body = parse_body(ImagesEditBody, fields)
    wanted = _generate_fields(openai_body) | {"init_image": base64.b64encode(files["image"]).decode("ascii")}
    if "mask" in files:
        wanted["mask_image"] = await mask_from_transparency(app, files["mask"])
    try:
        admitted = await admit(app, principal, wanted)
    except ApiError as error:
        raise _in_openai_terms(error) from None
    return await _answer(request, openai_body.response_format, admitted)


async def _answer(request: web.Request, response_format: str | None, admitted: Admitted) -> web.Response:
    """OpenAI's answer to a generation: b64_json, or links into the gallery (always stored: OpenAI has no `store`)."""
    app, principal = request.app, request[principal_key]
    origin = None
    if response_format == "url":
        try:
            origin = public_origin(request)  # before the work: a Host it cannot link to must cost nothing
        except ApiError as error:
            raise _in_openai_terms(error) from None
    generated = await generation.generate(app, principal, admitted.request, admitted.generator, store=True)
    if origin is not None:
        data = [{"url": signed_image_url(request, origin, image_id)} for image_id in generated.ids]
    else:
        encoded = await asyncio.to_thread(lambda: [base64.b64encode(png).decode("ascii") for png in generated.pngs])
        data = [{"b64_json": b64} for b64 in encoded]
    return web.json_response({"created": int(time.time()), "data": data})


def routes(base: str) -> list[web.RouteDef]:
    return [web.post(base + "/v1/images/generations", create_images), web.post(base + "/v1/images/edits", edit_images)]
