"""Loading and unloading over the API, preloading, the memory budget, and models that fail to load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imagine.http.app_keys import executor_key
from tests.conftest import auth
from tests.slow_plugin import SlowPlugin

ADMIN = auth(sub="operator", scope="admin")
URL = "/imagine/generate"


async def loaded(client) -> dict[str, bool]:
    listing = await (await client.get("/imagine/models", headers=auth())).json()
    return {name: entry["loaded"] for name, entry in listing["local_models"].items()}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/imagine/models/sdxl-turbo/load", None),
        ("post", "/imagine/models/sdxl-turbo/unload", None),
        ("post", "/imagine/load_model", {"model": "sdxl-turbo"}),
    ],
)
async def test_loading_and_unloading_need_the_admin_scope(client, method, path, body) -> None:
    refused = await client.request(method, path, json=body, headers=auth(scope="generate"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "FORBIDDEN"
    assert (await client.request(method, path, json=body)).status == 401
    assert (await client.request(method, path, json=body, headers=ADMIN)).status == 200


async def test_load_and_unload_report_what_they_did(client) -> None:
    first = await client.post("/imagine/load_model", json={"model": "sdxl-turbo"}, headers=ADMIN)
    assert first.status == 200
    body = await first.json()
    assert body["message"] == "Model loaded successfully"
    assert body["model"] == "sdxl-turbo"
    assert body["loaded"] is True
    assert body["load_time"] > 0
    assert body["vram_used"] == 0.0  # no GPU here
    assert body["memory"]["bytes"] > 0 and body["device"] == "cpu"

    again = await (await client.post("/imagine/models/sdxl-turbo/load", headers=ADMIN)).json()
    assert again["message"] == "Model already loaded" and again["load_time"] == 0.0

    unloaded = await (await client.post("/imagine/models/sdxl-turbo/unload", headers=ADMIN)).json()
    assert unloaded["message"] == "Model unloaded" and unloaded["loaded"] is False
    assert unloaded["memory"]["bytes"] == 0
    assert (await loaded(client))["sdxl-turbo"] is False
    # Lazily loaded again by the next request that needs it.
    assert (await client.post(URL, json={"prompt": "a fox", "model": "sdxl-turbo"}, headers=auth())).status == 200
    assert (await loaded(client))["sdxl-turbo"] is True


async def test_unknown_models_and_bad_bodies_are_refused(client) -> None:
    unknown = await client.post("/imagine/models/dall-e/load", headers=ADMIN)
    assert unknown.status == 404
    assert (await unknown.json())["error"]["code"] == "MODEL_NOT_AVAILABLE"
    for body in ({}, {"model": 3}, {"model": "sdxl", "extra": 1}):
        response = await client.post("/imagine/load_model", json=body, headers=ADMIN)
        assert response.status == 400, body
    # Aliases resolve, as for generation.
    alias = await client.post("/imagine/load_model", json={"model": "stable-diffusion-1.5"}, headers=ADMIN)
    assert (await alias.json())["model"] == "sd15-lora"


async def test_a_cloud_backend_has_nothing_to_load(client) -> None:
    for path, body, loc in (
        ("/imagine/models/leonardo/load", None, ["path", "name"]),
        ("/imagine/models/leonardo/unload", None, ["path", "name"]),
        ("/imagine/load_model", {"model": "leonardo-api"}, ["body", "model"]),
    ):
        response = await client.post(path, json=body, headers=ADMIN)
        assert response.status == 400, path
        [error] = (await response.json())["error"]["details"]["errors"]
        assert error["loc"] == loc and "cloud" in error["msg"]
    status = await (await client.get("/imagine/status", headers=ADMIN)).json()
    assert status["current_model"] is None


async def test_an_unload_waits_for_the_running_job(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    generation = asyncio.create_task(client.post(URL, json={"prompt": "a", "model": "slow", "steps": 25}, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    unload = await client.post("/imagine/models/slow/unload", headers=ADMIN)
    # The device thread finished the job first: the unload never pulled the model from under it.
    assert plugin.generator.finished_runs == ["completed"]
    assert (await unload.json())["message"] == "Model unloaded"
    assert (await generation).status == 200


async def test_preloaded_models_are_loaded_at_start(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(models={"preload": ("sdxl-turbo",)}))
    for _ in range(200):
        if (await loaded(client))["sdxl-turbo"]:
            break
        await asyncio.sleep(0.05)
    assert await loaded(client) == {"sdxl": False, "sdxl-lightning": False, "sdxl-turbo": True, "sd15-lora": False}


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


async def test_a_memory_budget_unloads_the_least_recently_used_model(make_client, base_settings) -> None:
    # Room for any two of these models, never three.
    sources = [Path(base_settings.models.model_options(name)["source"]) for name in ("sdxl", "sdxl-turbo", "sd15-lora")]
    largest = max(weights_bytes(source) for source in sources)
    client = await make_client(base_settings.replace(models={"memory_budget_gb": 2.5 * largest / 1024**3}))

    async def use(model: str) -> None:
        response = await client.post(URL, json={"prompt": "a fox", "model": model, "steps": 1}, headers=auth())
        assert response.status == 200, await response.text()

    await use("sdxl")
    await use("sdxl-turbo")
    await use("sdxl")  # sdxl-turbo is now the least recently used
    await use("sd15-lora")
    assert await loaded(client) == {"sdxl": True, "sdxl-lightning": False, "sdxl-turbo": False, "sd15-lora": True}
    memory = (await (await client.get("/imagine/models", headers=auth())).json())["memory"]
    assert memory["total_bytes"] <= 2.5 * largest
    assert memory["budget_gb"] == round(2.5 * largest / 1024**3, 3)

    await use("sdxl-turbo")  # reloaded; sdxl is the least recently used now
    assert await loaded(client) == {"sdxl": False, "sdxl-lightning": False, "sdxl-turbo": True, "sd15-lora": True}


async def test_a_model_that_fails_to_load_is_reported_everywhere(make_client, base_settings, tmp_path) -> None:
    options = dict(base_settings.models.options)
    options["sdxl-turbo"] = {**options["sdxl-turbo"], "source": str(tmp_path / "missing")}
    client = await make_client(base_settings.replace(models={"options": options}))

    response = await client.post("/imagine/models/sdxl-turbo/load", headers=ADMIN)
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "MODEL_NOT_AVAILABLE"
    reason = body["error"]["details"]["reason"]
    assert reason
    generation = await client.post(URL, json={"prompt": "x", "model": "sdxl-turbo"}, headers=auth())
    assert generation.status == 503
    assert (await generation.json())["error"]["details"]["reason"]

    status = await (await client.get("/imagine/status", headers=auth())).json()
    assert status["available_models"]["sdxl-turbo"]["error"]
    assert status["available_generators"]["sdxl-turbo"]["error"]
    assert status["available_models"]["sdxl"]["error"] is None
    assert status["system_info"]["models_memory"]["device"] == "cpu"
    info = await (await client.get("/imagine/info?model=sdxl-turbo", headers=auth())).json()
    assert info["error"] and info["is_loaded"] is False
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "degraded"
    assert health["model_status"]["sdxl-turbo"]["error"]


async def test_the_executor_reports_its_device(client) -> None:
    await client.post("/imagine/load_model", json={"model": "sdxl-turbo"}, headers=ADMIN)
    status = await (await client.get("/imagine/status", headers=auth())).json()
    assert client.app[executor_key].device == status["device"] == "cpu"
    assert status["vram_total"] is None and status["gpu_available"] is False
    memory = status["system_info"]["models_memory"]
    assert memory["total_bytes"] > 0 and memory["budget_gb"] is None
    assert status["system_info"]["process_memory"] > 0
