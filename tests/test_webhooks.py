"""Webhooks: signed (verified with the `standardwebhooks` package), retried with backoff, kept across a restart,
never aimed at the service's own network. The receiver is a real aiohttp server on a loopback port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from standardwebhooks.webhooks import Webhook

from imagine.http.app import create_app
from imagine.settings import Settings
from tests.conftest import KEYS, auth
from tests.processes import RedisServer, redis_server
from tests.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
BODY = {"prompt": "a lighthouse", "model": "sdxl", "width": 64, "height": 64, "steps": 2, "seed": 5, "response_format": "json"}
BACKOFF_S = 0.3


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver(fail_first=2)
    await server.start()
    yield server
    await server.stop()


def hooked(settings: Settings, hosts: tuple[str, ...] = ("127.0.0.1",), **values: Any) -> Settings:
    return settings.replace(
        webhooks={"allowed_hosts": hosts, "secret": SECRET, "backoff_s": BACKOFF_S, "timeout_s": 2.0, **values}
    )


async def submit(client: Any, url: str, **extra: Any) -> Any:
    return await client.post("/imagine/jobs", json={**BODY, "webhook_url": url, **extra}, headers=auth())


async def test_fails_twice_then_one_signed_delivery_with_gallery_links_and_spaced_retries(
    make_client: Any, base_settings: Settings, receiver: Receiver
) -> None:
    client = await make_client(hooked(base_settings))
    response = await submit(client, receiver.url)
    assert response.status == 202, await response.text()
    job_id = (await response.json())["id"]
    await receiver.wait_for(3)
    await asyncio.sleep(BACKOFF_S * 4)
    assert [entry.status for entry in receiver.received] == [500, 500, 200]
    (accepted,) = receiver.accepted
    payload = Webhook(SECRET).verify(accepted.body, accepted.headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    assert payload["timestamp"].endswith("Z")
    # The same message id on every attempt, so the receiver can drop repeats.
    assert len({entry.headers["webhook-id"] for entry in receiver.received}) == 1
    # Retries wait backoff_s, then twice that.
    first, second, third = (entry.at for entry in receiver.received)
    assert second - first >= BACKOFF_S * 0.9 and third - second >= BACKOFF_S * 1.8
    # Images are signed gallery links, not base64, and fetch without a token.
    result = payload["data"]["result"]
    (link,) = result["images"]
    assert link.startswith("http://") and f"/imagine/gallery/{result['ids'][0]}.png?" in link
    image = await client.get("/imagine" + link.split("/imagine", 1)[1])
    assert image.status == 200 and (await image.read()).startswith(b"\x89PNG")
    text = await (await client.get("/imagine/metrics", headers=auth(scope="metrics"))).text()
    assert 'imagine_webhook_attempts_total{outcome="http_error"} 2.0' in text
    assert 'imagine_webhook_deliveries_total{outcome="delivered"} 1.0' in text


async def test_the_images_of_a_late_attempt_still_open_for_the_link_lifetime(
    make_client: Any, base_settings: Settings, receiver: Receiver
) -> None:
    # Attempts at 0, 1 and 3 s after the job ends; links live 2 s. Signed for the first attempt,
    # the third would deliver links dead a second already.
    settings = hooked(base_settings, backoff_s=1.0).replace(gallery={"url_ttl_s": 2})
    client = await make_client(settings)
    assert (await submit(client, receiver.url)).status == 202
    await receiver.wait_for(3)
    (accepted,) = receiver.accepted
    (link,) = Webhook(SECRET).verify(accepted.body, accepted.headers)["data"]["result"]["images"]
    image = await client.get("/imagine" + link.split("/imagine", 1)[1])
    assert image.status == 200 and (await image.read()).startswith(b"\x89PNG")


async def test_a_receiver_named_by_host_name_is_resolved_and_delivered_to(
    make_client: Any, base_settings: Settings, receiver: Receiver
) -> None:
    """A name, not an address: each attempt resolves it (through the guard) on the lookup threads."""
    receiver.fail_first = 0
    client = await make_client(hooked(base_settings, hosts=("localhost",)))
    response = await submit(client, f"http://localhost:{receiver.port}/hook")
    assert response.status == 202, await response.text()
    await receiver.wait_for(1)
    (accepted,) = receiver.accepted
    assert Webhook(SECRET).verify(accepted.body, accepted.headers)["data"]["id"] == (await response.json())["id"]


@pytest.mark.parametrize("kept_before_owners", [False, True])
async def test_a_pending_delivery_resumes_after_a_restart(
    aiohttp_client: Any, base_settings: Settings, receiver: Receiver, kept_before_owners: bool
) -> None:
    receiver.fail_first = 1000
    settings = hooked(base_settings)
    first = await aiohttp_client(create_app(settings, keys=KEYS))
    response = await submit(first, receiver.url)
    assert response.status == 202
    job_id = (await response.json())["id"]
    await receiver.wait_for(1)
    await first.close()
    if kept_before_owners:  # an outbox written by a version whose deliveries did not name their caller
        with contextlib.closing(sqlite3.connect(Path(settings.server.state_dir) / "webhooks.sqlite3")) as outbox:
            outbox.execute("ALTER TABLE deliveries DROP COLUMN owner")
            outbox.commit()
    refused = len(receiver.received)
    receiver.fail_first = refused  # accepts from now on
    await aiohttp_client(create_app(settings, keys=KEYS))
    await receiver.wait_for(refused + 1)
    (accepted,) = receiver.accepted
    assert Webhook(SECRET).verify(accepted.body, accepted.headers)["data"]["id"] == job_id


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://localhost:9/hook",  # a name that resolves to loopback
        "http://[::1]:9/hook",
        # IPv6 forms that lead to a private or metadata IPv4 address: NAT64, its local-use prefix,
        # IPv4-compatible, 6to4.
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
        "http://[64:ff9b::a00:1]/hook",
        "http://[64:ff9b:1::a9fe:a9fe]/hook",
        "http://[::a9fe:a9fe]/hook",
        "http://[2002:a9fe:a9fe::1]/hook",
        "http://[::ffff:0:7f00:1]/hook",  # IPv4-translated (SIIT) 127.0.0.1
        "http://[fec0::1]/hook",  # site-local, deprecated and never public
        "ftp://hooks.example.com/hook",
        "http://user:secret@hooks.example.com/hook",
        "http://hooks.example.com:0/hook",
        # Names no resolver can be asked for: an empty label, one over 63 characters.
        "http://a..example.com/hook",
        "http://.example.com/hook",
        f"http://{'a' * 64}.example.com/hook",
    ],
)
async def test_forbidden_targets_are_refused_at_submission(make_client: Any, base_settings: Settings, url: str) -> None:
    client = await make_client(hooked(base_settings, hosts=("*",)))
    response = await submit(client, url)
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["details"]["errors"][0]["loc"] == ["body", "webhook_url"]
    # What a name resolves to is the service's network's business: never told.
    assert "127.0.0.1" not in body["detail"] or "127.0.0.1" in url


async def test_webhooks_are_off_until_hosts_are_listed_and_need_stored_images(
    make_client: Any, base_settings: Settings, receiver: Receiver
) -> None:
    off = await make_client(base_settings)
    response = await submit(off, receiver.url)
    assert response.status == 400 and "off" in (await response.json())["detail"]
    on = await make_client(hooked(base_settings))
    assert (await submit(on, receiver.url, store=False)).status == 400
    assert (await submit(on, "http://127.0.0.2/hook")).status == 400  # not listed
    # /generate has no webhook_url field.
    assert (await on.post("/imagine/generate", json={**BODY, "webhook_url": receiver.url}, headers=auth())).status == 400


async def test_a_receiver_that_stalls_holds_a_few_delivery_slots_not_all(
    make_client: Any, base_settings: Settings, receiver: Receiver, aiohttp_server: Any
) -> None:
    from aiohttp import web

    from imagine.webhooks.deliverer import PER_RECEIVER

    held, most, served, released = [], [0], [], asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        held.append(request)
        most[0] = max(most[0], len(held))
        await released.wait()
        held.remove(request)
        served.append(request.headers["webhook-id"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", stall)
    stalling = await aiohttp_server(app)
    receiver.fail_first = 0
    client = await make_client(hooked(base_settings, timeout_s=30.0))
    stalled = PER_RECEIVER + 2
    # One receiver however its port is spelt (080 is 80): a caller cannot spread it over more slots.
    for index in range(stalled):
        spelt = f"http://127.0.0.1:{'0' * (index % 3)}{stalling.port}/hook"
        assert (await submit(client, spelt)).status == 202
    assert (await submit(client, receiver.url)).status == 202
    # Another receiver is served while the stalling one holds its share of the slots, and no more.
    await receiver.wait_for(1)
    assert len(held) == PER_RECEIVER and most[0] == PER_RECEIVER
    # The ones kept back go once it answers, each once, no attempt spent on waiting.
    released.set()
    for _ in range(200):
        if len(served) == stalled:
            break
        await asyncio.sleep(0.05)
    assert len(set(served)) == len(served) == stalled and most[0] == PER_RECEIVER


async def test_one_callers_stalling_receivers_hold_part_of_the_delivery_slots_not_all(
    make_client: Any, base_settings: Settings, receiver: Receiver, aiohttp_server: Any
) -> None:
    from aiohttp import web

    from imagine.webhooks.deliverer import PER_CALLER, PER_RECEIVER

    held, most, released = [0], [0], asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        held[0] += 1
        most[0] = max(most[0], held[0])
        await released.wait()
        held[0] -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", stall)
    stalling = [await aiohttp_server(app) for _ in range(3)]  # three receivers of mallory's own
    receiver.fail_first = 0
    client = await make_client(hooked(base_settings, timeout_s=30.0))
    for server in stalling:
        for _ in range(PER_RECEIVER):
            response = await client.post(
                "/imagine/jobs", json={**BODY, "webhook_url": str(server.make_url("/hook"))}, headers=auth("mallory")
            )
            assert response.status == 202
    async with asyncio.timeout(30):
        while held[0] < PER_CALLER:
            await asyncio.sleep(0.05)
    assert (await submit(client, receiver.url)).status == 202  # alice's, to a receiver that answers
    await receiver.wait_for(1)
    assert most[0] == PER_CALLER < 3 * PER_RECEIVER
    released.set()


async def test_a_redirect_is_not_followed(make_client: Any, base_settings: Settings, receiver: Receiver) -> None:
    receiver.redirect_to = f"http://127.0.0.1:{receiver.port}/landing"
    client = await make_client(hooked(base_settings, max_attempts=2))
    assert (await submit(client, receiver.url)).status == 202
    await receiver.wait_for(2)
    await asyncio.sleep(BACKOFF_S * 3)
    assert len(receiver.received) == 2 and receiver.landed == 0
    text = await (await client.get("/imagine/metrics", headers=auth(scope="metrics"))).text()
    assert 'imagine_webhook_deliveries_total{outcome="gave_up"} 1.0' in text


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def test_with_a_shared_queue_the_replica_that_ends_the_job_need_not_be_the_one_that_delivers(
    aiohttp_client: Any, base_settings: Settings, receiver: Receiver, redis: RedisServer
) -> None:
    redis_sync.Redis.from_url(redis.url).flushall()
    settings = hooked(base_settings).replace(queue={"storage": redis.url, "visibility_timeout_s": 1.0})
    api = await aiohttp_client(create_app(settings, keys=KEYS, role="api"))
    await aiohttp_client(create_app(settings, keys=KEYS))
    response = await submit(api, receiver.url)
    assert response.status == 202
    await receiver.wait_for(3)
    await asyncio.sleep(BACKOFF_S * 4)
    assert [entry.status for entry in receiver.received] == [500, 500, 200]
    payload = json.loads(receiver.accepted[0].body)
    assert Webhook(SECRET).verify(receiver.accepted[0].body, receiver.accepted[0].headers) == payload
    assert payload["data"]["id"] == (await response.json())["id"] and payload["data"]["status"] == "succeeded"
