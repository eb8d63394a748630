"""Asynchronous jobs: submit, poll, stream, cancel, resume, isolation, idempotency, expiry."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from tests.conftest import assert_same_image, auth, data_url_png, pixels
from tests.slow_plugin import SlowPlugin

JOBS = "/imagine/jobs"


async def submit(client, body, *, sub="alice", **headers):
    response = await client.post(JOBS, json=body, headers={**auth(sub), **headers})
    return response, await response.json()


async def read_events(response, stop_after: int | None = None) -> list[dict]:
    """Parse a Server-Sent Events stream into [{"id", "event", "data"}], comments as {"comment"}."""
    events, current = [], {}
    while True:
        line = await response.content.readline()
        if not line:
            return events
        text = line.decode().rstrip("\n")
        if text.startswith(":"):
            events.append({"comment": text[1:].strip()})
        elif text == "":
            if current:
                current["data"] = json.loads(current["data"])
                events.append(current)
                current = {}
                if stop_after is not None and sum("id" in e for e in events) >= stop_after:
                    return events
        else:
            field, _, value = text.partition(": ")
            current[field] = value


def only_events(events: list[dict]) -> list[dict]:
    return [event for event in events if "id" in event]


async def wait_for(predicate, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def job_status(client, job_id: str, sub: str = "alice") -> dict:
    return await (await client.get(f"{JOBS}/{job_id}", headers=auth(sub))).json()




async def test_submit_stream_in_order_and_result_equals_generate(client) -> None:
    body = {"prompt": "a lighthouse", "seed": 11, "steps": 3}
    response, accepted = await submit(client, body)
    assert response.status == 202
    assert response.headers["Location"] == f"{JOBS}/{accepted['id']}"
    assert accepted["status"] == "queued"
    assert isinstance(accepted["position"], int) and accepted["eta_seconds"] >= 0

    stream = await client.get(f"{JOBS}/{accepted['id']}/events", headers=auth())
    assert stream.headers["Content-Type"] == "text/event-stream"
    events = only_events(await read_events(stream))
    kinds = [event["event"] for event in events]
    assert kinds[-1] == "succeeded"
    assert kinds.index("started") < kinds.index("progress")
    assert [event["data"]["step"] for event in events if event["event"] == "progress"] == [1, 2, 3]
    assert [int(event["id"]) for event in events] == list(range(1, len(events) + 1))

    result = events[-1]["data"]
    direct = await client.post("/imagine/generate", json=body, headers=auth())
    direct_pixels = pixels(await direct.read())
    assert result["seeds"] == [11]
    assert np.array_equal(pixels(data_url_png(result["images"][0])), direct_pixels)

    polled = await job_status(client, accepted["id"])
    assert polled["status"] == "succeeded"
    assert polled["progress"] == {"step": 3, "total": 3}
    assert polled["result"]["seeds"] == [11]


async def test_cancel_while_running_stops_at_the_next_step(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    _, job = await submit(client, {"prompt": "slow", "model": "slow", "steps": 500})

    async def some_steps_done() -> bool:
        return (await job_status(client, job["id"]))["progress"]["step"] >= 3

    await wait_for(some_steps_done)
    cancelled = await client.delete(f"{JOBS}/{job['id']}", headers=auth())
    assert cancelled.status == 200
    assert (await cancelled.json())["status"] == "cancelled"
    await wait_for(lambda: asyncio.sleep(0, result=bool(plugin.generator.finished_runs)))
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.steps_run < 100
    events = only_events(await read_events(await client.get(f"{JOBS}/{job['id']}/events", headers=auth())))
    assert events[-1]["event"] == "cancelled"


async def test_cancel_while_queued_never_runs_it(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings, plugins=(plugin,))
    _, first = await submit(client, {"prompt": "a", "model": "slow", "steps": 40})
    _, second = await submit(client, {"prompt": "b", "model": "slow", "steps": 41})  # never batched with the first
    assert second["position"] >= 1
    cancelled = await (await client.delete(f"{JOBS}/{second['id']}", headers=auth())).json()
    assert cancelled["status"] == "cancelled"

    async def first_done() -> bool:
        return (await job_status(client, first["id"]))["status"] == "succeeded"

    await wait_for(first_done)
    await asyncio.sleep(0.2)
    assert plugin.generator.finished_runs == ["completed"]


async def test_queued_events_report_the_position_moving_up(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.01)
    client = await make_client(base_settings, plugins=(plugin,))
    # Different step counts: the jobs cannot share a batch, so they queue one behind another.
    await submit(client, {"prompt": "a", "model": "slow", "steps": 20})
    await submit(client, {"prompt": "b", "model": "slow", "steps": 21})
    _, third = await submit(client, {"prompt": "c", "model": "slow", "steps": 22})
    events = only_events(await read_events(await client.get(f"{JOBS}/{third['id']}/events", headers=auth())))
    positions = [event["data"]["position"] for event in events if event["event"] == "queued"]
    assert positions == sorted(positions, reverse=True) and positions[-1] == 1 and len(positions) >= 2
    assert events[-1]["event"] == "succeeded"


async def test_reconnecting_with_last_event_id_misses_nothing(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.01)
    client = await make_client(base_settings, plugins=(plugin,))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 30})
    url = f"{JOBS}/{job['id']}/events"
    first_stream = await client.get(url, headers=auth())
    first = only_events(await read_events(first_stream, stop_after=4))
    first_stream.close()  # the connection drops
    rest = only_events(await read_events(await client.get(url, headers={**auth(), "Last-Event-ID": first[-1]["id"]})))
    ids = [int(event["id"]) for event in first + rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1]["event"] == "succeeded"


async def test_a_dropped_stream_does_not_cancel_the_job(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.01)
    client = await make_client(base_settings, plugins=(plugin,))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 30})
    stream = await client.get(f"{JOBS}/{job['id']}/events", headers=auth())
    await read_events(stream, stop_after=2)
    stream.close()

    async def done() -> bool:
        return (await job_status(client, job["id"]))["status"] == "succeeded"

    await wait_for(done)
    assert plugin.generator.finished_runs == ["completed"]


async def test_another_subject_cannot_see_stream_or_cancel(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.01)
    client = await make_client(base_settings, plugins=(plugin,))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 30})
    for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        response = await client.request(method, f"{JOBS}/{job['id']}{suffix}", headers=auth("mallory"))
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NOT_FOUND"

    async def done() -> bool:
        return (await job_status(client, job["id"]))["status"] == "succeeded"

    await wait_for(done)


async def test_idempotency_key_returns_the_same_job_and_refuses_a_changed_body(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.01)
    client = await make_client(base_settings, plugins=(plugin,))
    body = {"prompt": "a", "model": "slow", "steps": 5}
    first_response, first = await submit(client, body, **{"Idempotency-Key": "retry-1"})
    again_response, again = await submit(client, dict(reversed(list(body.items()))), **{"Idempotency-Key": "retry-1"})
    assert again["id"] == first["id"]
    assert again_response.status == 202 and again_response.headers["Idempotent-Replayed"] == "true"
    changed, conflict = await submit(client, {**body, "prompt": "b"}, **{"Idempotency-Key": "retry-1"})
    assert changed.status == 409
    assert conflict["error"]["code"] == "CONFLICT"
    # Keys are per subject: another caller's identical key is another job.
    _, other = await submit(client, body, sub="bob", **{"Idempotency-Key": "retry-1"})
    assert other["id"] != first["id"]

    async def both_done() -> bool:
        statuses = [(await job_status(client, job_id, sub))["status"] for job_id, sub in ((first["id"], "alice"), (other["id"], "bob"))]
        return statuses == ["succeeded", "succeeded"]

    await wait_for(both_done)
    # Two jobs ran (alone or batched together), not three.
    assert sum(len(prompts) for prompts in plugin.generator.batches) == 2


async def test_finished_jobs_are_forgotten_after_their_ttl(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(jobs={"ttl_s": 0.3}), plugins=(SlowPlugin(0.0),))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 1})

    async def done() -> bool:
        return (await job_status(client, job["id"]))["status"] == "succeeded"

    await wait_for(done)
    await asyncio.sleep(0.4)
    assert (await client.get(f"{JOBS}/{job['id']}", headers=auth())).status == 404


async def test_previews_are_small_images_every_n_steps(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(jobs={"preview_every": 2}))
    _, job = await submit(client, {"prompt": "a fox", "steps": 4, "width": 128, "height": 64, "preview": True})
    events = only_events(await read_events(await client.get(f"{JOBS}/{job['id']}/events", headers=auth())))
    progress = [event["data"] for event in events if event["event"] == "progress"]
    with_preview = [data["step"] for data in progress if "preview" in data]
    assert with_preview == [2, 4]
    preview = pixels(data_url_png(next(data["preview"] for data in progress if "preview" in data)))
    assert preview.shape == (8, 16, 3)  # one pixel per latent
    assert preview.std() > 0
    # Off unless asked for.
    _, plain = await submit(client, {"prompt": "a fox", "steps": 2})
    events = only_events(await read_events(await client.get(f"{JOBS}/{plain['id']}/events", headers=auth())))
    assert not any("preview" in event["data"] for event in events if event["event"] == "progress")


async def test_idle_streams_get_keep_alive_comments(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    client = await make_client(base_settings.replace(jobs={"keepalive_s": 0.02}), plugins=(plugin,))
    await submit(client, {"prompt": "a", "model": "slow", "steps": 10})
    _, waiting = await submit(client, {"prompt": "b", "model": "slow", "steps": 1})
    events = await read_events(await client.get(f"{JOBS}/{waiting['id']}/events", headers=auth()))
    assert {"comment": "keep-alive"} in events


async def test_a_caller_holds_at_most_its_share_of_open_streams(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    client = await make_client(base_settings.replace(jobs={"max_streams_per_subject": 2}), plugins=(plugin,))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 200})
    url = f"{JOBS}/{job['id']}/events"
    held = [await client.get(url, headers=auth()) for _ in range(2)]
    for stream in held:
        assert stream.status == 200 and (await read_events(stream, stop_after=1))
    refused = await client.get(url, headers=auth())
    assert refused.status == 429 and refused.headers["Retry-After"]
    assert (await refused.json())["error"]["details"]["bucket"] == "streams"
    # Another caller's streams are its own.
    _, bobs = await submit(client, {"prompt": "b", "model": "slow", "steps": 1}, sub="bob")
    assert (await client.get(f"{JOBS}/{bobs['id']}/events", headers=auth("bob"))).status == 200
    # A stream the caller closes gives its slot back.
    held.pop().close()

    async def reopened() -> bool:
        again = await client.get(url, headers=auth())
        held.append(again)
        return again.status == 200

    await wait_for(reopened)
    for stream in held:
        stream.close()
    await client.delete(f"{JOBS}/{job['id']}", headers=auth())


async def test_full_queue_and_per_subject_bound(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    settings = base_settings.replace(queue={"max_size": 1}, jobs={"max_per_subject": 3})
    client = await make_client(settings, plugins=(plugin,))
    body = {"prompt": "a", "model": "slow", "steps": 50}
    assert (await submit(client, body))[0].status == 202
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    assert (await submit(client, body))[0].status == 202
    full, refused = await submit(client, body, sub="bob")
    assert full.status == 503 and refused["error"]["code"] == "QUEUE_FULL"

    bounded = await make_client(settings.replace(queue={"max_size": 10}), plugins=(SlowPlugin(0.02),))
    statuses = [(await submit(bounded, body))[0].status for _ in range(4)]
    assert statuses == [202, 202, 202, 429]


async def test_a_refused_job_forgets_none_of_the_callers_finished_ones(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    settings = base_settings.replace(queue={"max_size": 1}, jobs={"max_per_subject": 2})
    client = await make_client(settings, plugins=(plugin,))
    finished = []
    for _ in range(2):  # one after the other: the queue holds one
        job_id = (await submit(client, {"prompt": "a", "model": "slow", "steps": 1}))[1]["id"]

        async def succeeded(job_id: str = job_id) -> bool:
            return (await job_status(client, job_id))["status"] == "succeeded"

        await wait_for(succeeded)
        finished.append(job_id)
    # Bob's jobs hold the device and the queue's one place.
    plugin.generator.started.clear()  # set by alice's jobs
    await submit(client, {"prompt": "b", "model": "slow", "steps": 100}, sub="bob")
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    await submit(client, {"prompt": "b", "model": "slow", "steps": 100}, sub="bob")
    full, refused = await submit(client, {"prompt": "a", "model": "slow", "steps": 1})
    assert full.status == 503 and refused["error"]["code"] == "QUEUE_FULL"
    # Room is made by forgetting the oldest finished job only for a job that is accepted.
    for job_id in finished:
        assert (await job_status(client, job_id))["status"] == "succeeded"


async def test_batched_jobs_each_preview_their_own_image(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.05)
    client = await make_client(base_settings.replace(jobs={"preview_every": 2}), plugins=(plugin,))

    async def previews(job_id: str) -> list[np.ndarray]:
        events = only_events(await read_events(await client.get(f"{JOBS}/{job_id}/events", headers=auth())))
        return [pixels(data_url_png(e["data"]["preview"])) for e in events if "preview" in e.get("data", {})]

    bodies = [{"prompt": "a fox", "seed": seed, "steps": 2, "width": 128, "height": 128, "preview": True} for seed in (1, 2)]
    # Keep the device busy, so that both jobs wait and then share one pipeline call.
    blocker = asyncio.create_task(client.post("/imagine/generate", json={"prompt": "busy", "model": "slow", "steps": 15}, headers=auth()))
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    together = [(await submit(client, body))[1]["id"] for body in bodies]
    await blocker
    batched = [await previews(job_id) for job_id in together]
    alone = []
    for body in bodies:
        alone.append(await previews((await submit(client, body))[1]["id"]))
    for batched_previews, alone_previews in zip(batched, alone, strict=True):
        assert len(batched_previews) == len(alone_previews) == 1
        assert_same_image(batched_previews[0], alone_previews[0])
    assert not np.array_equal(batched[0][0], batched[1][0])
