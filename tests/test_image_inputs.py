"""Input images on the generating routes: how they are read, refused, and brought to the request's size.

Most tests run on `echo`, a weightless test model that answers with the
prepared input image itself, so what preparation made of an input is what the
client gets back. The diffusers models' own image routes are tested last.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from imagine.http import image_inputs
from imagine.http.request_bodies import GenerateBody
from imagine.plugin.generators import (
    GenerationRequest,
    Generator,
    ModelCard,
    ModelDefaults,
    ModelLimits,
    StepCallback,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings, SettingsError, load_settings
from imagine.storage.gallery import IMAGES_FOLDER, INDEX_FILE, GalleryStore
from tests.conftest import auth, data_url_png, pixels
from tests.weightless import WeightlessGenerator

GENERATE = "/imagine/generate"
RED = (200, 30, 30)


class EchoGenerator(WeightlessGenerator):
    """Answers with the prepared input image (grey without one)."""

    card = ModelCard(
        description="test: the input image as prepared",
        defaults=ModelDefaults(steps=1, guidance=0.0, width=64, height=64, scheduler="euler"),
        limits=ModelLimits(min_size=8, max_size=512),
        vram_required="none",
        inputs=("text", "image", "mask"),
    )

    def __init__(self, name: str, inputs: tuple[str, ...]) -> None:
        self.name = name
        self.card = dataclasses.replace(self.card, inputs=inputs)

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        return [
            [
                request.image.image.copy() if request.image else Image.new("RGB", (request.width, request.height), "grey")
                for _ in request.seeds
            ]
            for request in requests
        ]


class EchoPlugin:
    @hookimpl
    def register_generators(self, register: Callable[[Generator], None], settings: Settings) -> None:
        register(EchoGenerator("echo", ("text", "image", "mask")))
        register(EchoGenerator("echo-image", ("text", "image")))


@pytest.fixture
async def echo(make_client: Callable[..., Any], base_settings: Settings) -> Any:
    return await make_client(base_settings, plugins=(EchoPlugin(),))


# ---- images -----------------------------------------------------------------


def encoded(image: Image.Image, kind: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def png(size: tuple[int, int] = (64, 64), colour: Any = RED, mode: str = "RGB") -> bytes:
    return encoded(Image.new(mode, size, colour))


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(data)}"


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (with a valid CRC) over the same few pixels."""
    header = bytearray(data[16:29])
    header[0:8] = struct.pack(">II", width, height)
    return data[:16] + bytes(header) + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + data[33:]


def animated(kind: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), (value, 0, 0)) for value in (0, 120, 240)]
    return encoded(frames[0], kind, save_all=True, append_images=frames[1:])


