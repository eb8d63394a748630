"""Asynchronous jobs: owned by their subject, observable as an event log, kept for a while.

A job is the same executor job that /generate awaits, with an observer that
turns queue moves and denoising steps into numbered events. Streams replay the
log from any event id, so a client that reconnects with Last-Event-ID misses
nothing; only DELETE cancels a job, never a dropped stream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imagine.security.tokens import Principal
from imagine.errors import ApiError, error_body, validation_error
from imagine.engine.work import Generated, JobObserver, shutting_down_error
from imagine.plugin.generators import GenerationRequest, Generator

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
# Event ids are 1, 2, 3...: the log's own ids are the only values Last-Event-ID may carry.
EVENT_ID = re.compile(r"[0-9]{1,9}")

# Queues a job's generation on this replica now (so a full queue is refused at once) and returns
# what finishes it: (principal, request, generator, store, observer). See imagine.http.generation.
JobRunner = Callable[[Principal, GenerationRequest, Generator, bool, JobObserver | None], Coroutine[Any, Any, "Generated"]]
# A finished generation as the /generate JSON a job's result holds.
ResultJson = Callable[["Generated"], Coroutine[Any, Any, dict[str, Any]]]
# What must follow a job's end (its webhook, its quota refund): called with the owner, the job's
# snapshot and the `after_end` fields it was submitted with, once it has ended.
JobEnded = Callable[[str, dict[str, Any], Mapping[str, str]], Coroutine[Any, Any, None]]


def sse_event(event_id: str, kind: str, data: str) -> bytes:
    """One Server-Sent Event; `data` is JSON text."""
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


def unknown_event_id() -> ApiError:
    return validation_error([{"loc": ["header", "Last-Event-ID"], "msg": "must be an event id of this stream"}])


def idempotency_conflict(job_id: str) -> ApiError:
    return ApiError(409, "CONFLICT", "This Idempotency-Key was used with a different request body", details={"job_id": job_id})


def too_many_jobs(limit: int) -> ApiError:
    return ApiError(
        429,
        "RATE_LIMIT_EXCEEDED",
        f"Too many unfinished jobs ({limit}); wait for some to finish or cancel them",
        headers={"Retry-After": "5"},
    )


@dataclass(frozen=True)
class JobEvent:
    id: int
    type: str
    data: dict[str, Any]

    def sse(self) -> bytes:
        return sse_event(str(self.id), self.type, json.dumps(self.data))


def body_fingerprint(body: Any) -> str:
    """Equal JSON bodies, whatever their key order or spacing, share a fingerprint."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def preview_data_url(image: Image.Image) -> str:
    # A latent-sized image (1/8 of the output per side): encoding it is cheap
    # enough for the loop, unlike the full-size PNGs that go to the pool.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_from_data_url(data_url: str) -> Image.Image:
    """The picture `preview_data_url` wrote, for a replica showing a preview another replica's device made."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2])))
    image.load()
    return image


# "job_" and 128 random bits in URL-safe base64, in one process and across replicas alike.
_JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{22}")


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(16)


def is_job_id(text: str) -> bool:
    """Whether `text` is of the form `new_job_id` makes: anything else names no job."""
    return _JOB_ID.fullmatch(text) is not None


class TrackedJob:
    """One job's state and event log; also the executor's observer for it."""

    def __init__(self, owner: str, total_steps: int, wants_preview: bool, fingerprint: str) -> None:
        self.id = new_job_id()
        self.owner = owner
        self.wants_steps = True
        self.wants_preview = wants_preview
        self.fingerprint = fingerprint
        self.status = "queued"
        self.position = 0
        self.eta_s = 0.0
        self.step = 0
        self.total = total_steps
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.events: list[JobEvent] = []
        # What POST /jobs answered; a replay of that request answers it again.
        self.acceptance: dict[str, Any] = {}
        self.after_end: Mapping[str, str] = {}
        self.task: asyncio.Task[str] | None = None
        self._changed = asyncio.Event()

    # -- JobObserver (called on the loop) --------------------------------

    def queued(self, position: int, eta_s: float) -> None:
        if self.status == "queued" and position != self.position:
            self.position, self.eta_s = position, eta_s
            self._emit("queued", {"position": position, "eta_seconds": eta_s})

    def started(self) -> None:
        if self.status == "queued":
            self.status, self.position = "running", 0
            self.started_at = time.time()
            self._emit("started", {"total": self.total})

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        if self.status != "running":
            return
        self.step, self.total = step, total
        data: dict[str, Any] = {"step": step, "total": total}
        if preview is not None:
            data["preview"] = preview_data_url(preview)
        self._emit("progress", data)

    # -- outcome -----------------------------------------------------------

    def finish(self, status: str, *, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        if self.status in TERMINAL:
            return
        self.status, self.result, self.error = status, result, error
        self.finished_at = time.time()
        self._emit(status, result if result is not None else (error or {}))

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append(JobEvent(len(self.events) + 1, kind, data))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def stream(self, after: int, keepalive_s: float) -> AsyncIterator[JobEvent | None]:
        """Events with ids above `after`, as they come, until the last; None means keep-alive."""
        sent = after
        while True:
            for event in self.events[sent:]:
                sent = event.id
                yield event
            if self.finished and sent >= len(self.events):
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=keepalive_s)
            except TimeoutError:
                yield None

    def snapshot(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "position": self.position,
            "eta_seconds": self.eta_s if self.status == "queued" else 0.0,
            "progress": {"step": self.step, "total": self.total},
            "created_at": self.created_at,
        }
        if self.started_at is not None:
            body["started_at"] = self.started_at
        if self.finished_at is not None:
            body["finished_at"] = self.finished_at
        if self.result is not None:
            body["result"] = self.result
        if self.error is not None:
            body["error"] = self.error
        return body


class JobStore(Protocol):
    """What the routes use of jobs: `JobManager` in one process, `imagine.cluster.jobs.ClusterJobs` across replicas."""

    async def submit_generation(
        self,
        principal: Principal,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        observer: JobObserver | None = None,
    ) -> Coroutine[Any, Any, Generated]: ...

    async def replay(self, principal: Principal, key: str | None, fingerprint: str) -> dict[str, Any] | None: ...

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
    ) -> tuple[dict[str, Any], bool]: ...

    async def snapshot(self, principal: Principal, job_id: str) -> dict[str, Any]: ...

    async def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]: ...

    def parse_event_id(self, value: str) -> str: ...

    async def events(self, principal: Principal, job_id: str, after: str | None) -> AsyncIterator[bytes | None]: ...

    def close_intake(self) -> list[asyncio.Task[str]]: ...

    async def fail_unfinished(self) -> int: ...


def not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Job not found")


class JobManager:
    """The jobs of one process, in memory (`queue.storage = "memory"`)."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_per_subject: int,
        keepalive_s: float,
        run: JobRunner,
        to_json: ResultJson,
        on_end: JobEnded | None = None,
    ) -> None:
        self._ttl_s = ttl_s
        self._on_end = on_end
        self._max_per_subject = max_per_subject
        self._keepalive_s = keepalive_s
        self._run_here = run
        self._to_json = to_json
        self._jobs: dict[str, TrackedJob] = {}
        self._idempotency: dict[tuple[str, str], str] = {}  # (sub, key) -> job id
        self._accepting = True

    def _forget_expired(self) -> None:
        cutoff = time.time() - self._ttl_s
        for job in [job for job in self._jobs.values() if job.finished_at is not None and job.finished_at < cutoff]:
            self._forget(job)

    def _forget(self, job: TrackedJob) -> None:
        del self._jobs[job.id]
        self._idempotency = {key: job_id for key, job_id in self._idempotency.items() if job_id != job.id}

    def _room_for_one(self, owner: str) -> list[TrackedJob]:
        """The subject's oldest finished jobs to forget so that one more fits its bound; 429 if even
        forgetting every finished one would not make room. Forgotten only once the new job is queued:
        a refused submission takes nothing away."""
        owned = sorted((job for job in self._jobs.values() if job.owner == owner), key=lambda job: job.created_at)
        excess = len(owned) - self._max_per_subject + 1
        finished = [job for job in owned if job.finished]
        if excess > len(finished):
            raise too_many_jobs(self._max_per_subject)
        return finished[: max(0, excess)]

    async def replay(self, principal: Principal, key: str | None, fingerprint: str) -> dict[str, Any] | None:
        """What an earlier POST /jobs with this Idempotency-Key answered; 409 if the body changed."""
        job = self._replayed(principal, key, fingerprint)
        return None if job is None else job.acceptance

    def _replayed(self, principal: Principal, key: str | None, fingerprint: str) -> TrackedJob | None:
        self._forget_expired()
        if key is None:
            return None
        job_id = self._idempotency.get((principal.sub, key))
        if job_id is None:
            return None
        job = self._jobs[job_id]
        if job.fingerprint != fingerprint:
            raise idempotency_conflict(job.id)
        return job

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
        """Create the job and queue its work at once (so a full queue is refused now): its acceptance, and
        whether it is a replay of an earlier submit with this Idempotency-Key. `after_end` is handed to
        `on_end` once the job has ended."""
        if not self._accepting:
            raise shutting_down_error()
        earlier = self._replayed(principal, key, fingerprint)
        if earlier is not None:
            return earlier.acceptance, True
        to_forget = self._room_for_one(principal.sub)
        job = TrackedJob(principal.sub, request.steps, preview, fingerprint)
        job.after_end = dict(after_end or {})
        work = self._run_here(principal, request, generator, store, job)
        for old in to_forget:
            self._forget(old)
        job.acceptance = {"id": job.id, "status": "queued", "position": job.position, "eta_seconds": job.eta_s}
        self._jobs[job.id] = job
        if key is not None:
            self._idempotency[(principal.sub, key)] = job.id
        job.task = asyncio.create_task(self._run(job, work), name=job.id)
        return job.acceptance, False

    async def submit_generation(
        self,
        principal: Principal,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        observer: JobObserver | None = None,
    ) -> Coroutine[Any, Any, Generated]:
        """A generation someone waits for (/generate): queued on this process's device now; `observer`
        hears its queue position, steps and previews."""
        return self._run_here(principal, request, generator, store, observer)

    async def _run(self, job: TrackedJob, work: Coroutine[Any, Any, Generated]) -> str:
        """Finish the job; its final status."""
        try:
            job.finish("succeeded", result=await self._to_json(await work))
        except asyncio.CancelledError:
            job.finish("cancelled")
        except ApiError as error:
            job.finish("cancelled" if error.code == "CANCELLED" else "failed", error=error.body())
        except Exception:
            log.exception("job %s failed", job.id)
            job.finish("failed", error=error_body("INTERNAL_ERROR", "Generation failed"))
        if job.after_end and self._on_end is not None:
            try:
                await self._on_end(job.owner, job.snapshot(), job.after_end)
            except Exception:
                log.exception("what follows the end of job %s failed", job.id)
        return job.status

    def _get(self, principal: Principal, job_id: str) -> TrackedJob:
        """Another subject's job is indistinguishable from a missing one."""
        self._forget_expired()
        job = self._jobs.get(job_id)
        if job is None or job.owner != principal.sub:
            raise not_found()
        return job

    async def snapshot(self, principal: Principal, job_id: str) -> dict[str, Any]:
        return self._get(principal, job_id).snapshot()

    async def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]:
        job = self._get(principal, job_id)
        if job.task is not None and not job.finished:
            job.task.cancel()
            await asyncio.wait([job.task])
        return job.snapshot()

    @staticmethod
    def parse_event_id(value: str) -> str:
        if EVENT_ID.fullmatch(value) is None:
            raise unknown_event_id()
        return value

    async def events(self, principal: Principal, job_id: str, after: str | None) -> AsyncIterator[bytes | None]:
        """The job's events after `after` as SSE bytes, until its last; None means keep-alive."""
        job = self._get(principal, job_id)
        position = int(after or 0)
        if position > len(job.events):
            # Not an id this stream gave: resuming after it would wait for events already sent, or
            # end without the job's last one, and the client would reconnect with it forever.
            raise unknown_event_id()
        return self._stream(job, position)

    async def _stream(self, job: TrackedJob, after: int) -> AsyncIterator[bytes | None]:
        async for event in job.stream(after, self._keepalive_s):
            yield None if event is None else event.sse()

    def close_intake(self) -> list[asyncio.Task[str]]:
        """Refuse new jobs from now on (503); the tasks of the jobs not finished yet (each ends with its status)."""
        self._accepting = False
        return [job.task for job in self.unfinished() if job.task is not None]

    def unfinished(self) -> list[TrackedJob]:
        return [job for job in self._jobs.values() if not job.finished]

    async def fail_unfinished(self) -> int:
        """End every unfinished job as failed with SERVICE_UNAVAILABLE, so a poller learns why; returns how many."""
        jobs = self.unfinished()
        error = shutting_down_error().body()
        for job in jobs:
            job.finish("failed", error=error)  # before the cancel, which would record it as cancelled
            if job.task is not None:
                job.task.cancel()
        tasks = [job.task for job in jobs if job.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        return len(jobs)

    async def close(self) -> None:
        if failed := await self.fail_unfinished():
            log.warning("%d unfinished jobs failed with SERVICE_UNAVAILABLE as the service stopped", failed)
