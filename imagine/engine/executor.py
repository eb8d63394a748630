"""The device executor: one thread owns the accelerator and runs every torch call.

Handlers submit a `WorkItem` (see `imagine.engine.work`) and await its future;
the thread resolves it with `loop.call_soon_threadsafe`, so nothing blocking
ever runs on the event loop. Work waits in a bounded `WorkQueue` (see
`imagine.engine.queue`), has a deadline, and can be stopped at any time:
removed if still queued, interrupted at its next denoising step if running.
The queue hands out compatible work as one batch; a member stopped mid-run is
answered at once and its images discarded, while the others go on. Control
tasks (loading or unloading a model) run on the same thread between batches,
ahead of queued work, and hand their result back the same way.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from imagine.engine import device
from imagine.engine.batch_sizing import BatchSizer
from imagine.engine.queue import QueueFull, WorkQueue
from imagine.engine.registry import ModelRegistry
from imagine.engine.telemetry import NO_TELEMETRY, Telemetry
from imagine.engine.work import (
    GenerationOutput,
    JobObserver,
    WorkItem,
    WorkState,
    cancelled_error,
    shutting_down_error,
    timeout_error,
)
from imagine.errors import ApiError
from imagine.plugin.generators import GenerationInterrupted, GenerationRequest, Generator, StepProgress

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")
# One image of a request, made with the seed given, as PNG bytes.
PngOfImage = Callable[[GenerationRequest, "Image.Image", int], bytes]

# How long stop() waits for the device thread: a step longer than this is not worth delaying the exit for.
STOP_JOIN_S = 5.0


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


class DeviceExecutor:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        queue: WorkQueue[WorkItem],
        device_preference: str,
        preload: Sequence[str] = (),
        preview_every: int = 5,
        batch_max_images: int = 1,
        batch_max_wait_ms: float = 0.0,
        adaptive_batches: bool = False,
        defer_switches: bool = False,
        telemetry: Telemetry = NO_TELEMETRY,
        encoder: PngOfImage | None = None,
    ) -> None:
        self._registry = registry
        # Encodes a finished item's images while no other work waits for the device: the hand-off to the
        # encoding pool and back costs a lone request more than the encoding itself, on a device idle anyway.
        self._encoder = encoder
        self._queue = queue
        self._telemetry = telemetry
        self._preview_every = preview_every
        self._batch_max_images = batch_max_images
        # With adaptive_batches, each batch's size is capped at what its shape has measured fastest.
        self.batch_sizer = BatchSizer(batch_max_images) if adaptive_batches else None
        self._batch_max_wait_s = batch_max_wait_ms / 1000
        # With defer_switches, work the device is ready for may go before work that needs a model
        # loaded again or a checkpoint swapped in, for as long as that would take.
        self._switch_cost = self._seconds_to_get_ready if defer_switches else None
        self._device_preference = device_preference
        self._preload = tuple(preload)
        self._controls: collections.deque[ControlTask] = collections.deque()
        # Taken before the queue's own lock, never after: intake decisions and the queue agree.
        self._lock = threading.Lock()
        # Work submitted and not settled yet, wherever it is (queued, in a forming batch, running).
        self._unfinished: set[WorkItem] = set()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.device = "cpu"
        self.report = device.UNPROBED
        self.running: list[WorkItem] = []
        # Mean seconds per item (moving average), overall for Retry-After and
        # per model for ETAs; a model not measured yet borrows the overall figure.
        self.seconds_per_item = 1.0
        self._seconds_by_model: dict[str, float] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()

    # ---- event-loop side -------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="imagine-device", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._accepting = False
        self._queue.close()
        if self.fail_unfinished():
            log.warning("the device executor stopped with generations left; they failed with SERVICE_UNAVAILABLE")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("the device thread is still busy after %g s; exiting without it", STOP_JOIN_S)

    def close_intake(self) -> list[WorkItem]:
        """Refuse new generations and control tasks from now on (503); the work accepted and not finished."""
        with self._lock:
            self._accepting = False
            return list(self._unfinished)

    def fail_unfinished(self) -> int:
        """Fail all unfinished work with SERVICE_UNAVAILABLE: queued items now, running ones at their next step.

        Returns how many there were; queued control tasks fail the same way.
        """
        error = shutting_down_error()
        with self._lock:
            unfinished = list(self._unfinished)
            queued = self._queue.drain()
            controls = list(self._controls)
            self._controls.clear()
        for item in unfinished:
            item.request_stop(error)  # a forming batch drops it, a running one at its next step
        for item in queued:
            self._settle(item, WorkState.FAILED, error=error)
        for control in controls:
            _resolve(control.future, None, error)
        return len(unfinished)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        return self._queue.capacity

    def retry_after_s(self) -> int:
        return max(1, math.ceil((self.depth + 1) * self.seconds_per_item))

    @property
    def accepting(self) -> bool:
        """False once the intake closed (shutdown): submissions answer 503."""
        return self._accepting

    def submit(
        self,
        request: GenerationRequest,
        generator: Generator,
        timeout_s: float,
        observer: JobObserver | None = None,
        owner: str = "",
    ) -> WorkItem:
        return self.submit_all([(request, generator, timeout_s, observer, owner)])[0]

    def submit_all(
        self, works: Sequence[tuple[GenerationRequest, Generator, float, JobObserver | None, str]]
    ) -> list[WorkItem]:
        """Queue (request, generator, timeout_s, observer, owner) works together, all or none, so the
        device thread can take them as one batch."""
        assert self._loop is not None, "executor not started"
        items = []
        for request, generator, timeout_s, observer, owner in works:
            future: asyncio.Future[GenerationOutput] = self._loop.create_future()
            # Nobody may be left to await cancelled work: mark its error as seen.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            items.append(
                WorkItem(request=request, generator=generator, timeout_s=timeout_s, future=future, observer=observer, owner=owner)
            )
        with self._lock:
            if not self._accepting:
                raise shutting_down_error()
            try:
                self._queue.submit(*items)
            except QueueFull as full:
                raise ApiError(
                    503,
                    "QUEUE_FULL",
                    "The generation queue is full, retry later",
                    details={"queue_depth": full.depth, "capacity": full.capacity},
                    headers={"Retry-After": str(self.retry_after_s())},
                ) from None
            self._unfinished.update(items)
        for item in items:
            if item.observer is not None:
                item.observer.queued(self.position(item), self.eta_s(item))
        return items

    async def call(self, task: Callable[[], T]) -> T:
        """Run `task` on the device thread before the next queued work, and return its result."""
        if self._thread is None:
            raise ApiError(503, "SERVICE_UNAVAILABLE", "This replica runs no device (imagine serve --no-device)")
        assert self._loop is not None, "executor not started"
        future: asyncio.Future[T] = self._loop.create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        with self._lock:
            if self._stopping or not self._accepting:
                raise shutting_down_error()
            self._controls.append(ControlTask(task, future))
        self._queue.wake()
        # A handler cancelled meanwhile does not stop the task: a half-done load helps nobody.
        return await asyncio.shield(future)

    def position(self, item: WorkItem) -> int:
        """0 while running or done, else 1 for the next item to run."""
        return self._queue.position(item)

    def _estimate_s(self, item: WorkItem) -> float:
        return self._seconds_by_model.get(item.request.model, self.seconds_per_item)

    def eta_s(self, item: WorkItem) -> float:
        """Seconds until `item` is done: the work ahead, what is left of the running batch, its own."""
        for waiting, eta in self._queue_etas():
            if waiting is item:
                return round(eta, 2)
        # Running, or just taken from the queue.
        return round(self._estimate_s(item) + (0.0 if item in self.running else self._running_left_s()), 2)

    def _queue_etas(self) -> Iterator[tuple[WorkItem, float]]:
        """Each waiting item, in queue order, with the seconds until it is done: the one ahead's, plus its own."""
        eta = self._running_left_s()
        for item in self._queue.waiting():
            eta += self._estimate_s(item)
            yield item, eta

    def _running_left_s(self) -> float:
        """What is left of the running batch, by its estimate."""
        running = self.running
        if running and running[0].started_at is not None:
            return max(0.0, self._estimate_s(running[0]) - (time.monotonic() - running[0].started_at))
        return 0.0

    def _announce_positions(self) -> None:
        """On the loop, after an item left the queue: everyone behind it moved up. One pass down the queue:
        every waited-for generation has an observer."""
        for position, (item, eta) in enumerate(self._queue_etas(), 1):
            if item.observer is not None:
                item.observer.queued(position, round(eta, 2))

    def _on_loop(self, callback: Any, *arguments: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *arguments)

    def cancel(self, item: WorkItem, error: ApiError | None = None) -> None:
        """Stop work: dropped now if queued, at its next step if running."""
        error = error or cancelled_error()
        item.request_stop(error)
        if not self._queue.cancel(item):
            return  # running or finished: the device thread sees the stop flag
        self._settle(item, WorkState.CANCELLED, error=error)
        self._announce_positions()

    async def wait(self, item: WorkItem) -> GenerationOutput:
        """Await work; if the awaiting handler is cancelled (client gone), so is the work."""
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout=max(0.0, item.deadline - time.monotonic()))
        except TimeoutError:
            self.cancel(item, timeout_error(item.timeout_s))
            raise timeout_error(item.timeout_s) from None
        except asyncio.CancelledError:
            self.cancel(item)
            raise

    def _settle(self, item: WorkItem, state: WorkState, output: GenerationOutput | None = None, error: ApiError | None = None) -> None:
        """Record the outcome and resolve the future on the loop (callable from any thread)."""
        item.state = state
        self.outcomes[state.value] += 1
        with self._lock:
            self._unfinished.discard(item)
        assert self._loop is not None
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # the device thread has no loop
            on_loop = False
        if on_loop:
            _resolve(item.future, output, error)
        else:
            self._loop.call_soon_threadsafe(_resolve, item.future, output, error)

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

    def _next_batch(self) -> list[WorkItem] | None:
        """The next work to run, after running any control tasks waiting before it."""
        while True:
            with self._lock:
                if self._stopping:
                    return None
                control = self._controls.popleft() if self._controls else None
            if control is not None:
                self._run_control(control)  # submissions go on meanwhile
                continue
            limit = self._batch_max_images if self.batch_sizer is None else self._learnt_limit
            batch = self._queue.take(limit, self._batch_max_wait_s, self._switch_cost)
            if batch is None:
                return None
            live = []
            for item in batch:
                if item.should_stop():  # expired while waiting
                    self._settle(item, WorkState.FAILED, error=item.stop_error)
                else:
                    live.append(item)
            if not live:
                continue  # woken for a control task, or everything taken had expired
            for item in live:
                item.state = WorkState.RUNNING
                if item.observer is not None:
                    self._on_loop(item.observer.started)
            self.running = live
            self._on_loop(self._announce_positions)
            return live

    def _seconds_to_get_ready(self, item: WorkItem) -> float:
        return self._registry.switch_cost_s(item.generator, item.request)

    def _learnt_limit(self, head: WorkItem) -> int:
        assert self.batch_sizer is not None
        return self.batch_sizer.limit(head.request)

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

    def _execute(self, batch: list[WorkItem]) -> None:
        started_at = time.monotonic()
        generator = batch[0].generator
        for item in batch:
            item.started_at = started_at
            self._telemetry.queue_waited(started_at - item.submitted_at)
        try:
            self._registry.ensure_loaded(generator)
            outputs = self._generate(batch)
            # A generation can grow a model (LoRA adapters): measure before answering,
            # so the budget and /models are up to date when the client reads them.
            self._registry.remeasure(generator)
        except GenerationInterrupted:
            pass  # every member was stopped, and settled as it stopped
        except ApiError as error:
            self._settle_all(batch, WorkState.FAILED, error)
        except Exception as error:
            still_running = [item for item in batch if item.state is WorkState.RUNNING]
            if len(still_running) > 1:
                # Out of memory, the batch was too big for the device, not necessarily any one
                # request; any other failure may be one caller's request that the others must
                # not fail with. Either way the members run again one by one, and only a
                # request that fails alone fails.
                if device.is_out_of_memory(error):
                    self._release_memory(generator, error)
                else:
                    log.warning(
                        "a batch of %d with %s failed (%r); running its members one by one",
                        len(still_running), generator.name, error,
                    )
                for item in still_running:
                    self._execute([item])
            else:
                self._settle_all(batch, WorkState.FAILED, self._failure(generator, error))
        else:
            for item, output in zip(batch, outputs, strict=True):
                self._settle_unless_stopped(item, self._encoded_if_idle(item, output))
        finally:
            self.running = []
            per_item = (time.monotonic() - started_at) / len(batch)
            self.seconds_per_item = 0.8 * self.seconds_per_item + 0.2 * per_item
            model = generator.name
            self._seconds_by_model[model] = 0.8 * self._seconds_by_model.get(model, per_item) + 0.2 * per_item

    def _encoded_if_idle(self, item: WorkItem, output: GenerationOutput) -> GenerationOutput:
        """`output` with its PNGs when no work or control task waits for the device, else as it is
        (the encoding pool encodes it then, and the device goes on)."""
        if self._encoder is None or len(self._queue) or self._controls or item.state is not WorkState.RUNNING:
            return output
        started = time.perf_counter()
        try:
            pngs = [self._encoder(item.request, image, seed) for image, seed in zip(output.images, output.seeds, strict=True)]
        except Exception:
            # Not this thread's to fail: the pool encodes it again, and a failure there is the request's.
            log.exception("encoding on the device thread failed")
            return output
        return dataclasses.replace(output, pngs=pngs, encode_time=time.perf_counter() - started)

    def _settle_all(self, batch: list[WorkItem], state: WorkState, error: ApiError) -> None:
        for item in batch:
            if not item.future.done() and item.state is WorkState.RUNNING:
                self._settle(item, state, error=error)

    def _settle_stopped(self, item: WorkItem) -> None:
        error = item.stop_error or cancelled_error()
        self._settle(item, WorkState.CANCELLED if error.code == "CANCELLED" else WorkState.FAILED, error=error)

    def _settle_unless_stopped(self, item: WorkItem, output: GenerationOutput) -> None:
        if item.state is not WorkState.RUNNING:
            return  # left the batch when it was stopped
        if item.should_stop():
            self._settle_stopped(item)
        else:
            self._settle(item, WorkState.SUCCEEDED, output=output)

    def _generate(self, batch: list[WorkItem]) -> list[GenerationOutput]:
        generator = batch[0].generator

        # Where each item's images sit in the batch's latents: a preview shows the item's own.
        offsets = list(itertools.accumulate((item.images for item in batch[:-1]), initial=0))

        def on_step(progress: StepProgress) -> bool:
            for item, offset in zip(batch, offsets, strict=True):
                if item.state is not WorkState.RUNNING:
                    continue
                if item.should_stop():
                    # It leaves the batch now: its caller hears at once, the others go on.
                    self._settle_stopped(item)
                    continue
                if item.observer is not None and item.observer.wants_steps:
                    preview = None
                    if item.observer.wants_preview and progress.latents is not None and progress.step % self._preview_every == 0:
                        preview = generator.latent_preview(progress.latents[offset : offset + 1])
                    self._on_loop(item.observer.progress, progress.step, progress.total, preview)
            return all(item.state is not WorkState.RUNNING for item in batch)

        started = time.perf_counter()
        images = generator.generate([item.request for item in batch], on_step)
        generation_time = time.perf_counter() - started
        made = sum(len(item_images) for item_images in images)
        self._telemetry.generated(generator.name, generation_time, made)
        self._telemetry.batched(len(batch))
        if self.batch_sizer is not None and all(item.state is WorkState.RUNNING for item in batch):
            # A run whose members all stayed measures the size it ran at.
            self.batch_sizer.observe(batch[0].request, made, generation_time)
        vram_used = device.generation_memory_gb(self.device)
        runtime = generator.runtime_info()
        return [
            GenerationOutput(
                images=item_images,
                seeds=item.request.seeds,
                generation_time=generation_time,
                queue_time=(item.started_at or 0.0) - item.submitted_at,
                vram_used=vram_used,
                runtime=runtime,
            )
            for item, item_images in zip(batch, images, strict=True)
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
            # Only this item fails; the next one finds the memory free.
            self._release_memory(generator, error)
            return ApiError(
                503,
                "OUT_OF_MEMORY",
                "The device ran out of memory for this generation; try a smaller size or fewer images",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        log.exception("generation with %s failed", generator.name)
        return ApiError(500, "INTERNAL_ERROR", "Generation failed")
