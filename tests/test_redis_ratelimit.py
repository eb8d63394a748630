"""Buckets shared through a real redis-server: one bucket across replicas, expiry, and Redis going away."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis as redis_sync

from imagine.security import redis_buckets
from imagine.security.ratelimit import BucketSpec
from imagine.security.redis_buckets import KEY_PREFIX, redis_bucket_store
from imagine.settings import RateLimitSettings, SettingsError, load_settings
from tests.conftest import auth
from tests.processes import free_port, redis_server

# A refill this slow keeps the counts exact however long a test takes.
SLOW = 0.001


@pytest.fixture
def redis(tmp_path):
    with redis_server(tmp_path / "redis") as server:
        yield server


def shared(settings, url: str, **values):
    buckets = {"ip_burst": 10_000, "global_burst": 10_000, "subject_burst": 10_000, "ip_rate": SLOW, **values}
    return settings.replace(ratelimit={"storage": url, **buckets})


@pytest.fixture
def quick_recheck(monkeypatch):
    """Let the store try Redis again soon after a failure, so recovery is seen within the test."""
    monkeypatch.setattr(redis_buckets, "RECHECK_S", 0.2)


def test_storage_accepts_redis_urls_only_and_a_known_failure_mode() -> None:
    assert load_settings(None, {"IMAGINE_RATELIMIT_STORAGE": "redis://127.0.0.1:6379/1"}).ratelimit.shared
    with pytest.raises(SettingsError, match="ratelimit.storage"):
        RateLimitSettings(storage="memcached://127.0.0.1")
    with pytest.raises(SettingsError, match="ratelimit.redis_failure"):
        RateLimitSettings(redis_failure="open")


async def test_two_replicas_admit_one_bucket_in_total(make_client, base_settings, redis) -> None:
    settings = shared(base_settings, redis.url, ip_burst=10)
    replicas = [await make_client(settings), await make_client(settings)]
    responses = await asyncio.gather(
        *(replicas[number % 2].get("/imagine/health", headers=auth()) for number in range(16))
    )
    statuses = [response.status for response in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 6
    refused = next(response for response in responses if response.status == 429)
    assert (await refused.json())["error"]["details"]["bucket"] == "ip"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"


async def test_a_bucket_refills_by_redis_time_and_its_key_expires_when_full(redis) -> None:
    spec = BucketSpec("ip", rate=20.0, burst=2)
    async with redis_bucket_store(RateLimitSettings(storage=redis.url)) as store:
        first, second, third = [await store.take("ip:198.51.100.1", spec, 1) for _ in range(3)]
        assert (first.allowed, first.remaining) == (True, 1)
        assert (second.allowed, second.remaining) == (True, 0)
        assert not third.allowed and 0 < third.retry_after_s <= 0.05 + 1e-6
        inspector = redis_sync.Redis.from_url(redis.url)
        # Absent means full: the key lives only until the bucket would be full again (0.1 s here).
        assert 0 < inspector.pttl(KEY_PREFIX + "ip:198.51.100.1") <= 100
        await asyncio.sleep(0.25)
        assert inspector.exists(KEY_PREFIX + "ip:198.51.100.1") == 0
        again = await store.take("ip:198.51.100.1", spec, 1)
        assert (again.allowed, again.remaining) == (True, 1)
        # A cost larger than what is left is refused whole, never taken in part.
        big = await store.take("ip:198.51.100.1", spec, 2)
        assert not big.allowed and big.remaining == 1
        inspector.close()


async def test_redis_down_fails_closed_and_health_says_why(make_client, base_settings, redis, quick_recheck) -> None:
    client = await make_client(shared(base_settings, redis.url))
    admin = auth(scope="admin")
    assert (await client.get("/imagine/models", headers=auth())).status == 200

    redis.stop()
    refused = await client.get("/imagine/models", headers=auth())
    assert refused.status == 503
    body = await refused.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert int(refused.headers["Retry-After"]) >= 1
    # Operators still see why: /health and /metrics answer on local buckets.
    health = await client.get("/imagine/health", headers=auth())
    assert health.status == 200
    report = await health.json()
    assert report["status"] == "degraded"
    assert any("Redis" in reason and "unreachable" in reason for reason in report["reasons"])
    scrape = await (await client.get("/imagine/metrics", headers=admin)).text()
    assert "imagine_ratelimit_store_up 0.0" in scrape

    redis.start()
    await asyncio.sleep(0.3)
    assert (await client.get("/imagine/models", headers=auth())).status == 200
    report = await (await client.get("/imagine/health", headers=auth())).json()
    assert report["status"] == "healthy" and report["reasons"] == []
    assert "imagine_ratelimit_store_up 1.0" in await (await client.get("/imagine/metrics", headers=admin)).text()


async def test_unreachable_redis_can_fall_back_to_local_buckets(make_client, base_settings, caplog) -> None:
    # Nothing listens there, from the start; the URL's password must never show.
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    client = await make_client(shared(base_settings, url, redis_failure="local", ip_burst=3))
    started = time.monotonic()
    health = await client.get("/imagine/health", headers=auth())
    assert health.status == 200
    report = await health.json()
    assert report["status"] == "degraded"
    assert any("unreachable" in reason for reason in report["reasons"])
    statuses = [(await client.get("/imagine/models", headers=auth())).status for _ in range(3)]
    assert statuses == [200, 200, 429]  # the limit still holds, in this process's own buckets
    assert time.monotonic() - started < 5  # an outage costs a flag check, not a timeout per request
    assert "hunter2" not in caplog.text and "hunter2" not in str(report)
