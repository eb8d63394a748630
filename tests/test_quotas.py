"""Image quotas: charged at admission, refused with 429 past the quota, refunded when work fails or is cancelled
before it runs, counted in the embedded database (kept across a restart) or in Redis (shared by replicas)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis as redis_sync

from imagine.http.app import create_app
from imagine.http.app_keys import executor_key
from imagine.settings import Settings
from tests import oom_plugin
from tests.conftest import KEYS, auth
from tests.oom_plugin import TRIGGER
from tests.processes import RedisServer, redis_server
from tests.slow_plugin import SlowPlugin

BODY = {"prompt": "a lighthouse", "model": "sdxl", "width": 64, "height": 64, "steps": 2, "seed": 3, "response_format": "json"}


async def usage(client: Any, sub: str = "alice", **claims: Any) -> dict[str, Any]:
    response = await client.get("/imagine/usage", headers=auth(sub, **claims))
    assert response.status == 200, await response.text()
    return await response.json()


async def job_end(client: Any, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = await (await client.get(f"/imagine/jobs/{job_id}", headers=auth())).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


async def test_quota_admits_until_spent_then_429_with_headers_and_usage_matches(make_client: Any, base_settings: Settings) -> None:
    client = await make_client(base_settings.replace(quotas={"images_per_day": 3}))
    first = await client.post("/imagine/generate", json={**BODY, "num_images": 2}, headers=auth())
    assert first.status == 200
    assert (first.headers["Quota-Limit"], first.headers["Quota-Remaining"]) == ("3", "1")
    assert 0 < int(first.headers["Quota-Reset"]) <= 86400
    refused = await client.post("/imagine/generate", json={**BODY, "num_images": 2}, headers=auth())
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "QUOTA_EXCEEDED"
    assert 0 < int(refused.headers["Retry-After"]) <= 86400 and refused.headers["Quota-Remaining"] == "0"
    assert (await client.post("/imagine/generate", json=BODY, headers=auth())).status == 200
    seen = await usage(client)
    assert seen["day"]["images"] == 3 and seen["day"]["limit"] == 3 and seen["day"]["by_model"] == {"sdxl": 3}
    assert seen["month"]["images"] == 3 and seen["month"]["limit"] is None
    # Another subject has its own count; only admin reads it.
    assert (await usage(client, "bob"))["day"]["images"] == 0
    assert (await client.get("/imagine/usage?sub=bob", headers=auth())).status == 403
    assert (await (await client.get("/imagine/usage?sub=alice", headers=auth("root", "admin"))).json())["day"]["images"] == 3
    text = await (await client.get("/imagine/metrics", headers=auth(scope="metrics"))).text()
    assert 'imagine_quota_images_total{model="sdxl",outcome="charged"} 3.0' in text
    assert 'imagine_quota_images_total{model="sdxl",outcome="refused"} 2.0' in text


async def test_a1111_generations_are_charged_as_every_other_route(make_client: Any, base_settings: Settings) -> None:
    client = await make_client(base_settings.replace(quotas={"images_per_day": 1}))
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 3}
    made = await client.post("/imagine/sdapi/v1/txt2img", json=body, headers=auth())
    assert made.status == 200 and made.headers["Quota-Remaining"] == "0"
    refused = await client.post("/imagine/sdapi/v1/txt2img", json=body, headers=auth())
    assert refused.status == 429 and "Retry-After" in refused.headers
    assert (await refused.json())["error"] == "QUOTA_EXCEEDED"  # in A1111's error shape
    assert (await usage(client))["day"]["by_model"] == {"sdxl": 1}


async def test_an_a1111_interrupt_of_a_running_generation_stays_charged(make_client: Any, base_settings: Settings) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    client = await make_client(base_settings.replace(quotas={"images_per_day": 10}), plugins=(plugin,))
    body = {"prompt": "a long one", "steps": 200, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "slow"}}
    running = asyncio.create_task(client.post("/imagine/sdapi/v1/txt2img", json=body, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    assert (await client.post("/imagine/sdapi/v1/interrupt", headers=auth())).status == 200
    response = await running
    assert response.status == 200 and (await response.json())["images"] == []
    # As a job cancelled while running: the device's time was spent.
    await asyncio.sleep(0.2)  # a refund would have been written by now
    assert (await usage(client))["day"]["images"] == 1


async def test_a_generation_whose_caller_hangs_up_is_refunded_only_if_it_had_not_started(make_client: Any, base_settings: Settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings.replace(quotas={"images_per_day": 10}), plugins=(plugin,))
    executor = client.app[executor_key]
    slow = {"prompt": "slow", "model": "slow", "steps": 500}
    running = asyncio.create_task(client.post("/imagine/generate", json=slow, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = asyncio.create_task(client.post("/imagine/generate", json=slow, headers=auth()))
    while executor.depth == 0:
        await asyncio.sleep(0.01)
    assert (await usage(client))["day"]["images"] == 2
    queued.cancel()  # its caller hangs up before it ran: nothing was spent on it
    running.cancel()  # its caller hangs up while it runs: the device's time was spent
    while executor.outcomes["cancelled"] < 2:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # a refund would have been written by now
    assert (await usage(client))["day"]["images"] == 1
    assert plugin.generator.finished_runs == ["interrupted"]  # the one that ran, stopped


async def test_a_spent_quota_is_refused_before_an_input_image_is_decoded(make_client: Any, base_settings: Settings) -> None:
    client = await make_client(base_settings.replace(quotas={"images_per_day": 1}))
    unreadable = {**BODY, "init_image": "aGVsbG8gd29ybGQ="}  # base64 of text, not of an image
    refused = await client.post("/imagine/generate", json=unreadable, headers=auth())
    assert refused.status == 400, await refused.text()  # with room left, the image is read, and a 400 costs nothing
    assert (await client.post("/imagine/generate", json=BODY, headers=auth())).status == 200
    over = await client.post("/imagine/generate", json=unreadable, headers=auth())
    assert over.status == 429 and (await over.json())["error"]["code"] == "QUOTA_EXCEEDED"
    assert "Retry-After" in over.headers
    assert (await usage(client))["day"]["images"] == 1


async def test_retries_of_one_job_sent_together_are_replays_not_refusals(make_client: Any, base_settings: Settings) -> None:
    """Each retry holds a charge until the store tells it is a replay: those past the quota meanwhile must
    still answer the job they repeat."""
    client = await make_client(base_settings.replace(quotas={"images_per_day": 3}))
    headers = {**auth(), "Idempotency-Key": "order-9"}
    responses = await asyncio.gather(*(client.post("/imagine/jobs", json=BODY, headers=headers) for _ in range(8)))
    assert [response.status for response in responses] == [202] * 8
    assert len({(await response.json())["id"] for response in responses}) == 1
    await job_end(client, (await responses[0].json())["id"])
    assert (await usage(client))["day"]["images"] == 1


async def test_a_token_claim_and_per_model_limits_override_the_defaults(make_client: Any, base_settings: Settings) -> None:
    client = await make_client(base_settings.replace(quotas={"images_per_day": 100, "models": {"sdxl": {"images_per_day": 1}}}))
    assert (await client.post("/imagine/generate", json=BODY, headers=auth())).status == 200
    assert (await client.post("/imagine/generate", json=BODY, headers=auth())).status == 429
    generous = {"models": {"sdxl": {"images_per_day": 5}}}
    response = await client.post("/imagine/generate", json=BODY, headers=auth(quota=generous))
    assert response.status == 200 and response.headers["Quota-Remaining"] == "3"
    assert (await client.get("/imagine/usage", headers=auth(quota="lots"))).status == 401


async def test_failed_and_cancelled_before_running_jobs_are_refunded_but_not_a_timeout_while_running(
    make_client: Any, base_settings: Settings
) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    settings = base_settings.replace(queue={"timeout_s": 0.6}, quotas={"images_per_day": 10})
    client = await make_client(settings, plugins=(plugin,))
    # The device thread's first start (torch imported there) can take longer than the deadline itself.
    await client.app[executor_key].call(lambda: None)
    slow = {"prompt": "slow", "model": "slow", "steps": 100}
    running = await (await client.post("/imagine/jobs", json=slow, headers=auth())).json()
    # The second job must wait behind the first, not join its batch.
    assert await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = await (await client.post("/imagine/jobs", json=slow, headers=auth())).json()
    cancelled = await (await client.delete(f"/imagine/jobs/{queued['id']}", headers=auth())).json()
    assert cancelled["status"] == "cancelled" and "started_at" not in cancelled
    failed = await job_end(client, running["id"])
    assert failed["status"] == "failed" and failed["error"]["error"]["code"] == "TIMEOUT"
    await asyncio.sleep(0.2)
    # The cancel came back; the job that ran until its deadline used the device's time.
    assert (await usage(client))["day"]["images"] == 1


async def test_a_failed_job_is_refunded(make_client: Any, base_settings: Settings) -> None:
    client = await make_client(base_settings.replace(quotas={"images_per_day": 10}), plugins=(oom_plugin,))
    broken = await (await client.post("/imagine/jobs", json={"prompt": TRIGGER, "model": "oom"}, headers=auth())).json()
    assert (await job_end(client, broken["id"]))["error"]["error"]["code"] == "OUT_OF_MEMORY"
    deadline = time.monotonic() + 10
    while (await usage(client))["day"]["images"] != 0:  # the refund follows the job's end
        assert time.monotonic() < deadline, "the failed job was never refunded"
        await asyncio.sleep(0.05)


async def test_a_generation_that_runs_past_its_deadline_stays_charged(make_client: Any, base_settings: Settings) -> None:
    """Else a request too large to finish within queue.timeout_s would run, every time, for free."""
    plugin = SlowPlugin(step_seconds=0.05)
    client = await make_client(base_settings.replace(queue={"timeout_s": 0.5}, quotas={"images_per_day": 10}), plugins=(plugin,))
    await client.app[executor_key].call(lambda: None)  # the device thread started: the deadline is the run's
    response = await client.post("/imagine/generate", json={"prompt": "slow", "model": "slow", "steps": 100}, headers=auth())
    assert response.status == 504 and (await response.json())["error"]["code"] == "TIMEOUT"
    await asyncio.sleep(0.2)  # a refund would have been written by now
    assert (await usage(client))["day"]["images"] == 1


async def test_counts_survive_a_restart(aiohttp_client: Any, base_settings: Settings) -> None:
    settings = base_settings.replace(quotas={"images_per_day": 2})
    first = await aiohttp_client(create_app(settings, keys=KEYS))
    assert (await first.post("/imagine/generate", json={**BODY, "num_images": 2}, headers=auth())).status == 200
    await first.close()
    second = await aiohttp_client(create_app(settings, keys=KEYS))
    assert (await second.post("/imagine/generate", json=BODY, headers=auth())).status == 429
    assert (await usage(second))["day"]["images"] == 2


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def test_two_replicas_sharing_redis_never_admit_more_than_the_quota(
    aiohttp_client: Any, base_settings: Settings, redis: RedisServer
) -> None:
    redis_sync.Redis.from_url(redis.url).flushall()
    settings = base_settings.replace(
        quotas={"images_per_day": 5}, ratelimit={"storage": redis.url}, queue={"storage": redis.url}
    )
    # One replica with a device and an API tier: the quota is counted where requests arrive, on both.
    replicas = [await aiohttp_client(create_app(settings, keys=KEYS, role=role)) for role in ("serve", "api")]
    responses = await asyncio.gather(
        *(replicas[index % 2].post("/imagine/jobs", json=BODY, headers=auth()) for index in range(16))
    )
    statuses = sorted(response.status for response in responses)
    assert statuses == [202] * 5 + [429] * 11
    for replica in replicas:
        assert (await usage(replica))["day"]["images"] == 5
    ended = [await job_end(replicas[0], (await response.json())["id"]) for response in responses if response.status == 202]
    assert all(job["status"] == "succeeded" for job in ended)
    assert (await usage(replicas[1]))["day"]["by_model"] == {"sdxl": 5}


async def test_counts_without_a_limit_reach_the_other_replica_without_being_asked_for(
    aiohttp_client: Any, base_settings: Settings, redis: RedisServer
) -> None:
    redis_sync.Redis.from_url(redis.url).flushall()
    settings = base_settings.replace(ratelimit={"storage": redis.url}, queue={"storage": redis.url})
    serving, other = [await aiohttp_client(create_app(settings, keys=KEYS, role=role)) for role in ("serve", "api")]
    for _ in range(3):
        assert (await serving.post("/imagine/generate", json=BODY, headers=auth())).status == 200
    # Written together in the background, within a second or so, though nobody read them where they were counted.
    deadline = time.monotonic() + 10
    while (await usage(other))["day"]["images"] != 3:
        assert time.monotonic() < deadline, "the counts never reached the shared store"
        await asyncio.sleep(0.1)
    assert (await usage(other))["day"]["by_model"] == {"sdxl": 3}


async def device_and_api_replicas(aiohttp_client: Any, base_settings: Settings, redis: RedisServer, plugin: SlowPlugin) -> tuple[Any, Any]:
    """Two replicas on one shared queue and quota store (an empty Redis): one with `plugin`'s device, one
    with none, whose callers' generations run on the first."""
    redis_sync.Redis.from_url(redis.url).flushall()
    settings = base_settings.replace(quotas={"images_per_day": 5}, ratelimit={"storage": redis.url}, queue={"storage": redis.url})
    plugin.generator.started.clear()
    gpu = await aiohttp_client(create_app(settings, keys=KEYS, extra_plugins=(plugin,)))
    api = await aiohttp_client(create_app(settings, keys=KEYS, extra_plugins=(SlowPlugin(),), role="api"))
    return gpu, api


