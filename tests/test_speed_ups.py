"""The GPU switches (models.attention, channels_last, tf32, compile) on the CPU: the same image, or a clear refusal."""

from __future__ import annotations

from typing import Any

import pytest

from imagine.settings import Settings, SettingsError
from tests.conftest import assert_same_image, auth, pixels

BODY = {"prompt": "a lighthouse at dusk", "model": "sdxl", "width": 64, "height": 64, "steps": 2, "seed": 3}


async def generate(client: Any) -> bytes:
    response = await client.post("/imagine/generate", json=BODY, headers=auth())
    assert response.status == 200, await response.text()
    return await response.read()


async def test_fused_attention_channels_last_and_a_compiled_unet_make_the_same_image(
    make_client: Any, base_settings: Settings
) -> None:
    plain = await generate(await make_client(base_settings.replace(models={"attention": "eager"})))
    switched_client = await make_client(base_settings.replace(models={"channels_last": True, "compile": "trace"}))
    switched = await generate(switched_client)
    # Another memory layout and another attention kernel: the same arithmetic, in another order.
    assert_same_image(pixels(plain), pixels(switched))
    listing = await (await switched_client.get("/imagine/models", headers=auth())).json()
    applied = listing["local_models"]["sdxl"]["speed_ups"]
    assert applied["channels_last"] is True and applied["compile"] == "trace" and applied["compile_s"] >= 0
    assert applied["attention"] == "sdpa"


async def test_a_standalone_vae_replaces_the_pipelines_own(make_client: Any, base_settings: Settings, demo_folder) -> None:
    own = await generate(await make_client(base_settings))
    options = dict(base_settings.models.options)
    options["sdxl"] = {**options["sdxl"], "vae_source": str(demo_folder / "sdxl" / "vae")}
    replaced = await generate(await make_client(base_settings.replace(models={"options": options})))
    assert (pixels(own) == pixels(replaced)).all()


async def test_a_switch_the_device_cannot_honour_fails_the_load_with_its_name(make_client: Any, base_settings: Settings) -> None:
    # device "auto" chose the CPU here: TF32 is a CUDA feature.
    client = await make_client(base_settings.replace(models={"tf32": True}))
    response = await client.post("/imagine/generate", json=BODY, headers=auth())
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "MODEL_NOT_AVAILABLE" and "models.tf32 needs a CUDA device" in error["message"]


def test_switches_for_cuda_only_are_refused_for_an_explicit_cpu(base_settings: Settings) -> None:
    with pytest.raises(SettingsError, match="need a CUDA device"):
        base_settings.replace(models={"device": "cpu", "compile": "reduce-overhead"})
    with pytest.raises(SettingsError, match="models.compile must be one of"):
        base_settings.replace(models={"compile": "fast"})
