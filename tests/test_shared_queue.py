"""Two replicas in one test process sharing a real redis-server: jobs, generations and cancels across them.

Replica "api" runs no device (`serve --no-device`); replica "gpu" is a full
`serve`. Whatever is submitted to one is answered alike by the other, and
work submitted to the API tier runs on the GPU replica's device. Killed
processes and nginx in front are in tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import redis.asyncio as redis_asyncio

from imagine.cluster import keys
from imagine.cluster.queue import SharedQueue
from imagine.http.app import create_app
from imagine.settings import Settings
from imagine.webhooks.outbox import DELIVERY_PREFIX
from tests.conftest import KEYS, auth, data_url_png, pixels
from tests.processes import RedisServer, free_port, redis_server
from tests.slow_plugin import SlowPlugin


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def shared(redis: RedisServer, base_settings: Settings) -> Settings:
    redis_sync.Redis.from_url(redis.url).flushall()
    return base_settings.replace(
        queue={"storage": redis.url, "visibility_timeout_s": 1.0}, batch={"max_size": 1}, jobs={"preview_every": 1}
    )


Replicas = Callable[..., Any]


@pytest.fixture
async def raw_redis(redis: RedisServer) -> AsyncIterator[Any]:
    """A client of the test's own, to play a worker that takes work and dies."""
    client = redis_asyncio.Redis.from_url(redis.url)
    yield client
    await client.aclose()


@pytest.fixture
def replica(aiohttp_client: Callable[..., Any]) -> Replicas:
    async def make(settings: Settings, role: str = "serve", plugins: tuple[Any, ...] = ()) -> Any:
        return await aiohttp_client(create_app(settings, keys=KEYS, extra_plugins=plugins, role=role))

    return make


