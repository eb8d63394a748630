"""Pending webhook deliveries, kept where the jobs live, so a restart (or a dead replica) loses none.

In one process (`queue.storage = "memory"`) a delivery is a row of
`webhooks.sqlite3` in the state folder, written when its job ends. With a
shared queue, the end of a job with `after_end` fields puts its id in the
zset `imagine:jobs:after_end` in the same Lua step that records the end
(imagine.cluster.scripts), whichever replica ends it; the score is when it is
next due. Any replica's deliverer claims due ids by moving their score a
lease ahead, so a deliverer that dies mid-attempt leaves its deliveries to
another once the lease runs out: delivery is at least once. The first claim
settles what the end asks for (the quota refund, once, guarded by a flag in
the job) and builds the payload, kept with the delivery so every retry sends
the same body under the same `webhook-id`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as redis

from imagine.cluster import keys
from imagine.storage.sqlite_thread import SqliteThread

log = logging.getLogger(__name__)

DATABASE_FILE = "webhooks.sqlite3"
DELIVERY_PREFIX = keys.PREFIX + "webhooks:delivery:"

T = TypeVar("T")


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    message_id: str
    body: str
    attempts: int  # made so far
    owner: str  # the job's caller ("" for a delivery stored before deliveries kept it)


class Outbox(Protocol):
    async def claim(self, lease_s: float, limit: int) -> list[Delivery]:
        """Deliveries due now, each held for `lease_s` (another deliverer takes it after that)."""

    async def delivered(self, delivery: Delivery) -> None: ...

    async def retry_at(self, delivery: Delivery, attempts: int, at: float) -> None:
        """`attempts` made so far; the next one is due at `at` (unix time)."""

    async def give_up(self, delivery: Delivery) -> None: ...


_SCHEMA = """CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY, url TEXT NOT NULL, message_id TEXT NOT NULL, body TEXT NOT NULL,
    attempts INTEGER NOT NULL, next_at REAL NOT NULL, owner TEXT NOT NULL DEFAULT '')"""


def _with_owner_column(connection: sqlite3.Connection) -> None:
    """An outbox written before deliveries kept their caller gains the column; its rows keep ""."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(deliveries)")}
    if "owner" not in columns:
        connection.execute("ALTER TABLE deliveries ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


class SqliteOutbox:
    """The embedded outbox: one row per pending delivery, on a thread that owns the connection."""

    def __init__(self, folder: Path) -> None:
        self._database = SqliteThread(folder / DATABASE_FILE, [_SCHEMA], "imagine-webhooks", prepare=_with_owner_column)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._database.call(work)

    async def add(self, delivery: Delivery) -> None:
        """Due at once; a job's delivery is added once, whatever calls this again."""
        await self._call(
            lambda connection: connection.execute(
                "INSERT OR IGNORE INTO deliveries (job_id, url, message_id, body, attempts, next_at, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    delivery.job_id, delivery.url, delivery.message_id, delivery.body, delivery.attempts, time.time(),
                    delivery.owner,
                ),
            )
        )

    async def claim(self, lease_s: float, limit: int) -> list[Delivery]:
        def claim(connection: sqlite3.Connection) -> list[Delivery]:
            now = time.time()
            rows = connection.execute(
                "SELECT job_id, url, message_id, body, attempts, owner FROM deliveries WHERE next_at <= ?"
                " ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            connection.executemany(
                "UPDATE deliveries SET next_at = ? WHERE job_id = ?", [(now + lease_s, row[0]) for row in rows]
            )
            return [Delivery(*row) for row in rows]

        return await self._call(claim)

    async def delivered(self, delivery: Delivery) -> None:
        await self._call(lambda connection: connection.execute("DELETE FROM deliveries WHERE job_id = ?", (delivery.job_id,)))

    async def retry_at(self, delivery: Delivery, attempts: int, at: float) -> None:
        await self._call(
            lambda connection: connection.execute(
                "UPDATE deliveries SET attempts = ?, next_at = ? WHERE job_id = ?", (attempts, at, delivery.job_id)
            )
        )

    async def give_up(self, delivery: Delivery) -> None:
        await self.delivered(delivery)

    async def close(self) -> None:
        await self._database.close()


