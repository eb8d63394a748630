"""The leonardo cloud generator against a fake Leonardo.ai speaking the real protocol."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from imagine.http.app import create_app
from imagine.settings import Settings, SettingsError, load_settings
from imagine_plugins.leonardo import LeonardoSettings
from imagine_plugins.leonardo_catalog import MODELS
from tests.conftest import KEYS, auth, pixels
from tests.fake_leonardo import API_PREFIX, FakeLeonardo, gradient
from tests.processes import redis_server
from tests.slow_plugin import SlowPlugin
from tests.test_deploy import Replica

URL = "/imagine/generate"
KEY = "8c1e1f7a-3b2d-4e59-9a61-0f5d2c7e9721"
PHOENIX_1 = MODELS["phoenix-1-0"].id


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEONARDO_API_KEY", raising=False)


@pytest.fixture
def fake() -> FakeLeonardo:
    return FakeLeonardo(api_key=KEY)


@pytest.fixture
async def leonardo_settings(aiohttp_server: Callable[..., Any], fake: FakeLeonardo, base_settings: Settings) -> Settings:
    server = await aiohttp_server(fake.app())
    return base_settings.replace(
        leonardo={
            "base_url": str(server.make_url(API_PREFIX)),
            "poll_interval_s": 0.01,
            "poll_max_interval_s": 0.03,
            "retry_base_s": 0.01,
            "request_timeout_s": 5.0,
        }
    )


@pytest.fixture
async def leonardo(make_client: Callable[..., Any], leonardo_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    return await make_client(leonardo_settings)




async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_pending_polls_then_complete_gives_a_png_of_the_cdn_jpeg(leonardo, fake) -> None:
    fake.pending_polls = 3
    body = {
        "prompt": "a futuristic city with flying cars",
        "negative_prompt": "blurry",
        "model": "leonardo",
        "leonardo_model": "phoenix-1-0",
        "aspect_ratio": "16:9",
        "preset_style": "CINEMATIC",
        "quality": "high",
        "seed": 1234,
    }
    response = await leonardo.post(URL, json=body, headers=auth())
    assert response.status == 200, await response.text()
    assert response.content_type == "image/png"
    assert response.headers["X-Model"] == "leonardo"
    assert response.headers["X-Seed"] == "1234"
    png = await response.read()
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (1344, 768)
    assert image.text["parameters"] == (
        "a futuristic city with flying cars\nNegative prompt: blurry\n"
        "Steps: 15, Sampler: leonardo, CFG scale: 7, Seed: 1234, Size: 1344x768, Model: leonardo"
    )
    # Exactly the CDN's JPEG, decoded; and close to the picture that JPEG was made from.
    (generation_id,) = fake.generations
    cdn = np.asarray(Image.open(io.BytesIO(fake.jpeg_for(generation_id))).convert("RGB")).astype(int)
    assert np.array_equal(pixels(png).astype(int), cdn)
    assert np.abs(pixels(png).astype(int) - np.asarray(gradient(1344, 768)).astype(int)).mean() < 3

    assert fake.posts == [
        {
            "prompt": "a futuristic city with flying cars",
            "negative_prompt": "blurry",
            "modelId": PHOENIX_1,
            "width": 1344,
            "height": 768,
            "num_images": 1,
            "presetStyle": "CINEMATIC",
            "alchemy": True,
            "seed": 1234,
            "guidance_scale": 7,
            "num_inference_steps": 15,
        }
    ]
    assert fake.generations[generation_id].polls == 4  # three PENDING (no images yet), then COMPLETE
    # The key goes to Leonardo's API only, never to the CDN.
    assert fake.cdn_request_headers and all("Authorization" not in headers for headers in fake.cdn_request_headers)


async def test_seed_003_body_by_alias_with_a_raw_uuid_and_two_images_as_json(leonardo, fake) -> None:
    uuid = MODELS["kino-xl"].id
    body = {
        "prompt": "a lighthouse",
        "model": "leonardo-api",
        "leonardo_model": uuid.upper(),
        "width": 512,
        "height": 512,
        "num_inference_steps": 20,
        "guidance_scale": 9,
        "seed": -1,
        "num_images": 2,
        "response_format": "json",
    }
    response = await leonardo.post(URL, json=body, headers=auth())
    assert response.status == 200, await response.text()
    result = await response.json()
    sent = fake.posts[0]
    assert sent["modelId"] == uuid
    assert (sent["width"], sent["height"], sent["num_images"]) == (512, 512, 2)
    assert (sent["guidance_scale"], sent["num_inference_steps"], sent["alchemy"]) == (9, 20, False)
    assert "presetStyle" not in sent and "negative_prompt" not in sent
    # A random seed is drawn here, sent, and reported: one Leonardo generation, one seed for its images.
    assert 0 <= sent["seed"] <= 4_294_967_295
    assert result["seed"] == sent["seed"]
    assert result["seeds"] == [sent["seed"], sent["seed"]]
    assert result["model"] == "leonardo"
    assert len(result["images"]) == 2
    assert result["parameters"]["width"] == 512
    assert result["vram_used"] == 0.0
    assert result["model_info"]["device"] == "cloud"


async def test_seed_003_dotted_model_names_and_style_spelling_are_accepted(leonardo, fake) -> None:
    seed_003 = {"leonardo_model": "phoenix-1.0", "preset_style": "creative", "aspect_ratio": "1:1"}
    body = {"prompt": "a fox", "model": "leonardo", **seed_003}
    response = await leonardo.post(URL, json=body, headers=auth())
    assert response.status == 200, await response.text()
    assert fake.posts[0]["modelId"] == PHOENIX_1
    assert fake.posts[0]["presetStyle"] == "CREATIVE"
    assert (fake.posts[0]["width"], fake.posts[0]["height"]) == (1024, 1024)


async def test_failed_generation_is_a_502_with_a_suggestion(leonardo, fake) -> None:
    fake.outcome = "FAILED"
    response = await leonardo.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "LEONARDO_API_ERROR"
    assert "FAILED" in error["details"]["api_error"]
    assert error["details"]["suggestion"]


async def test_leonardo_error_bodies_become_leonardo_api_errors(leonardo, fake) -> None:
    fake.post_error = (400, {"error": "Invalid model ID", "path": "$", "code": "validation-failed"})
    response = await leonardo.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 502
    body = await response.json()
    assert body["error"]["code"] == "LEONARDO_API_ERROR"
    assert body["error"]["details"]["api_error"] == "Invalid model ID"
    assert body["error"]["details"]["api_code"] == "validation-failed"
    assert body["error"]["details"]["upstream_status"] == 400
    assert "GET /models" in body["error"]["details"]["suggestion"]
    assert "Invalid model ID" in body["detail"]


async def test_a_rejected_key_is_said_plainly_and_never_echoed(leonardo, fake) -> None:
    fake.api_key = "a-different-key-than-ours-0000"
    response = await leonardo.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 502
    text = await response.text()
    body = json.loads(text)
    assert body["detail"] == "Leonardo API key rejected"
    assert body["error"]["code"] == "LEONARDO_API_ERROR"
    assert body["error"]["details"]["upstream_status"] == 401
    assert "/api-key" in body["error"]["details"]["suggestion"]
    # The fake echoed our key in its error message; it does not reach the client.
    assert KEY not in text
    assert "[redacted]" in body["error"]["details"]["api_error"]
    health = await (await leonardo.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "healthy"  # a cloud problem is reported, not degrading
    assert health["model_status"]["leonardo"]["error"] == "Leonardo API key rejected"


async def test_429_is_retried_with_backoff_then_succeeds(leonardo, fake) -> None:
    fake.rate_limited_posts = 2
    response = await leonardo.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 200, await response.text()
    assert fake.post_attempts == 3
    assert len(fake.posts) == 1


async def test_429_past_the_retries_is_a_503_with_retry_after(make_client, leonardo_settings, fake, monkeypatch) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings.replace(leonardo={"max_retries": 1}))
    fake.rate_limited_posts = 5
    response = await client.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert int(response.headers["Retry-After"]) >= 1
    assert fake.post_attempts == 2


async def test_a_slow_upstream_hits_the_job_deadline_and_its_generation_is_deleted(
    make_client, leonardo_settings, fake, monkeypatch
) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings.replace(queue={"timeout_s": 0.3}))
    fake.hold = asyncio.Event()  # never released: PENDING forever
    response = await client.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "TIMEOUT"
    # Nobody will fetch it: it leaves the account's library too.
    await wait_until(lambda: fake.deleted == list(fake.generations))
    assert len(fake.deleted) == 1


async def test_a_cancelled_job_deletes_its_generation_upstream(make_client, leonardo_settings, fake, monkeypatch) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings)
    fake.hold = asyncio.Event()
    job = await (await client.post("/imagine/jobs", json={"prompt": "a fox", "model": "leonardo"}, headers=auth())).json()
    await wait_until(lambda: any(generation.polls for generation in fake.generations.values()))
    cancelled = await (await client.delete(f"/imagine/jobs/{job['id']}", headers=auth())).json()
    assert cancelled["status"] == "cancelled"
    await wait_until(lambda: fake.deleted == list(fake.generations))
    assert [generation.status for generation in fake.generations.values()] == ["DELETED"]


async def test_a_local_generation_completes_while_a_leonardo_call_is_pending(
    make_client, leonardo_settings, fake, monkeypatch
) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings, plugins=(SlowPlugin(step_seconds=0.01),))
    fake.hold = asyncio.Event()
    cloud = asyncio.create_task(client.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth()))
    await wait_until(lambda: any(generation.polls for generation in fake.generations.values()))
    local = await client.post(URL, json={"prompt": "a hen", "model": "slow", "steps": 3}, headers=auth())
    assert local.status == 200
    assert not cloud.done()  # the GPU queue served the local job around the pending cloud one
    fake.hold.set()
    assert (await cloud).status == 200


async def test_at_most_max_concurrent_generations_in_flight(make_client, leonardo_settings, fake, monkeypatch) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings.replace(leonardo={"max_concurrent": 1}))
    fake.hold = asyncio.Event()
    calls = [
        asyncio.create_task(client.post(URL, json={"prompt": f"fox {index}", "model": "leonardo"}, headers=auth()))
        for index in range(3)
    ]
    await wait_until(lambda: len(fake.posts) == 1)
    await asyncio.sleep(0.1)
    assert len(fake.posts) == 1  # the others wait for the slot
    fake.hold.set()
    assert [response.status for response in await asyncio.gather(*calls)] == [200, 200, 200]
    assert fake.max_in_flight == 1


async def test_leonardo_fields_are_validated_for_leonardo_only(make_client, leonardo_settings, monkeypatch) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings, plugins=(SlowPlugin(step_seconds=0.001),))
    odd = {"leonardo_model": "picasso-2", "aspect_ratio": "5:1", "preset_style": "CUBIST", "quality": "legendary"}
    response = await client.post(URL, json={"prompt": "a fox", "model": "leonardo", **odd}, headers=auth())
    assert response.status == 400
    errors = (await response.json())["error"]["details"]["errors"]
    assert sorted(error["loc"][1] for error in errors) == ["aspect_ratio", "leonardo_model", "preset_style", "quality"]
    fractional = await client.post(URL, json={"prompt": "a fox", "model": "leonardo", "guidance_scale": 7.5}, headers=auth())
    assert fractional.status == 400
    too_few_steps = await client.post(URL, json={"prompt": "a fox", "model": "leonardo", "steps": 4}, headers=auth())
    assert too_few_steps.status == 400
    # Seed 003 clients always send these fields: local models accept and ignore them.
    local = await client.post(URL, json={"prompt": "a fox", "model": "slow", "steps": 2, **odd}, headers=auth())
    assert local.status == 200


async def test_without_a_key_503_says_how_to_set_one(make_client, leonardo_settings, fake) -> None:
    client = await make_client(leonardo_settings)
    response = await client.post(URL, json={"prompt": "a fox", "model": "leonardo"}, headers=auth())
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "/api-key" in body["detail"] and "LEONARDO_API_KEY" in body["detail"]
    assert fake.post_attempts == 0

    models = await (await client.get("/imagine/models", headers=auth())).json()
    assert "leonardo" not in models["local_models"]
    cloud = models["cloud_models"]["leonardo"]
    assert cloud["configured"] is False
    assert cloud["models"]["phoenix-1-0"]["id"] == PHOENIX_1
    assert {"id": "16:9", "name": "Widescreen", "resolution": [1344, 768]} in cloud["aspect_ratios"]
    assert "CINEMATIC" in [style["id"] for style in cloud["preset_styles"]]
    assert [level["id"] for level in cloud["quality_levels"]] == ["standard", "high"]
    assert "leonardo-api" in cloud["aliases"]

    health_response = await client.get("/imagine/health", headers=auth())
    assert health_response.status == 200
    health = await health_response.json()
    assert health["status"] == "healthy"
    assert health["model_status"]["leonardo"]["configured"] is False
    assert "/api-key" in health["model_status"]["leonardo"]["error"]

    status = await (await client.get("/imagine/status", headers=auth())).json()
    assert status["available_generators"]["leonardo"]["type"] == "api"
    assert status["available_generators"]["leonardo"]["configured"] is False
    assert status["models"]["leonardo"] is False
    assert "leonardo" not in status["available_models"]


async def test_configured_shows_in_models_and_status(leonardo) -> None:
    models = await (await leonardo.get("/imagine/models", headers=auth())).json()
    assert models["cloud_models"]["leonardo"]["configured"] is True
    status = await (await leonardo.get("/imagine/status", headers=auth())).json()
    assert status["available_generators"]["leonardo"]["configured"] is True
    assert status["model_loaded"] is False  # a cloud key is not a loaded model


def test_leonardo_settings_are_checked_at_startup(base_settings) -> None:
    environment = {"IMAGINE_LEONARDO_MAX_CONCURRENT": "4", "IMAGINE_LEONARDO_BASE_URL": "http://127.0.0.1:1/v1"}
    assert load_settings(None, environment).section("leonardo", LeonardoSettings).max_concurrent == 4
    with pytest.raises(SettingsError, match="max_concurrent"):
        load_settings(None, {"IMAGINE_LEONARDO_MAX_CONCURRENT": "0"})
    with pytest.raises(SettingsError, match="base_url"):
        load_settings(None, {"IMAGINE_LEONARDO_BASE_URL": "ftp://example.org"})
    with pytest.raises(SettingsError, match="default_model"):
        create_app(base_settings.replace(leonardo={"default_model": "picasso-2"}), keys=KEYS)


async def test_on_a_shared_queue_cloud_generations_run_on_the_replica_that_took_them(
    aiohttp_client: Callable[..., Any], leonardo_settings: Settings, fake: FakeLeonardo, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """An API-tier replica (no device) answers Leonardo requests itself; the job is in Redis all the same."""
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    with redis_server(tmp_path / "redis") as redis:
        settings = leonardo_settings.replace(queue={"storage": redis.url})
        client = await aiohttp_client(create_app(settings, keys=KEYS, role="api"))
        body = {"prompt": "a lighthouse", "model": "leonardo", "seed": 5}
        answer = await client.post(URL, json=body, headers=auth())
        assert answer.status == 200, await answer.text()
        assert answer.headers["X-Model"] == "leonardo"
        job = await (await client.post("/imagine/jobs", json=body, headers=auth())).json()
        async with asyncio.timeout(10):
            while (state := await (await client.get(f"/imagine/jobs/{job['id']}", headers=auth())).json())["status"] in ("queued", "running"):
                await asyncio.sleep(0.02)
        assert state["status"] == "succeeded", state
        assert state["result"]["seed"] == 5 and len(fake.generations) == 2
        await client.close()


async def test_a_cloud_job_whose_replica_is_killed_fails_with_a_reason_instead_of_running_for_ever(
    aiohttp_server: Callable[..., Any],
    aiohttp_client: Callable[..., Any],
    fake: FakeLeonardo,
    base_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    demo_folder: Path,
) -> None:
    """A cloud job runs on the replica that took it, not from the queue: if that replica dies (kill -9), another
    replica fails the job, with a reason, once its visibility timeout has passed."""
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    fake.hold = asyncio.Event()  # the upstream generation never finishes
    upstream = str((await aiohttp_server(fake.app())).make_url(API_PREFIX))
    leonardo = {"base_url": upstream, "poll_interval_s": 0.05, "poll_max_interval_s": 0.1}
    with redis_server(tmp_path / "redis") as redis:
        config = tmp_path / "imagine.toml"
        config.write_text(
            f'[queue]\nstorage = "{redis.url}"\nvisibility_timeout_s = 2\n\n'
            + "[leonardo]\n" + "".join(f"{name} = {json.dumps(value)}\n" for name, value in leonardo.items())
        )
        replica = Replica(tmp_path / "replica", config, demo_folder, command=("serve", "--no-device"), environment={"LEONARDO_API_KEY": KEY})
        try:
            await asyncio.to_thread(replica.wait_ready)
            async with aiohttp.ClientSession() as session:
                body = {"prompt": "a lighthouse", "model": "leonardo", "seed": 5}
                async with session.post(f"http://127.0.0.1:{replica.port}/imagine/jobs", json=body, headers=auth()) as answer:
                    assert answer.status == 202, await answer.text()
                    job_id = (await answer.json())["id"]
            await wait_until(lambda: bool(fake.generations), timeout=30)
            replica.kill()
        finally:
            replica.stop()
        settings = base_settings.replace(queue={"storage": redis.url, "visibility_timeout_s": 2}, leonardo=leonardo)
        other = await aiohttp_client(create_app(settings, keys=KEYS, role="api"))
        async with asyncio.timeout(30):
            # Killed before or after its start reached Redis, the job reads queued or running until it fails.
            while (state := await (await other.get(f"/imagine/jobs/{job_id}", headers=auth())).json())["status"] in ("queued", "running"):
                await asyncio.sleep(0.1)
        assert state["status"] == "failed", state
        error = state["error"]["error"]
        assert error["code"] == "SERVICE_UNAVAILABLE" and "replica running this cloud generation stopped" in error["message"]
        await other.close()


def test_a_key_in_its_model_table_is_refused_with_its_name(base_settings: Settings) -> None:
    # Its settings are [leonardo]; [models.leonardo] holds nothing, so a key there is a mistake, not ignored.
    options = {**base_settings.models.options, "leonardo": {"source": "/srv/x"}}
    with pytest.raises(SettingsError, match="unknown setting models.leonardo.source"):
        create_app(base_settings.replace(models={"options": options}), keys=KEYS)


async def usage_images(client: Any) -> int:
    return (await (await client.get("/imagine/usage", headers=auth())).json())["day"]["images"]


async def test_a_cloud_call_whose_caller_hangs_up_is_refunded_only_if_it_had_been_sent(
    make_client, leonardo_settings, fake, monkeypatch
) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    client = await make_client(leonardo_settings.replace(leonardo={"max_concurrent": 1}, quotas={"images_per_day": 10}))
    fake.hold = asyncio.Event()
    sent = asyncio.create_task(client.post(URL, json={"prompt": "fox 1", "model": "leonardo"}, headers=auth()))
    await wait_until(lambda: len(fake.posts) == 1)
    waiting = asyncio.create_task(client.post(URL, json={"prompt": "fox 2", "model": "leonardo"}, headers=auth()))
    await asyncio.sleep(0.3)
    assert len(fake.posts) == 1  # the second waits for Leonardo's one slot: nothing of it was sent
    assert await usage_images(client) == 2
    waiting.cancel()
    sent.cancel()
    await asyncio.sleep(0.5)  # the refund would have been written by now
    # Leonardo was asked for the first (and charges for it): that one stays charged.
    assert await usage_images(client) == 1


async def test_a_cloud_call_the_service_stops_as_it_shuts_down_is_refunded(
    aiohttp_server, aiohttp_client, leonardo_settings, fake, monkeypatch
) -> None:
    monkeypatch.setenv("LEONARDO_API_KEY", KEY)
    settings = leonardo_settings.replace(quotas={"images_per_day": 10}, server={"shutdown_grace_s": 0.2})
    # The runner cancels handlers still running soon after the grace, as `imagine serve`'s does.
    first = await aiohttp_client(await aiohttp_server(create_app(settings, keys=KEYS), shutdown_timeout=0.5))
    fake.hold = asyncio.Event()
    # A connection of its own: the test client closes its own before its server, which would read as a hang-up.
    async with aiohttp.ClientSession() as caller:
        call = asyncio.create_task(caller.post(first.make_url(URL), json={"prompt": "fox", "model": "leonardo"}, headers=auth()))
        await wait_until(lambda: len(fake.posts) == 1)
        assert await usage_images(first) == 1
        await first.close()
        call.cancel()
    second = await aiohttp_client(create_app(settings, keys=KEYS))
    assert await usage_images(second) == 0  # not the caller's doing, and nothing delivered