def jpeg_rotated_by_exif(size: tuple[int, int]) -> bytes:
    """A JPEG stored `size`, whose EXIF orientation 6 says: turn 90 degrees clockwise to view."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.new("RGB", size, RED), "JPEG", exif=exif.tobytes())


# ---- helpers ----------------------------------------------------------------


async def post(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return await client.post(GENERATE, json={"prompt": "a cat", **body}, headers=headers or auth())


async def generated(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await post(client, {"response_format": "json", **body}, headers)
    assert response.status == 200, await response.text()
    return await response.json()


def first_image(result: dict[str, Any]) -> np.ndarray:
    return pixels(data_url_png(result["images"][0]))


def field_errors(body: dict[str, Any], field: str) -> list[dict[str, Any]]:
    assert body["error"]["code"] == "VALIDATION_ERROR", body
    errors = body["error"]["details"]["errors"]
    matching = [error for error in errors if error["loc"] == ["body", field]]
    assert matching, errors
    return matching


async def assert_refused(response: Any, field: str, fragment: str) -> None:
    assert response.status == 400, await response.text()
    matching = field_errors(await response.json(), field)
    assert fragment.lower() in matching[0]["msg"].lower(), matching


def body_model(**fields: Any) -> GenerateBody:
    return GenerateBody.model_validate({"prompt": "a cat", **fields})


def prepared(body: GenerateBody, init: Image.Image, mask: Image.Image | None = None) -> Any:
    """What preparation makes of these inputs for this body, at the size the route would ask for."""
    sent = image_inputs.SentInputs(
        image_inputs.SentImage(init, "init"), None if mask is None else image_inputs.SentImage(mask, "mask")
    )
    return image_inputs.prepare(body, sent, image_inputs.output_size(body, init.size))


# ---- refusals ---------------------------------------------------------------

PNG = png()
NOISE_PNG = encoded(noise())


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not base64 at all!", "not valid base64"),
        ("data:image/png,iVBORw0KGgo", "base64 data url"),
        (b64(b"just some text, not an image"), "not a png, jpeg or webp"),
        (b64(animated("GIF")), "gif image"),
        (data_url(animated("GIF"), "image/png"), "gif image"),  # the bytes decide, not the URL's type
        (b64(encoded(Image.new("RGB", (64, 64)), "BMP")), "bmp image"),
        (b64(animated("WEBP")), "animated (3 frames)"),
        (b64(animated("PNG")), "animated (3 frames)"),
        (b64(NOISE_PNG[: len(NOISE_PNG) // 2]), "not a readable png image: truncated"),
        (b64(encoded(noise(), "JPEG")[:400]), "not a readable jpeg image: truncated"),
        (b64(with_header_size(PNG, 0, 64)), "not a readable png"),
        (b64(with_header_size(PNG, 20000, 20000)), "more than 16777216 pixels"),
        (b64(with_header_size(PNG, 5000, 5000)), "more than 16777216 pixels"),
    ],
)
async def test_each_unreadable_image_is_refused_naming_its_field(echo, value, fragment) -> None:
    await assert_refused(await post(echo, {"model": "echo", "init_image": value}), "init_image", fragment)
    mask = await post(echo, {"model": "echo", "init_image": b64(PNG), "mask_image": value})
    await assert_refused(mask, "mask_image", fragment)


async def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(echo, monkeypatch) -> None:
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or load(image))
    for side in (5000, 20000):  # under and over Pillow's own limit
        bomb = with_header_size(PNG, side, side)
        response = await post(echo, {"model": "echo", "init_image": data_url(bomb)})
        await assert_refused(response, "init_image", "server.max_input_pixels")
    assert decoded == []


def with_last_scan_repeated(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan (a refinement of what the others decoded) comes `times` more times."""
    end_of_image = jpeg.rindex(b"\xff\xd9")
    last_scan = jpeg[jpeg.rindex(b"\xff\xda") : end_of_image]
    return jpeg[:end_of_image] + last_scan * times + jpeg[end_of_image:]


async def test_a_jpeg_of_too_many_scans_is_refused_without_decoding(echo, monkeypatch) -> None:
    """Each scan of a progressive JPEG is another pass over the whole image: thousands of them in a small
    file would be minutes of CPU."""
    progressive = encoded(noise(), "JPEG", progressive=True)
    assert (await post(echo, {"model": "echo", "init_image": b64(progressive)})).status == 200
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or load(image))
    bomb = with_last_scan_repeated(progressive, 100)
    scans = bomb.count(b"\xff\xda")
    response = await post(echo, {"model": "echo", "init_image": b64(bomb)})
    await assert_refused(response, "init_image", f"is a jpeg of {scans} scans, more than 64")
    assert scans > 100
    assert decoded == []