async def wait_for(client: Any, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"), timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.get(f"/imagine/jobs/{job_id}", headers=auth())
        assert response.status == 200, await response.text()
        job = await response.json()
        if job["status"] in statuses:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


async def events_of(client: Any, job_id: str, headers: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(id, event, data) of each event of the job's stream, read to its end."""
    response = await client.get(f"/imagine/jobs/{job_id}/events", headers={**auth(), **(headers or {})})
    assert response.status == 200, await response.text()
    events, current = [], {}
    async for line in response.content:
        text = line.decode().rstrip("\n")
        if text.startswith("id: "):
            current["id"] = text[4:]
        elif text.startswith("event: "):
            current["event"] = text[7:]
        elif text.startswith("data: "):
            current["data"] = text[6:]
        elif text == "" and current:
            events.append((current["id"], current["event"], current["data"]))
            current = {}
    return events


@pytest.fixture
async def pair(shared: Settings, replica: Replicas) -> AsyncIterator[tuple[Any, Any]]:
    api = await replica(shared, "api")
    gpu = await replica(shared)
    yield api, gpu


BODY = {"prompt": "a lighthouse", "model": "sdxl", "width": 64, "height": 64, "steps": 2, "seed": 7}


async def test_a_job_submitted_to_one_replica_is_answered_by_both_and_runs_on_the_device(pair: tuple[Any, Any]) -> None:
    api, gpu = pair
    submitted = await api.post("/imagine/jobs", json={**BODY, "preview": True}, headers=auth())
    assert submitted.status == 202
    job_id = (await submitted.json())["id"]
    done = await wait_for(gpu, job_id)
    assert done["status"] == "succeeded", done
    assert (await wait_for(api, job_id)) == done
    assert done["result"]["seed"] == 7 and len(done["result"]["images"]) == 1
    # The stream from either replica, to its end; resumed on the other from an event id, only what came after.
    events = await events_of(api, job_id)
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "started" in kinds
    # Progress and its latent previews come through the same log, from the device replica.
    progress = [json.loads(data) for _, kind, data in events if kind == "progress"]
    assert [event["step"] for event in progress] == [1, 2]
    assert all(event["preview"].startswith("data:image/png;base64,") for event in progress)
    resumed = await events_of(gpu, job_id, {"Last-Event-ID": events[0][0]})
    assert resumed == events[1:]
    # Resumed from its end: nothing follows, and the stream closes at once, not after a keep-alive.
    started = time.monotonic()
    assert await events_of(api, job_id, {"Last-Event-ID": events[-1][0]}) == []
    assert time.monotonic() - started < 5
    # An id of the right form that this stream never gave (or not as it gave it) is refused, not waited on
    # nor taken for the start.
    milliseconds, sequence = events[-1][0].split("-")
    never = (f"{milliseconds}-{int(sequence) + 1}", f"{int(milliseconds) + 1}-0", "0-0", "1-0", f"{milliseconds}-0{sequence}")
    for beyond in never:
        refused = await gpu.get(f"/imagine/jobs/{job_id}/events", headers={**auth(), "Last-Event-ID": beyond})
        assert refused.status == 400 and (await refused.json())["error"]["details"]["errors"][0]["loc"] == ["header", "Last-Event-ID"]


async def test_a_generate_on_the_api_tier_comes_back_from_the_device_replica(pair: tuple[Any, Any]) -> None:
    api, gpu = pair
    through_api = await api.post("/imagine/generate", json=BODY, headers=auth())
    assert through_api.status == 200, await through_api.text()
    assert through_api.headers["X-Seed"] == "7"
    direct = await gpu.post("/imagine/generate", json=BODY, headers=auth())
    assert (pixels(await through_api.read()) == pixels(await direct.read())).all()
    # Stored in the gallery like any other generation (by the replica whose device ran it).
    listing = await (await gpu.get("/imagine/gallery", headers=auth())).json()
    assert listing["total_count"] == 2


async def test_json_answers_and_errors_cross_replicas_in_the_contract_shape(pair: tuple[Any, Any]) -> None:
    api, _ = pair
    answer = await api.post("/imagine/generate", json={**BODY, "response_format": "json", "num_images": 2}, headers=auth())
    assert answer.status == 200
    body = await answer.json()
    assert body["seeds"] == [7, 8] and len(body["images"]) == 2 and len(body["ids"]) == 2
    refused = await api.post("/imagine/generate", json={**BODY, "model": "nope"}, headers=auth())
    assert refused.status == 404 and (await refused.json())["error"]["code"] == "MODEL_NOT_AVAILABLE"


async def test_a_cancel_sent_to_the_other_replica_stops_the_running_job(shared: Settings, replica: Replicas) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    api = await replica(shared, "api", (SlowPlugin(),))
    gpu = await replica(shared, plugins=(plugin,))
    submitted = await gpu.post("/imagine/jobs", json={"prompt": "slow", "model": "slow", "steps": 400}, headers=auth())
    job_id = (await submitted.json())["id"]
    await wait_for(api, job_id, ("running",))
    cancelled = await api.delete(f"/imagine/jobs/{job_id}", headers=auth())
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    assert (await wait_for(gpu, job_id))["status"] == "cancelled"
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.steps_run < 400


async def test_an_idempotency_key_replays_on_the_other_replica_and_jobs_stay_private(pair: tuple[Any, Any]) -> None:
    api, gpu = pair
    headers = {**auth(), "Idempotency-Key": "order-42"}
    first = await api.post("/imagine/jobs", json=BODY, headers=headers)
    again = await gpu.post("/imagine/jobs", json=BODY, headers=headers)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    changed = await gpu.post("/imagine/jobs", json={**BODY, "seed": 8}, headers=headers)
    assert changed.status == 409
    job_id = (await first.json())["id"]
    for client in pair:
        other = await client.get(f"/imagine/jobs/{job_id}", headers=auth("mallory"))
        assert other.status == 404
        assert (await client.delete(f"/imagine/jobs/{job_id}", headers=auth("mallory"))).status == 404
    assert (await wait_for(api, job_id))["status"] == "succeeded"
    # An id that is not one of ours names no job, even one that would name another of the job's keys.
    for path in (f"{job_id}:events", f"{job_id}:result", "job_"):
        assert (await api.get(f"/imagine/jobs/{path}", headers=auth())).status == 404
        assert (await api.get(f"/imagine/jobs/{path}/events", headers=auth())).status == 404


async def test_the_queue_limit_counts_the_whole_cluster(shared: Settings, replica: Replicas) -> None:
    settings = shared.replace(queue={"max_size": 1})
    api = await replica(settings, "api", (SlowPlugin(),))
    gpu = await replica(settings, plugins=(SlowPlugin(step_seconds=0.05),))
    running = await (await gpu.post("/imagine/jobs", json={"prompt": "a", "model": "slow", "steps": 200}, headers=auth())).json()
    await wait_for(api, running["id"], ("running",))
    waiting = await api.post("/imagine/jobs", json={"prompt": "b", "model": "slow", "steps": 5}, headers=auth())
    assert waiting.status == 202
    assert (await waiting.json())["position"] == 1
    full = await gpu.post("/imagine/jobs", json={"prompt": "c", "model": "slow", "steps": 5}, headers=auth())
    assert full.status == 503
    assert (await full.json())["error"]["code"] == "QUEUE_FULL"
    assert int(full.headers["Retry-After"]) >= 1
    await api.delete(f"/imagine/jobs/{running['id']}", headers=auth())


async def test_subjects_take_turns_on_the_shared_queue(shared: Settings, replica: Replicas) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    await replica(shared, plugins=(plugin,))
    api = await replica(shared, "api", (SlowPlugin(),))
    first = await (await api.post("/imagine/jobs", json={"prompt": "x0", "model": "slow", "steps": 30}, headers=auth("x"))).json()
    await asyncio.sleep(0.2)  # x0 runs; x1..x4 and then y0 wait
    for index in range(1, 5):
        await api.post("/imagine/jobs", json={"prompt": f"x{index}", "model": "slow", "steps": 3}, headers=auth("x"))
    await api.post("/imagine/jobs", json={"prompt": "y0", "model": "slow", "steps": 3}, headers=auth("y"))
    deadline = time.monotonic() + 30
    while len(plugin.generator.batches) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    order = [batch[0] for batch in plugin.generator.batches]
    assert first["position"] == 1
    # y's only image waits for at most the one batch running when it arrived.
    assert order[:2] == ["x0", "y0"], order


async def test_an_idempotency_key_whose_job_has_expired_makes_a_new_job(shared: Settings, replica: Replicas) -> None:
    """The key lasts from submission, the job from its end: a job that ended quickly goes first, and
    its key must then name nothing, not a job that is not found."""
    gpu = await replica(shared.replace(jobs={"ttl_s": 1}, queue={"timeout_s": 60}))
    headers = {**auth(), "Idempotency-Key": "order-7"}
    first = await (await gpu.post("/imagine/jobs", json=BODY, headers=headers)).json()
    assert (await wait_for(gpu, first["id"]))["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while (await gpu.get(f"/imagine/jobs/{first['id']}", headers=auth())).status != 404:
        assert time.monotonic() < deadline, "the job never expired"
        await asyncio.sleep(0.1)
    again = await gpu.post("/imagine/jobs", json=BODY, headers=headers)
    assert again.status == 202, await again.text()
    assert "Idempotent-Replayed" not in again.headers and (await again.json())["id"] != first["id"]
    assert (await wait_for(gpu, (await again.json())["id"]))["status"] == "succeeded"


async def test_a_worker_that_went_quiet_has_its_job_claimed_and_run_by_another(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    api = await replica(shared, "api")
    submitted = await (await api.post("/imagine/jobs", json={**BODY, "response_format": "json"}, headers=auth())).json()
    # A worker takes the entry and is never heard of again.
    [taken] = await SharedQueue(raw_redis, visibility_timeout_s=1.0, max_attempts=3).take("ghost", 1)
    assert taken.job_id == submitted["id"]
    gpu = await replica(shared)
    done = await wait_for(api, submitted["id"])
    assert done["status"] == "succeeded" and done["result"]["seed"] == 7
    alone = await (await gpu.post("/imagine/generate", json={**BODY, "response_format": "json"}, headers=auth())).json()
    assert (pixels(data_url_png(done["result"]["images"][0])) == pixels(data_url_png(alone["images"][0]))).all()


async def test_a_job_taken_by_a_worker_that_never_started_it_is_cancelled_at_once(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    api = await replica(shared, "api")
    submitted = await (await api.post("/imagine/jobs", json=BODY, headers=auth())).json()
    [taken] = await SharedQueue(raw_redis, visibility_timeout_s=1.0, max_attempts=3).take("ghost", 1)
    assert taken.job_id == submitted["id"]
    started = time.monotonic()
    cancelled = await (await api.delete(f"/imagine/jobs/{submitted['id']}", headers=auth())).json()
    assert cancelled["status"] == "cancelled" and "started_at" not in cancelled
    assert time.monotonic() - started < 5  # not the wait for a running job to stop
    # The worker that claims the ghost's entry finds the job ended, and neither runs nor revives it.
    gpu = await replica(shared)
    await asyncio.sleep(2.5)
    assert (await (await gpu.get(f"/imagine/jobs/{submitted['id']}", headers=auth())).json())["status"] == "cancelled"
    assert await raw_redis.exists(taken.stream) == 0  # the entry acknowledged, its stream gone with it


async def test_a_job_whose_every_attempt_stopped_its_worker_fails_instead_of_looping(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    api = await replica(shared.replace(queue={"max_attempts": 2}), "api")
    client = raw_redis
    ghost = SharedQueue(client, visibility_timeout_s=1.0, max_attempts=2)
    submitted = await (await api.post("/imagine/jobs", json=BODY, headers=auth())).json()
    [entry] = await ghost.take("ghost-1", 1)
    await asyncio.sleep(1.1)
    # A second worker claims it and dies too: two attempts.
    assert await client.xclaim(entry.stream, "workers", "ghost-2", 1000, [entry.id])
    failed = await wait_for(api, submitted["id"], timeout=20)
    assert failed["status"] == "failed"
    assert failed["error"]["error"]["details"] == {"attempts": 2}
    assert "2 times" in failed["error"]["detail"]


async def test_without_redis_generation_answers_503_with_retry_after(base_settings: Settings, replica: Replicas) -> None:
    settings = base_settings.replace(queue={"storage": f"redis://127.0.0.1:{free_port()}/0"})
    client = await replica(settings, "api")
    for path in ("/imagine/generate", "/imagine/jobs"):
        response = await client.post(path, json=BODY, headers=auth())
        assert response.status == 503, await response.text()
        assert (await response.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert response.headers["Retry-After"] == "2"
    assert (await client.get("/imagine/jobs/job_" + "x" * 22, headers=auth())).status == 503


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and start; persistent, as a shared queue's Redis runs.
    Asked for before `replica`, so it outlives the replica's shutdown."""
    with redis_server(tmp_path, persistent=True) as server:
        yield server


async def test_an_event_stream_whose_redis_goes_away_ends_without_a_second_answer(
    own_redis: RedisServer, base_settings: Settings, replica: Replicas
) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    settings = base_settings.replace(queue={"storage": own_redis.url}, jobs={"preview_every": 1})
    client = await replica(settings, "serve", (plugin,))
    job = await (await client.post("/imagine/jobs", json={"prompt": "a", "model": "slow", "steps": 60}, headers=auth())).json()
    response = await client.get(f"/imagine/jobs/{job['id']}/events", headers=auth())
    assert response.status == 200
    body = b""
    while b"event: progress" not in body:
        body += await response.content.readany()
    own_redis.stop()
    # The stream ends (an EventSource reconnects with Last-Event-ID); no status line follows the events.
    async with asyncio.timeout(30):
        while chunk := await response.content.readany():
            body += chunk
    assert b"HTTP/1.1" not in body and b"SERVICE_UNAVAILABLE" not in body
    own_redis.start()  # for the replica's shutdown


def test_the_api_and_worker_roles_need_the_shared_queue(base_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="queue.storage"):
        create_app(base_settings, keys=KEYS, role="api")


# ---- jobs.max_per_subject over the cluster, finished jobs included ----------------------------------------


async def submit_and_finish(
    submit_to: Any, read_from: Any, raw_redis: Any, body: dict[str, Any], sub: str = "alice", headers: dict[str, str] | None = None
) -> str:
    """A job that succeeded and whose follow-up (its quota's, in keys.AFTER_END) has run."""
    submitted = await submit_to.post("/imagine/jobs", json=body, headers={**auth(sub), **(headers or {})})
    assert submitted.status == 202, await submitted.text()
    job_id = (await submitted.json())["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = await (await read_from.get(f"/imagine/jobs/{job_id}", headers=auth(sub))).json()
        if job["status"] in ("succeeded", "failed", "cancelled") and await raw_redis.zscore(keys.AFTER_END, job_id) is None:
            assert job["status"] == "succeeded", job
            return job_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


async def status_of(client: Any, job_id: str, sub: str = "alice") -> int:
    return (await client.get(f"/imagine/jobs/{job_id}", headers=auth(sub))).status


async def test_past_max_per_subject_the_oldest_finished_job_is_forgotten_everywhere(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    settings = shared.replace(jobs={"max_per_subject": 2})
    api = await replica(settings, "api")
    gpu = await replica(settings)
    theirs = [await submit_and_finish(gpu, api, raw_redis, {**BODY, "seed": seed}, "mallory") for seed in (1, 2)]
    keyed = {**auth(), "Idempotency-Key": "order-1"}
    first = await submit_and_finish(api, gpu, raw_redis, {**BODY, "seed": 1}, headers=keyed)
    second = await submit_and_finish(gpu, api, raw_redis, {**BODY, "seed": 2})
    third = await submit_and_finish(api, gpu, raw_redis, {**BODY, "seed": 3})
    # The third made room by forgetting the oldest, on every replica; the two newest still answer.
    for client in (api, gpu):
        assert await status_of(client, first) == 404
        assert (await client.get(f"/imagine/jobs/{first}/events", headers=auth())).status == 404
        assert [await status_of(client, job_id) for job_id in (second, third)] == [200, 200]
        # Another caller's jobs count against their own bound only.
        assert [await status_of(client, job_id, "mallory") for job_id in theirs] == [200, 200]
    # Its result is out of Redis's memory: the record, the event stream (with the succeeded event) and the key.
    assert await raw_redis.exists(keys.job(first), keys.events(first), keys.idempotency("alice", "order-1")) == 0
    assert await raw_redis.exists(keys.job(second), keys.events(second)) == 2
    assert await raw_redis.zcard(keys.finished("alice")) == 2
    # Its Idempotency-Key no longer replays: the same request is a new job (which forgets the next oldest).
    again = await gpu.post("/imagine/jobs", json={**BODY, "seed": 1}, headers=keyed)
    assert again.status == 202 and "Idempotent-Replayed" not in again.headers
    assert (await again.json())["id"] != first
    assert await status_of(api, second) == 404


async def test_when_unfinished_jobs_fill_max_per_subject_a_submission_is_429_and_forgets_nothing(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    settings = shared.replace(jobs={"max_per_subject": 2})
    api = await replica(settings, "api", (SlowPlugin(),))
    gpu = await replica(settings, plugins=(SlowPlugin(step_seconds=0.05),))
    finished = await submit_and_finish(api, gpu, raw_redis, {"prompt": "done", "model": "slow", "steps": 1})
    running = await (await gpu.post("/imagine/jobs", json={"prompt": "a", "model": "slow", "steps": 400}, headers=auth())).json()
    await wait_for(api, running["id"], ("running",))
    # A second unfinished job fits by forgetting the finished one...
    queued = await api.post("/imagine/jobs", json={"prompt": "b", "model": "slow", "steps": 5}, headers=auth())
    assert queued.status == 202
    queued_id = (await queued.json())["id"]
    assert await status_of(gpu, finished) == 404
    # ...and with two unfinished, nothing finished is left to forget: 429, and both stay as they were.
    before = sorted(await raw_redis.keys(keys.PREFIX + "job:*"))
    for client in (api, gpu):
        refused = await client.post(
            "/imagine/jobs", json={"prompt": "c", "model": "slow", "steps": 5}, headers={**auth(), "Idempotency-Key": "c"}
        )
        assert refused.status == 429, await refused.text()
        assert (await refused.json())["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert sorted(await raw_redis.keys(keys.PREFIX + "job:*")) == before
    assert await raw_redis.exists(keys.idempotency("alice", "c")) == 0
    assert (await wait_for(api, running["id"], ("running",)))["status"] == "running"
    assert (await wait_for(gpu, queued_id, ("queued",)))["status"] == "queued"
    # Another caller is not held back by this one's jobs.
    other = await api.post("/imagine/jobs", json={"prompt": "d", "model": "slow", "steps": 5}, headers=auth("mallory"))
    assert other.status == 202
    for job_id, sub in ((running["id"], "alice"), (queued_id, "alice"), ((await other.json())["id"], "mallory")):
        await api.delete(f"/imagine/jobs/{job_id}", headers=auth(sub))


async def test_a_queued_job_whose_record_expired_holds_none_of_its_callers_room(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    # No device anywhere: the job waits until its record's TTL runs out, here at once.
    api = await replica(shared.replace(jobs={"max_per_subject": 1}), "api", (SlowPlugin(),))
    body = {"prompt": "a", "model": "slow", "steps": 1}
    first = await api.post("/imagine/jobs", json=body, headers=auth())
    assert first.status == 202
    await raw_redis.delete(keys.job((await first.json())["id"]))
    second = await api.post("/imagine/jobs", json=body, headers=auth())
    assert second.status == 202, await second.text()
    await api.delete(f"/imagine/jobs/{(await second.json())['id']}", headers=auth())


async def test_a_finished_job_whose_follow_up_has_not_read_it_yet_is_not_forgotten(
    shared: Settings, replica: Replicas, raw_redis: Any
) -> None:
    """The outbox reads a job's record to refund its quota and build its webhook (imagine.webhooks.outbox):
    until it has made the delivery, forgetting the job would lose both. A newer finished job goes instead,
    and when there is none, the submission waits (429) rather than the follow-up being lost."""
    settings = shared.replace(jobs={"max_per_subject": 2})
    api = await replica(settings, "api", (SlowPlugin(),))
    gpu = await replica(settings, plugins=(SlowPlugin(step_seconds=0.05),))
    quick = {"prompt": "quick", "model": "slow", "steps": 1}
    pending = await submit_and_finish(api, gpu, raw_redis, quick)
    # As the end of a job with a webhook or a quota charge queues it; not due yet, so no deliverer takes it.
    await raw_redis.zadd(keys.AFTER_END, {pending: time.time() + 3600})
    newer = await submit_and_finish(gpu, api, raw_redis, quick)
    third = await submit_and_finish(api, gpu, raw_redis, quick)
    assert [await status_of(api, job_id) for job_id in (pending, newer, third)] == [200, 404, 200]
    running = await (await gpu.post("/imagine/jobs", json={"prompt": "a", "model": "slow", "steps": 400}, headers=auth())).json()
    await wait_for(api, running["id"], ("running",))
    assert await status_of(api, third) == 404
    # One unfinished, and the one finished job is still to be followed up: refused, and nothing goes.
    refused = await api.post("/imagine/jobs", json=quick, headers=auth())
    assert refused.status == 429, await refused.text()
    assert "followed up" in (await refused.json())["error"]["message"] and refused.headers["Retry-After"] == "1"
    assert await status_of(gpu, pending) == 200
    # Once its delivery is made (kept apart from the job), the job itself may go; the delivery stays.
    await raw_redis.hset(DELIVERY_PREFIX + pending, mapping={"url": "https://example.com/hook", "attempts": 0})
    accepted = await gpu.post("/imagine/jobs", json=quick, headers=auth())
    assert accepted.status == 202, await accepted.text()
    assert await status_of(api, pending) == 404
    assert await raw_redis.exists(DELIVERY_PREFIX + pending) == 1
    assert await raw_redis.zscore(keys.AFTER_END, pending) is not None
    await raw_redis.zrem(keys.AFTER_END, pending)
    for job_id in (running["id"], (await accepted.json())["id"]):
        await api.delete(f"/imagine/jobs/{job_id}", headers=auth())
