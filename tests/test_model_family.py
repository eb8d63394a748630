"""The four local models through /generate: defaults, limits, Lightning's checkpoints, shared components."""

from __future__ import annotations

import numpy as np
import pytest

from imagine.http.app_keys import registry_key
from imagine.plugin.generators import GenerationRequest
from tests.conftest import auth, data_url_png, pixels

URL = "/imagine/generate"
LOCAL_MODELS = ("sdxl", "sdxl-lightning", "sdxl-turbo", "sd15-lora")
SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
# Small limits so that each model's extremes take a fraction of a second (the real ones reach 1024px, 100 steps).
SMALL_LIMITS = {"max_size": 128, "max_steps": 6}


@pytest.fixture
def small_limits(base_settings):
    options = {name: {**table, **SMALL_LIMITS} for name, table in base_settings.models.options.items()}
    options["sdxl-turbo"].pop("max_steps")  # its real limit, 4, is small already
    return base_settings.replace(models={"options": options})


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


async def generate(client, **body) -> tuple[int, dict]:
    response = await client.post(URL, json={"prompt": "a lighthouse at dusk", "response_format": "json", **body}, headers=auth())
    return response.status, await response.json()


@pytest.mark.parametrize("model", LOCAL_MODELS)
async def test_every_model_generates_at_its_defaults(make_client, base_settings, model) -> None:
    client = await make_client(base_settings)
    card = (await (await client.get("/imagine/models", headers=auth())).json())["local_models"][model]
    status, result = await generate(client, model=model, seed=3)
    assert status == 200, result
    defaults = card["defaults"]
    assert result["parameters"] == {
        "num_inference_steps": defaults["steps"],
        "guidance_scale": defaults["guidance"],
        "width": defaults["width"],
        "height": defaults["height"],
        "scheduler": defaults["scheduler"],
        "loras": [],
    }
    image = pixels(data_url_png(result["images"][0]))
    assert image.shape == (defaults["height"], defaults["width"], 3)
    assert image.std() > 5  # a picture, not a blank


@pytest.mark.parametrize("model", LOCAL_MODELS)
async def test_every_model_generates_at_its_limits_and_refuses_beyond(make_client, small_limits, model) -> None:
    client = await make_client(small_limits)
    limits = (await (await client.get("/imagine/models", headers=auth())).json())["local_models"][model]["limits"]
    steps = limits["step_choices"] or [1, limits["max_steps"]]
    for size, step_count in ((limits["min_size"], min(steps)), (limits["max_size"], max(steps))):
        status, result = await generate(client, model=model, width=size, height=size, steps=step_count)
        assert status == 200, result
        assert pixels(data_url_png(result["images"][0])).shape == (size, size, 3)
    for beyond in ({"width": limits["max_size"] + 8}, {"height": limits["min_size"] - 8}, {"steps": max(steps) + 1}):
        status, result = await generate(client, model=model, **beyond)
        assert status == 400, (beyond, result)
        assert result["error"]["code"] == "VALIDATION_ERROR"


async def test_lightning_serves_only_the_step_counts_it_has_checkpoints_for(make_client, base_settings) -> None:
    options = dict(base_settings.models.options)
    lightning = dict(options["sdxl-lightning"])
    lightning["checkpoints"] = {steps: lightning["checkpoints"][steps] for steps in ("2", "8")}
    options["sdxl-lightning"] = lightning
    client = await make_client(base_settings.replace(models={"options": options}))

    card = (await (await client.get("/imagine/models", headers=auth())).json())["local_models"]["sdxl-lightning"]
    assert card["limits"]["step_choices"] == [2, 8]
    assert card["defaults"]["steps"] == 8  # 4 is not configured: the most steps there are
    for steps in (4, 3):
        status, result = await generate(client, model="sdxl-lightning", steps=steps)
        assert status == 400
        [error] = result["error"]["details"]["errors"]
        assert error["loc"] == ["body", "num_inference_steps"]
        assert "2, 8" in error["msg"]


def lightning_request(steps: int) -> GenerationRequest:
    return GenerationRequest(
        prompt="a lighthouse", negative_prompt="", model="sdxl-lightning", width=64, height=64, steps=steps,
        guidance=0.0, num_images=1, seed=5, scheduler="euler",
    )