async def test_max_input_pixels_is_the_operators_to_set(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(server={"max_input_pixels": 64 * 64}), plugins=(EchoPlugin(),))
    assert (await post(client, {"model": "echo", "init_image": b64(png((64, 64)))})).status == 200
    refused = await post(client, {"model": "echo", "init_image": b64(png((72, 64)))})
    await assert_refused(refused, "init_image", "more than 4096 pixels")
    with pytest.raises(SettingsError, match="max_input_pixels"):
        load_settings(None, {"IMAGINE_SERVER_MAX_INPUT_PIXELS": str(16384 * 16384)})


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"mask_image": b64(PNG)}, "mask_image", "needs init_image"),
        ({"strength": 0.5}, "strength", "needs init_image"),
        ({"denoising_strength": 0.5}, "strength", "needs init_image"),
        ({"mask_blur": 8}, "mask_blur", "needs init_image"),
        ({"outpaint": {"left": 64}}, "outpaint", "needs init_image"),
        ({"resize_mode": "crop"}, "resize_mode", "needs init_image"),
        ({"init_image": b64(PNG), "strength": 1.5}, "strength", "less than or equal to 1"),
        ({"init_image": b64(PNG), "strength": -0.1}, "strength", "greater than or equal to 0"),
        ({"init_image": b64(PNG), "denoising_strength": 0.5, "strength": 0.6}, "denoising_strength", "conflicts"),
        ({"init_image": b64(PNG), "mask_blur": 65}, "mask_blur", "less than or equal to 64"),
        ({"init_image": b64(PNG), "outpaint": {"left": 12}}, "outpaint", "multiple of 8"),
        ({"init_image": b64(PNG), "outpaint": {"left": -8}}, "outpaint", "greater than or equal to 0"),
        ({"init_image": b64(PNG), "outpaint": {}}, "outpaint", "at least one side"),
        ({"init_image": b64(PNG), "outpaint": {"middle": 8}}, "outpaint", "extra"),
        ({"init_image": b64(PNG), "resize_mode": "zoom"}, "resize_mode", "'resize', 'crop' or 'fill'"),
        ({"init_image": ""}, "init_image", "at least 1"),
        ({"init_image": 42}, "init_image", "string"),
    ],
)
async def test_each_bad_image_field_is_named(client, change, field, fragment) -> None:
    response = await post(client, change)
    assert response.status == 400, await response.text()
    errors = (await response.json())["error"]["details"]["errors"]
    matching = [error for error in errors if error["loc"][:2] == ["body", field]]
    assert matching and fragment.lower() in matching[0]["msg"].lower(), errors


async def test_strength_must_be_finite(client) -> None:
    response = await client.post(
        GENERATE,
        data=f'{{"prompt": "a cat", "init_image": "{b64(PNG)}", "strength": NaN}}',
        headers={**auth(), "Content-Type": "application/json"},
    )
    await assert_refused(response, "strength", "finite")


async def test_a_model_refuses_the_inputs_its_card_does_not_list(echo) -> None:
    text_only = await post(echo, {"model": "leonardo", "init_image": b64(PNG)})
    await assert_refused(text_only, "init_image", "leonardo does not take an input image")
    for field, value in (("mask_image", b64(PNG)), ("outpaint", {"right": 8})):
        response = await post(echo, {"model": "echo-image", "init_image": b64(PNG), field: value})
        await assert_refused(response, field, "echo-image does not take a mask")
    assert (await post(echo, {"model": "echo-image", "init_image": b64(PNG)})).status == 200


async def test_a_mask_of_another_shape_is_refused(echo) -> None:
    response = await post(echo, {"model": "echo", "init_image": b64(png((64, 64))), "mask_image": b64(png((64, 48)))})
    await assert_refused(response, "mask_image", "another shape than init_image (64x64)")
    # Another resolution of the same shape is resized with the image.
    halved = await post(echo, {"model": "echo", "init_image": b64(png((64, 64))), "mask_image": b64(png((32, 32)))})
    assert halved.status == 200


async def test_an_input_image_too_small_or_too_large_for_the_model_is_refused(echo) -> None:
    # Without width/height the input's own size is the request's, within the model's limits.
    small = await post(echo, {"model": "echo", "init_image": b64(png((7, 64)))})
    await assert_refused(small, "init_image", "is 7x64: send at least 8 pixels a side")
    large = await post(echo, {"model": "echo", "init_image": b64(png((64, 64))), "outpaint": {"bottom": 456}})
    await assert_refused(large, "height", "must be between 8 and 512 for echo, and is 520 with init_image")


async def test_jobs_and_batch_items_refuse_bad_images_the_same_way(echo) -> None:
    bad = {"prompt": "a cat", "model": "echo", "init_image": b64(animated("GIF"))}
    job = await echo.post("/imagine/jobs", json=bad, headers=auth())
    await assert_refused(job, "init_image", "gif image")
    batch = await echo.post(
        "/imagine/generate/batch", json=[bad, {**bad, "init_image": b64(PNG)}], headers=auth()
    )
    assert batch.status == 200
    failed, succeeded = (await batch.json())["results"]
    assert failed["status"] == 400 and not failed["success"]
    assert field_errors(failed["error"], "init_image")[0]["msg"] == "is a GIF image: send PNG, JPEG or WebP"
    assert succeeded["success"]
    assert (first_image(succeeded["result"]) == RED).all()


# ---- reading ----------------------------------------------------------------


