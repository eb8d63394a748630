"""Health, status, info, models and examples: what an operator and a client read."""

from __future__ import annotations

import datetime

from tests.conftest import auth


async def get_json(client, path: str) -> dict:
    response = await client.get(path, headers=auth())
    assert response.status == 200, await response.text()
    return await response.json()


async def generate_turbo(client) -> None:
    response = await client.post("/imagine/generate", json={"prompt": "a fox", "model": "sdxl-turbo"}, headers=auth())
    assert response.status == 200


async def test_health_reports_models_and_queue(client) -> None:
    health = await get_json(client, "/imagine/health")
    assert health["status"] == "healthy"
    stamp = datetime.datetime.fromisoformat(health["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    assert health["model_loaded"] is False
    assert health["model_status"]["sdxl"] == {"loaded": False, "error": None}
    assert health["queue"] == {"depth": 0, "capacity": 32}
    await generate_turbo(client)
    health = await get_json(client, "/imagine/health")
    assert health["model_loaded"] is True
    assert health["model_status"]["sdxl-turbo"]["loaded"] is True


async def test_status_follows_what_was_used(client) -> None:
    status = await get_json(client, "/imagine/status")
    assert status["status"] == "running"
    assert status["current_model"] is None
    assert status["models"]["sdxl"] is False
    await generate_turbo(client)
    status = await get_json(client, "/imagine/status")
    assert status["device"] == "cpu"
    assert status["gpu_available"] is False
    assert status["gpu_backend"] is None
    assert status["vram_total"] is None  # no GPU: null, not a made-up number
    assert status["current_model"] == "sdxl-turbo"
    assert status["current_generator_type"] == "local"
    assert status["models"]["sdxl-turbo"] is True
    assert {"sdxl", "sdxl-turbo"} <= set(status["available_models"])
    assert status["system_info"]["torch_version"].startswith("2.")
    # Unloading the current model leaves the most recently used of those still loaded as current.
    admin = auth(scope="generate admin")
    assert (await client.post("/imagine/models/sdxl/load", headers=admin)).status == 200
    assert (await get_json(client, "/imagine/status"))["current_model"] == "sdxl"
    assert (await client.post("/imagine/models/sdxl/unload", headers=admin)).status == 200
    assert (await get_json(client, "/imagine/status"))["current_model"] == "sdxl-turbo"
    assert status["system_info"]["process_memory"] > 0


async def test_info_describes_the_default_or_the_named_model(client) -> None:
    info = await get_json(client, "/imagine/info")
    assert info["model"] == "sdxl"
    assert info["config"]["default"] is True
    assert info["config"]["default_steps"] == 20
    assert info["config"]["default_guidance"] == 7.5
    turbo = await get_json(client, "/imagine/info?model=sdxl-turbo")
    assert turbo["config"] == {
        "default_steps": 1,
        "default_guidance": 0.0,
        "min_img_size": 64,  # the tests' override of the real 512
        "max_img_size": 1024,
        "default": False,
    }
    system = turbo["system_info"]
    assert 0 < system["available_memory"] <= system["total_memory"]
    unknown = await client.get("/imagine/info?model=nope", headers=auth())
    assert unknown.status == 404


async def test_models_and_default_model_status(client) -> None:
    models = await get_json(client, "/imagine/models")
    assert isinstance(models["cloud_models"], dict)  # always present, configured or not
    turbo = models["local_models"]["sdxl-turbo"]
    assert turbo["defaults"]["steps"] == 1
    assert turbo["limits"]["max_steps"] == 4
    assert turbo["loaded"] is False  # where it will load: see test_contract_gaps
    assert models["local_models"]["sdxl"]["aliases"] == ["stable-diffusion-xl"]
    assert await get_json(client, "/imagine/models/status") == {"loaded": False, "lora_available": False, "device": "cpu"}


async def test_examples_name_only_registered_models(client) -> None:
    examples = (await get_json(client, "/imagine/examples"))["examples"]
    assert len(examples) >= 3
    for example in examples:
        assert example["prompt"]
        assert example.get("model", "sdxl") in {"sdxl", "sdxl-turbo"}
