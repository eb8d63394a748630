"""PNG bytes with the generation parameters embedded the way other Stable Diffusion tools read them."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from isal import isal_zlib

from imagine.plugin.generators import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

# Our scheduler names -> the sampler labels that A1111-style tools write and parse.
SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
    "unipc": "UniPC",
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
    if request.image is not None:
        settings.append(f"Denoising strength: {request.image.strength:g}")
        if request.image.image_hash:
            settings.append(f"Init image hash: {request.image.image_hash}")
        if request.image.mask_hash:
            settings.append(f"Mask hash: {request.image.mask_hash}")
    if request.loras:
        settings.append("Lora: " + " ".join(f"{lora.name}:{lora.weight:g}" for lora in request.loras))
    lines.append(", ".join(settings))
    return "\n".join(lines)


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
    return struct.pack(">I", len(data)), kind, data, struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))


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


def _raw_compressor(engine: str, level: int, strategy: str) -> Any:
    """A raw deflate compressor (no zlib header or checksum).

    ISA-L (Intel's storage acceleration library, through python-isal) deflates a
    filtered 256x256 image in 0.6 ms where zlib's fastest setting takes 2.8 ms,
    into a slightly smaller stream; zlib remains for stored PNGs and for levels
    above ISA-L's top level of 3.
    """
    if engine == "zlib" or level == 0:
        return zlib.compressobj(level, zlib.DEFLATED, -15, 9, ZLIB_STRATEGIES[strategy])
    return isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)


# zlib's header for a deflate stream with a 32 KiB window, compressed fast.
_ZLIB_HEADER = b"\x78\x01"
# A piece of fewer pixel bytes is not worth handing to another thread.
_MIN_PIECE_BYTES = 64 * 1024


@dataclass(frozen=True)
class PngEncoder:
    """Writes 8-bit RGB(A) PNGs with a `parameters` text chunk.

    Written here rather than by Pillow, whose writer spends most of its time
    choosing a filter per row: one vectorised SUB filter and ISA-L's deflate are
    four to five times faster (1.2 ms against 5.6 ms at 256x256, 17 ms against
    69 ms at 1024x1024, on one thread) at equal or better size, and this runs
    for every image served.

    With `helpers`, a large image is filtered and deflated in `pieces` side by
    side, as pigz does: each piece of whole rows is compressed alone and all but
    the last end on a byte boundary (a sync flush), so the pieces concatenate
    into one valid stream, for a few bytes more.
    """

    level: int = 1
    engine: str = "isal"
    strategy: str = "huffman_only"
    pieces: int = 1
    helpers: Executor | None = None

    def encode_for(self, request: GenerationRequest, image: Image.Image, seed: int) -> bytes:
        """One image of `request`, made with `seed`, with the parameters that remake it."""
        return self.encode(image, parameters_text(request, seed))

    def encode(self, image: Image.Image, parameters: str) -> bytes:
        if image.mode not in _COLOUR_TYPES:
            image = image.convert("RGB")
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[image.mode], 0, 0, 0)
        return b"".join(
            (
                _SIGNATURE,
                _chunk(b"IHDR", header),
                _text_chunk(PARAMETERS_KEY, parameters),
                *_chunk_parts(b"IDAT", self._image_data(pixels)),
                _chunk(b"IEND", b""),
            )
        )

    def _image_data(self, pixels: np.ndarray) -> bytes:
        """The zlib stream of the filtered scanlines: pieces of rows filtered and deflated side by side."""
        pieces = np.array_split(pixels, self._piece_count(pixels))
        last = len(pieces) - 1
        others = []
        if self.helpers is not None:
            others = [self.helpers.submit(self._piece, piece, index == last) for index, piece in enumerate(pieces[1:], 1)]
        # The first piece on this thread: one hand-off fewer.
        done = [self._piece(pieces[0], last == 0), *(other.result() for other in others)]
        checksum = 1  # Adler-32 of nothing, continued piece by piece
        for filtered, _ in done:
            checksum = isal_zlib.adler32(filtered, checksum)
        return b"".join((_ZLIB_HEADER, *(compressed for _, compressed in done), struct.pack(">I", checksum)))

    def _piece_count(self, pixels: np.ndarray) -> int:
        if self.helpers is None:
            return 1
        return min(self.pieces, len(pixels), max(1, pixels.nbytes // _MIN_PIECE_BYTES))

    def _piece(self, pixels: np.ndarray, last: bool) -> tuple[np.ndarray, bytes]:
        """(filtered rows, their raw deflate), ending on a byte boundary unless `last`."""
        filtered = _sub_filtered(pixels)
        compressor = _raw_compressor(self.engine, self.level, self.strategy)
        return filtered, compressor.compress(filtered) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
