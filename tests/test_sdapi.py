"""The AUTOMATIC1111-compatible routes, driven by the published A1111 client (`webuiapi`) over a real port."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import webuiapi
from PIL import Image

from imagine.http.app import create_app
from tests.conftest import KEYS, assert_same_image, auth, data_url_png, make_token, pixels
from tests.processes import RedisServer, redis_server

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
async def service(aiohttp_server, base_settings):
    """The app on a loopback port; its base URL."""
    server = await aiohttp_server(create_app(base_settings.replace(jobs={"preview_every": 1}), keys=KEYS))
    return f"http://{server.host}:{server.port}"


async def a1111(service: str, token: str | None = None, *, basic: bool = True) -> webuiapi.WebUIApi:
    """The client as its users set it up: Basic credentials (A1111's --api-auth), or a bearer header.

    Made on a thread: the client asks the service for its scripts as it starts.
    """
    token = token or make_token()
    if basic:
        return await call(webuiapi.WebUIApi, baseurl=f"{service}/imagine/sdapi/v1", username="anyone", password=token)
    api = await call(webuiapi.WebUIApi, baseurl=f"{service}/imagine/sdapi/v1")
    api.session.headers["Authorization"] = f"Bearer {token}"
    return api


async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """The client is synchronous: on a thread, so the service's loop keeps running."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def native(service: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, f"{service}/imagine{path}", **kwargs) as response:
        return response.status, await response.json()


def png_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


async def test_txt2img_with_basic_and_bearer_auth(service) -> None:
    api = await a1111(service)
    await call(api.util_set_model, "sd15-lora")
    assert await call(api.util_get_current_model) == "sd15-lora"
    result = await call(api.txt2img, prompt="a lighthouse", seed=42, sampler_name="Euler a", batch_size=2, **SMALL)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [42, 43] and result.info["sd_model_name"] == "sd15-lora"
    # The PNG records A1111's sampler name, as A1111's own "PNG info" reads it.
    assert "Sampler: Euler a" in result.images[0].info["parameters"]
    assert result.info["infotexts"][0] == result.images[0].info["parameters"]
    assert result.parameters["prompt"] == "a lighthouse"
    # The images are in the caller's gallery too.
    status, gallery = await native(service, "GET", "/gallery", headers=auth())
    assert status == 200 and {image["id"] for image in gallery["images"]} == set(result.info["image_ids"])

    bearer = await a1111(service, basic=False)
    again = await call(bearer.txt2img, prompt="a lighthouse", seed=42, sampler_name="Euler a", **SMALL)
    # Another caller's choice of model is not this one's: options are per subject.
    assert again.info["sd_model_name"] == "sd15-lora"
    assert_same_image(png_pixels(again.image), png_pixels(result.images[0]))
    other = await a1111(service, make_token("bob"))
    assert (await call(other.get_options))["sd_model_checkpoint"] == "sdxl"

    wrong = await call(webuiapi.WebUIApi, baseurl=f"{service}/imagine/sdapi/v1", username="anyone", password="not-a-token")
    with pytest.raises(RuntimeError) as refused:
        await call(wrong.txt2img, prompt="a lighthouse", **SMALL)
    status, text = refused.value.args
    assert status == 401
    assert set(json.loads(text)) == {"error", "detail", "body", "errors"}
    assert json.loads(text)["error"] == "AUTHENTICATION_ERROR"
    # Basic credentials are for the A1111 routes only.
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{make_token()}".encode()).decode()}
    assert (await native(service, "GET", "/models", headers=basic))[0] == 401
    assert (await native(service, "GET", "/sdapi/v1/sd-models", headers=basic))[0] == 200


async def test_img2img_with_a_mask_keeps_what_the_mask_keeps(service) -> None:
    api = await a1111(service)
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    result = await call(
        api.img2img,
        images=[source],
        mask_image=mask,
        mask_blur=0,
        denoising_strength=0.8,
        prompt="a red door",
        seed=3,
        override_settings={"sd_model_checkpoint": "sd15-lora"},
        **SMALL,
    )
    made = png_pixels(result.image)
    kept = np.asarray(source)
    assert np.array_equal(made[:, 40:], kept[:, 40:])
    assert np.abs(made[:, :24].astype(int) - kept[:, :24]).mean() > 10
    assert result.info["is_using_inpainting_conditioning"] and result.info["denoising_strength"] == 0.8
    assert "Denoising strength: 0.8" in result.image.info["parameters"]
    assert result.parameters["init_images"] is None  # not echoed back unless asked


async def test_models_samplers_schedulers_and_loras(service) -> None:
    api = await a1111(service)
    assert {"sdxl", "sd15-lora", "sdxl-turbo"} <= set(await call(api.util_get_model_names))
    await call(api.util_set_model, "sdxl-turbo")
    assert await call(api.util_get_sampler_names) == ["Euler", "Euler a"]
    assert await call(api.util_get_scheduler_names) == ["automatic"]
    await call(api.util_set_model, "sd15-lora")
    samplers = await call(api.util_get_sampler_names)
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DDIM", "UniPC", "LMS"} <= set(samplers)
    assert await call(api.util_get_scheduler_names) == ["automatic", "karras"]
    assert [lora["name"] for lora in await call(api.get_loras)] == ["pixel-art", "watercolor"]
    assert await call(api.get_upscalers) == [] and await call(api.get_embeddings) == {"loaded": {}, "skipped": {}}
    assert await call(api.get_cmd_flags) == {}

    # Each A1111 name runs its own scheduler: the new style (sampler + schedule type) equals the old name.
    karras = await call(api.txt2img, prompt="a fox", seed=5, sampler_name="DPM++ 2M Karras", **SMALL)
    split = await call(api.txt2img, prompt="a fox", seed=5, sampler_name="DPM++ 2M", scheduler="Karras", **SMALL)
    plain = await call(api.txt2img, prompt="a fox", seed=5, sampler_name="DPM++ 2M", **SMALL)
    assert_same_image(png_pixels(karras.image), png_pixels(split.image))
    assert not np.array_equal(png_pixels(karras.image), png_pixels(plain.image))
    assert "Sampler: DPM++ 2M Karras" in karras.image.info["parameters"]
    sde = [await call(api.txt2img, prompt="a fox", seed=5, sampler_name="DPM++ SDE", **SMALL) for _ in range(2)]
    assert_same_image(png_pixels(sde[0].image), png_pixels(sde[1].image))  # its noise comes from the seed


async def test_weighted_prompts_and_lora_tags(service) -> None:
    api = await a1111(service)
    for model in ("sdxl", "sd15-lora"):
        await call(api.util_set_model, model)
        plain = await call(api.txt2img, prompt="a cat on a red sofa", seed=7, **SMALL)
        weighted = await call(api.txt2img, prompt="a (cat:3) on a [red] sofa", seed=7, **SMALL)
        repeat = await call(api.txt2img, prompt="a (cat:3) on a [red] sofa", seed=7, **SMALL)
        assert_same_image(png_pixels(weighted.image), png_pixels(repeat.image))
        assert np.abs(png_pixels(weighted.image).astype(int) - png_pixels(plain.image)).mean() > 1, model
        # Plain text is exactly what /generate made before any of this (webuiapi's defaults: Euler a, CFG 7).
        status, generated = await native(
            service, "POST", "/generate", headers=auth(),
            json={"prompt": "a cat on a red sofa", "seed": 7, "model": model, "width": 64, "height": 64, "steps": 2,
                  "guidance_scale": 7.0, "scheduler": "euler_a", "response_format": "json"},
        )  # fmt: skip
        assert status == 200
        assert np.array_equal(pixels(data_url_png(generated["images"][0])), png_pixels(plain.image))

    tagged = await call(api.txt2img, prompt="a cat <lora:pixel-art:0.8>", seed=9, **SMALL)
    status, fielded = await native(
        service, "POST", "/generate", headers=auth(),
        json={"prompt": "a cat", "seed": 9, "model": "sd15-lora", "width": 64, "height": 64, "steps": 2,
              "guidance_scale": 7.0, "scheduler": "euler_a", "loras": [{"name": "pixel-art", "weight": 0.8}],
              "response_format": "json"},
    )  # fmt: skip
    untagged = await call(api.txt2img, prompt="a cat", seed=9, **SMALL)
    assert_same_image(png_pixels(tagged.image), pixels(data_url_png(fielded["images"][0])))
    assert np.abs(png_pixels(tagged.image).astype(int) - png_pixels(untagged.image)).mean() > 1
    assert "Lora: pixel-art:0.8" in tagged.image.info["parameters"]
    # The same syntax on /generate; the names are checked as the loras field's are.
    status, error = await native(
        service, "POST", "/generate", headers=auth(), json={"prompt": "a cat <lora:../secret:1>", "model": "sd15-lora"}
    )
    assert status == 400 and "is a path" in error["detail"]


async def test_fields_that_would_change_the_image_are_refused_by_name(service) -> None:
    api = await a1111(service)
    for fields, named in (
        ({"enable_hr": True}, "enable_hr"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"refiner_checkpoint": "sdxl-refiner"}, "refiner_checkpoint"),
    ):
        with pytest.raises(RuntimeError) as refused:
            await call(api.txt2img, prompt="a fox", **SMALL, **({} if "refiner_checkpoint" in fields else fields))
            if "refiner_checkpoint" in fields:
                raise RuntimeError(*(await native(service, "POST", "/sdapi/v1/txt2img", headers=auth(),
                                                  json={"prompt": "a fox", **fields})))  # fmt: skip
        status, text = refused.value.args
        body = text if isinstance(text, dict) else json.loads(text)
        assert status == 400, fields
        assert body["error"] == "VALIDATION_ERROR" and [entry["loc"] for entry in body["errors"]] == [["body", named]]
        assert named in body["detail"]
    status, body = await native(
        service, "POST", "/sdapi/v1/txt2img", headers=auth(),
        json={"prompt": "a fox", "sampler_name": "DPM++ 2M", "override_settings": {"sd_model_checkpoint": "sdxl-turbo"}},
    )  # fmt: skip
    assert status == 400 and body["errors"][0]["loc"] == ["body", "sampler_name"] and "Euler a" in body["detail"]
    status, body = await native(service, "POST", "/sdapi/v1/txt2img", headers=auth(), json={"prompt": "a fox", "cfg_scale": 30})
    assert status == 400 and body["errors"][0]["loc"] == ["body", "cfg_scale"]
    # A refusal shows the start of what it refused, not all of it: a hostile body is not sent back, twice.
    for path, huge in (
        ("/sdapi/v1/txt2img", {"prompt": "a fox", "styles": ["x" * 100_000]}),
        ("/sdapi/v1/txt2img", {"prompt": "a fox", "sampler_name": "y" * 100_000}),
        ("/sdapi/v1/options", {"sd_vae": "v" * 100_000}),
    ):
        status, body = await native(service, "POST", path, headers=auth(), json=huge)
        assert status == 400 and len(json.dumps(body)) < 2000, (path, len(json.dumps(body)))
    status, body = await native(
        service, "POST", "/sdapi/v1/txt2img", headers=auth(), json={"prompt": "a fox", "override_settings": {"sd_model_checkpoint": 7}}
    )
    assert status == 400 and body["errors"][0]["loc"] == ["body", "override_settings", "sd_model_checkpoint"]
    status, body = await native(service, "POST", "/sdapi/v1/options", headers=auth(), json={"sd_model_checkpoint": 7})
    assert status == 400 and body["errors"][0]["loc"] == ["body", "sd_model_checkpoint"]
    status, body = await native(service, "POST", "/sdapi/v1/options", headers=auth(), json={"sd_model_checkpoint": "nope"})
    assert status == 404 and body["error"] == "MODEL_NOT_AVAILABLE"


