"""Input images (`init_image`, `mask_image`): read, checked and prepared before any work is queued.

A value is a data URL, plain base64, or `gallery:<id>` naming one of the
caller's gallery images (another caller's, or a malformed id, is 404 as on the
gallery routes). The bytes must be PNG, JPEG or WebP, told by their first bytes
whatever a data URL claims; the header's size is checked against
`server.max_input_pixels` before a single pixel is decoded. Pillow's own bomb
guard (`Image.MAX_IMAGE_PIXELS`) is left as it is: it is process-wide, and the
setting's ceiling stays below it. Decoding and preparing run on the app's CPU
pool, never on the event loop.

Preparation brings the image to the request's size:
- without width/height it keeps its own size, cut down to a multiple of 8 at
  the right and bottom edges (so pixel coordinates stay those of the input);
- with width/height, `resize_mode` stretches (`resize`), scales to cover and
  crops the middle (`crop`), or fits inside and pads (`fill`);
- `outpaint` then pads each side.
Padding repeats the edge pixels, a neutral start for the pipeline; when a mask is
in play (`mask_image` or `outpaint`) the padding is white in it, so it is
repainted. The mask follows the image's every step, then `mask_blur` feathers it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from aiohttp import web
from PIL import Image, ImageFilter, ImageOps

from imagine.errors import ApiError, field_error, validation_error
from imagine.http.app_keys import gallery_key, input_pool_key, settings_key
from imagine.http.request_bodies import GenerateBody
from imagine.http.views.gallery import not_found, visible_owner
from imagine.plugin.generators import GenerationRequest, Generator, ImageInput
from imagine.security.tokens import Principal

GALLERY_PREFIX = "gallery:"
HASH_LENGTH = 10
# A mask may be sent at another resolution than the image, not in another shape.
ASPECT_TOLERANCE = 0.01
# Pillow's format names, by the bytes every such file starts with.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_LABELS = {"WEBP": "WebP"}
# A progressive JPEG is decoded once more for every scan it holds, so a small file of one scan repeated
# thousands of times costs minutes of CPU. Encoders write about ten; the count may include a thumbnail's.
MAX_JPEG_SCANS = 64
_START_OF_SCAN = b"\xff\xda"
_REFUSED_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))

T = TypeVar("T")


@dataclass(frozen=True)
class SentImage:
    """One decoded input: upright, alpha dropped, in the mode its field needs; `digest` is of the bytes as sent."""

    image: Image.Image
    digest: str


@dataclass(frozen=True)
class SentInputs:
    init: SentImage
    mask: SentImage | None


def check_model_takes(body: GenerateBody, generator: Generator) -> None:
    """400 for each input the model's card does not list, before anything is read."""
    inputs = generator.card.inputs
    errors = []
    if "image" not in inputs:
        errors.append(field_error("init_image", f"{generator.name} does not take an input image"))
    if "mask" not in inputs:
        errors.extend(
            field_error(name, f"{generator.name} does not take a mask (inpainting, outpainting)")
            for name in ("mask_image", "outpaint")
            if getattr(body, name) is not None
        )
    if errors:
        raise validation_error(errors)


async def read_inputs(app: web.Application, principal: Principal, body: GenerateBody) -> SentInputs:
    """The body's input images decoded, or the 400 (404 for a gallery id) that says why not."""
    assert body.init_image is not None
    max_pixels = app[settings_key].server.max_input_pixels
    init = await _read(app, principal, "init_image", body.init_image, "RGB", max_pixels)
    mask = None
    if body.mask_image is not None:
        mask = await _read(app, principal, "mask_image", body.mask_image, "L", max_pixels)
        _check_mask_shape(init.image.size, mask.image.size)
    return SentInputs(init, mask)


async def read_image(app: web.Application, principal: Principal, field: str, value: str) -> SentImage:
    """One image a route takes besides the generation inputs (`/analyze-image`'s), read by the same rules, as RGB."""
    return await _read(app, principal, field, value, "RGB", app[settings_key].server.max_input_pixels)


def output_size(body: GenerateBody, image_size: tuple[int, int]) -> tuple[int, int]:
    """The request's width and height with this input: the body's, or the image's own; outpaint's sides added.

    A side the body leaves out follows the input's aspect ratio; every side is
    rounded down to a multiple of 8 (the model's limits are checked afterwards).
    """
    width, height = _canvas_size(body, image_size)
    if body.outpaint is not None:
        width += body.outpaint.left + body.outpaint.right
        height += body.outpaint.top + body.outpaint.bottom
    return width, height


