"""Seed 000's POST /generate/batch and seed 004's POST /generate-image."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from imagine.http.app_keys import executor_key
from tests.conftest import auth
from tests.slow_plugin import SlowPlugin

BATCH = "/imagine/generate/batch"
GENERATE_IMAGE = "/imagine/generate-image"


async def test_batch_one_bad_item_fails_alone(client) -> None:
    items = [
        {"prompt": "abstract geometric patterns", "num_inference_steps": 2, "seed": 1},
        {"prompt": "", "width": 7},
        {"prompt": "minimalist line art", "model": "dall-e-9"},
        {"prompt": "a fox", "model": "sdxl-turbo", "num_images": 2, "seed": 5},
    ]
    response = await client.post(BATCH, json=items, headers=auth())
    assert response.status == 200
    results = (await response.json())["results"]
    assert [(result["index"], result["success"]) for result in results] == [(0, True), (1, False), (2, False), (3, True)]

    first = results[0]["result"]
    assert first["prompt"] == "abstract geometric patterns" and first["seed"] == 1
    assert first["parameters"]["num_inference_steps"] == 2
    assert len(first["images"]) == len(first["ids"]) == 1
    assert results[3]["result"]["seeds"] == [5, 6] and len(results[3]["result"]["images"]) == 2

    invalid = results[1]
    assert invalid["status"] == 400
    assert invalid["error"]["error"]["code"] == "VALIDATION_ERROR"
    assert {tuple(error["loc"]) for error in invalid["error"]["error"]["details"]["errors"]} == {
        ("body", "prompt"),
        ("body", "width"),
    }
    unknown = results[2]
    assert unknown["status"] == 404
    assert unknown["error"]["detail"] == "Model 'dall-e-9' not available"
    # The successful items are in the gallery like any other generation.
    gallery = await (await client.get("/imagine/gallery", headers=auth())).json()
    assert gallery["total_count"] == 3


async def test_a_nul_character_fails_only_its_own_batch_item(client) -> None:
    items = [{"prompt": "a fox", "num_inference_steps": 1}, {"prompt": "a \u0000 fox", "num_inference_steps": 1}]
    response = await client.post(BATCH, json=items, headers=auth())
    assert response.status == 200
    good, bad = (await response.json())["results"]
    assert good["success"] is True and bad["success"] is False and bad["status"] == 400
    assert bad["error"]["error"]["details"]["errors"] == [{"loc": ["body", "prompt"], "msg": "must not contain the NUL character"}]


async def test_batch_array_itself_must_be_valid(client) -> None:
    for body in ({"prompt": "a fox"}, [], [{"prompt": "a fox"}] * 9):
        response = await client.post(BATCH, json=body, headers=auth())
        assert response.status == 400
        assert (await response.json())["error"]["details"]["errors"][0]["loc"] == ["body"]
    assert (await client.post(BATCH, json=[{"prompt": "a fox"}], headers=auth(scope="metrics"))).status == 403
    # It answers JSON only: an Accept that rules JSON out is refused before anything runs.
    refused = await client.post(BATCH, json=[{"prompt": "a fox"}], headers={**auth(), "Accept": "text/html"})
    assert refused.status == 406 and (await refused.json())["error"]["code"] == "NOT_ACCEPTABLE"
    assert (await (await client.get("/imagine/gallery", headers=auth())).json())["total_count"] == 0
    for accept in ("*/*", "application/*", "text/html, application/json;q=0.5"):
        assert (await client.post(BATCH, json=[{"prompt": "a fox", "steps": 1}], headers={**auth(), "Accept": accept})).status == 200


async def test_batch_items_are_queued_together(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    # Batches of one: the items must be seen waiting in the queue, not merged into one call.
    client = await make_client(base_settings.replace(batch={"max_size": 1}), plugins=(plugin,))
    executor = client.app[executor_key]
    items = [{"prompt": f"slow {number}", "model": "slow", "steps": 15} for number in range(3)]
    batch = asyncio.create_task(client.post(BATCH, json=items, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    # While the first item runs, the other two join the queue (each is admitted and counted on its own first).
    async with asyncio.timeout(5):
        while executor.depth < 2:
            await asyncio.sleep(0.005)
    assert plugin.generator.finished_runs == []
    results = (await (await batch).json())["results"]
    assert all(result["success"] for result in results)
    assert plugin.generator.finished_runs == ["completed"] * 3


async def test_generate_image_answers_in_seed_004_shape(client) -> None:
    body = {"prompt": "a beautiful landscape", "negative_prompt": "blurry", "steps": 10, "guidance": 8.0, "seed": 12345}
    response = await client.post(GENERATE_IMAGE, json=body, headers=auth())
    assert response.status == 200, await response.text()
    result = await response.json()
    assert set(result) == {"success", "image_base64", "message", "seed"}
    assert result["success"] is True
    assert result["message"] == "Image generated successfully! Seed: 12345"
    assert result["seed"] == 12345
    image = Image.open(io.BytesIO(base64.b64decode(result["image_base64"])))
    assert image.size == (64, 64)  # sdxl's default size, shrunk for the tests
    assert image.text["parameters"].endswith("Steps: 10, Sampler: Euler, CFG scale: 8, Seed: 12345, Size: 64x64, Model: sdxl")
    stored = await client.get(f"/imagine/gallery/{response.headers['X-Image-Id']}", headers=auth())
    assert (await stored.json())["negative_prompt"] == "blurry"


async def test_generate_image_defaults_and_random_seed(client) -> None:
    result = await (await client.post(GENERATE_IMAGE, json={"prompt": "a fox", "steps": 10}, headers=auth())).json()
    assert 0 <= result["seed"] <= 4_294_967_295
    assert result["message"] == f"Image generated successfully! Seed: {result['seed']}"


async def test_generate_image_validates_seed_004_ranges(client) -> None:
    for change, field in (
        ({"steps": 5}, "steps"),
        ({"steps": 101}, "steps"),
        ({"guidance": 0.5}, "guidance"),
        ({"prompt": "  "}, "prompt"),
        ({"model": "sdxl-turbo"}, "model"),
    ):
        response = await client.post(GENERATE_IMAGE, json={"prompt": "a fox", **change}, headers=auth())
        assert response.status == 400, change
        errors = (await response.json())["error"]["details"]["errors"]
        assert errors[0]["loc"] == ["body", field], errors
