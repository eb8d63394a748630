"""PNG bytes with the generation parameters embedded the way other Stable Diffusion tools read them."""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from isal import isal_zlib

from imagine.generators import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

# Our scheduler names -> the sampler labels that A1111-style tools write and parse.
SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "pndm": "PNDM",
    "lcm": "LCM",
}

PARAMETERS_KEY = "parameters"


def parameters_text(request: GenerationRequest, seed: int) -> str:
    """The prompt, an optional `Negative prompt:` line, then one line of settings."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        f"Steps: {request.steps}",
        f"Sampler: {SAMPLER_LABELS.get(request.scheduler, request.scheduler)}",
        f"CFG scale: {request.guidance:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {request.model}",
    ]
    if request.loras:
        settings.append("Lora: " + " ".join(f"{lora.name}:{lora.weight:g}" for lora in request.loras))
    lines.append(", ".join(settings))
    return "\n".join(lines)


# Deflate implementations. ISA-L (Intel's storage acceleration library, through
# python-isal) deflates a filtered 256x256 image in 0.6 ms where zlib's fastest
# setting takes 2.8 ms, into a slightly smaller stream; zlib remains for levels
# above ISA-L's top level of 3.

# zlib strategies by name. After the SUB filter, Huffman coding alone keeps
# nearly all of deflate's gain on photographs at a fraction of its time.
ZLIB_STRATEGIES = {
    "huffman_only": zlib.Z_HUFFMAN_ONLY,
    "rle": zlib.Z_RLE,
    "filtered": zlib.Z_FILTERED,
    "default": zlib.Z_DEFAULT_STRATEGY,
}

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {"RGB": 2, "RGBA": 6}
_SUB_FILTER = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join(_chunk_parts(kind, data))


def _chunk_parts(kind: bytes, data: bytes) -> tuple[bytes, ...]:
    """A chunk as parts, so that a large one is copied once, into the file."""
    return struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _text_chunk(key: str, text: str) -> bytes:
    """tEXt when the text is Latin-1, else iTXt (UTF-8), as the PNG specification asks."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, no compression (flag 0, method 0), no language tag, no translated keyword
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _sub_filtered(pixels: np.ndarray) -> np.ndarray:
    """Scanlines with PNG's SUB filter (each byte minus the one a pixel to its left), vectorised.

    Deflate reads the array's buffer directly: no copy into bytes first.
    """
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = _SUB_FILTER
    filtered[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels :])
    return filtered


def deflate(data: bytes | np.ndarray, level: int, engine: str = "isal", strategy: str = "huffman_only") -> bytes:
    """A zlib stream of `data`; level 0 stores it uncompressed, whatever the engine."""
    if level == 0 or engine == "zlib":
        compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 9, ZLIB_STRATEGIES[strategy])
        return compressor.compress(data) + compressor.flush()
    return isal_zlib.compress(data, level)


def encode_png(
    image: Image.Image, parameters: str, compress_level: int, engine: str = "isal", strategy: str = "huffman_only"
) -> bytes:
    """An 8-bit RGB(A) PNG with a `parameters` text chunk.

    Written here rather than by Pillow, whose writer spends most of its time
    choosing a filter per row: one vectorised SUB filter and ISA-L's deflate are
    four to five times faster (1.2 ms against 5.6 ms at 256x256, 17 ms against
    69 ms at 1024x1024) at equal or better size, and this runs for every image
    served.
    """
    if image.mode not in _COLOUR_TYPES:
        image = image.convert("RGB")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[image.mode], 0, 0, 0)
    data = deflate(_sub_filtered(pixels), compress_level, engine, strategy)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _text_chunk(PARAMETERS_KEY, parameters),
            *_chunk_parts(b"IDAT", data),
            _chunk(b"IEND", b""),
        )
    )
