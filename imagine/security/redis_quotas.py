"""Quota counters in Redis (`ratelimit.storage = "redis://..."`), shared by every replica.

One hash per subject and window (`imagine:quota:<digest>:d2026-12-01`,
`...:m2026-12`), a field per model plus `*` for all of them. A charge is one
Lua script: it reads every counter that a limit applies to, and counts the
images only if all have room, so replicas charging at once never admit more
than a quota. Each hash expires a little after its window ends.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from imagine.errors import ApiError
from imagine.security.quotas import TOTAL, WINDOW_GRACE_S, Applied, Charge, Counts, Windows
from imagine.settings import RateLimitSettings

KEY_PREFIX = "imagine:quota:"
RETRY_AFTER_S = 2

# KEYS: the day hash, the month hash. ARGV: model, images, day limit, month limit, model day limit,
# model month limit (0 = none), day expiry, month expiry (unix seconds).
# Returns {counted (0/1), day, month, model day, model month}: the counts after counting, or as they were.
CHARGE = """
local model, cost = ARGV[1], tonumber(ARGV[2])
local day = tonumber(redis.call('HGET', KEYS[1], '*') or '0')
local month = tonumber(redis.call('HGET', KEYS[2], '*') or '0')
local model_day = tonumber(redis.call('HGET', KEYS[1], model) or '0')
local model_month = tonumber(redis.call('HGET', KEYS[2], model) or '0')
local used = {day, month, model_day, model_month}
for index = 1, 4 do
  local limit = tonumber(ARGV[index + 2])
  if limit > 0 and used[index] + cost > limit then
    return {0, day, month, model_day, model_month}
  end
end
day = redis.call('HINCRBY', KEYS[1], '*', cost)
model_day = redis.call('HINCRBY', KEYS[1], model, cost)
month = redis.call('HINCRBY', KEYS[2], '*', cost)
model_month = redis.call('HINCRBY', KEYS[2], model, cost)
redis.call('EXPIREAT', KEYS[1], ARGV[7])
redis.call('EXPIREAT', KEYS[2], ARGV[8])
return {1, day, month, model_day, model_month}
"""

# KEYS: the day hash, the month hash of the charge. ARGV: model, images.
# A window that expired meanwhile stays gone; counters never go below zero.
REFUND = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    for _, field in ipairs({'*', ARGV[1]}) do
      local left = redis.call('HINCRBY', key, field, -tonumber(ARGV[2]))
      if left < 0 then redis.call('HSET', key, field, 0) end
    end
  end
end
return 1
"""


def _key(sub: str, window: str) -> str:
    # Subjects come from tokens: a digest keeps key names short and plain.
    return f"{KEY_PREFIX}{hashlib.sha256(sub.encode()).hexdigest()[:24]}:{window}"


def unavailable() -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        "Quotas cannot be counted now (their store is unreachable), retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class RedisQuotaStore:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._charge = client.register_script(CHARGE)
        self._refund = client.register_script(REFUND)

    async def charge(self, sub: str, model: str, images: int, at: Windows, applied: Applied) -> tuple[bool, Counts]:
        try:
            counted, *counts = await self._charge(
                keys=[_key(sub, at.day), _key(sub, at.month)],
                args=[
                    model, images, applied.total.day, applied.total.month, applied.model.day, applied.model.month,
                    int(at.day_ends_at + WINDOW_GRACE_S), int(at.month_ends_at + WINDOW_GRACE_S),
                ],
            )
        except RedisError:
            raise unavailable() from None
        return bool(counted), Counts(*(int(count) for count in counts))

    async def refund(self, charge: Charge) -> None:
        await self._refund(keys=[_key(charge.sub, charge.day), _key(charge.sub, charge.month)], args=[charge.model, charge.images])

    async def usage(self, sub: str, at: Windows) -> tuple[dict[str, int], dict[str, int]]:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(_key(sub, at.day))
                pipe.hgetall(_key(sub, at.month))
                day, month = await pipe.execute()
        except RedisError:
            raise unavailable() from None
        return _ints(day), _ints(month)


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    counted = {name.decode(): int(value) for name, value in raw.items()}
    counted.setdefault(TOTAL, 0)
    return counted


@contextlib.asynccontextmanager
async def redis_quota_store(settings: RateLimitSettings) -> AsyncIterator[RedisQuotaStore]:
    """A client for `ratelimit.storage` for the app's lifetime."""
    client = redis.Redis.from_url(
        settings.storage,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
    try:
        yield RedisQuotaStore(client)
    finally:
        await client.aclose()