async def test_with_a_shared_queue_a_hang_up_is_refunded_only_before_the_other_replica_ran_it(
    aiohttp_client: Any, base_settings: Settings, redis: RedisServer
) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    gpu, api = await device_and_api_replicas(aiohttp_client, base_settings, redis, plugin)
    slow = {"prompt": "slow", "model": "slow", "steps": 500}
    # Sent to a replica with no device: the start it hears of comes from the other one's, through Redis.
    running = asyncio.create_task(api.post("/imagine/generate", json=slow, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = asyncio.create_task(api.post("/imagine/generate", json=slow, headers=auth()))
    await asyncio.sleep(0.3)  # queued behind the first
    assert (await usage(gpu))["day"]["images"] == 2
    queued.cancel()
    await asyncio.sleep(0.2)  # the start event reached the caller's replica long since
    running.cancel()
    deadline = time.monotonic() + 10
    while plugin.generator.finished_runs != ["interrupted"]:
        assert time.monotonic() < deadline, "the running generation was not stopped"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert (await usage(gpu))["day"]["images"] == 1


async def test_with_a_shared_queue_a_job_cancelled_before_running_is_refunded_for_every_replica(
    aiohttp_client: Any, base_settings: Settings, redis: RedisServer
) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    gpu, api = await device_and_api_replicas(aiohttp_client, base_settings, redis, plugin)
    slow = {"prompt": "slow", "model": "slow", "steps": 40}
    running = await (await api.post("/imagine/jobs", json=slow, headers=auth())).json()
    # The second job must wait behind the first, not join its batch.
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = await (await api.post("/imagine/jobs", json=slow, headers=auth())).json()
    assert (await (await api.delete(f"/imagine/jobs/{queued['id']}", headers=auth())).json())["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while (await usage(gpu))["day"]["images"] != 1:
        assert time.monotonic() < deadline, "the cancelled job was not refunded"
        await asyncio.sleep(0.1)
    # Cancelled while running: the device spent the time, the image stays charged.
    assert (await (await api.delete(f"/imagine/jobs/{running['id']}", headers=auth())).json())["status"] == "cancelled"
    await asyncio.sleep(1.5)
    assert (await usage(api))["day"]["images"] == 1