async def with_inputs(app: web.Application, body: GenerateBody, sent: SentInputs, request: GenerationRequest) -> GenerationRequest:
    """`request` (already resolved at `output_size`) with its `ImageInput`, prepared on the CPU pool."""
    image_input = await _off_loop(app, prepare, body, sent, (request.width, request.height))
    return dataclasses.replace(request, image=image_input)


def prepare(body: GenerateBody, sent: SentInputs, size: tuple[int, int]) -> ImageInput:
    """The image (and mask) at `size`, as the module's docstring tells; pure PIL, for a worker thread."""
    outpaint = body.outpaint
    left, top, right, bottom = (outpaint.left, outpaint.top, outpaint.right, outpaint.bottom) if outpaint else (0, 0, 0, 0)
    canvas = (size[0] - left - right, size[1] - top - bottom)
    explicit = _sends_size(body)
    image = _fit(sent.init.image, canvas, body.resize_mode, explicit, pad=None)
    mask = None
    if sent.mask is not None or outpaint is not None:
        if sent.mask is None:
            # Outpainting alone keeps the whole input: black (keep) everywhere but the padding.
            source = Image.new("L", sent.init.image.size, 0)
        else:
            source = sent.mask.image.resize(sent.init.image.size, Image.Resampling.BILINEAR)
        mask = _fit(source, canvas, body.resize_mode, explicit, pad=255)
    if outpaint is not None:
        assert mask is not None
        image = _pad(image, (left, top, right, bottom), fill=None)
        mask = _pad(mask, (left, top, right, bottom), fill=255)
    if mask is not None and body.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(body.mask_blur))
    return ImageInput(
        image=image,
        strength=body.strength,
        mask=mask,
        image_hash=sent.init.digest,
        mask_hash=sent.mask.digest if sent.mask else "",
    )


# ---- reading --------------------------------------------------------------


async def _read(
    app: web.Application, principal: Principal, field: str, value: str, mode: str, max_pixels: int
) -> SentImage:
    if value.startswith(GALLERY_PREFIX):
        data = await _gallery_png(app, principal, value.removeprefix(GALLERY_PREFIX))
        return await _off_loop(app, decode, field, data, mode, max_pixels)
    return await _off_loop(app, lambda: decode(field, _base64_bytes(field, value), mode, max_pixels))


async def _gallery_png(app: web.Application, principal: Principal, image_id: str) -> bytes:
    """The PNG of one of the caller's images (an admin's: anyone's), as GET /gallery/{id}.png finds it."""
    store = app[gallery_key]
    if await store.get(image_id, visible_owner(principal)) is None:
        raise not_found()
    png = await store.read_png(image_id)
    if png is None:  # deleted since the lookup
        raise not_found()
    return png


def _base64_bytes(field: str, value: str) -> bytes:
    """A data URL's or plain base64's bytes; the media type a data URL names is not trusted (the bytes are sniffed)."""
    payload = value
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _refused(field, "must be a base64 data URL (data:image/png;base64,...), plain base64 or gallery:<id>")
    try:
        # Line breaks are what MIME encoders add: not an error.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _refused(field, "is not valid base64 (nor a data URL or gallery:<id>)") from None


def decode(field: str, data: bytes, mode: str, max_pixels: int) -> SentImage:
    """Bytes to an upright image in `mode` ("RGB" or "L"), refused before decoding if the header is too large."""
    digest = hashlib.sha256(data).hexdigest()[:HASH_LENGTH]
    kind = _sniff(field, data)
    label = _LABELS.get(kind, kind)
    # In a JPEG's coded data every 0xFF byte is followed by 0x00 or a marker: only a real (or a
    # thumbnail's) start-of-scan marker reads as these two bytes, so counting them errs towards refusing.
    if kind == "JPEG" and (scans := data.count(_START_OF_SCAN)) > MAX_JPEG_SCANS:
        raise _refused(field, f"is a JPEG of {scans} scans, more than {MAX_JPEG_SCANS}: save it again with a usual encoder")
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError:
        raise _too_large(field, max_pixels) from None
    except Exception:  # noqa: BLE001 - a parser fails on hostile bytes in many ways, all unreadable to the client
        raise _unreadable(field, label) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(field, max_pixels)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise _refused(field, f"is animated ({frames} frames): send a single still image")
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - as above: a decoder's every failure is a bad file
        raise _unreadable(field, label) from None
    return SentImage(_flatten(upright, mode), digest)