# KEYS: the after-end zset. ARGV: now, lease seconds, limit. Returns the ids due now, each moved a lease ahead.
CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, job_id in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), job_id)
end
return due
"""

# A job's snapshot from its owner and id, as GET /jobs/{id} answers it.
Snapshot = Callable[[str, str], Awaitable[dict[str, Any]]]
# What the end of a job asks for besides its webhook (a quota refund): (owner, snapshot, after_end).
Settle = Callable[[str, dict[str, Any], Mapping[str, str]], Awaitable[None]]
# The delivery a job's end makes, or None when it has no webhook: (owner, snapshot, after_end).
Prepare = Callable[[str, dict[str, Any], Mapping[str, str]], Delivery | None]


class RedisOutbox:
    """The shared queue's outbox: the ids in keys.AFTER_END, each with a delivery hash once first claimed."""

    def __init__(self, client: redis.Redis, *, snapshot: Snapshot, settle: Settle, prepare: Prepare, keep_s: float) -> None:
        self._client = client
        self._claim = client.register_script(CLAIM)
        self._snapshot = snapshot
        self._settle = settle
        self._prepare = prepare
        self._keep_s = int(keep_s)

    async def claim(self, lease_s: float, limit: int) -> list[Delivery]:
        due = await self._claim(keys=[keys.AFTER_END], args=[time.time(), lease_s, limit])
        found = []
        for raw in due:
            job_id = raw.decode()
            try:
                delivery = await self._delivery(job_id)
            except Exception:
                # One job's bad record must not hold up the others: it is tried again after its lease.
                log.exception("could not follow up the end of job %s", job_id)
                continue
            if delivery is None:
                await self._client.zrem(keys.AFTER_END, job_id)
            else:
                found.append(delivery)
        return found

    async def _delivery(self, job_id: str) -> Delivery | None:
        stored = await self._client.hgetall(DELIVERY_PREFIX + job_id)
        if stored:
            return Delivery(
                job_id, stored[b"url"].decode(), stored[b"message_id"].decode(), stored[b"body"].decode(),
                int(stored[b"attempts"]), stored.get(b"owner", b"").decode(),
            )
        job = keys.job(job_id)
        owner, after_end = await self._client.hmget(job, ["owner", "after_end"])
        if owner is None or after_end is None:
            log.warning("job %s expired before what follows its end could run", job_id)
            return None
        fields = json.loads(after_end)
        snapshot = await self._snapshot(owner.decode(), job_id)
        # Once per job, whichever deliverer gets here first (or again, after a crash).
        if await self._client.hsetnx(job, "after_end_settled", "1"):
            await self._settle(owner.decode(), snapshot, fields)
        delivery = self._prepare(owner.decode(), snapshot, fields)
        if delivery is not None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    DELIVERY_PREFIX + job_id,
                    mapping={
                        "url": delivery.url, "message_id": delivery.message_id, "body": delivery.body, "attempts": 0,
                        "owner": delivery.owner,
                    },
                )
                pipe.expire(DELIVERY_PREFIX + job_id, self._keep_s)
                await pipe.execute()
        return delivery

    async def delivered(self, delivery: Delivery) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.AFTER_END, delivery.job_id)
            pipe.delete(DELIVERY_PREFIX + delivery.job_id)
            await pipe.execute()

    async def retry_at(self, delivery: Delivery, attempts: int, at: float) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(DELIVERY_PREFIX + delivery.job_id, "attempts", attempts)
            pipe.zadd(keys.AFTER_END, {delivery.job_id: at}, xx=True)
            await pipe.execute()

    async def give_up(self, delivery: Delivery) -> None:
        await self.delivered(delivery)
