"""The worker's side of the shared queue: take a fair batch, keep it, acknowledge it, or claim a dead worker's.

Entries wait in one Redis stream per subject, all read through one consumer
group. A worker takes entries only when its device is free (`take`), keeps
the ones it runs visibly alive (`keep_alive`: their idle time is reset, so no
one claims them), and acknowledges each once its outcome is stored (`ack`),
which removes it. Entries a worker took and stopped reporting on for
`queue.visibility_timeout_s` are claimed by the next free worker (`claim_stale`);
one that has started `queue.max_attempts` times is handed back as exhausted,
for its job to fail instead of crashing another worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import ResponseError

from imagine.cluster import keys, scripts

# How many subjects one take looks at: past this many, the ones served longest ago come first anyway.
SUBJECTS_PER_TAKE = 64
# How many stale entries one look at a stream considers.
STALE_PER_STREAM = 16


@dataclass(frozen=True)
class Entry:
    """One queued generation, as a worker received it."""

    stream: str
    id: str
    fields: dict[str, bytes]

    def text(self, name: str) -> str:
        return self.fields[name].decode()

    @property
    def job_id(self) -> str:
        return self.text("job")

    @property
    def owner(self) -> str:
        return self.text("owner")

    @property
    def images(self) -> int:
        return int(self.fields["images"])

    @property
    def submitted_at(self) -> float:
        return float(self.fields["submitted_at"])

    @property
    def deadline(self) -> float:
        """Unix time past which the generation fails with TIMEOUT."""
        return float(self.fields["deadline"])


def _fields(flat: Sequence[bytes]) -> dict[str, bytes]:
    return {flat[index].decode(): flat[index + 1] for index in range(0, len(flat), 2)}


def _entries(stream: str, claimed: Iterable[tuple[bytes, dict[bytes, bytes] | None]]) -> list[Entry]:
    """XCLAIM's answer as entries; an entry deleted meanwhile comes back without fields and is skipped."""
    found = []
    for entry_id, fields in claimed:
        if fields:
            found.append(Entry(stream, entry_id.decode(), {name.decode(): value for name, value in fields.items()}))
    return found


class SharedQueue:
    def __init__(self, client: redis.Redis, *, visibility_timeout_s: float, max_attempts: int) -> None:
        self._client = client
        self._visibility_ms = int(visibility_timeout_s * 1000)
        self._max_attempts = max_attempts
        self._take = client.register_script(scripts.TAKE)
        self._ack = client.register_script(scripts.ACK)

    async def take(self, consumer: str, max_images: int) -> list[Entry]:
        """The next batch for `consumer`, up to `max_images` images (the first entry whatever its size); [] when none waits."""
        taken = await self._take(
            keys=[keys.SUBJECTS, keys.WAITING, keys.SERVED, keys.TURN], args=[consumer, max_images, SUBJECTS_PER_TAKE]
        )
        return [Entry(stream.decode(), entry_id.decode(), _fields(fields)) for stream, entry_id, fields in taken]

    async def wait_for_work(self, timeout_s: float) -> None:
        """Block until a submission rings (or `timeout_s` passes); a ring left from earlier returns at once."""
        await self._client.blpop([keys.BELL], timeout=timeout_s)

    async def ack(self, entry: Entry) -> None:
        await self._ack(keys=[entry.stream, keys.STREAMS, keys.SUBJECTS], args=[entry.id])

    async def keep_alive(self, consumer: str, entries: Iterable[Entry]) -> None:
        """Reset the idle time of entries this worker still runs (JUSTID: not counted as another delivery)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xclaim(entry.stream, keys.GROUP, consumer, 0, [entry.id], justid=True)
            await pipe.execute()

    async def release(self, consumer: str, entries: Iterable[Entry]) -> None:
        """Give entries back without running them (this worker is stopping): they look stale at once."""
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xclaim(entry.stream, keys.GROUP, consumer, 0, [entry.id], idle=self._visibility_ms, justid=True)
            await pipe.execute()

    async def claim_stale(self, consumer: str, room: int) -> tuple[list[Entry], list[tuple[Entry, int]]]:
        """Claim entries whose worker went quiet: up to `room` images to run again (room 0: none),
        and every one that has started max_attempts times already, with that count, for its job to fail."""
        runnable: list[Entry] = []
        exhausted: list[tuple[Entry, int]] = []
        for raw_stream in await self._client.smembers(keys.STREAMS):
            stream = raw_stream.decode()
            try:
                pending = await self._client.xpending_range(
                    stream, keys.GROUP, min="-", max="+", count=STALE_PER_STREAM, idle=self._visibility_ms
                )
            except ResponseError:
                continue  # the stream went with its last entry meanwhile
            for info in pending:
                entry_id, deliveries = info["message_id"], info["times_delivered"]
                if deliveries >= self._max_attempts:
                    # Claimed with min-idle: of two replicas looking at once, only one gets it.
                    claimed = await self._client.xclaim(stream, keys.GROUP, consumer, self._visibility_ms, [entry_id])
                    exhausted.extend((entry, deliveries) for entry in _entries(stream, claimed))
                elif room > 0:
                    claimed = await self._client.xclaim(stream, keys.GROUP, consumer, self._visibility_ms, [entry_id])
                    for entry in _entries(stream, claimed):
                        runnable.append(entry)
                        room -= entry.images
        return runnable, exhausted

    async def depth(self) -> int:
        """Entries no worker has taken yet, over the whole cluster."""
        return int(await self._client.zcard(keys.WAITING))

    async def images_per_second(self) -> float:
        """The cluster's throughput over the last minute (0.0 before anything finished)."""
        now = time.time()
        finished = await self._client.zrangebyscore(keys.DONE, now - 60, "+inf")
        return sum(int(member.rsplit(b":", 1)[1]) for member in finished) / 60

    async def seen_alive(self, name: str) -> None:
        await self._client.zadd(keys.WORKERS, {name: time.time()})

    async def workers(self, within_s: float = 60.0) -> list[str]:
        """Workers that said they were alive within the last `within_s` seconds."""
        now = time.time()
        await self._client.zremrangebyscore(keys.WORKERS, "-inf", now - 3600)
        return [name.decode() for name in await self._client.zrangebyscore(keys.WORKERS, now - within_s, "+inf")]