@pytest.mark.parametrize(
    "as_sent",
    [
        lambda data: b64(data),
        lambda data: data_url(data),
        lambda data: data_url(data, "image/jpeg"),  # the type a data URL names is not trusted either way
        lambda data: "\n".join(b64(data)[index : index + 76] for index in range(0, len(b64(data)), 76)),
    ],
)
async def test_base64_and_data_urls_carry_the_image(echo, as_sent) -> None:
    image = noise((64, 48))
    result = await generated(echo, {"model": "echo", "init_image": as_sent(encoded(image))})
    assert (first_image(result) == np.asarray(image)).all()
    assert result["parameters"]["strength"] == 0.75
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (64, 48)


async def test_jpeg_and_webp_are_read_too(echo) -> None:
    for kind in ("JPEG", "WEBP"):
        result = await generated(echo, {"model": "echo", "init_image": b64(encoded(noise(), kind)), "strength": 0.3})
        assert first_image(result).shape == (64, 64, 3)
        assert result["parameters"]["strength"] == 0.3


async def test_a_gallery_image_is_an_input_for_its_owner_only(echo) -> None:
    stored = await generated(echo, {"model": "echo", "init_image": b64(encoded(noise()))})
    (image_id,) = stored["ids"]
    again = await generated(echo, {"model": "echo", "init_image": f"gallery:{image_id}"})
    assert (first_image(again) == first_image(stored)).all()
    for value, headers in ((f"gallery:{image_id}", auth("bob")), ("gallery:img_nope", auth()), ("gallery:", auth())):
        response = await post(echo, {"model": "echo", "init_image": value}, headers)
        assert response.status == 404, await response.text()
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
    # The gallery itself answers bob the same.
    assert (await echo.get(f"/imagine/gallery/{image_id}.png", headers=auth("bob"))).status == 404


async def test_exif_orientation_is_applied(echo) -> None:
    result = await generated(echo, {"model": "echo", "init_image": b64(jpeg_rotated_by_exif((64, 32)))})
    assert first_image(result).shape == (64, 32, 3)  # 32 wide, 64 high
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (32, 64)


async def test_transparency_is_dropped_as_black(echo) -> None:
    image = Image.new("RGBA", (64, 64), (*RED, 255))
    image.paste((255, 255, 255, 0), (0, 0, 32, 64))
    result = first_image(await generated(echo, {"model": "echo", "init_image": b64(encoded(image))}))
    assert (result[:, :32] == 0).all()
    assert (result[:, 32:] == RED).all()


async def test_a_16_bit_greyscale_png_keeps_its_levels(echo) -> None:
    deep = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    result = first_image(await generated(echo, {"model": "echo", "init_image": b64(encoded(deep))}))
    assert (result == 40000 >> 8).all()


# ---- sizes ------------------------------------------------------------------


async def test_without_a_size_the_input_keeps_its_own_cut_to_multiples_of_8(echo) -> None:
    image = noise((100, 75))
    result = await generated(echo, {"model": "echo", "init_image": b64(encoded(image))})
    # Cut at the right and bottom: the pixels keep their coordinates.
    assert (first_image(result) == np.asarray(image)[:72, :96]).all()


@pytest.mark.parametrize(
    ("size", "expected"),
    [({"width": 32}, (32, 16)), ({"height": 16}, (32, 16)), ({"img_size": 48}, (48, 48)), ({"width": 96, "height": 40}, (96, 40))],
)
async def test_a_side_left_out_follows_the_inputs_aspect_ratio(echo, size, expected) -> None:
    result = await generated(echo, {"model": "echo", "init_image": b64(png((128, 64))), **size})
    assert (result["parameters"]["width"], result["parameters"]["height"]) == expected
    assert first_image(result).shape == (expected[1], expected[0], 3)


async def test_resize_modes_bring_the_input_to_the_size_asked(echo) -> None:
    # Left half red, right half blue, 128x64 into 64x64.
    image = Image.new("RGB", (128, 64), RED)
    image.paste((0, 0, 255), (64, 0, 128, 64))
    results = {}
    for mode in ("resize", "crop", "fill"):
        body = {"model": "echo", "init_image": b64(encoded(image)), "width": 64, "height": 64, "resize_mode": mode}
        results[mode] = first_image(await generated(echo, body)).astype(int)
        assert results[mode].shape == (64, 64, 3)
    # Stretched: half red, half blue.
    assert (np.abs(results["resize"][:, :28] - RED) <= 2).all() and (results["resize"][:, 36:, 2] >= 250).all()
    # Cropped: the middle 64 columns, half red, half blue, unscaled.
    assert (np.abs(results["crop"][:, :28] - RED) <= 2).all() and (results["crop"][:, 36:, 2] >= 250).all()
    # Fitted 64x32 in the middle, the rows above and below repeating its edge.
    fill = results["fill"]
    assert (fill[:16] == fill[16]).all() and (fill[48:] == fill[47]).all()
    assert (np.abs(fill[:, :28] - RED) <= 2).all() and (fill[:, 36:, 2] >= 250).all()


