"""Token buckets in Redis, shared by every replica that names the same server.

A take is one round trip: a Lua script refills the bucket by the time elapsed
on the Redis server's own clock (replicas' clocks never enter into it), takes
the cost if the tokens are there, and answers allowed/remaining/reset/retry.
Redis runs a script atomically, so N replicas together never admit more than
one bucket allows. A bucket's key expires when it would be full again:
absent means full, so idle clients cost no memory.

When Redis cannot be reached the store says so (`BucketStoreUnavailable`)
and does not try again for a moment, so an outage costs each request nothing
but a flag check; the limiter decides what to do (`ratelimit.redis_failure`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from imagine.security.ratelimit import BucketDecision, BucketSpec, BucketStoreUnavailable
from imagine.settings import RateLimitSettings

log = logging.getLogger(__name__)

KEY_PREFIX = "imagine:ratelimit:"
# After a failure, how long requests skip Redis before one tries it again;
# also the Retry-After of a refusal while failing closed.
RECHECK_S = 2.0

# KEYS[1]: the bucket. ARGV: rate (tokens/s), burst, cost.
# Returns {allowed (0/1), tokens left, seconds until full, seconds until `cost` is there};
# fractions travel as strings because Redis truncates Lua numbers to integers.
TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = burst
  updated = now
end
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
local reset = (burst - tokens) / rate
if reset <= 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(reset * 1000))
end
local retry = 0
if allowed == 0 then
  retry = (cost - tokens) / rate
end
return {allowed, tostring(tokens), tostring(reset), tostring(retry)}
"""


def _where(url: str) -> str:
    """host:port (or socket path) of a Redis URL, never its password: safe for logs and /health."""
    with contextlib.suppress(ValueError):
        kwargs = parse_url(url)
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return "the configured server"


class RedisBucketStore:
    def __init__(self, client: redis.Redis, where: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._script = client.register_script(TAKE_SCRIPT)
        self._where = where
        self._clock = clock
        self._problem: str | None = None
        self._skip_until = 0.0

    def problem(self) -> str | None:
        return self._problem

    async def take(self, key: str, spec: BucketSpec, cost: float) -> BucketDecision:
        if self._problem is not None and self._clock() < self._skip_until:
            raise BucketStoreUnavailable(self._problem, self._skip_until - self._clock())
        try:
            answer = await self._script(keys=[KEY_PREFIX + key], args=[spec.rate, spec.burst, cost])
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            raise BucketStoreUnavailable(self._problem or "", RECHECK_S) from None
        if self._problem is not None:
            log.warning("rate-limit store %s answers again; shared buckets are back", self._where)
            self._problem = None
        allowed, tokens, reset, retry = answer
        return BucketDecision(
            bucket=spec.name,
            allowed=bool(allowed),
            limit=spec.burst,
            remaining=int(float(tokens)),
            reset_s=float(reset),
            retry_after_s=float(retry),
        )

    def _failed(self, error: BaseException) -> None:
        # The error's class, not its text: some messages quote the URL, and URLs can carry passwords.
        problem = f"rate-limit store (Redis at {self._where}) unreachable: {type(error).__name__}"
        if problem != self._problem:
            log.error("%s; ratelimit.redis_failure decides what requests get", problem)
        self._problem = problem
        self._skip_until = self._clock() + RECHECK_S


@contextlib.asynccontextmanager
async def redis_bucket_store(settings: RateLimitSettings) -> AsyncIterator[RedisBucketStore]:
    """A client for `ratelimit.storage` for the app's lifetime; no connection is made until the first take."""
    timeout = settings.redis_timeout_s
    client = redis.Redis.from_url(
        settings.storage,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One immediate retry replaces a pooled connection that Redis closed
        # (a restart); more would multiply the timeout on every request.
        retry=Retry(NoBackoff(), 1),
    )
    try:
        yield RedisBucketStore(client, _where(settings.storage))
    finally:
        await client.aclose()
