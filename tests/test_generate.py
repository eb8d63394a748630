"""POST /generate on the tiny real pipelines, and the executor behind it."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import aiohttp
import numpy as np
from PIL import Image

from imagine.http.app_keys import executor_key
from tests.conftest import auth, data_url_png, pixels
from tests.slow_plugin import SlowPlugin

URL = "/imagine/generate"


async def test_png_of_the_asked_size_with_parameters_chunk(client) -> None:
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": 96, "height": 64, "seed": 42, "steps": 3}
    response = await client.post(URL, json=body, headers=auth())
    assert response.status == 200, await response.text()
    assert response.content_type == "image/png"
    assert response.headers["X-Seed"] == "42"
    assert response.headers["X-Model"] == "sdxl"
    assert float(response.headers["X-Generation-Time"]) > 0
    assert response.headers["Content-Disposition"].startswith("inline; filename=")
    # Where the time went, stage by stage, for browsers' developer tools and `imagine bench`.
    stages = dict(part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    assert set(stages) == {"validate", "queue", "device", "encode", "store"}
    assert float(stages["device"]) > 0
    image = Image.open(io.BytesIO(await response.read()))
    assert image.format == "PNG"
    assert image.size == (96, 64)
    assert image.text["parameters"] == (
        "a lighthouse at dusk\nNegative prompt: fog\n"
        "Steps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 96x64, Model: sdxl"
    )


async def test_same_seed_same_image_and_different_seeds_differ(client) -> None:
    async def image(seed: int) -> np.ndarray:
        response = await client.post(URL, json={"prompt": "a fox", "seed": seed, "steps": 2}, headers=auth())
        assert response.status == 200
        return pixels(await response.read())

    first, again, other = await image(7), await image(7), await image(8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


async def test_json_result_with_several_images_uses_seed_plus_i(client) -> None:
    body = {"prompt": "a fox", "seed": 100, "num_images": 2, "steps": 2, "response_format": "json"}
    response = await client.post(URL, json=body, headers=auth())
    assert response.status == 200
    result = await response.json()
    assert result["seed"] == 100
    assert result["seeds"] == [100, 101]
    assert len(result["ids"]) == 2  # both kept in the gallery
    assert result["model"] == "sdxl"
    assert result["prompt"] == "a fox"
    assert result["parameters"] == {
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "scheduler": "euler",
        "loras": [],
    }
    assert result["model_info"]["device"] == "cpu"
    assert result["model_info"]["dtype"] == "float32"
    assert result["vram_used"] == 0.0
    assert result["generation_time"] > 0
    first, second = (pixels(data_url_png(image)).astype(int) for image in result["images"])
    alone = await client.post(URL, json={"prompt": "a fox", "seed": 101, "steps": 2}, headers=auth())
    reproduced = pixels(await alone.read()).astype(int)
    # Seed 101 alone gives the second image. (A batch of two goes through other
    # CPU matrix kernels than a batch of one: a level of rounding may differ.)
    assert np.abs(second - reproduced).max() <= 2
    assert np.abs(first - reproduced).mean() > 10


async def test_accept_header_chooses_json(client) -> None:
    response = await client.post(
        URL, json={"prompt": "a fox", "steps": 1}, headers={**auth(), "Accept": "application/json"}
    )
    assert response.status == 200
    assert response.content_type == "application/json"
    png = data_url_png((await response.json())["images"][0])
    assert Image.open(io.BytesIO(png)).size == (64, 64)


async def test_seed_compatible_aliases_and_img_size(client) -> None:
    body = {"prompt": "a fox", "img_size": 128, "steps": 2, "guidance": 3.0, "seed": 5, "response_format": "json"}
    result = await (await client.post(URL, json=body, headers=auth())).json()
    assert result["parameters"]["width"] == result["parameters"]["height"] == 128
    assert result["parameters"]["num_inference_steps"] == 2
    assert result["parameters"]["guidance_scale"] == 3.0


async def test_non_latin1_prompt_is_kept_in_an_itxt_chunk(client) -> None:
    response = await client.post(URL, json={"prompt": "灯台 at dusk", "steps": 1, "seed": 1}, headers=auth())
    image = Image.open(io.BytesIO(await response.read()))
    assert image.text["parameters"].startswith("灯台 at dusk\nSteps: 1")


async def test_defaults_per_model_at_their_real_sizes(make_client, base_settings, demo_folder) -> None:
    from imagine.devtools.demo_models import demo_settings

    # The demo models with their real cards: turbo answers 512x512 in one step by default.
    client = await make_client(demo_settings(base_settings.replace(models={"options": {}}), demo_folder))
    response = await client.post(URL, json={"prompt": "a fox", "model": "sdxl-turbo", "response_format": "json"}, headers=auth())
    result = await response.json()
    assert result["parameters"] == {
        "num_inference_steps": 1,
        "guidance_scale": 0.0,
        "width": 512,
        "height": 512,
        "scheduler": "euler_a",
        "loras": [],
    }
    assert pixels(data_url_png(result["images"][0])).shape == (512, 512, 3)
    models = await (await client.get("/imagine/models", headers=auth())).json()
    sdxl = models["local_models"]["sdxl"]
    assert sdxl["defaults"] == {"steps": 20, "guidance": 7.5, "width": 1024, "height": 1024, "scheduler": "euler"}
    assert sdxl["limits"]["min_size"] == 512
    assert models["local_models"]["sdxl-turbo"]["loaded"] is True
    assert sdxl["loaded"] is False  # loaded lazily, on first use


async def test_client_disconnect_cancels_the_running_job(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    executor = client.app[executor_key]
    request = asyncio.create_task(client.post(URL, json={"prompt": "slow", "model": "slow", "steps": 500}, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    request.cancel()  # the client hangs up
    for _ in range(200):
        if plugin.generator.finished_runs:
            break
        await asyncio.sleep(0.02)
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.steps_run < 500
    assert executor.outcomes["cancelled"] == 1
    # The device moves straight on to the next request.
    follow_up = await client.post(URL, json={"prompt": "quick", "model": "slow", "steps": 2}, headers=auth())
    assert follow_up.status == 200


async def test_disconnect_while_queued_drops_the_job(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    executor = client.app[executor_key]
    running = asyncio.create_task(client.post(URL, json={"prompt": "a", "model": "slow", "steps": 60}, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = asyncio.create_task(client.post(URL, json={"prompt": "b", "model": "slow", "steps": 60}, headers=auth()))
    while executor.depth == 0:
        await asyncio.sleep(0.01)
    queued.cancel()
    while executor.depth == 1:
        await asyncio.sleep(0.01)
    assert (await running).status == 200
    assert plugin.generator.finished_runs == ["completed"]  # the dropped job never ran
    assert executor.outcomes["cancelled"] == 1


async def test_full_queue_answers_503_with_retry_after(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings.replace(queue={"max_size": 1}), plugins=(plugin,))
    body = {"prompt": "slow", "model": "slow", "steps": 40}
    running = asyncio.create_task(client.post(URL, json=body, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = asyncio.create_task(client.post(URL, json=body, headers=auth()))
    while client.app[executor_key].depth == 0:
        await asyncio.sleep(0.01)
    refused = await client.post(URL, json=body, headers=auth())
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "QUEUE_FULL"
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await running).status == 200
    assert (await queued).status == 200


async def test_job_past_its_deadline_gets_504(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings.replace(queue={"timeout_s": 0.3}), plugins=(plugin,))
    await client.app[executor_key].call(lambda: None)  # the device thread started: the deadline is the run's
    response = await client.post(URL, json={"prompt": "slow", "model": "slow", "steps": 500}, headers=auth())
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "TIMEOUT"
    for _ in range(100):
        if plugin.generator.finished_runs:
            break
        await asyncio.sleep(0.02)
    assert plugin.generator.finished_runs == ["interrupted"]


async def test_a_model_that_fails_to_load_is_reported_not_fatal(make_client, base_settings, tmp_path) -> None:
    options = dict(base_settings.models.options)
    options["sdxl"] = {**options["sdxl"], "source": str(tmp_path / "missing")}
    client = await make_client(base_settings.replace(models={"options": options}))
    response = await client.post(URL, json={"prompt": "a fox"}, headers=auth())
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "MODEL_NOT_AVAILABLE"
    assert "traceback" not in json.dumps(body).lower()
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "degraded"
    assert health["model_status"]["sdxl"]["error"]
    info = await (await client.get("/imagine/info?model=sdxl", headers=auth())).json()
    assert info["is_loaded"] is False and info["error"]
    # The other models still work.
    turbo = await client.post(URL, json={"prompt": "a fox", "model": "sdxl-turbo"}, headers=auth())
    assert turbo.status == 200


def test_importing_the_app_does_not_import_torch() -> None:
    code = "import sys, imagine.http.app, imagine.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


async def test_generation_does_not_block_the_event_loop(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    generation = asyncio.create_task(client.post(URL, json={"prompt": "a", "model": "slow", "steps": 50}, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    timeout = aiohttp.ClientTimeout(total=0.5)
    # While the device works, the service keeps answering.
    assert (await client.get("/imagine/livez", timeout=timeout)).status == 200
    assert not generation.done()
    assert (await generation).status == 200
