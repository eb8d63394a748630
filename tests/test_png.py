"""The PNG writer: exact pixels, the `parameters` chunk other tools read, every engine, level and strategy."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from imagine.plugin.generators import GenerationRequest, LoraWeight
from imagine.http.png import ZLIB_STRATEGIES, PngEncoder, parameters_text


def chunk_types(png: bytes) -> list[bytes]:
    types, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        types.append(png[position + 4 : position + 8])
        position += 12 + length
    return types


def random_image(mode: str, width: int = 67, height: int = 31) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


ENGINE_SETTINGS = [("isal", level, "huffman_only") for level in range(4)] + [
    ("zlib", level, strategy) for level in (0, 1, 6, 9) for strategy in sorted(ZLIB_STRATEGIES)
]


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize(("engine", "level", "strategy"), ENGINE_SETTINGS)
def test_pixels_survive_exactly_with_every_engine_level_and_strategy(mode, engine, level, strategy) -> None:
    image = random_image(mode)
    decoded = Image.open(io.BytesIO(PngEncoder(level, engine, strategy).encode(image, "a prompt")))
    decoded.load()  # Pillow checks every chunk's CRC on the way
    assert decoded.mode == mode and decoded.size == image.size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_other_modes_are_written_as_rgb() -> None:
    grey = Image.new("L", (8, 4), 120)
    decoded = Image.open(io.BytesIO(PngEncoder().encode(grey, "x")))
    assert decoded.mode == "RGB" and decoded.getpixel((3, 2)) == (120, 120, 120)


def test_latin1_text_is_tEXt_and_anything_else_iTXt() -> None:
    image = random_image("RGB", 4, 4)
    latin = PngEncoder().encode(image, "café at dusk")
    assert chunk_types(latin) == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert Image.open(io.BytesIO(latin)).text["parameters"] == "café at dusk"
    unicode = PngEncoder().encode(image, "灯台 at dusk\nSteps: 4")
    assert chunk_types(unicode) == [b"IHDR", b"iTXt", b"IDAT", b"IEND"]
    assert Image.open(io.BytesIO(unicode)).text["parameters"] == "灯台 at dusk\nSteps: 4"


def test_compression_shrinks_smooth_images() -> None:
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    image = Image.fromarray(np.stack([gradient] * 3, axis=-1))
    stored = PngEncoder(level=0).encode(image, "x")
    assert len(stored) > 64 * 256 * 3
    for engine in ("isal", "zlib"):
        # Even Huffman coding alone spends about a bit per filtered byte.
        assert len(PngEncoder(1, engine).encode(image, "x")) < len(stored) / 5


@pytest.fixture(scope="module")
def helpers():
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield pool


def image_data(png: bytes) -> bytes:
    """The concatenated IDAT chunks' contents: the zlib stream of the scanlines."""
    data, position = b"", 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        if png[position + 4 : position + 8] == b"IDAT":
            data += png[position + 8 : position + 8 + length]
        position += 12 + length
    return data


@pytest.mark.parametrize("pieces", [2, 3, 4])
@pytest.mark.parametrize(("engine", "level"), [("isal", 1), ("isal", 3), ("zlib", 1), ("zlib", 6), ("zlib", 0)])
def test_a_large_image_encoded_in_pieces_is_one_valid_stream(helpers, pieces, engine, level) -> None:
    image = random_image("RGB", width=320, height=301)  # 282 KiB of pixels: room for four pieces of uneven rows
    encoder = PngEncoder(level, engine, pieces=pieces, helpers=helpers)
    assert encoder._piece_count(np.asarray(image)) == pieces  # or this test would prove nothing
    png = encoder.encode(image, "a prompt")
    # zlib checks the Adler-32 of the whole: each piece ended where the next one starts.
    assert len(zlib.decompress(image_data(png))) == 301 * (320 * 3 + 1)
    decoded = Image.open(io.BytesIO(png))
    decoded.load()
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_parameters_text_in_the_form_other_tools_parse() -> None:
    request = GenerationRequest(
        prompt="a lighthouse",
        negative_prompt="fog",
        model="sd15-lora",
        width=512,
        height=768,
        steps=20,
        guidance=7.5,
        num_images=2,
        seed=42,
        scheduler="dpmpp_2m",
        loras=(LoraWeight("watercolor", 0.8),),
    )
    assert parameters_text(request, 43) == (
        "a lighthouse\nNegative prompt: fog\n"
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 43, Size: 512x768, Model: sd15-lora, Lora: watercolor:0.8"
    )