async def test_outpaint_pads_each_side(echo) -> None:
    image = noise((64, 48))
    body = {"model": "echo", "init_image": b64(encoded(image)), "outpaint": {"left": 16, "top": 8, "bottom": 24}}
    result = await generated(echo, body)
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (80, 80)
    padded = first_image(result)
    assert (padded[8:56, 16:80] == np.asarray(image)).all()
    assert (padded[8:56, :16] == padded[8:56, 16:17]).all()  # the edge, repeated outwards


async def test_a_tiny_or_thin_input_is_refused_or_fitted_never_a_500(echo) -> None:
    # Too small to keep anything once its sides round down to multiples of 8, whatever outpaint adds.
    for size, outpaint in (((4, 4), {"left": 64, "right": 64, "top": 64, "bottom": 64}), ((7, 64), {"left": 32, "right": 32})):
        body = {"prompt": "a cat", "model": "echo", "init_image": b64(png(size)), "outpaint": outpaint}
        response = await echo.post("/imagine/generate", json=body, headers=auth())
        assert response.status == 400
        assert (await response.json())["error"]["details"]["errors"][0]["loc"] == ["body", "init_image"]
    # A strip filled into a square keeps a pixel's height, and the rest repeats its edge.
    for size in ((4000, 1), (1, 4000)):
        body = {"model": "echo", "init_image": b64(png(size)), "width": 64, "height": 64, "resize_mode": "fill"}
        assert first_image(await generated(echo, body)).shape == (64, 64, 3)


def test_outpaint_masks_the_padding_white_and_the_input_black() -> None:
    body = body_model(init_image="x", outpaint={"left": 16, "right": 8}, mask_blur=0)
    result = prepared(body, noise((64, 64)))
    assert result.image.size == result.mask.size == (88, 64)
    mask = np.asarray(result.mask)
    assert (mask[:, :16] == 255).all() and (mask[:, 80:] == 255).all()
    assert (mask[:, 16:80] == 0).all()
    assert result.mask_hash == ""


def test_a_sent_mask_is_extended_by_outpaint_and_feathered() -> None:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    body = body_model(init_image="x", mask_image="y", outpaint={"bottom": 16}, mask_blur=4)
    result = prepared(body, noise((64, 64)), mask)
    assert result.mask.mode == "L" and result.mask.size == (64, 80)
    feathered = np.asarray(result.mask).astype(int)
    assert (feathered[:40, :16] >= 250).all() and (feathered[:40, 48:] <= 5).all()  # far from any edge
    assert 20 < feathered[30, 32] < 235  # on the edge: feathered
    assert (feathered[72:] >= 250).all()  # the outpainted rows
    assert (result.image_hash, result.mask_hash) == ("init", "mask")


def test_fill_masks_its_padding_only_when_a_mask_is_in_play() -> None:
    body = body_model(init_image="x", mask_image="y", width=64, height=64, resize_mode="fill", mask_blur=0)
    result = prepared(body, noise((128, 64)), Image.new("L", (128, 64), 0))
    mask = np.asarray(result.mask)
    assert (mask[:16] == 255).all() and (mask[48:] == 255).all() and (mask[16:48] == 0).all()
    assert prepared(body_model(init_image="x", width=64, height=64, resize_mode="fill"), noise((128, 64))).mask is None


def test_a_mask_follows_the_crop_of_its_image() -> None:
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # the columns that survive the crop on the left
    body = body_model(init_image="x", mask_image="y", width=64, height=64, resize_mode="crop", mask_blur=0)
    result = np.asarray(prepared(body, noise((128, 64)), mask).mask)
    assert (result[:, :30] >= 250).all() and (result[:, 34:] <= 5).all()


# ---- provenance -------------------------------------------------------------