def _sniff(field: str, data: bytes) -> str:
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, kind in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            raise _refused(field, f"is a {kind} image: send PNG, JPEG or WebP")
    raise _refused(field, "is not a PNG, JPEG or WebP image")


def _flatten(image: Image.Image, mode: str) -> Image.Image:
    """Transparent pixels count as black: for a mask, what a transparent layer leaves unpainted is kept.

    "RGBA" keeps the transparency: OpenAI's masks are made of it.
    """
    if mode == "RGBA":
        return image.convert("RGBA")
    if image.mode.startswith("I"):
        # 16-bit greyscale: Pillow's own conversion clips every level above 255 to white.
        levels = np.clip(np.asarray(image), 0, 65535) >> 8
        image = Image.fromarray(levels.astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert(mode)


def _check_mask_shape(image_size: tuple[int, int], mask_size: tuple[int, int]) -> None:
    (image_width, image_height), (mask_width, mask_height) = image_size, mask_size
    image_ratio, mask_ratio = image_width / image_height, mask_width / mask_height
    if abs(mask_ratio - image_ratio) > ASPECT_TOLERANCE * image_ratio:
        raise _refused(
            "mask_image",
            f"is {mask_width}x{mask_height}, another shape than init_image ({image_width}x{image_height})",
        )


# ---- preparing ------------------------------------------------------------


def _sends_size(body: GenerateBody) -> bool:
    return body.width is not None or body.height is not None or body.img_size is not None


def _canvas_size(body: GenerateBody, image_size: tuple[int, int]) -> tuple[int, int]:
    """The size the input is brought to, before outpainting."""
    image_width, image_height = image_size
    width = body.width or body.img_size
    height = body.height or body.img_size
    if width is None and height is None:
        if min(image_width, image_height) < 8:
            # Its sides round down to multiples of 8: nothing of it would be left to paint around.
            raise _refused("init_image", f"is {image_width}x{image_height}: send at least 8 pixels a side, or width and height")
        return _down_to_8(image_width), _down_to_8(image_height)
    if width is None:
        assert height is not None
        return max(8, _down_to_8(round(image_width * height / image_height))), height
    if height is None:
        return width, max(8, _down_to_8(round(image_height * width / image_width)))
    return width, height


def _down_to_8(value: int) -> int:
    return value - value % 8


def _fit(image: Image.Image, size: tuple[int, int], resize_mode: str, explicit: bool, *, pad: int | None) -> Image.Image:
    """`image` brought to `size`; `pad` is what `fill` pads a mask with (None: repeat the edge pixels)."""
    if image.size == size:
        return image
    if not explicit:
        # Only the remainder of a multiple of 8 goes, so the pixels keep their coordinates.
        return image.crop((0, 0, *size))
    resample = Image.Resampling.LANCZOS if pad is None else Image.Resampling.BILINEAR
    if resize_mode == "crop":
        return ImageOps.fit(image, size, resample)
    if resize_mode == "fill":
        # As ImageOps.contain, but never thinner than a pixel: a 4000x1 strip fills 64x64 as 64x1.
        scale = min(size[0] / image.width, size[1] / image.height)
        contained = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
        left = (size[0] - contained.width) // 2
        top = (size[1] - contained.height) // 2
        borders = (left, top, size[0] - contained.width - left, size[1] - contained.height - top)
        return _pad(contained, borders, fill=pad)
    return image.resize(size, resample)


def _pad(image: Image.Image, borders: tuple[int, int, int, int], *, fill: int | None) -> Image.Image:
    """`borders` (left, top, right, bottom) added: `fill` for a mask, else the edge pixels repeated outwards."""
    left, top, right, bottom = borders
    if not any(borders):
        return image
    if fill is not None:
        return ImageOps.expand(image, border=borders, fill=fill)
    pixels = np.asarray(image)
    return Image.fromarray(np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge"))


# ---- helpers --------------------------------------------------------------


async def _off_loop(app: web.Application, function: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(app[input_pool_key], function, *args)


def _refused(field: str, message: str) -> ApiError:
    return validation_error([field_error(field, message)])


def _unreadable(field: str, label: str) -> ApiError:
    return _refused(field, f"is not a readable {label} image: truncated, corrupt or without pixels")


def _too_large(field: str, max_pixels: int) -> ApiError:
    return _refused(field, f"has more than {max_pixels} pixels (server.max_input_pixels)")