async def interrupted_once_a_preview_came(api: webuiapi.WebUIApi, bystander: webuiapi.WebUIApi) -> tuple[list[dict[str, Any]], Any]:
    """A long txt2img, polled as a client's progress bar does and interrupted once a preview has come:
    the progress seen with steps, and the call's result. The bystander, another caller, sees none of it."""
    seen: list[dict[str, Any]] = []
    interrupted = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not interrupted.is_set():
            progress = api.get_progress()
            if progress["state"]["sampling_step"] > 0:
                seen.append(progress)
                assert bystander.get_progress()["state"]["sampling_steps"] == 0  # not bob's job
                bystander.interrupt()  # bob cannot stop it
                if progress["current_image"]:
                    api.interrupt()
                    interrupted.set()
            time.sleep(0.005)

    watcher = asyncio.create_task(asyncio.to_thread(watch))
    result = await call(api.txt2img, prompt="a long one", width=128, height=128, steps=100)
    await watcher
    assert interrupted.is_set() and seen
    preview = Image.open(io.BytesIO(base64.b64decode(seen[-1]["current_image"])))
    assert preview.size == (16, 16)  # the latents' size, 1/8 of the image
    assert 0 < seen[-1]["progress"] < 1 and seen[-1]["state"]["sampling_steps"] == 100
    assert result.images == [] and result.info["interrupted"] is True
    return seen, result


