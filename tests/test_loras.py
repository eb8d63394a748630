"""sd15-lora: LoRAs from the LoRA folder, per request, with weights, never a path."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from imagine_plugins.sd15_lora import DEMO_LORA_DIR
from tests.conftest import assert_same_image, auth, pixels

URL = "/imagine/generate"
MODEL = "sd15-lora"


async def image(client, loras=None, seed: int = 11) -> np.ndarray:
    body = {"prompt": "a fox in the snow", "model": MODEL, "steps": 2, "seed": seed}
    if loras is not None:
        body["loras"] = loras
    response = await client.post(URL, json=body, headers=auth())
    assert response.status == 200, await response.text()
    return pixels(await response.read()).astype(int)


def with_model_options(settings, **options):
    tables = dict(settings.models.options)
    tables[MODEL] = {**tables[MODEL], **options}
    return settings.replace(models={"options": tables})


async def memory_bytes(client) -> int:
    listing = await (await client.get("/imagine/models", headers=auth())).json()
    return listing["local_models"][MODEL]["memory"]["bytes"]


async def test_a_lora_changes_the_image_and_weight_zero_gives_the_base(client) -> None:
    base = await image(client, [])
    without_adapters = await memory_bytes(client)
    pixel_art = await image(client, [{"name": "pixel-art", "weight": 1.0}])
    assert await memory_bytes(client) > without_adapters  # the cached adapter counts against the budget
    watercolor = await image(client, [{"name": "watercolor", "weight": 1.0}])
    assert np.abs(pixel_art - base).mean() > 5
    assert np.abs(watercolor - pixel_art).mean() > 5
    assert np.array_equal(await image(client, [{"name": "pixel-art", "weight": 0.0}]), base)
    # Adapters loaded before stay cached but switched off: a request without LoRAs is the base again.
    assert np.array_equal(await image(client, []), base)


async def test_concurrent_requests_with_different_lora_sets_each_get_their_own(client) -> None:
    sets = [
        [{"name": "pixel-art", "weight": 1.0}],
        [{"name": "watercolor", "weight": 0.8}, {"name": "pixel-art", "weight": -0.5}],
        [],
    ]
    alone = [await image(client, loras) for loras in sets]
    together = await asyncio.gather(*(image(client, loras) for loras in sets * 2))
    # Equal sets may share a batch; different sets never do, and must not mix.
    for index, result in enumerate(together):
        assert_same_image(result, alone[index % len(sets)])
    assert not np.array_equal(alone[0], alone[2]) and not np.array_equal(alone[1], alone[2])


@pytest.mark.parametrize(
    "name", ["../pixel-art", "loras/pixel-art", "/etc/passwd", "..", ".hidden", "pixel-art/../watercolor", "C:\\loras\\x"]
)
async def test_path_like_lora_names_are_refused(client, name) -> None:
    response = await client.post(URL, json={"prompt": "x", "model": MODEL, "loras": [{"name": name}]}, headers=auth())
    assert response.status == 400
    [error] = (await response.json())["error"]["details"]["errors"]
    assert error["loc"] == ["body", "loras", 0, "name"]
    assert "path" in error["msg"]


async def test_only_files_of_the_lora_folder_can_be_named(make_client, base_settings, demo_folder, tmp_path) -> None:
    loras = tmp_path / "loras"
    shutil.copytree(demo_folder / DEMO_LORA_DIR, loras)
    # A valid LoRA right beside the folder is still out of reach.
    shutil.copy(loras / "pixel-art.safetensors", tmp_path / "outside.safetensors")
    client = await make_client(base_settings.replace(models={"lora_dir": str(loras)}))

    refusals = {
        "../outside": "is a path",
        "outside": "unknown LoRA 'outside'; available: pixel-art, watercolor",
        "pixel-art.safetensors": "available: pixel-art, watercolor",
    }
    for name, reason in refusals.items():
        response = await client.post(URL, json={"prompt": "x", "model": MODEL, "loras": [{"name": name}]}, headers=auth())
        assert response.status == 400, name
        assert reason in (await response.json())["detail"]

    listing = await (await client.get("/imagine/models", headers=auth())).json()
    assert listing["local_models"][MODEL]["loras"] == ["pixel-art", "watercolor"]
    # A file dropped into the folder is offered at once.
    shutil.copy(loras / "watercolor.safetensors", loras / "ink.safetensors")
    listing = await (await client.get("/imagine/models", headers=auth())).json()
    assert listing["local_models"][MODEL]["loras"] == ["ink", "pixel-art", "watercolor"]

    twice = [{"name": "ink"}, {"name": "ink", "weight": 0.5}]
    response = await client.post(URL, json={"prompt": "x", "model": MODEL, "loras": twice}, headers=auth())
    assert response.status == 400
    assert "twice" in (await response.json())["detail"]


async def test_a_replaced_lora_file_is_loaded_again(make_client, base_settings, demo_folder, tmp_path) -> None:
    loras = tmp_path / "loras"
    shutil.copytree(demo_folder / DEMO_LORA_DIR, loras)
    client = await make_client(base_settings.replace(models={"lora_dir": str(loras)}))
    watercolor = await image(client, [{"name": "watercolor", "weight": 1.0}])
    before = await image(client, [{"name": "pixel-art", "weight": 1.0}])

    shutil.copy(loras / "watercolor.safetensors", loras / "pixel-art.safetensors")
    after = await image(client, [{"name": "pixel-art", "weight": 1.0}])
    assert np.abs(after - before).mean() > 5
    assert np.array_equal(after, watercolor)


async def test_the_default_lora_set_applies_when_a_request_names_none(make_client, base_settings) -> None:
    client = await make_client(with_model_options(base_settings, default_loras={"pixel-art": 0.7}, max_cached_loras=1))
    response = await client.post(
        URL, json={"prompt": "a fox in the snow", "model": MODEL, "steps": 2, "seed": 11, "response_format": "json"}, headers=auth()
    )
    result = await response.json()
    assert result["parameters"]["loras"] == [{"name": "pixel-art", "weight": 0.7}]
    assert result["model_info"]["lora_applied"] is True
    defaulted = await image(client)
    assert np.array_equal(defaulted, await image(client, [{"name": "pixel-art", "weight": 0.7}]))
    # An explicit empty list opts out; with a cache of one adapter, switching back and forth stays right.
    base = await image(client, [])
    assert np.abs(defaulted - base).mean() > 5
    assert np.array_equal(await image(client, [{"name": "watercolor", "weight": 0.0}]), base)
    assert np.array_equal(await image(client), defaulted)

    listing = await (await client.get("/imagine/models", headers=auth())).json()
    assert listing["local_models"][MODEL]["default_loras"] == [{"name": "pixel-art", "weight": 0.7}]


async def test_a_missing_default_lora_makes_the_model_unavailable_with_the_reason(make_client, base_settings) -> None:
    client = await make_client(with_model_options(base_settings, default_loras={"gone": 1.0}))
    response = await client.post(URL, json={"prompt": "x", "model": MODEL, "steps": 1}, headers=auth())
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "MODEL_NOT_AVAILABLE"
    assert "gone" in body["error"]["details"]["reason"]
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "degraded"


async def test_a_file_that_is_no_sd15_lora_is_refused_and_leaves_no_trace(make_client, base_settings, demo_folder, tmp_path) -> None:
    loras = tmp_path / "loras"
    shutil.copytree(demo_folder / DEMO_LORA_DIR, loras)
    shutil.copy(demo_folder / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors", loras / "not-a-lora.safetensors")
    client = await make_client(base_settings.replace(models={"lora_dir": str(loras)}))
    base = await image(client, [])

    response = await client.post(URL, json={"prompt": "x", "model": MODEL, "loras": [{"name": "not-a-lora"}]}, headers=auth())
    assert response.status == 400
    assert "Stable Diffusion 1.5 LoRA" in (await response.json())["detail"]
    assert np.array_equal(await image(client, []), base)
    assert np.abs(await image(client, [{"name": "pixel-art", "weight": 1.0}]) - base).mean() > 5
