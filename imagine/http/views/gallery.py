"""The gallery: list, show, download and delete stored images.

A caller sees only the images of its own `sub`; a token with `admin` sees
everyone's. Another caller's image answers exactly like a missing one (404),
and an id that is not of our own format is refused before any lookup.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagine.security.tokens import Principal, requires, signed_url_allowed
from imagine.errors import ApiError, validation_error
from imagine.storage.records import ImageRecord, ListQuery, is_valid_id
from imagine.http.app_keys import gallery_key, principal_key, settings_key, url_signer_key
from imagine.http.query_params import query_values
from imagine.http.openapi import (
    Component,
    content_response,
    error_response,
    json_response,
    obj,
    operation,
    path_parameter,
    query_parameter,
)
from imagine.http.generation_result import GenerationParameters, input_parameters
from imagine.http.request_bodies import pydantic_errors
from imagine.security.url_signing import EXPIRES_PARAM, SIGNATURE_PARAM
from imagine.http.urls import gallery_path

MAX_LIMIT = 200
PNG_HEADERS = {"Cache-Control": "private", "X-Content-Type-Options": "nosniff"}
# SQLite's OFFSET is a signed 64-bit integer.
MAX_OFFSET = 2**63 - 1


class GalleryQuery(BaseModel):
    # Not strict: query values are strings, and "50" is meant as 50.
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    model: str | None = Field(None, max_length=200)
    q: str | None = Field(None, max_length=2000)
    include_data: bool = False


IMAGE_ID = path_parameter("image_id", "A gallery id (`img_` and 22 URL-safe characters), as /generate answered")
NOT_FOUND = {404: error_response("No such image for this caller (another caller's image included)")}
UNAVAILABLE = {
    503: error_response("A shared gallery's database or object storage cannot be reached (with `Retry-After`)")
}
GALLERY_IMAGE = Component(
    "GalleryImage",
    obj(
        {
            "id": {"type": "string"},
            "filename": {"type": "string"},
            "owner": {"type": "string", "description": "The `sub` of the token that generated it"},
            "prompt": {"type": "string"},
            "negative_prompt": {"type": "string"},
            "model": {"type": "string"},
            "seed": {"type": "integer"},
            "generation_time": {"type": "number"},
            "vram_used": {"type": "number"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "url": {"type": "string", "description": "Path of the PNG: <base>/gallery/<id>.png"},
            # The same shape as in /generate's JSON result.
            "parameters": GenerationParameters,
        }
    ),
)
LISTED_IMAGE = {
    "allOf": [GALLERY_IMAGE],
    "properties": {
        "image_data": {
            "type": ["string", "null"],
            "contentEncoding": "base64",
            "description": "Only with `include_data=true`: the PNG in plain base64; null if deleted meanwhile",
        }
    },
}
GALLERY_PAGE = obj(
    {
        "images": {"type": "array", "items": LISTED_IMAGE, "description": "Newest first"},
        "total_count": {"type": "integer", "description": "Matching images on every page"},
        "limit": {"type": "integer"},
        "offset": {"type": "integer"},
    }
)


def parse_query(request: web.Request) -> GalleryQuery:
    query = query_values(request, GalleryQuery.model_fields)
    # `?model=&q=` (an empty form field) means no filter.
    values = {name: value for name, value in query.items() if not (name in ("model", "q") and value == "")}
    try:
        return GalleryQuery.model_validate(values)
    except ValidationError as error:
        raise validation_error(pydantic_errors(error, "query")) from None


def not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Image not found")


def visible_owner(principal: Principal) -> str | None:
    """Whose images the caller may see: its own, or (admin) everyone's."""
    return None if principal.has_scope("admin") else principal.sub