async def test_lightning_runs_each_step_count_on_its_configured_checkpoint(make_client, base_settings) -> None:
    async def image(client, model: str, steps: int) -> np.ndarray:
        status, result = await generate(client, model=model, steps=steps, guidance=0.0, scheduler="euler", seed=5)
        assert status == 200, result
        return pixels(data_url_png(result["images"][0])).astype(int)

    client = await make_client(base_settings)
    four = await image(client, "sdxl-lightning", 4)
    two = await image(client, "sdxl-lightning", 2)
    lightning = client.app[registry_key].resolve("sdxl-lightning")
    assert lightning.switch_cost_s(lightning_request(2)) == 0  # the checkpoint it holds
    assert np.array_equal(await image(client, "sdxl-lightning", 4), four)  # swapped back exactly
    # What swapping the 2-step checkpoint in again would cost is known now, and the queue weighs it.
    assert lightning.switch_cost_s(lightning_request(2)) > 0
    assert lightning.switch_cost_s(lightning_request(4)) == 0
    assert np.abs(four - await image(client, "sdxl", 4)).mean() > 5  # Lightning's UNet, not the base's

    # Point the 2-step entry at another file: the 2-step image changes, the 4-step one does not.
    options = dict(base_settings.models.options)
    checkpoints = dict(options["sdxl-lightning"]["checkpoints"])
    checkpoints["2"] = checkpoints["8"]
    options["sdxl-lightning"] = {**options["sdxl-lightning"], "checkpoints": checkpoints}
    rewired = await make_client(base_settings.replace(models={"options": options}))
    assert np.abs(await image(rewired, "sdxl-lightning", 2) - two).mean() > 5
    assert np.array_equal(await image(rewired, "sdxl-lightning", 4), four)


async def test_sdxl_and_lightning_hold_one_copy_of_the_shared_components(client) -> None:
    admin = auth(scope="admin")
    for model in ("sdxl", "sdxl-lightning"):
        assert (await client.post(f"/imagine/models/{model}/load", headers=admin)).status == 200
    registry = client.app[registry_key]
    sdxl, lightning = registry.resolve("sdxl").pipe, registry.resolve("sdxl-lightning").pipe
    for name in SHARED:
        assert getattr(sdxl, name) is getattr(lightning, name), name
    assert sdxl.unet is not lightning.unet

    listing = await (await client.get("/imagine/models", headers=auth())).json()
    memory = {name: listing["local_models"][name]["memory"] for name in ("sdxl", "sdxl-lightning")}
    shared_bytes = sum(tensor_bytes(getattr(sdxl, name)) for name in ("text_encoder", "text_encoder_2", "vae"))
    unet_bytes = tensor_bytes(lightning.unet)
    assert memory["sdxl"] == {"bytes": unet_bytes + shared_bytes, "shared_bytes": 0, "shared_with": ["sdxl-lightning"]}
    assert memory["sdxl-lightning"] == {"bytes": unet_bytes, "shared_bytes": shared_bytes, "shared_with": ["sdxl"]}
    # The total counts the shared components once.
    assert listing["memory"]["total_bytes"] == 2 * unet_bytes + shared_bytes
    assert listing["memory"]["device"] == "cpu"

    # Unloading sdxl leaves Lightning whole: the shared components now count for it.
    assert (await client.post("/imagine/models/sdxl/unload", headers=admin)).status == 200
    listing = await (await client.get("/imagine/models", headers=auth())).json()
    assert listing["local_models"]["sdxl-lightning"]["memory"]["bytes"] == unet_bytes + shared_bytes
    assert listing["memory"]["total_bytes"] == unet_bytes + shared_bytes
    status, _ = await generate(client, model="sdxl-lightning", steps=1)
    assert status == 200


async def test_a_broken_lightning_checkpoint_fails_its_step_count_only(make_client, base_settings, tmp_path) -> None:
    broken = tmp_path / "broken_2step_unet.safetensors"
    broken.write_bytes(b"not a safetensors file")
    options = dict(base_settings.models.options)
    checkpoints = {**options["sdxl-lightning"]["checkpoints"], "2": str(broken), "8": str(tmp_path / "missing.safetensors")}
    options["sdxl-lightning"] = {**options["sdxl-lightning"], "checkpoints": checkpoints}
    client = await make_client(base_settings.replace(models={"options": options}))

    for steps in (2, 8):
        status, result = await generate(client, model="sdxl-lightning", steps=steps)
        assert status == 503
        assert result["error"]["code"] == "MODEL_NOT_AVAILABLE"
        assert f"{steps}-step checkpoint" in result["error"]["details"]["reason"]
    # The UNet is filled with the 4-step weights again, and the model stays healthy.
    status, _ = await generate(client, model="sdxl-lightning", steps=4)
    assert status == 200
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "healthy"
