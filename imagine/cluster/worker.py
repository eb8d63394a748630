"""A replica's device as a worker of the shared queue: it pulls a batch only when free, and stores every outcome.

The loop takes the next fair batch (see `imagine.cluster.queue`) only once the
device is done with the last one, hands it to this process's device executor
as one batch, and takes the next while the last is still being encoded and
stored. Each entry is acknowledged once its outcome is written to its job;
until then the entries it holds are kept alive, so only a dead worker's
entries are claimed by others. An entry that has started
`queue.max_attempts` times (each attempt ended its worker) fails its job
instead. Without a device (`imagine serve --no-device`) the loop only does
that last part, so a crash-looping job ends even when no worker survives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from imagine.cluster import wire
from imagine.cluster.queue import Entry, SharedQueue
from imagine.cluster.records import OBSERVED_STEPS, EventWriter, JobRecords, StoredResult
from imagine.engine.executor import DeviceExecutor
from imagine.engine.jobs import ResultJson
from imagine.engine.registry import ModelRegistry
from imagine.engine.work import GenerationOutput, WorkItem, cancelled_error, timeout_error
from imagine.errors import ApiError
from imagine.plugin.generators import GenerationRequest, LocalGenerator
from imagine.security.tokens import Principal

if TYPE_CHECKING:
    from imagine.engine.work import Generated

log = logging.getLogger(__name__)

# Encodes and stores a finished generation on this replica: (principal, request, generator, running, store).
Finisher = Callable[[Principal, GenerationRequest, LocalGenerator, Awaitable[GenerationOutput], bool], Coroutine[Any, Any, "Generated"]]

# After Redis failed, how long the loop waits before trying again.
RETRY_S = 0.5
# How long an outcome is retried against an unreachable Redis before the entry is left for another worker.
PERSIST_FOR_S = 60.0


def worker_name() -> str:
    """Unique per process start: a restarted worker is a new consumer, so its old entries are claimed."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def gave_up_error(attempts: int) -> ApiError:
    return ApiError(
        500,
        "INTERNAL_ERROR",
        f"The generation was started {attempts} times and each time its worker stopped; it will not run again",
        details={"attempts": attempts},
    )


class ClusterWorker:
    def __init__(
        self,
        queue: SharedQueue,
        records: JobRecords,
        executor: DeviceExecutor,
        registry: ModelRegistry,
        *,
        device: bool,
        max_images: int,
        visibility_timeout_s: float,
        finish: Finisher,
        to_json: ResultJson,
    ) -> None:
        self.name = worker_name()
        self._queue = queue
        self._records = records
        self._executor = executor
        self._registry = registry
        self._device = device
        self._max_images = max_images
        self._finish = finish
        self._to_json = to_json
        # Stale entries are looked for, and held ones kept alive, several times per visibility timeout.
        self._check_every_s = max(0.2, min(5.0, visibility_timeout_s / 4))
        self._held: dict[str, Entry] = {}  # job id -> entry taken and not acknowledged yet
        self._running: dict[str, WorkItem] = {}  # job id -> its work on this device
        self._cancelled: set[str] = set()  # cancels heard for jobs not (yet) running here
        self._completions: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pull(), name="imagine-worker"),
            asyncio.create_task(self._keep_alive(), name="imagine-worker-alive"),
        ]

    async def stop(self) -> None:
        """Stop pulling; outcomes being stored are stored, and work not started goes back to the queue."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._completions:
            await asyncio.wait(self._completions)
        if self._held:
            with contextlib.suppress(RedisError):
                await self._queue.release(self.name, list(self._held.values()))
            self._held.clear()

    def stop_job(self, job_id: str) -> None:
        """A cancel for `job_id` arrived: stop it at its next step if it runs here."""
        item = self._running.get(job_id)
        if item is not None:
            self._executor.cancel(item)
        elif job_id in self._held:
            self._cancelled.add(job_id)

    # ---- the loop -------------------------------------------------------------

    async def _pull(self) -> None:
        last_check = 0.0
        while True:
            try:
                if self._device and not self._executor.accepting:
                    return  # draining: the rest of the queue is for other replicas
                batch: list[Entry] = []
                if time.monotonic() - last_check >= self._check_every_s:
                    last_check = time.monotonic()
                    batch = await self._claim_stale()
                if not self._device:
                    await asyncio.sleep(self._check_every_s)
                    continue
                if not batch:
                    batch = await self._queue.take(self.name, self._max_images)
                if batch:
                    await self._run(batch)
                else:
                    await self._queue.wait_for_work(self._check_every_s)
            except RedisError as error:
                log.warning("the shared queue cannot be reached (%s); trying again", error)
                await asyncio.sleep(RETRY_S)
            except Exception:
                # A bug must not stop this device from ever pulling again.
                log.exception("the worker loop failed; pulling again")
                await asyncio.sleep(RETRY_S)

    async def _keep_alive(self) -> None:
        while True:
            try:
                await self._queue.seen_alive(self.name)
                if self._held:
                    await self._queue.keep_alive(self.name, list(self._held.values()))
            except RedisError as error:
                log.debug("could not keep entries alive: %s", error)
            await asyncio.sleep(self._check_every_s)

    async def _claim_stale(self) -> list[Entry]:
        runnable, exhausted = await self._queue.claim_stale(self.name, self._max_images if self._device else 0)
        for entry, attempts in exhausted:
            log.warning("job %s was started %d times without finishing; it fails", entry.job_id, attempts)
            await self._records.fail(entry.job_id, entry.owner, gave_up_error(attempts))
            await self._queue.ack(entry)
        if runnable:
            log.info("claimed %d entries a stopped worker left", len(runnable))
        return runnable

    async def _run(self, batch: list[Entry]) -> None:
        """Start the batch on the device; return once the device is done with it (its outcomes may still be stored)."""
        for entry in batch:
            self._held[entry.job_id] = entry
        ready: list[tuple[Entry, GenerationRequest, LocalGenerator, EventWriter | None]] = []
        try:
            for entry in batch:
                started = await self._start(entry)
                if started is not None:
                    ready.append((entry, *started))
        except BaseException:
            # Redis failed half-way: what did not start is no longer kept alive, so it is claimed again later.
            for entry in batch:
                self._held.pop(entry.job_id, None)
            raise
        if not ready:
            return
        try:
            items = self._executor.submit_all(
                [
                    (request, generator, max(0.001, entry.deadline - time.time()), observer, entry.owner)
                    for entry, request, generator, observer in ready
                ]
            )
        except ApiError:
            # This replica stopped taking work between the take and now: another worker runs it.
            await self._queue.release(self.name, [entry for entry, *_ in ready])
            for entry, *_ in ready:
                self._held.pop(entry.job_id, None)
            return
        device_done = [asyncio.Event() for _ in items]
        for (entry, request, generator, observer), item, done in zip(ready, items, device_done, strict=True):
            self._running[entry.job_id] = item
            if entry.job_id in self._cancelled:
                self._executor.cancel(item)
            completion = asyncio.create_task(self._complete(entry, request, generator, observer, item, done))
            self._completions.add(completion)
            completion.add_done_callback(self._completions.discard)
        for done in device_done:
            await done.wait()

    async def _start(self, entry: Entry) -> tuple[GenerationRequest, LocalGenerator, EventWriter | None] | None:
        """Decode the entry and mark its job running; None when it must not run (it was settled here)."""
        try:
            generator = self._registry.as_local(self._registry.resolve(entry.text("model")))
            if generator is None:
                raise ApiError(404, "MODEL_NOT_AVAILABLE", f"Model '{entry.text('model')}' does not run on a device")
            request = wire.request_from_fields(entry.fields, generator)
        except ApiError as error:
            await self._settle(entry, error)
            return None
        state = await self._records.start(entry.job_id, request.steps, self.name)
        if state == "cancel":
            await self._settle(entry, cancelled_error())
            return None
        if state != "run":  # ended already (a worker stored it and died before acknowledging), or expired
            await self._settle(entry, None)
            return None
        if time.time() > entry.deadline:
            await self._settle(entry, timeout_error(entry.deadline - entry.submitted_at))
            return None
        observer = None
        # A listed job's steps go to its events, and so do those of a generation whose caller follows them.
        if entry.text("visible") == "1" or entry.fields.get("observed", b"0").decode() == OBSERVED_STEPS:
            observer = EventWriter(
                self._records, entry.job_id, wants_preview=entry.text("preview") == "1",
                total_steps=request.steps, announce_start=False,
            )
        return request, generator, observer

    async def _complete(
        self,
        entry: Entry,
        request: GenerationRequest,
        generator: LocalGenerator,
        observer: EventWriter | None,
        item: WorkItem,
        device_done: asyncio.Event,
    ) -> None:
        waited = time.time() - entry.submitted_at

        async def on_device() -> GenerationOutput:
            try:
                output = await self._executor.wait(item)
            finally:
                device_done.set()
            return dataclasses.replace(output, queue_time=waited + output.queue_time)

        visible = entry.text("visible") == "1"
        principal = Principal(sub=entry.owner, scopes=frozenset())
        recorded = False
        try:
            generated = await self._finish(principal, request, generator, on_device(), entry.text("store") == "1")
            result = await self._to_json(generated) if visible else None
            stored = None if visible else StoredResult(generated.pngs, _meta(generated))
            if observer is not None:
                await observer.flush()
            recorded = await self._persist(
                lambda: self._records.succeed(entry.job_id, entry.owner, request.num_images, result, stored)
            )
        except ApiError as error:
            if error.code == "SERVICE_UNAVAILABLE" and not self._executor.accepting:
                # Stopped by this replica's shutdown, not by the job: it runs again elsewhere.
                await self._release(entry)
                return
            if observer is not None:
                await observer.flush()
            failure = error  # the except clause unbinds `error` before the lambda runs
            recorded = await self._persist(lambda: self._records.fail(entry.job_id, entry.owner, failure))
        except Exception:
            log.exception("job %s failed", entry.job_id)
            recorded = await self._persist(
                lambda: self._records.fail(entry.job_id, entry.owner, ApiError(500, "INTERNAL_ERROR", "Generation failed"))
            )
        finally:
            device_done.set()
            self._running.pop(entry.job_id, None)
            self._cancelled.discard(entry.job_id)
        # Not recorded: it is no longer kept alive, so another worker claims it and runs it again.
        if recorded:
            await self._persist(lambda: self._queue.ack(entry))
        self._held.pop(entry.job_id, None)

    async def _settle(self, entry: Entry, error: ApiError | None) -> None:
        """End an entry that will not run here: record why (unless it had ended) and acknowledge it."""
        if error is not None:
            await self._records.fail(entry.job_id, entry.owner, error)
        await self._queue.ack(entry)
        self._held.pop(entry.job_id, None)

    async def _release(self, entry: Entry) -> None:
        with contextlib.suppress(RedisError):
            await self._queue.release(self.name, [entry])
        self._held.pop(entry.job_id, None)
        self._running.pop(entry.job_id, None)

    async def _persist(self, write: Callable[[], Awaitable[Any]]) -> bool:
        """Write an outcome through a Redis restart; False past PERSIST_FOR_S."""
        give_up = time.monotonic() + PERSIST_FOR_S
        while True:
            try:
                await write()
                return True
            except RedisError as error:
                if time.monotonic() > give_up:
                    log.error("could not store an outcome in the shared queue: %s", error)
                    return False
                await asyncio.sleep(RETRY_S)


def _meta(generated: Generated) -> dict[str, Any]:
    output = generated.output
    return {
        "seeds": output.seeds,
        "generation_time": output.generation_time,
        "queue_time": output.queue_time,
        "vram_used": output.vram_used,
        "runtime": output.runtime,
        "ids": generated.ids,
        "encode_time": generated.encode_time,
        "store_time": generated.store_time,
    }