async def test_the_result_and_the_gallery_record_say_an_input_image_was_used(echo) -> None:
    init, mask = encoded(noise()), png(colour=255, mode="L")
    body = {"model": "echo", "init_image": data_url(init), "mask_image": b64(mask), "denoising_strength": 0.6}
    result = await generated(echo, body)
    inputs = {
        "strength": 0.6,
        "image_hash": hashlib.sha256(init).hexdigest()[:10],
        "mask_hash": hashlib.sha256(mask).hexdigest()[:10],
    }
    assert result["parameters"].items() >= inputs.items()
    record = await (await echo.get(f"/imagine/gallery/{result['ids'][0]}", headers=auth())).json()
    assert record["parameters"] == result["parameters"]
    text = await generated(echo, {"model": "echo"})
    assert not set(text["parameters"]) & set(inputs)


async def test_a_gallery_index_from_before_image_inputs_is_migrated(tmp_path) -> None:
    folder = tmp_path / "gallery"
    (folder / IMAGES_FOLDER).mkdir(parents=True)
    (folder / IMAGES_FOLDER / f"{OLD_ID}.png").write_bytes(PNG)
    with contextlib.closing(sqlite3.connect(folder / INDEX_FILE)) as old:
        old.executescript(SCHEMA_1)
        old.execute(
            "INSERT INTO images VALUES (?, 'alice', ?, 'a fox', 'a fox', '', 'sdxl', 7, 64, 64, 2, 7.5, 'euler', '[]', 0.5, 0.0)",
            (OLD_ID, time.time()),
        )
        old.commit()
    store = GalleryStore(folder)
    await store.open()
    try:
        record = await store.get(OLD_ID, "alice")
        assert record is not None and record.metadata.prompt == "a fox" and record.metadata.strength is None
        new_metadata = dataclasses.replace(record.metadata, strength=0.4, image_hash="0123456789")
        (new_id,) = await store.add("alice", [(PNG, new_metadata)])
        assert (await store.get(new_id, "alice")).metadata == new_metadata
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(folder / INDEX_FILE)) as migrated:
        assert migrated.execute("PRAGMA user_version").fetchone()[0] == 2


OLD_ID = "img_" + "a" * 22
# The index as the gallery wrote it before image inputs (schema 1).
SCHEMA_1 = """
CREATE TABLE images (
    id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, created_at REAL NOT NULL, prompt TEXT NOT NULL,
    prompt_folded TEXT NOT NULL, negative_prompt TEXT NOT NULL, model TEXT NOT NULL, seed INTEGER NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, steps INTEGER NOT NULL, guidance REAL NOT NULL,
    scheduler TEXT NOT NULL, loras TEXT NOT NULL, generation_time REAL NOT NULL, vram_used REAL NOT NULL
);
CREATE INDEX images_by_owner ON images (owner, created_at);
PRAGMA user_version = 1;
"""


# ---- listing and documentation ----------------------------------------------


async def test_models_list_the_inputs_each_takes(echo) -> None:
    listing = await (await echo.get("/imagine/models", headers=auth())).json()
    assert listing["local_models"]["echo"]["inputs"] == ["text", "image", "mask"]
    assert listing["local_models"]["echo-image"]["inputs"] == ["text", "image"]
    assert listing["cloud_models"]["leonardo"]["inputs"] == ["text"]


async def test_the_document_describes_the_image_fields(client) -> None:
    document = await (await client.get("/imagine/openapi.json")).json()
    body = document["components"]["schemas"]["GenerateBody"]["properties"]
    assert {"init_image", "mask_image", "strength", "denoising_strength", "mask_blur", "outpaint", "resize_mode"} <= set(body)
    assert body["resize_mode"]["enum"] == ["resize", "crop", "fill"]


# ---- the diffusers models ---------------------------------------------------


async def test_sdxl_turbo_starts_from_an_image_and_outpaints(client) -> None:
    base = {"model": "sdxl-turbo", "seed": 5, "steps": 2}
    text = first_image(await generated(client, base))
    image = first_image(await generated(client, {**base, "init_image": b64(encoded(noise())), "strength": 0.5}))
    assert np.abs(image.astype(int) - text.astype(int)).mean() > 5
    outpainted = await generated(client, {**base, "init_image": b64(encoded(noise())), "outpaint": {"right": 64}})
    assert first_image(outpainted).shape == (64, 128, 3)
