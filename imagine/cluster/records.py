"""Job records in Redis: state, the per-job event stream, and the images of a generation someone waits for.

A job is a hash (`imagine:job:<id>`) and a stream of its events
(`imagine:job:<id>:events`), so any replica answers GET /jobs/{id} and
streams events from any point: the SSE ids are the stream's own ids. Both
expire `jobs.ttl_s` after the job ends, unless newer jobs of its subject
push a listed one out first (scripts.SUBMIT, `jobs.max_per_subject`). A
/generate waited for on one replica while another's device runs it is a job
too, not listed to its caller (`visible` 0), that counts against no bound:
its images come back through `imagine:job:<id>:result`, deleted once read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from imagine.cluster import keys, scripts
from imagine.engine.jobs import preview_data_url
from imagine.errors import ApiError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class StoredResult:
    """What a worker stored of a generation for the replica waiting for it."""

    pngs: list[bytes]
    meta: dict[str, Any]


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class JobRecords:
    def __init__(self, client: redis.Redis, *, ttl_s: float) -> None:
        self._client = client
        self.ttl_s = int(ttl_s)
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)

    async def fields(self, job_id: str) -> dict[str, str]:
        raw = await self._client.hgetall(keys.job(job_id))
        # The result and error are JSON; everything else is short text.
        return {name.decode(): value.decode() for name, value in raw.items()}

    async def start(self, job_id: str, total_steps: int, worker: str) -> str:
        """Mark a job running as `worker` starts it: "run", or "cancel", "done" or "missing" (see scripts.START)."""
        return (await self._start(keys=[keys.job(job_id), keys.events(job_id)], args=[total_steps, worker, time.time()])).decode()

    async def progress(self, job_id: str, step: int, total: int, preview: Image.Image | None) -> None:
        data: dict[str, Any] = {"step": step, "total": total}
        if preview is not None:
            data["preview"] = preview_data_url(preview)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job_id), "step", step)
            pipe.xadd(keys.events(job_id), {"type": "progress", "data": json.dumps(data)})
            await pipe.execute()

    async def succeed(
        self, job_id: str, owner: str, images: int, result: Mapping[str, Any] | None, stored: StoredResult | None
    ) -> bool:
        """End a job with its result JSON (a listed job) or its images (a /generate waited for); False if it had ended."""
        payload = json.dumps(result) if result is not None else "{}"
        async with self._client.pipeline(transaction=True) as pipe:
            if stored is not None:
                record: dict[str, Any] = {"meta": json.dumps(stored.meta)}
                record |= {f"png:{index}": png for index, png in enumerate(stored.pngs)}
                pipe.hset(keys.result(job_id), mapping=record)
                pipe.expire(keys.result(job_id), self.ttl_s)
            await self._finish(
                keys=self._finish_keys(job_id, owner),
                args=[job_id, "succeeded", payload, payload, self.ttl_s, time.time(), images, "", ""],
                client=pipe,
            )
            outcome = await pipe.execute()
        return bool(outcome[-1])

    async def fail(self, job_id: str, owner: str, error: ApiError) -> bool:
        """End a job as failed (or cancelled, for CANCELLED); False if it had ended already."""
        status = "cancelled" if error.code == "CANCELLED" else "failed"
        body = json.dumps(error.body())
        retry_after = error.headers.get("Retry-After", "")
        done = await self._finish(
            keys=self._finish_keys(job_id, owner),
            args=[job_id, status, body, body, self.ttl_s, time.time(), 0, error.status, retry_after],
        )
        return bool(done)

    def _finish_keys(self, job_id: str, owner: str) -> list[str]:
        return [keys.job(job_id), keys.events(job_id), keys.unfinished(owner), keys.DONE, keys.AFTER_END, keys.finished(owner)]

    async def take_result(self, job_id: str) -> StoredResult:
        """The images of a finished /generate, for the replica whose caller waits for them.

        Read first and deleted after, not both at once: a Redis stopping may run a command and drop its
        reply, and a read-and-delete retried then would find nothing. The record expires anyway, so a
        delete that fails is left to that.
        """
        record = await self._client.hgetall(keys.result(job_id))
        if b"meta" not in record:
            raise ApiError(500, "INTERNAL_ERROR", "The finished images could not be found in the shared queue")
        with contextlib.suppress(RedisError):
            await self._client.delete(keys.result(job_id))
        meta = json.loads(record[b"meta"])
        return StoredResult(pngs=[record[f"png:{index}".encode()] for index in range(len(meta["seeds"]))], meta=meta)

    async def error_of(self, job_id: str) -> ApiError:
        """The ApiError a failed job ended with, for the replica whose caller waits for it."""
        fields = await self.fields(job_id)
        body = json.loads(fields.get("error", "{}")).get("error", {})
        retry_after = fields.get("error_retry_after")
        return ApiError(
            int(fields.get("error_status") or 500),
            body.get("code", "INTERNAL_ERROR"),
            body.get("message", "Generation failed"),
            details=body.get("details"),
            headers={"Retry-After": retry_after} if retry_after else None,
        )


# How much of a waited-for generation (a job not listed) its caller's replica follows, as the job's and its
# entry's "observed" field (scripts.START reads it too): nothing; its start alone, which is what tells a caller
# who hangs up before it ran from one who hangs up after (the quota's refund); or its start and every step.
NOT_OBSERVED, OBSERVED_START, OBSERVED_STEPS = "0", "start", "1"


class EventWriter:
    """A job's progress written to Redis in the order it happened, without holding up the loop.

    The observer callbacks are plain functions called on the loop (see
    `imagine.engine.work.JobObserver`); each write is chained after the last,
    so events never overtake each other, and `flush` waits for all of them
    before the job's end is written.
    """

    def __init__(self, records: JobRecords, job_id: str, *, wants_preview: bool, total_steps: int, announce_start: bool) -> None:
        self._records = records
        self._job_id = job_id
        self.wants_steps = True
        self.wants_preview = wants_preview
        self._total = total_steps
        self._announce_start = announce_start
        self._last: asyncio.Future[None] | None = None

    def _then(self, write: Callable[[], Awaitable[Any]]) -> None:
        previous = self._last

        async def run() -> None:
            if previous is not None:
                await previous
            try:
                await write()
            except RedisError as error:
                # Progress is worth showing, not worth failing the generation over.
                log.debug("could not record progress of %s: %s", self._job_id, error)

        self._last = asyncio.ensure_future(run())

    def queued(self, position: int, eta_s: float) -> None:
        """The queued event was written with the job; positions are read live from the shared queue."""

    def started(self) -> None:
        if self._announce_start:
            self._then(lambda: self._records.start(self._job_id, self._total, socket.gethostname()))

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self._then(lambda: self._records.progress(self._job_id, step, total, preview))

    async def flush(self) -> None:
        if self._last is not None:
            await self._last
