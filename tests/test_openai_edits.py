"""POST /v1/images/edits through the official `openai` client: an image, optionally a mask, OpenAI's answers."""

from __future__ import annotations

import base64
import io

import aiohttp
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import make_token, pixels

ROUTE = "/imagine/v1/images/edits"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    array = np.stack([np.tile(x, (height, 1)), np.tile(x[::-1], (height, 1)), np.full((height, width), 90, np.uint8)], axis=-1)
    return Image.fromarray(array, "RGB")


def transparent_left_half(width: int = 64, height: int = 64) -> Image.Image:
    """OpenAI's mask: transparent where the image is to be repainted."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


@pytest.fixture
async def openai_client(client):
    # No retries: a refusal must surface at once, not after back-off.
    opened = openai.AsyncOpenAI(base_url=str(client.make_url("/imagine/v1")), api_key=make_token(), max_retries=0)
    yield opened
    await opened.close()


def decoded(result) -> np.ndarray:
    return pixels(base64.b64decode(result.data[0].b64_json))


async def test_an_edit_with_a_mask_repaints_only_the_transparent_part(openai_client) -> None:
    source = gradient()
    result = await openai_client.images.edit(
        image=("photo.png", png(source), "image/png"),
        mask=("mask.png", png(transparent_left_half()), "image/png"),
        prompt="a lighthouse",
        model="sdxl-turbo",
        n=1,
        response_format="b64_json",
    )
    edited = decoded(result)
    assert edited.shape == (64, 64, 3)  # the image's own size when no size is sent
    original = np.asarray(source).astype(int)
    kept = np.abs(edited[:, 40:].astype(int) - original[:, 40:])  # right half, clear of the mask's feathered edge
    repainted = np.abs(edited[:, :24].astype(int) - original[:, :24])
    assert kept.mean() < 3
    assert repainted.mean() > 10


async def test_an_edit_without_a_mask_varies_the_whole_image(openai_client) -> None:
    source = gradient()
    result = await openai_client.images.edit(
        image=("photo.png", png(source), "image/png"), prompt="a lighthouse", model="sdxl-turbo", size="64x64", n=2
    )
    assert len(result.data) == 2
    edited = decoded(result)
    assert edited.shape == (64, 64, 3)
    assert np.abs(edited.astype(int) - np.asarray(source).astype(int)).mean() > 5


async def test_a_url_answer_points_into_the_gallery(openai_client) -> None:
    result = await openai_client.images.edit(
        image=("photo.png", png(gradient()), "image/png"), prompt="a lighthouse", model="sdxl-turbo", response_format="url"
    )
    assert "/imagine/gallery/img_" in result.data[0].url and "signature=" in result.data[0].url


async def test_errors_come_in_openais_shape_naming_the_field(openai_client, client) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.images.edit(image=("anim.gif", png(gradient())[:40], "image/png"), prompt="x", model="sdxl-turbo")
    assert refused.value.body["param"] == "image"

    gif = io.BytesIO()
    gradient().save(gif, format="GIF")
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.images.edit(image=("a.gif", gif.getvalue(), "image/gif"), prompt="x", model="sdxl-turbo")
    assert refused.value.body["param"] == "image"

    # A mask without transparency would repaint nothing, and still cost a generation.
    jpeg = io.BytesIO()
    gradient().save(jpeg, format="JPEG")
    for mask in (("mask.jpg", jpeg.getvalue(), "image/jpeg"), ("mask.png", png(gradient()), "image/png")):
        with pytest.raises(openai.BadRequestError) as refused:
            await openai_client.images.edit(image=("a.png", png(gradient()), "image/png"), mask=mask, prompt="x", model="sdxl-turbo")
        assert refused.value.body["param"] == "mask" and "transparency" in refused.value.body["message"]

    with pytest.raises(openai.NotFoundError) as unknown:
        await openai_client.images.edit(image=("a.png", png(gradient()), "image/png"), prompt="x", model="dall-e-9")
    assert unknown.value.body["code"] == "model_not_found"

    with aiohttp.MultipartWriter("form-data") as form:
        form.append("x").set_content_disposition("form-data", name="prompt")
    no_image = await client.post(ROUTE, data=form, headers={"Authorization": f"Bearer {make_token()}"})
    assert no_image.status == 400
    assert (await no_image.json())["error"]["param"] == "image"

    as_json = await client.post(ROUTE, json={"prompt": "x"}, headers={"Authorization": f"Bearer {make_token()}"})
    assert as_json.status == 400
    assert (await as_json.json())["error"]["type"] == "invalid_request_error"
