"""Jobs and generations of the whole cluster, as the HTTP routes of any replica see them.

Submitting writes the job record and its queue entry in one script (with the
cluster-wide checks: capacity, the subject's jobs, finished ones included,
whose oldest finished ones it forgets past `jobs.max_per_subject`, the
idempotency key); polling, streaming and cancelling read and write only
Redis, so every replica answers alike. A /generate is a job its caller does
not see: this replica waits on its event stream while whichever device is
free runs it. Cloud generations need no device: they run on the replica that
took them, and record their progress here all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from imagine.cluster import keys, scripts, wire
from imagine.cluster.queue import SharedQueue
from imagine.cluster.records import NOT_OBSERVED, OBSERVED_START, OBSERVED_STEPS, TERMINAL, EventWriter, JobRecords
from imagine.engine.jobs import (
    JobRunner,
    ResultJson,
    idempotency_conflict,
    is_job_id,
    new_job_id,
    not_found,
    preview_from_data_url,
    sse_event,
    too_many_jobs,
    unknown_event_id,
)
from imagine.engine.work import Generated, GenerationOutput, JobObserver, cancelled_error, shutting_down_error, timeout_error
from imagine.errors import ApiError
from imagine.plugin.generators import CloudGenerator, GenerationRequest, Generator
from imagine.security.tokens import Principal
from imagine.webhooks.outbox import DELIVERY_PREFIX

log = logging.getLogger(__name__)

# What a client is told to wait when Redis cannot be reached: a restart takes about this long.
REDIS_RETRY_AFTER_S = 2
# Stream ids as Redis makes them: milliseconds, then a sequence number.
EVENT_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,9}")
# How long DELETE waits for the worker running a job to stop it, before answering its state then.
CANCEL_WAIT_S = 10.0
# The keys of any job, for SUBMIT to forget a subject's oldest finished jobs and to spare those whose
# follow-up has not made its delivery yet (see scripts.SUBMIT).
JOB_KEY_NAMES = json.dumps({"job": keys.job("%s"), "events": keys.events("%s"), "delivery": DELIVERY_PREFIX + "%s"})


def redis_unavailable() -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        "The shared queue cannot be reached, retry later",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """A Redis outage reaches the client as 503 with Retry-After; what was stored stays stored."""
    try:
        yield
    except RedisError as error:
        log.warning("the shared queue cannot be reached: %s", error)
        raise redis_unavailable() from None


class ClusterJobs:
    def __init__(
        self,
        client: redis.Redis,
        queue: SharedQueue,
        records: JobRecords,
        *,
        capacity: int,
        timeout_s: float,
        max_per_subject: int,
        keepalive_s: float,
        visibility_timeout_s: float,
        local_seconds_per_image: Callable[[], float],
        run_here: JobRunner,
        to_json: ResultJson,
    ) -> None:
        self._client = client
        self._queue = queue
        self.records = records
        self._capacity = capacity
        self._timeout_s = timeout_s
        self._max_per_subject = max_per_subject
        self._keepalive_ms = int(keepalive_s * 1000)
        self._visibility_s = visibility_timeout_s
        self._local_seconds_per_image = local_seconds_per_image
        self._run_here = run_here
        self._to_json = to_json
        self._submit = client.register_script(scripts.SUBMIT)
        self._cancel = client.register_script(scripts.CANCEL)
        # Cloud jobs this replica runs, by id, with their owners: the cancel channel stops them here.
        self._local: dict[str, tuple[asyncio.Task[str], str]] = {}
        self._accepting = True
        self._pace = 0.0  # images/s of the cluster, as last read
        self._pace_read_at = -1.0

    # ---- estimates ----------------------------------------------------------

    async def seconds_per_image(self) -> float:
        """The cluster's measured pace (over the last minute), or this replica's before anything finished.

        Read from Redis at most once a second: every submission asks, and the answer moves slowly.
        """
        now = time.monotonic()
        if now - self._pace_read_at >= 1.0:
            self._pace = await self._queue.images_per_second()
            self._pace_read_at = now
        return 1 / self._pace if self._pace > 0 else self._local_seconds_per_image()

    async def retry_after_s(self, depth: int) -> int:
        return max(1, math.ceil((depth + 1) * await self.seconds_per_image()))

    # ---- submitting ---------------------------------------------------------

    async def _enqueue(
        self,
        principal: Principal,
        request: GenerationRequest,
        *,
        store: bool,
        visible: bool,
        enqueue: bool,
        preview: bool = False,
        observed: str = NOT_OBSERVED,
        fingerprint: str = "",
        idempotency_key: str | None = None,
        after_end: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Write the job (and its entry, with `enqueue`); (job id, position), or the earlier job's id and "replay".
        A job not `visible` to its owner's listings still has its start written to its events when `observed`,
        and its steps too when that is `OBSERVED_STEPS`."""
        if not self._accepting:
            raise shutting_down_error()
        job_id = new_job_id()
        now = time.time()
        job_fields = {
            "owner": principal.sub,
            "fingerprint": fingerprint,
            "total": str(request.steps),
            "preview": "1" if preview else "0",
            "observed": observed,
            "created_at": repr(now),
        }
        if after_end:
            # Its presence makes the end of the job queue it in keys.AFTER_END (scripts.FINISH, scripts.CANCEL).
            job_fields["after_end"] = json.dumps(dict(after_end))
        entry_fields: dict[str, bytes | str] = {
            "job": job_id,
            "owner": principal.sub,
            "model": request.model,
            "images": str(request.num_images),
            "batch_key": wire.batch_key_digest(request),
            "submitted_at": repr(now),
            "deadline": repr(now + self._timeout_s),
            "store": "1" if store else "0",
            "visible": "1" if visible else "0",
            "observed": observed,
            "preview": "1" if preview else "0",
            **wire.request_fields(request),
        }
        flat = [part for pair in entry_fields.items() for part in pair]
        with redis_errors():
            per_position = await self.seconds_per_image() * request.num_images
            outcome, value = await self._submit(
                keys=[
                    keys.WAITING, keys.SEQUENCE, keys.SUBJECTS, keys.SERVED, keys.STREAMS, keys.BELL,
                    keys.subject_stream(principal.sub), keys.job(job_id), keys.events(job_id),
                    keys.unfinished(principal.sub), keys.idempotency(principal.sub, idempotency_key or ""),
                    keys.finished(principal.sub), keys.AFTER_END,
                ],
                args=[
                    job_id, self._capacity, self._max_per_subject,
                    int(self.records.ttl_s + self._timeout_s), 1 if idempotency_key else 0, 1 if enqueue else 0,
                    f"{per_position:.4f}", json.dumps(job_fields), 1 if visible else 0, JOB_KEY_NAMES, *flat,
                ],
            )
            outcome, value = outcome.decode(), value.decode()
            if outcome == "full":
                depth = int(value)
                raise ApiError(
                    503,
                    "QUEUE_FULL",
                    "The generation queue is full, retry later",
                    details={"queue_depth": depth, "capacity": self._capacity},
                    headers={"Retry-After": str(await self.retry_after_s(depth))},
                )
        if outcome == "too_many":
            # Spared finished jobs: their follow-up runs within about a second, and then they make room.
            raise too_many_jobs(self._max_per_subject) if value == "0" else jobs_being_followed_up(self._max_per_subject)
        if outcome == "replay":
            return value, "replay"
        return job_id, value

    async def submit_generation(
        self,
        principal: Principal,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        observer: JobObserver | None = None,
    ) -> Coroutine[Any, Any, Generated]:
        """Queue a local generation for whichever device is free; the coroutine returned waits for its images,
        telling `observer` of its start, steps and previews from whichever device runs it.
        A cloud generation needs no device: it runs here."""
        if isinstance(generator, CloudGenerator):
            if not self._accepting:
                raise shutting_down_error()
            return self._run_here(principal, request, generator, store, observer)
        job_id, position = await self._enqueue(
            principal, request, store=store, visible=False, enqueue=True,
            observed=_observed(observer), preview=observer is not None and observer.wants_steps and observer.wants_preview,
        )
        if observer is not None:
            observer.queued(int(position), 0.0)
        return self._wait_for(job_id, principal, request, generator, time.time() + self._timeout_s, observer)

    async def _wait_for(
        self,
        job_id: str,
        principal: Principal,
        request: GenerationRequest,
        generator: Generator,
        deadline: float,
        observer: JobObserver | None,
    ) -> Generated:
        try:
            await self._await_end(job_id, deadline, observer)
        except asyncio.CancelledError:
            # The caller is gone: nobody wants the images any more.
            asyncio.ensure_future(self._cancel_quietly(principal, job_id))
            raise
        stored = await self._retrying(lambda: self.records.take_result(job_id), deadline)
        meta = stored.meta
        output = GenerationOutput(
            images=[],  # they arrive encoded, as the PNGs below
            seeds=meta["seeds"],
            generation_time=meta["generation_time"],
            queue_time=meta["queue_time"],
            vram_used=meta["vram_used"],
            runtime=meta["runtime"],
        )
        return Generated(
            request, generator, output, stored.pngs, ids=meta["ids"],
            encode_time=meta["encode_time"], store_time=meta["store_time"],
        )

    async def _await_end(self, job_id: str, deadline: float, observer: JobObserver | None = None) -> None:
        """Wait for the job's last event, telling `observer` of the others; raise what it failed with.
        Rides out a Redis restart until the deadline."""
        last = "0-0"
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                asyncio.ensure_future(self._cancel_job(job_id, timeout_error(self._timeout_s)))
                raise timeout_error(self._timeout_s)
            try:
                answer = await self._client.xread({keys.events(job_id): last}, block=int(min(remaining, 5.0) * 1000))
            except RedisError:
                await asyncio.sleep(0.2)
                continue
            for _, events in answer:
                for event_id, fields in events:
                    last = event_id.decode()
                    kind = fields[b"type"].decode()
                    if kind == "succeeded":
                        return
                    if kind == "cancelled":
                        raise cancelled_error()
                    if kind == "failed":
                        raise await self._retrying(lambda: self.records.error_of(job_id), deadline)
                    if observer is not None:
                        _tell(observer, kind, fields)

    async def _retrying(self, read: Callable[[], Coroutine[Any, Any, Any]], deadline: float) -> Any:
        while True:
            try:
                return await read()
            except RedisError:
                if time.time() > deadline:
                    raise redis_unavailable() from None
                await asyncio.sleep(0.2)

    async def replay(self, principal: Principal, key: str | None, fingerprint: str) -> dict[str, Any] | None:
        """What an earlier POST /jobs with this Idempotency-Key answered; 409 if the body changed."""
        if key is None:
            return None
        with redis_errors():
            raw = await self._client.get(keys.idempotency(principal.sub, key))
            if raw is None:
                return None
            fields = await self.records.fields(raw.decode())
        if not fields:
            return None
        if fields["fingerprint"] != fingerprint:
            raise idempotency_conflict(raw.decode())
        return acceptance(raw.decode(), fields)

    async def submit(
        self,
        principal: Principal,
        key: str | None,
        fingerprint: str,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        preview: bool,
        after_end: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Create a job (or find the one this Idempotency-Key made): its acceptance, and whether it is a replay."""
        cloud = isinstance(generator, CloudGenerator)
        job_id, position = await self._enqueue(
            principal, request, store=store, visible=True, enqueue=not cloud, preview=preview,
            fingerprint=fingerprint, idempotency_key=key, after_end=after_end,
        )
        if position == "replay":
            replayed = await self.replay(principal, key, fingerprint)
            if replayed is None:
                raise not_found()
            return replayed, True
        if cloud:
            self._run_cloud(job_id, principal, request, generator, store=store, preview=preview)
            with contextlib.suppress(RedisError):  # else the next beat of watch_cloud_jobs records it
                await self._client.zadd(keys.CLOUD_RUNNING, {job_id: time.time()})
        with redis_errors():
            return acceptance(job_id, await self.records.fields(job_id)), False

    def _run_cloud(
        self, job_id: str, principal: Principal, request: GenerationRequest, generator: Generator, *, store: bool, preview: bool
    ) -> None:
        writer = EventWriter(self.records, job_id, wants_preview=preview, total_steps=request.steps, announce_start=True)

        async def run() -> str:
            try:
                generated = await self._run_here(principal, request, generator, store, writer)
                result = await self._to_json(generated)
                await writer.flush()
                await self.records.succeed(job_id, principal.sub, request.num_images, result, None)
                return "succeeded"
            except asyncio.CancelledError:
                error = cancelled_error()
            except ApiError as failure:
                error = failure
            except Exception:
                log.exception("job %s failed", job_id)
                error = ApiError(500, "INTERNAL_ERROR", "Generation failed")
            finally:
                self._local.pop(job_id, None)
                with contextlib.suppress(RedisError):
                    await self._client.zrem(keys.CLOUD_RUNNING, job_id)
            await writer.flush()
            await self.records.fail(job_id, principal.sub, error)
            return "cancelled" if error.code == "CANCELLED" else "failed"

        self._local[job_id] = (asyncio.create_task(run(), name=job_id), principal.sub)

    async def watch_cloud_jobs(self) -> None:
        """Say which cloud jobs still run here, and fail those whose replica went quiet.

        A cloud job runs on the replica that took it, not from the queue: if that replica dies, no other
        can take it over without starting (and paying for) a second upstream generation. So it fails, with
        a reason, once the replica has not vouched for it for `queue.visibility_timeout_s`.
        """
        while True:
            try:
                now = time.time()
                if self._local:
                    await self._client.zadd(keys.CLOUD_RUNNING, {job_id: now for job_id in self._local})
                for raw in await self._client.zrangebyscore(keys.CLOUD_RUNNING, "-inf", now - self._visibility_s):
                    job_id = raw.decode()
                    owner = (await self.records.fields(job_id)).get("owner")
                    if owner is not None and await self.records.fail(job_id, owner, replica_stopped_error()):
                        log.warning("cloud job %s failed: the replica running it stopped", job_id)
                    await self._client.zrem(keys.CLOUD_RUNNING, job_id)
            except RedisError as error:
                log.debug("could not watch the cloud jobs: %s", error)
            await asyncio.sleep(max(0.2, self._visibility_s / 4))

    def stop_here(self, job_id: str) -> None:
        """A cancel for `job_id` arrived on the channel: stop it if this replica runs it as a cloud job."""
        running = self._local.get(job_id)
        if running is not None:
            running[0].cancel()

    # ---- reading --------------------------------------------------------------

    @staticmethod
    def parse_event_id(value: str) -> str:
        if EVENT_ID.fullmatch(value) is None:
            raise unknown_event_id()
        return value

    async def _owned(self, principal: Principal, job_id: str) -> dict[str, str]:
        """Another subject's job, or a /generate's, is indistinguishable from a missing one."""
        # Not of our form, it names no job, and must not reach Redis as part of a key (`job_x:events`
        # would name another key of a job).
        if not is_job_id(job_id):
            raise not_found()
        with redis_errors():
            fields = await self.records.fields(job_id)
        if not fields or fields.get("owner") != principal.sub or fields.get("visible") != "1":
            raise not_found()
        return fields

    async def snapshot(self, principal: Principal, job_id: str) -> dict[str, Any]:
        fields = await self._owned(principal, job_id)
        status = fields["status"]
        position, eta = 0, 0.0
        if status == "queued":
            with redis_errors():
                rank = await self._client.zrank(keys.WAITING, job_id)
                position = 0 if rank is None else rank + 1
                eta = round(position * await self.seconds_per_image(), 2)
        body: dict[str, Any] = {
            "id": job_id,
            "status": status,
            "position": position,
            "eta_seconds": eta,
            "progress": {"step": int(fields.get("step", 0)), "total": int(fields["total"])},
            "created_at": float(fields["created_at"]),
        }
        if "started_at" in fields:
            body["started_at"] = float(fields["started_at"])
        if "finished_at" in fields:
            body["finished_at"] = float(fields["finished_at"])
        if "worker" in fields:
            body["worker"] = fields["worker"]
        if "result" in fields:
            body["result"] = json.loads(fields["result"])
        if "error" in fields:
            body["error"] = json.loads(fields["error"])
        return body

    async def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]:
        await self._owned(principal, job_id)
        with redis_errors():
            state = await self._cancel_job(job_id, cancelled_error(), owner=principal.sub)
            if state == "signalled":
                await self._wait_until_ended(job_id, time.time() + CANCEL_WAIT_S)
        return await self.snapshot(principal, job_id)

    async def _cancel_job(self, job_id: str, error: ApiError, owner: str | None = None) -> str:
        if owner is None:
            owner = (await self.records.fields(job_id)).get("owner", "")
        state = await self._cancel(
            keys=[
                keys.job(job_id), keys.WAITING, keys.events(job_id), keys.unfinished(owner), keys.STREAMS, keys.SUBJECTS,
                keys.AFTER_END, keys.finished(owner),
            ],
            args=[job_id, json.dumps(error.body()), self.records.ttl_s, time.time()],
        )
        return state.decode()

    async def _cancel_quietly(self, principal: Principal, job_id: str) -> None:
        try:
            await self._cancel_job(job_id, cancelled_error(), owner=principal.sub)
        except RedisError as error:
            log.warning("could not cancel %s, whose caller left: %s", job_id, error)

    async def _wait_until_ended(self, job_id: str, deadline: float) -> None:
        with contextlib.suppress(ApiError):
            await self._await_end(job_id, deadline)

    async def events(self, principal: Principal, job_id: str, after: str | None) -> AsyncIterator[bytes | None]:
        """The job's events after `after` (a Last-Event-ID), as SSE bytes, until its last; None: keep-alive.

        Checks the job is the caller's before the first event, so a 404 is still an HTTP answer.
        """
        await self._owned(principal, job_id)
        if after is not None:
            with redis_errors():
                seen = await self._client.xrange(keys.events(job_id), after, after, count=1)
            if not seen or seen[0][0].decode() != after:
                # Not an id this stream gave, as written (see imagine.engine.jobs: the same rule in one process).
                raise unknown_event_id()
            if seen[0][1][b"type"].decode() in TERMINAL:
                return _no_events()  # the client saw the job's end: nothing follows it
        return self._stream(job_id, after or "0-0")

    async def _stream(self, job_id: str, last: str) -> AsyncIterator[bytes | None]:
        stream = keys.events(job_id)
        while True:
            with redis_errors():
                answer = await self._client.xread({stream: last}, block=self._keepalive_ms, count=100)
                if not answer:
                    status = await self._client.hget(keys.job(job_id), "status")
                    if status is None or status.decode() in TERMINAL:
                        return  # it ended before the last event this client saw, or expired
                    yield None
                    continue
            for _, events in answer:
                for event_id, fields in events:
                    last = event_id.decode()
                    kind = fields[b"type"].decode()
                    yield sse_event(last, kind, fields[b"data"].decode())
                    if kind in TERMINAL:
                        return

    # ---- stopping -------------------------------------------------------------

    def close_intake(self) -> list[asyncio.Task[str]]:
        """Refuse new work from now on (503); the cloud jobs this replica still runs. Queued work stays in Redis."""
        self._accepting = False
        return [task for task, _ in self._local.values() if not task.done()]

    async def fail_unfinished(self) -> int:
        """Past the grace: fail the cloud jobs still running here (their callers learn why)."""
        running = [(job_id, task, owner) for job_id, (task, owner) in self._local.items() if not task.done()]
        error = shutting_down_error()
        for job_id, task, owner in running:
            with contextlib.suppress(RedisError):
                await self.records.fail(job_id, owner, error)
            task.cancel()
        if running:
            await asyncio.wait([task for _, task, _ in running])
        return len(running)


async def _no_events() -> AsyncIterator[bytes | None]:
    return
    yield  # an async generator that ends at once


def jobs_being_followed_up(limit: int) -> ApiError:
    """429 while the finished jobs that would make room still wait for their webhook or quota refund to read them."""
    return ApiError(
        429,
        "RATE_LIMIT_EXCEEDED",
        f"Too many jobs ({limit}); the finished ones are still being followed up (webhook, quota refund): retry in a moment",
        headers={"Retry-After": "1"},
    )


def replica_stopped_error() -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        "The replica running this cloud generation stopped before it finished; submit it again",
        headers={"Retry-After": "1"},
    )


def _observed(observer: JobObserver | None) -> str:
    if observer is None:
        return NOT_OBSERVED
    return OBSERVED_STEPS if observer.wants_steps else OBSERVED_START


def _tell(observer: JobObserver, kind: str, fields: Mapping[bytes, bytes]) -> None:
    """A waited-for generation's event, from the device that runs it, to the observer on this replica."""
    if kind == "started":
        observer.started()
    elif kind == "progress":
        progress = json.loads(fields[b"data"])
        # A latent-sized picture: cheap enough to decode on the loop.
        preview = preview_from_data_url(progress["preview"]) if "preview" in progress else None
        observer.progress(progress["step"], progress["total"], preview)


def acceptance(job_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """What POST /jobs answered, rebuilt from the record so a replay on any replica answers the same."""
    return {
        "id": job_id,
        "status": "queued",
        "position": int(fields.get("accepted_position", 0)),
        "eta_seconds": float(fields.get("accepted_eta", 0.0)),
    }