def _timestamp(created_at: float) -> str:
    moment = datetime.datetime.fromtimestamp(created_at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def image_json(record: ImageRecord, base: str) -> dict[str, Any]:
    """Seed 003's gallery item, plus the parameters in /generate's own form."""
    metadata = record.metadata
    inputs = {} if metadata.strength is None else input_parameters(metadata.strength, metadata.image_hash, metadata.mask_hash)
    return {
        "id": record.id,
        "filename": f"{record.id}.png",
        "owner": record.owner,
        "prompt": metadata.prompt,
        "negative_prompt": metadata.negative_prompt,
        "model": metadata.model,
        "seed": metadata.seed,
        "generation_time": metadata.generation_time,
        "vram_used": metadata.vram_used,
        "width": metadata.width,
        "height": metadata.height,
        "created_at": _timestamp(record.created_at),
        "url": gallery_path(base, record.id),
        "parameters": {
            "num_inference_steps": metadata.steps,
            "guidance_scale": metadata.guidance,
            "width": metadata.width,
            "height": metadata.height,
            "scheduler": metadata.scheduler,
            "loras": [{"name": name, "weight": weight} for name, weight in metadata.loras],
            **inputs,
        },
    }


@requires("generate", "admin")
@operation(
    "List stored images, newest first (seed 003)",
    tags=["gallery"],
    description="A caller sees its own images; a token with `admin` sees everyone's.",
    parameters=[
        query_parameter("limit", "Page size", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}),
        query_parameter(
            "offset", "Images to skip", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}
        ),
        query_parameter("model", "Only this model's images (empty: all)", {"type": "string", "maxLength": 200}),
        query_parameter(
            "q", "A case-insensitive substring of the prompt (empty: all)", {"type": "string", "maxLength": 2000}
        ),
        query_parameter("include_data", "Add each PNG as `image_data`", {"type": "boolean", "default": False}),
    ],
    responses={
        200: json_response("A page of images", GALLERY_PAGE),
        400: error_response("A parameter out of range, repeated or unknown"),
        **UNAVAILABLE,
    },
)
async def list_images(request: web.Request) -> web.Response:
    query = parse_query(request)
    store = request.app[gallery_key]
    base = request.app[settings_key].server.base_path
    records, total = await store.list(
        ListQuery(
            owner=visible_owner(request[principal_key]),
            limit=query.limit,
            offset=query.offset,
            model=query.model,
            text=query.q,
        )
    )
    images = [image_json(record, base) for record in records]
    page = {"total_count": total, "limit": query.limit, "offset": query.offset}
    if not query.include_data:
        return web.json_response({"images": images, **page})
    # Up to 200 PNGs as base64: written as they are read, a few at a time, so that a page holds a few
    # images' memory rather than all of them (with 1024² images a whole page would be a gigabyte).
    windows = [records[start : start + _PNGS_AT_ONCE] for start in range(0, len(records), _PNGS_AT_ONCE)]

    async def read(window: list[ImageRecord]) -> list[bytes | None]:
        return list(await asyncio.gather(*(store.read_png(record.id) for record in window)))

    # The first few read before answering: a store that cannot be read is still an error answer.
    first = await read(windows[0]) if windows else []
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"images": [')
    for number, window in enumerate(windows):
        pngs = first if number == 0 else await read(window)
        for index, png in enumerate(pngs, number * _PNGS_AT_ONCE):
            # Seed 003's plain base64; null if the image was deleted since the listing.
            entry = await asyncio.to_thread(_with_data, images[index], png)
            await response.write((b", " if index else b"") + entry)
    await response.write(b"], " + json.dumps(page).encode()[1:])
    await response.write_eof()
    return response


# PNGs a page with include_data reads side by side.
_PNGS_AT_ONCE = 8


def _with_data(image: dict[str, Any], png: bytes | None) -> bytes:
    data = base64.b64encode(png).decode("ascii") if png is not None else None
    return json.dumps({**image, "image_data": data}).encode()


@requires("generate", "admin")
@operation(
    "A stored image's metadata",
    tags=["gallery"],
    parameters=[IMAGE_ID],
    responses={200: json_response("The image's metadata", GALLERY_IMAGE), **NOT_FOUND, **UNAVAILABLE},
)
async def show_image(request: web.Request) -> web.Response:
    record = await request.app[gallery_key].get(request.match_info["image_id"], visible_owner(request[principal_key]))
    if record is None:
        raise not_found()
    return web.json_response(image_json(record, request.app[settings_key].server.base_path))


@signed_url_allowed
@requires("generate", "admin")
@operation(
    "A stored image's PNG",
    tags=["gallery"],
    description=f"With a bearer token, or without one through a signed link (`{EXPIRES_PARAM}` and "
    f"`{SIGNATURE_PARAM}`, as in the `url` that /v1/images/generations answers): the link is the permission, "
    "until it expires. With a token the two parameters are ignored.",
    parameters=[
        IMAGE_ID,
        query_parameter(
            EXPIRES_PARAM, "Signed link: its expiry, in Unix seconds", {"type": "string", "pattern": "^[0-9]{1,12}$"}
        ),
        query_parameter(SIGNATURE_PARAM, "Signed link: its signature", {"type": "string"}),
    ],
    responses={
        200: content_response(
            "The PNG (`Content-Disposition: inline`)",
            {"image/png": {"type": "string", "contentMediaType": "image/png"}},
            headers=["Content-Disposition"],
        ),
        307: {
            "description": "With `gallery.redirect` (shared gallery): to a presigned object URL, valid for a minute",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        403: error_response("The token lacks the scope; without a token, the link's signature is invalid or expired"),
        **NOT_FOUND,
        **UNAVAILABLE,
    },
)
async def image_png(request: web.Request) -> web.Response:
    image_id = request.match_info["image_id"]
    if not is_valid_id(image_id):
        raise not_found()
    principal = request.get(principal_key)
    if principal is None:
        # Let in without a token for its URL signature (see auth.signed_url_allowed): the link is the permission.
        if not request.app[url_signer_key].verify(image_id, request.query):
            raise ApiError(403, "FORBIDDEN", "Invalid or expired image link")
        owner = None
    else:
        owner = visible_owner(principal)
    store = request.app[gallery_key]
    if await store.get(image_id, owner) is None:
        raise not_found()
    link = await store.png_link(image_id)
    if link is not None:
        # Straight from the object store (gallery.redirect): the bytes never pass through this replica.
        raise web.HTTPTemporaryRedirect(link, headers={"Cache-Control": "no-store"})
    async with store.open_png(image_id) as png:
        if png is None:  # deleted since the lookup
            raise not_found()
        response = web.StreamResponse(headers=PNG_HEADERS | {"Content-Disposition": f'inline; filename="{image_id}.png"'})
        response.content_type = "image/png"
        response.content_length = png.length
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in png.chunks:
                await response.write(chunk)
        await response.write_eof()
        return response


@requires("generate", "admin")
@operation(
    "Delete a stored image",
    tags=["gallery"],
    parameters=[IMAGE_ID],
    responses={204: {"description": "Deleted"}, **NOT_FOUND, **UNAVAILABLE},
)
async def delete_image(request: web.Request) -> web.Response:
    deleted = await request.app[gallery_key].delete(request.match_info["image_id"], visible_owner(request[principal_key]))
    if not deleted:
        raise not_found()
    return web.Response(status=204)


def routes(base: str) -> list[web.RouteDef]:
    # Ids have no dot, so "<id>.png" is the PNG's route alone: a request there is allowed (and told, in
    # a 405's Allow) only the PNG's methods, never the metadata route's DELETE.
    image = base + "/gallery/{image_id:[^/.]+}"
    return [
        web.get(base + "/gallery", list_images),
        web.get(base + "/gallery/{image_id}.png", image_png),
        web.get(image, show_image),
        web.delete(image, delete_image),
    ]
