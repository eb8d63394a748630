"""Token buckets (rate + burst) keyed by scope, and who the client really is.

aiohttp-ratelimiter is not used: it keys on any client's X-Forwarded-For, counts
a moving window instead of refilling a bucket with a burst, and tests then hits
its counter in two steps, so concurrent requests can overshoot. Here a take is
one step: the in-memory store never awaits inside it, so on the event loop it is
atomic, and the store interface is what the shared store (`imagine.security.redis_buckets`)
implements too.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imagine.errors import ApiError
from imagine.settings import RateLimitSettings
from imagine.engine.telemetry import NO_TELEMETRY, Telemetry

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BucketSpec:
    name: str  # "global", "ip" or "subject": shows in logs and metrics
    rate: float  # tokens added per second
    burst: int  # bucket size


@dataclass(frozen=True)
class BucketDecision:
    bucket: str
    allowed: bool
    limit: int
    remaining: int
    # Seconds until the bucket is full again, and until `cost` tokens are there.
    reset_s: float
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class BucketStoreUnavailable(Exception):
    """The store cannot answer now (a shared store lost its server)."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class BucketStore(Protocol):
    async def take(self, key: str, spec: BucketSpec, cost: float) -> BucketDecision:
        """Take `cost` tokens if the bucket holds them; never partly. May raise BucketStoreUnavailable."""

    def problem(self) -> str | None:
        """Why the store cannot answer right now, for /health; None while it can."""


class MemoryBucketStore:
    """Buckets in this process. Full buckets are forgotten, since absent means full."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated_at)

    async def take(self, key: str, spec: BucketSpec, cost: float) -> BucketDecision:
        now = self._clock()
        tokens, updated = self._buckets.get(key, (float(spec.burst), now))
        tokens = min(float(spec.burst), tokens + (now - updated) * spec.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._forget_full(now, spec)
        return BucketDecision(
            bucket=spec.name,
            allowed=allowed,
            limit=spec.burst,
            remaining=int(tokens),
            reset_s=(spec.burst - tokens) / spec.rate,
            retry_after_s=0.0 if allowed else (cost - tokens) / spec.rate,
        )

    def problem(self) -> str | None:
        return None  # memory is always there

    def _forget_full(self, now: float, spec: BucketSpec) -> None:
        idle_enough = spec.burst / spec.rate
        self._buckets = {key: value for key, value in self._buckets.items() if now - value[1] < idle_enough}


# Route annotation: the route keeps answering (on this process's own buckets)
# while a shared store is down, even when the limiter fails closed, so that
# /health can say why everything else is refused.
OPERATIONAL_ATTRIBUTE = "__imagine_operational__"
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def operational(handler: H) -> H:
    """Mark a route that operators need most while the shared rate-limit store is down."""
    setattr(handler, OPERATIONAL_ATTRIBUTE, True)
    return handler


class RateLimiter:
    """The three buckets of the contract: global and per IP before auth, per subject after.

    When the store is unavailable, `ratelimit.redis_failure` decides: "closed"
    refuses with 503 (operational routes excepted), "local" counts in this
    process's own buckets until the store is back.
    """

    def __init__(self, settings: RateLimitSettings, store: BucketStore, telemetry: Telemetry = NO_TELEMETRY) -> None:
        self.enabled = settings.enabled
        self._store = store
        self._local = MemoryBucketStore()
        self._fail_closed = settings.redis_failure == "closed"
        self._telemetry = telemetry
        self._global = BucketSpec("global", settings.global_rate, settings.global_burst)
        self._ip = BucketSpec("ip", settings.ip_rate, settings.ip_burst)
        self._subject = BucketSpec("subject", settings.subject_rate, settings.subject_burst)

    def problem(self) -> str | None:
        """Why the limiter is not counting as configured (its store is down), or None."""
        return self._store.problem()

    async def _take(self, key: str, spec: BucketSpec, cost: float, operational: bool) -> BucketDecision:
        try:
            decision = await self._store.take(key, spec, cost)
        except BucketStoreUnavailable as unavailable:
            if self._fail_closed and not operational:
                raise ApiError(
                    503,
                    "SERVICE_UNAVAILABLE",
                    "Rate limiting is unavailable, so requests are refused; retry later",
                    headers={"Retry-After": str(max(1, math.ceil(unavailable.retry_after_s)))},
                ) from None
            decision = await self._local.take(key, spec, cost)
        if not decision.allowed:
            self._telemetry.rate_limited(spec.name)
        return decision

    async def before_auth(self, client_ip: str, *, operational: bool = False) -> list[BucketDecision]:
        # The client's own bucket first: a flooding client is stopped without
        # draining the global bucket that everyone else shares.
        decisions = [await self._take(f"ip:{client_key(client_ip)}", self._ip, 1, operational)]
        if decisions[0].allowed:
            decisions.append(await self._take("global", self._global, 1, operational))
        return decisions

    async def for_subject(self, sub: str, cost: float = 1, *, operational: bool = False) -> BucketDecision:
        return await self._take(f"sub:{sub}", self._subject, cost, operational)


def client_key(client_ip: str) -> str:
    """The per-IP bucket's key: the address, or for IPv6 its /64. One subscriber holds a whole /64
    (2^64 addresses to rotate through), so a bucket per IPv6 address would be a bucket per request.
    An IPv4 client seen through a dual-stack socket (`::ffff:1.2.3.4`) is its IPv4 address."""
    if ":" not in client_ip:
        return client_ip
    try:
        address = ipaddress.IPv6Address(client_ip.partition("%")[0])
    except ValueError:
        return client_ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.is_loopback:
        return str(address)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def most_restrictive(decisions: Iterable[BucketDecision]) -> BucketDecision | None:
    """The decision whose headers a client should see: a refusal, else the emptiest bucket."""
    ordered = sorted(decisions, key=lambda decision: (decision.allowed, decision.remaining))
    return ordered[0] if ordered else None


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def is_trusted(address: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    """True when `address` (a TCP peer, say) is one of the trusted proxies."""
    return address is not None and _is_trusted(address, trusted)


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def is_trusted_proxy(peer: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    """Whether the TCP peer's forwarding headers (X-Forwarded-*) may be believed."""
    return peer is not None and _is_trusted(peer, trusted)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The TCP peer, unless it is a trusted proxy: then the right-most untrusted hop.

    Walking from the right means a client that sends its own X-Forwarded-For only
    adds entries to the left of what our proxy appended, which are never reached.
    """
    peer = peer or "unknown"
    if not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer
