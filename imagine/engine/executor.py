"""The device executor: one thread owns the accelerator and runs every torch call.

Handlers submit a `Job` and await its future; the thread resolves it with
`loop.call_soon_threadsafe`, so nothing blocking ever runs on the event loop.
The queue is bounded, every job has a deadline, and a job can be stopped at
any time: removed if still queued, interrupted at its next denoising step if
running. Compatible queued jobs run as one batch (see `imagine.engine.batching`);
a member stopped mid-run is answered at once and its images discarded, while
the others go on. Control tasks (loading or unloading a model) run on the same
thread between batches, ahead of queued jobs, and hand their result back the
same way.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from imagine.engine import device
from imagine.engine.batching import FairBatcher
from imagine.errors import ApiError
from imagine.plugin.generators import GenerationInterrupted, GenerationRequest, Generator, StepProgress
from imagine.engine.registry import ModelRegistry
from imagine.engine.telemetry import NO_TELEMETRY, Telemetry

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationOutput:
    images: list[Image.Image]
    seeds: list[int]
    generation_time: float  # seconds on the device
    queue_time: float  # seconds waiting for it
    vram_used: float  # GB at the peak of this run; 0.0 without a GPU
    runtime: dict[str, Any]  # device and dtype, as the generator reports them


def cancelled_error() -> ApiError:
    return ApiError(499, "CANCELLED", "The generation was cancelled")


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, "TIMEOUT", f"The generation did not finish within {timeout_s:g} s")


class JobObserver(Protocol):
    """Told, on the event loop, how a job moves through the queue and the device."""

    wants_preview: bool

    def queued(self, position: int, eta_s: float) -> None: ...

    def started(self) -> None: ...

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None: ...


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    generator: Generator
    timeout_s: float
    future: asyncio.Future[GenerationOutput]
    id: str = field(default_factory=lambda: "job_" + secrets.token_urlsafe(12))
    state: JobState = JobState.QUEUED
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    # Set by any thread to stop the job; `stop_error` says why.
    _stop: threading.Event = field(default_factory=threading.Event)
    stop_error: ApiError | None = None
    observer: JobObserver | None = None
    owner: str = ""  # the subject, for fair turns between callers

    @property
    def images(self) -> int:
        return self.request.num_images

    @property
    def batch_key(self) -> tuple[Any, ...]:
        return self.request.batch_key()

    @property
    def deadline(self) -> float:
        return self.submitted_at + self.timeout_s

    def request_stop(self, error: ApiError) -> None:
        if not self._stop.is_set():
            self.stop_error = error
            self._stop.set()

    def should_stop(self) -> bool:
        if not self._stop.is_set() and time.monotonic() > self.deadline:
            self.request_stop(timeout_error(self.timeout_s))
        return self._stop.is_set()


@dataclass(eq=False)
class ControlTask:
    """Work that must run on the device thread but is no generation (loading a model, say)."""

    run: Callable[[], Any]
    future: asyncio.Future[Any]


def _resolve(future: asyncio.Future[Any], result: Any, error: ApiError | None) -> None:
    """Settle a future on its loop, unless a cancelled waiter already gave it up."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# A replica that stops is restarted, or another behind the proxy takes the retry, within seconds.
SHUTDOWN_RETRY_AFTER_S = 5
# How long stop() waits for the device thread: a step longer than this is not worth delaying the exit for.
STOP_JOIN_S = 5.0


def shutting_down_error() -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        "The service is shutting down, retry later",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
    )


class DeviceExecutor:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_queue: int,
        device_preference: str,
        preload: Sequence[str] = (),
        preview_every: int = 5,
        batch_max_images: int = 1,
        batch_max_wait_ms: float = 0.0,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._registry = registry
        self._telemetry = telemetry
        self._preview_every = preview_every
        self._batch_max_images = batch_max_images
        self._batch_max_wait_s = batch_max_wait_ms / 1000
        self._batcher = FairBatcher()
        self.capacity = max_queue
        self._device_preference = device_preference
        self._preload = tuple(preload)
        self._queue: collections.deque[Job] = collections.deque()
        self._controls: collections.deque[ControlTask] = collections.deque()
        self._condition = threading.Condition()
        # Jobs submitted and not settled yet, wherever they are (queued, in a forming batch, running).
        self._unfinished: set[Job] = set()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.device = "cpu"
        self.report = device.UNPROBED
        self.running: list[Job] = []
        # Mean seconds per job (moving average), overall for Retry-After and
        # per model for ETAs; a model not measured yet borrows the overall figure.
        self.seconds_per_job = 1.0
        self._seconds_by_model: dict[str, float] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()

    # ---- event-loop side -------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="imagine-device", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._accepting = False
            self._condition.notify_all()
        if self.fail_unfinished():
            log.warning("the device executor stopped with generations left; they failed with SERVICE_UNAVAILABLE")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("the device thread is still busy after %g s; exiting without it", STOP_JOIN_S)

    def close_intake(self) -> list[Job]:
        """Refuse new generations and control tasks from now on (503); the jobs accepted and not finished."""
        with self._condition:
            self._accepting = False
            return list(self._unfinished)

    def fail_unfinished(self) -> int:
        """Fail every unfinished job with SERVICE_UNAVAILABLE: queued ones now, running ones at their next step.

        Returns how many there were; queued control tasks fail the same way.
        """
        error = shutting_down_error()
        with self._condition:
            unfinished = list(self._unfinished)
            queued = list(self._queue)
            self._queue.clear()
            controls = list(self._controls)
            self._controls.clear()
        for job in unfinished:
            job.request_stop(error)  # a forming batch drops it, a running one at its next step
        for job in queued:
            self._settle(job, JobState.FAILED, error=error)
        for control in controls:
            _resolve(control.future, None, error)
        return len(unfinished)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        return max(1, math.ceil((self.depth + 1) * self.seconds_per_job))

    def submit(
        self,
        request: GenerationRequest,
        generator: Generator,
        timeout_s: float,
        observer: JobObserver | None = None,
        owner: str = "",
    ) -> Job:
        assert self._loop is not None, "executor not started"
        future: asyncio.Future[GenerationOutput] = self._loop.create_future()
        # Nobody may be left to await a cancelled job: mark its error as seen.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        job = Job(request=request, generator=generator, timeout_s=timeout_s, future=future, observer=observer, owner=owner)
        with self._condition:
            if not self._accepting:
                raise shutting_down_error()
            if len(self._queue) >= self.capacity:
                raise ApiError(
                    503,
                    "QUEUE_FULL",
                    "The generation queue is full, retry later",
                    details={"queue_depth": len(self._queue), "capacity": self.capacity},
                    headers={"Retry-After": str(self.retry_after_s())},
                )
            self._queue.append(job)
            self._unfinished.add(job)
            self._condition.notify()
        if observer is not None:
            observer.queued(self.position(job), self.eta_s(job))
        return job

    async def call(self, task: Callable[[], T]) -> T:
        """Run `task` on the device thread before the next queued job, and return its result."""
        assert self._loop is not None, "executor not started"
        future: asyncio.Future[T] = self._loop.create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        with self._condition:
            if self._stopping or not self._accepting:
                raise shutting_down_error()
            self._controls.append(ControlTask(task, future))
            self._condition.notify()
        # A handler cancelled meanwhile does not stop the task: a half-done load helps nobody.
        return await asyncio.shield(future)

    def position(self, job: Job) -> int:
        """0 while running or done, else 1 for the next job to run."""
        with self._condition:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return 0

    def _estimate_s(self, job: Job) -> float:
        return self._seconds_by_model.get(job.request.model, self.seconds_per_job)

    def eta_s(self, job: Job) -> float:
        """Seconds until `job` is done: the jobs ahead, what is left of the running one, its own."""
        with self._condition:
            queued = list(self._queue)
        ahead = queued[: queued.index(job)] if job in queued else []
        eta = sum(self._estimate_s(other) for other in ahead) + self._estimate_s(job)
        running = self.running
        if running and job not in running and running[0].started_at is not None:
            eta += max(0.0, self._estimate_s(running[0]) - (time.monotonic() - running[0].started_at))
        return round(eta, 2)

    def _announce_positions(self) -> None:
        """On the loop, after a job left the queue: everyone behind it moved up."""
        with self._condition:
            waiting = list(self._queue)
        for job in waiting:
            if job.observer is not None:
                job.observer.queued(self.position(job), self.eta_s(job))

    def _on_loop(self, callback: Any, *arguments: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *arguments)

    def cancel(self, job: Job, error: ApiError | None = None) -> None:
        """Stop a job: dropped now if queued, at its next step if running."""
        error = error or cancelled_error()
        job.request_stop(error)
        with self._condition:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running or finished: the device thread sees the stop flag
        self._settle(job, JobState.CANCELLED, error=error)
        self._announce_positions()

    async def wait(self, job: Job) -> GenerationOutput:
        """Await a job; if the awaiting handler is cancelled (client gone), so is the job."""
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            self.cancel(job, timeout_error(job.timeout_s))
            raise timeout_error(job.timeout_s) from None
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def _settle(self, job: Job, state: JobState, output: GenerationOutput | None = None, error: ApiError | None = None) -> None:
        """Record the outcome and resolve the future on the loop (callable from any thread)."""
        job.state = state
        self.outcomes[state.value] += 1
        with self._condition:
            self._unfinished.discard(job)
        assert self._loop is not None
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # the device thread has no loop
            on_loop = False
        if on_loop:
            _resolve(job.future, output, error)
        else:
            self._loop.call_soon_threadsafe(_resolve, job.future, output, error)

    # ---- device thread ----------------------------------------------------

    def _run(self) -> None:
        self.device = device.choose_device(self._device_preference)
        self.report = device.report(self.device)
        for name in self._preload:
            try:
                self._registry.ensure_loaded(self._registry.resolve(name))
            except ApiError:
                pass  # recorded in the registry; /health reports it
        self.report = device.report(self.device)
        while (batch := self._next_batch()) is not None:
            self._execute(batch)
            self.report = device.report(self.device)

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run, after running any control tasks waiting before them."""
        while True:
            with self._condition:
                while not self._queue and not self._controls and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return None
                control = self._controls.popleft() if self._controls else None
                if control is None:
                    batch = self._batcher.take(self._queue, self._batch_max_images)
                    self._wait_for_company(batch)
                    live = []
                    for job in batch:
                        if job.should_stop():  # expired while waiting
                            self._settle(job, JobState.FAILED, error=job.stop_error)
                        else:
                            live.append(job)
                    if not live:
                        continue
                    for job in live:
                        job.state = JobState.RUNNING
                        if job.observer is not None:
                            self._on_loop(job.observer.started)
                    self.running = live
                    self._on_loop(self._announce_positions)
                    return live
            self._run_control(control)  # outside the lock: submissions go on meanwhile

    def _run_control(self, control: ControlTask) -> None:
        result: Any = None
        error: ApiError | None = None
        try:
            result = control.run()
        except ApiError as failure:
            error = failure
        except Exception:
            log.exception("a control task on the device thread failed")
            error = ApiError(500, "INTERNAL_ERROR", "The operation failed")
        self.report = device.report(self.device)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, control.future, result, error)

    def _wait_for_company(self, batch: list[Job]) -> None:
        """With batch.max_wait_ms, give compatible requests a moment to arrive (lock held)."""
        deadline = time.monotonic() + self._batch_max_wait_s
        while (room := self._batch_max_images - sum(job.images for job in batch)) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return
            self._condition.wait(remaining)
            joining = self._batcher.compatible(self._queue, batch[0].batch_key, room)
            for job in joining:
                self._queue.remove(job)
            batch.extend(joining)

    def _execute(self, batch: list[Job]) -> None:
        started_at = time.monotonic()
        generator = batch[0].generator
        for job in batch:
            job.started_at = started_at
            self._telemetry.queue_waited(started_at - job.submitted_at)
        try:
            self._registry.ensure_loaded(generator)
            outputs = self._generate(batch)
            # A generation can grow a model (LoRA adapters): measure before answering,
            # so the budget and /models are up to date when the client reads them.
            self._registry.remeasure(generator)
        except GenerationInterrupted:
            pass  # every member was stopped, and settled as it stopped
        except ApiError as error:
            self._settle_all(batch, JobState.FAILED, error)
        except Exception as error:
            still_running = [job for job in batch if job.state is JobState.RUNNING]
            if len(still_running) > 1 and device.is_out_of_memory(error):
                # The batch was too big for the device, not necessarily any one
                # request: give its memory back, then run the members one by one.
                self._release_memory(generator, error)
                for job in still_running:
                    self._execute([job])
            else:
                self._settle_all(batch, JobState.FAILED, self._failure(generator, error))
        else:
            for job, output in zip(batch, outputs, strict=True):
                self._settle_unless_stopped(job, output)
        finally:
            self.running = []
            per_job = (time.monotonic() - started_at) / len(batch)
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * per_job
            model = generator.name
            self._seconds_by_model[model] = 0.8 * self._seconds_by_model.get(model, per_job) + 0.2 * per_job

    def _settle_all(self, batch: list[Job], state: JobState, error: ApiError) -> None:
        for job in batch:
            if not job.future.done() and job.state is JobState.RUNNING:
                self._settle(job, state, error=error)

    def _settle_stopped(self, job: Job) -> None:
        error = job.stop_error or cancelled_error()
        self._settle(job, JobState.CANCELLED if error.code == "CANCELLED" else JobState.FAILED, error=error)

    def _settle_unless_stopped(self, job: Job, output: GenerationOutput) -> None:
        if job.state is not JobState.RUNNING:
            return  # left the batch when it was stopped
        if job.should_stop():
            self._settle_stopped(job)
        else:
            self._settle(job, JobState.SUCCEEDED, output=output)

    def _generate(self, batch: list[Job]) -> list[GenerationOutput]:
        generator = batch[0].generator

        # Where each job's images sit in the batch's latents: a preview shows the job's own.
        offsets = list(itertools.accumulate((job.images for job in batch[:-1]), initial=0))

        def on_step(progress: StepProgress) -> bool:
            for job, offset in zip(batch, offsets, strict=True):
                if job.state is not JobState.RUNNING:
                    continue
                if job.should_stop():
                    # It leaves the batch now: its caller hears at once, the others go on.
                    self._settle_stopped(job)
                    continue
                if job.observer is not None:
                    preview = None
                    if job.observer.wants_preview and progress.latents is not None and progress.step % self._preview_every == 0:
                        preview = generator.latent_preview(progress.latents[offset : offset + 1])
                    self._on_loop(job.observer.progress, progress.step, progress.total, preview)
            return all(job.state is not JobState.RUNNING for job in batch)

        started = time.perf_counter()
        images = generator.generate([job.request for job in batch], on_step)
        generation_time = time.perf_counter() - started
        self._telemetry.generated(generator.name, generation_time, sum(len(job_images) for job_images in images))
        self._telemetry.batched(len(batch))
        vram_used = device.generation_memory_gb(self.device)
        runtime = generator.runtime_info()
        return [
            GenerationOutput(
                images=job_images,
                seeds=job.request.seeds,
                generation_time=generation_time,
                queue_time=(job.started_at or 0.0) - job.submitted_at,
                vram_used=vram_used,
                runtime=runtime,
            )
            for job, job_images in zip(batch, images, strict=True)
        ]

    def _release_memory(self, generator: Generator, error: BaseException) -> None:
        """After an out-of-memory error: drop the cached blocks so the next run has room.

        The traceback's frames still hold the failed run's tensors; clear them
        first, or the cache could not give their blocks back.
        """
        traceback.clear_frames(error.__traceback__)
        device.free_cache(self.device)
        log.warning("out of memory generating with %s; cache freed", generator.name)

    def _failure(self, generator: Generator, error: Exception) -> ApiError:
        if device.is_out_of_memory(error):
            # Only this job fails; the next one finds the memory free.
            self._release_memory(generator, error)
            return ApiError(
                503,
                "OUT_OF_MEMORY",
                "The device ran out of memory for this generation; try a smaller size or fewer images",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        log.exception("generation with %s failed", generator.name)
        return ApiError(500, "INTERNAL_ERROR", "Generation failed")