async def test_progress_and_interrupt_of_the_callers_own_job(service) -> None:
    api = await a1111(service)
    await call(api.util_set_model, "sd15-lora")
    bystander = await a1111(service, make_token("bob"))
    assert (await call(api.get_progress))["state"]["sampling_steps"] == 0
    await interrupted_once_a_preview_came(api, bystander)
    assert (await call(api.get_progress))["state"]["job_count"] == 0
    # The next generation runs as usual.
    assert (await call(api.txt2img, prompt="a short one", **SMALL)).image.size == (64, 64)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def test_a_model_chosen_on_one_replica_holds_on_the_other(aiohttp_server, base_settings, redis) -> None:
    settings = base_settings.replace(queue={"storage": redis.url})
    # A replica with a device and an API tier, as nginx would alternate a client's requests between them.
    first, second = [await aiohttp_server(create_app(settings, keys=KEYS, role=role)) for role in ("serve", "api")]
    one, other = [await a1111(f"http://{server.host}:{server.port}") for server in (first, second)]
    await call(one.util_set_model, "sdxl-turbo")
    assert await call(other.util_get_current_model) == "sdxl-turbo"
    made = await call(other.txt2img, prompt="a fox", seed=5, **SMALL)
    assert "Model: sdxl-turbo" in made.image.info["parameters"]
    # Another caller of the same replicas still has the default model.
    stranger = await a1111(f"http://{second.host}:{second.port}", make_token("stranger"))
    assert await call(stranger.util_get_current_model) == "sdxl"


async def test_progress_and_interrupt_reach_a_caller_whose_job_runs_on_another_replica(aiohttp_server, base_settings, redis) -> None:
    settings = base_settings.replace(queue={"storage": redis.url}, jobs={"preview_every": 1})
    # The caller's replica has no device: the other one runs the job and writes its steps to the shared queue.
    device, api_tier = [await aiohttp_server(create_app(settings, keys=KEYS, role=role)) for role in ("serve", "api")]
    api = await a1111(f"http://{api_tier.host}:{api_tier.port}", make_token("carol"))
    await call(api.util_set_model, "sd15-lora")
    bystander = await a1111(f"http://{api_tier.host}:{api_tier.port}", make_token("bob"))
    seen, _ = await interrupted_once_a_preview_came(api, bystander)
    assert [progress["state"]["sampling_step"] for progress in seen] == sorted(progress["state"]["sampling_step"] for progress in seen)
    assert (await call(api.get_progress))["state"]["job_count"] == 0
    # The interrupt stopped the job on the device: the next one runs at once.
    assert (await call(api.txt2img, prompt="a short one", **SMALL)).image.size == (64, 64)
