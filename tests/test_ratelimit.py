"""Token buckets: burst, refusal, headers, proxies, and no overshoot under concurrency."""

from __future__ import annotations

import asyncio

from imagine.security.ratelimit import client_ip, parse_networks
from imagine.settings import RateLimitSettings
from tests.conftest import auth

# A refill this slow keeps the counts exact however long a test takes.
SLOW = 0.001


def limited(settings, **buckets):
    values = {"global_burst": 10_000, "ip_burst": 10_000, "subject_burst": 10_000, **buckets}
    values.setdefault("global_rate", SLOW)
    values.setdefault("ip_rate", SLOW)
    values.setdefault("subject_rate", SLOW)
    return settings.replace(ratelimit=values)


def test_contract_defaults_are_ten_per_second_with_a_burst_of_25() -> None:
    defaults = RateLimitSettings()
    for bucket in ("global", "ip", "subject"):
        assert getattr(defaults, f"{bucket}_rate") == 10.0
        assert getattr(defaults, f"{bucket}_burst") == 25


async def test_a_burst_of_25_passes_and_the_26th_is_refused(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=25))
    headers = auth()
    for number in range(25):
        response = await client.get("/imagine/health", headers=headers)
        assert response.status == 200, number
        assert response.headers["RateLimit-Limit"] == "25"
        assert response.headers["RateLimit-Remaining"] == str(24 - number)
    refused = await client.get("/imagine/health", headers=headers)
    assert refused.status == 429
    body = await refused.json()
    assert body["detail"] == "Rate limit exceeded"
    assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"


async def test_retry_after_follows_the_refill_rate(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=1, ip_rate=0.25))
    assert (await client.get("/imagine/health", headers=auth())).status == 200
    refused = await client.get("/imagine/health", headers=auth())
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "4"


async def test_liveness_is_never_limited(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=1))
    for _ in range(5):
        assert (await client.get("/imagine/livez")).status == 200


async def test_flood_is_refused_before_token_verification(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=2))
    statuses = [(await client.get("/imagine/health", headers={"Authorization": "Bearer junk"})).status for _ in range(4)]
    assert statuses == [401, 401, 429, 429]


async def test_each_subject_has_its_own_bucket(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, subject_burst=3))
    alice = [(await client.get("/imagine/health", headers=auth("alice"))).status for _ in range(4)]
    assert alice == [200, 200, 200, 429]
    assert (await client.get("/imagine/health", headers=auth("bob"))).status == 200


async def test_client_sent_forwarded_for_does_not_dodge_the_limit(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=5))
    statuses = []
    for number in range(7):
        response = await client.get(
            "/imagine/health", headers={**auth(), "X-Forwarded-For": f"203.0.113.{number}"}
        )
        statuses.append(response.status)
    assert statuses == [200] * 5 + [429] * 2


async def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(make_client, base_settings) -> None:
    settings = limited(base_settings, ip_burst=2).replace(server={"trusted_proxies": ("127.0.0.1", "::1")})
    client = await make_client(settings)

    async def status_for(forwarded_for: str) -> int:
        response = await client.get("/imagine/health", headers={**auth(), "X-Forwarded-For": forwarded_for})
        return response.status

    assert [await status_for("198.51.100.7") for _ in range(3)] == [200, 200, 429]
    # Another client behind the same proxy has its own bucket.
    assert await status_for("198.51.100.8") == 200
    # A spoofed entry to the left of what the proxy appended changes nothing.
    assert await status_for("1.2.3.4, 198.51.100.7") == 429
    # An IPv6 client is its /64: rotating through its own addresses gets no fresh bucket.
    assert [await status_for(f"2001:db8:1:2::{number:x}") for number in range(1, 4)] == [200, 200, 429]
    assert await status_for("2001:db8:1:3::1") == 200


async def test_concurrent_requests_cannot_overshoot_the_bucket(make_client, base_settings) -> None:
    client = await make_client(limited(base_settings, ip_burst=25))
    responses = await asyncio.gather(*(client.get("/imagine/health", headers=auth()) for _ in range(60)))
    statuses = [response.status for response in responses]
    assert statuses.count(200) == 25
    assert statuses.count(429) == 35


def test_an_ipv6_client_is_its_64_and_a_mapped_ipv4_one_its_address() -> None:
    from imagine.security.ratelimit import client_key

    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    # Through a dual-stack socket every IPv4 client is ::ffff:a.b.c.d: each keeps a bucket of its own.
    assert client_key("::ffff:1.2.3.4") == "1.2.3.4" != client_key("::ffff:5.6.7.8")
    assert client_key("::1") == "::1" and client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("198.51.100.7") == "198.51.100.7"


def test_client_ip_walks_forwarded_for_from_the_right() -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_ip("203.0.113.9", "1.1.1.1", trusted) == "203.0.113.9"  # untrusted peer: header ignored
    assert client_ip("10.0.0.2", "1.1.1.1, 198.51.100.4", trusted) == "198.51.100.4"
    assert client_ip("10.0.0.2", "198.51.100.4, 10.0.0.9", trusted) == "198.51.100.4"  # two proxy hops
    assert client_ip("10.0.0.2", None, trusted) == "10.0.0.2"
