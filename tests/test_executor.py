"""The device executor on its own, no HTTP: batches, stops at a step, deadlines, out of memory, shutdown.

Its registry is built through the plugin hook from the test plugins: the slow
generator (real time per step, records its batches and interrupted runs) and
the out-of-memory one. To make work queue up together, a test holds the
device thread with a control task, which runs ahead of any queued work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy
import pytest

from imagine.engine.executor import DeviceExecutor
from imagine.engine.queue import MemoryQueue, QueueFull
from imagine.engine.registry import ModelRegistry
from imagine.engine.telemetry import NoTelemetry
from imagine.engine.work import GenerationOutput, WorkItem
from imagine.errors import ApiError
from imagine.plugin import hookspecs
from imagine.plugin.hookspecs import hookimpl
from imagine.plugin.generators import GenerationRequest
from imagine.plugin.manager import collect_generators
from imagine.settings import Settings
from tests import oom_plugin
from tests.oom_plugin import BUG_TRIGGER, TRIGGER
from tests.slow_plugin import SlowGenerator, SlowPlugin
from tests.test_jobs import wait_for

# Upper bound for anything a test awaits; nothing here should take more than a second or two.
LIMIT_S = 20.0
E = TypeVar("E", bound="ExecutorUnderTest")


class BatchSizes(NoTelemetry):
    """Remembers how many items each pipeline call served."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def batched(self, jobs: int) -> None:
        self.sizes.append(jobs)


class ExecutorUnderTest:
    """A device executor on the CPU over `registry`, counting the items of each pipeline call."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        capacity: int,
        batch: int,
        preview_every: int = 5,
        adaptive: bool = False,
        defer_switches: bool = False,
    ) -> None:
        self.registry = registry
        self.telemetry = BatchSizes()
        self.executor = DeviceExecutor(
            registry,
            queue=MemoryQueue(capacity),
            device_preference="cpu",
            preview_every=preview_every,
            batch_max_images=batch,
            adaptive_batches=adaptive,
            defer_switches=defer_switches,
            telemetry=self.telemetry,
        )


@contextlib.asynccontextmanager
async def started_executors() -> AsyncIterator[Callable[[E], E]]:
    """`start(device)` starts its executor; every one started is stopped on the way out."""
    started: list[ExecutorUnderTest] = []

    def start(device: E) -> E:
        device.executor.start()
        started.append(device)
        return device

    try:
        yield start
    finally:
        for device in started:
            await device.executor.stop()


class Device(ExecutorUnderTest):
    """An executor over the test plugins' generators, with what a test needs to drive it."""

    def __init__(
        self,
        *plugins: Any,
        capacity: int,
        batch: int,
        adaptive: bool = False,
        defer_switches: bool = False,
        memory_budget_bytes: int | None = None,
    ) -> None:
        manager = pluggy.PluginManager(hookspecs.PROJECT)
        manager.add_hookspecs(hookspecs)
        for plugin in plugins:
            manager.register(plugin)
        generators = collect_generators(manager, Settings())
        registry = ModelRegistry(generators, default=next(iter(generators)), memory_budget_bytes=memory_budget_bytes)
        super().__init__(registry, capacity=capacity, batch=batch, adaptive=adaptive, defer_switches=defer_switches)

    def submit(
        self, prompt: str, *, model: str = "slow", steps: int = 2, timeout_s: float = LIMIT_S, owner: str = "alice"
    ) -> WorkItem:
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt="",
            model=model,
            width=64,
            height=64,
            steps=steps,
            guidance=0.0,
            num_images=1,
            seed=7,
            scheduler="euler",
        )
        return self.executor.submit(request, self.registry.resolve(model), timeout_s, owner=owner)

    async def result(self, item: WorkItem) -> GenerationOutput:
        return await asyncio.wait_for(self.executor.wait(item), LIMIT_S)

    async def between_batches(self) -> None:
        """Returns once the device thread finished what it was running (control tasks run between batches)."""
        await asyncio.wait_for(self.executor.call(lambda: None), LIMIT_S)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """The device thread is busy with a control task inside the block: work submitted meanwhile waits."""
        gate = threading.Event()
        holding = asyncio.create_task(self.executor.call(lambda: gate.wait(LIMIT_S)))
        await asyncio.sleep(0)  # the control task is queued, ahead of anything submitted next
        try:
            yield
        finally:
            gate.set()
            await asyncio.wait_for(holding, LIMIT_S)


@pytest.fixture
async def start_device() -> AsyncIterator[Callable[..., Device]]:
    async with started_executors() as start:
        yield lambda *plugins, capacity=8, batch=1: start(Device(*plugins, capacity=capacity, batch=batch))


async def failure(outcome: Awaitable[Any]) -> ApiError:
    with pytest.raises(ApiError) as failed:
        await asyncio.wait_for(outcome, LIMIT_S)
    return failed.value


def refusal(submit: Callable[[], Any]) -> ApiError:
    with pytest.raises(ApiError) as refused:
        submit()
    return refused.value


async def started(generator: SlowGenerator) -> None:
    assert await asyncio.to_thread(generator.started.wait, LIMIT_S), "the generator never started"


# ---- batching ---------------------------------------------------------------


async def test_compatible_work_runs_as_one_batch_up_to_the_batch_size_and_incompatible_work_apart(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin, batch=3)
    async with device.held():
        compatible = [device.submit(f"a{n}") for n in range(4)]
        other = device.submit("b", steps=3)  # another step count: it cannot share a pipeline call
    outputs = await asyncio.gather(*(device.result(item) for item in [*compatible, other]))
    assert plugin.generator.batches == [["a0", "a1", "a2"], ["a3"], ["b"]]
    assert [len(output.images) for output in outputs] == [1] * 5
    assert all(output.seeds == [7] for output in outputs)


# ---- cancellation -----------------------------------------------------------


async def test_cancelling_running_work_stops_it_at_the_next_step(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    running = device.submit("long", steps=1000)
    await started(plugin.generator)
    device.executor.cancel(running)
    assert (await failure(device.executor.wait(running))).code == "CANCELLED"
    await device.between_batches()
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.steps_run < 1000


async def test_cancelling_queued_work_removes_it_without_running_it(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    async with device.held():
        cancelled = device.submit("never")
        behind = device.submit("after")
        assert device.executor.position(behind) == 2
        device.executor.cancel(cancelled)
        assert (await failure(cancelled.future)).code == "CANCELLED"
        assert device.executor.position(behind) == 1
        assert device.executor.depth == 1
    await device.result(behind)
    assert plugin.generator.batches == [["after"]]


# ---- deadlines --------------------------------------------------------------


async def test_running_work_past_its_deadline_is_stopped_with_timeout(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    item = device.submit("long", steps=1000, timeout_s=0.2)
    error = await failure(device.executor.wait(item))
    assert error.status == 504 and error.code == "TIMEOUT"
    await device.between_batches()
    assert plugin.generator.finished_runs == ["interrupted"]


async def test_work_whose_deadline_passed_in_the_queue_fails_with_timeout_and_never_runs(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    async with device.held():
        item = device.submit("late", timeout_s=0.05)
        await asyncio.sleep(0.1)  # the deadline passes while the device is busy
    error = await failure(item.future)  # what the device thread answered, not the waiter's own timeout
    assert error.code == "TIMEOUT"
    assert plugin.generator.batches == []


# ---- out of memory ----------------------------------------------------------


async def test_a_batch_out_of_memory_is_retried_one_by_one_and_only_the_culprit_fails(start_device) -> None:
    device = start_device(oom_plugin, batch=4)
    async with device.held():
        culprit = device.submit(f"please run {TRIGGER}", model="oom", steps=1)
        neighbours = [device.submit(prompt, model="oom", steps=1) for prompt in ("a fox", "a castle")]
    error = await failure(device.executor.wait(culprit))
    assert error.status == 503 and error.code == "OUT_OF_MEMORY"
    assert int(error.headers["Retry-After"]) >= 1
    for output in await asyncio.gather(*(device.result(item) for item in neighbours)):
        assert len(output.images) == 1
    # The batch of three failed as a whole; each neighbour then ran alone and succeeded.
    assert device.telemetry.sizes == [1, 1]


async def test_a_batch_that_fails_is_retried_one_by_one_and_only_the_request_that_breaks_it_fails(start_device) -> None:
    """One caller's request that trips a bug must not fail the other callers' requests batched with it."""
    device = start_device(oom_plugin, batch=4)
    async with device.held():
        neighbours = [device.submit(prompt, model="oom", steps=1) for prompt in ("a fox", "a castle")]
        culprit = device.submit(f"a fox with {BUG_TRIGGER}", model="oom", steps=1)
    error = await failure(device.executor.wait(culprit))
    assert error.status == 500 and error.code == "INTERNAL_ERROR"
    for output in await asyncio.gather(*(device.result(item) for item in neighbours)):
        assert len(output.images) == 1
    assert device.telemetry.sizes == [1, 1]


# ---- intake and shutdown ----------------------------------------------------


class SlowToLoad(SlowGenerator):
    """Loads in LOAD_S, and holds as much memory as any other: a budget of one fits one at a time."""

    LOAD_S = 0.3

    def __init__(self, name: str, loads: list[str]) -> None:
        super().__init__(step_seconds=0.0)
        self.name = name
        self._loads = loads

    def load(self) -> None:
        time.sleep(self.LOAD_S)
        self._loads.append(self.name)
        super().load()

    def memory_footprint(self) -> dict[int, int]:
        return {id(self): 1000}


class TwoModels:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @hookimpl
    def register_generators(self, register, settings):  # type: ignore[no-untyped-def]
        register(SlowToLoad("model-a", self.loads))
        register(SlowToLoad("model-b", self.loads))


@pytest.mark.parametrize("defer_switches", [False, True])
async def test_work_for_the_loaded_model_goes_before_a_reload_for_as_long_as_the_reload_takes(defer_switches) -> None:
    plugin = TwoModels()
    async with started_executors() as start:
        device = start(Device(plugin, capacity=16, batch=1, defer_switches=defer_switches, memory_budget_bytes=1500))
        for model in ("model-a", "model-b"):  # each loaded once, so its load time is known; model-b stays
            await device.result(device.submit("warm-up", model=model))
        async with device.held():
            # Two callers, each of one model, their requests interleaved: strict turns reload before each.
            items = [device.submit(f"{owner}{n}", model=f"model-{owner}", owner=owner) for n in range(3) for owner in "ab"]
        for item in items:
            await device.result(item)
    ran = [prompts[0] for prompts in device.registry.resolve("model-a").batches + device.registry.resolve("model-b").batches]
    if defer_switches:
        # model-b's work, ready, took the few milliseconds model-a's reload would have waited, then one reload.
        assert plugin.loads[2:] == ["model-a"], plugin.loads
        assert items[1].started_at < items[0].started_at
    else:
        assert plugin.loads[2:] == ["model-a", "model-b"] * 3, plugin.loads
    assert sorted(ran) == sorted(["warm-up"] * 2 + [item.request.prompt for item in items])


async def test_a_full_queue_refuses_with_queue_full_and_keeps_what_it_holds(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin, capacity=2)
    async with device.held():
        accepted = [device.submit("one"), device.submit("two")]
        error = refusal(lambda: device.submit("three"))
        assert error.status == 503 and error.code == "QUEUE_FULL"
        assert error.details == {"queue_depth": 2, "capacity": 2}
        assert int(error.headers["Retry-After"]) >= 1
    await asyncio.gather(*(device.result(item) for item in accepted))
    assert plugin.generator.batches == [["one"], ["two"]]


async def test_closed_intake_refuses_new_work_and_lets_accepted_work_finish(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    async with device.held():
        accepted = [device.submit("one"), device.submit("two")]
        assert set(device.executor.close_intake()) == set(accepted)
        refused = refusal(lambda: device.submit("late"))
        assert refused.code == "SERVICE_UNAVAILABLE" and refused.headers["Retry-After"]
        assert (await failure(device.executor.call(lambda: None))).code == "SERVICE_UNAVAILABLE"
    await asyncio.gather(*(device.result(item) for item in accepted))
    assert plugin.generator.batches == [["one"], ["two"]]


async def test_failing_unfinished_work_fails_running_queued_and_control_work_with_service_unavailable(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    running = device.submit("long", steps=1000)
    queued = device.submit("waiting")
    await started(plugin.generator)
    ran: list[str] = []
    control = asyncio.create_task(device.executor.call(lambda: ran.append("control")))
    await asyncio.sleep(0)  # queued behind the running batch
    device.executor.close_intake()
    assert device.executor.fail_unfinished() == 2
    for outcome in (device.executor.wait(running), device.executor.wait(queued), control):
        assert (await failure(outcome)).code == "SERVICE_UNAVAILABLE"
    await wait_for(lambda: asyncio.sleep(0, result=bool(plugin.generator.finished_runs)), LIMIT_S)
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.batches == [["long"]]  # the queued one never ran
    assert ran == []


async def test_stop_fails_what_is_left_with_service_unavailable_and_ends_the_device_thread(start_device) -> None:
    plugin = SlowPlugin()
    device = start_device(plugin)
    running = device.submit("long", steps=1000)
    queued = device.submit("waiting")
    await started(plugin.generator)
    await asyncio.wait_for(device.executor.stop(), LIMIT_S)
    for item in (running, queued):
        error = await failure(item.future)
        assert error.status == 503 and error.code == "SERVICE_UNAVAILABLE"
    assert not device.executor.alive
    assert plugin.generator.finished_runs == ["interrupted"]
    assert plugin.generator.batches == [["long"]]
    assert refusal(lambda: device.submit("late")).code == "SERVICE_UNAVAILABLE"


# ---- the memory queue -------------------------------------------------------


@dataclass(eq=False)
class Waiting:
    owner: str
    batch_key: str = "same"
    images: int = 1


def test_the_memory_queue_gives_each_subject_its_turn() -> None:
    queue: MemoryQueue[Waiting] = MemoryQueue(capacity=10)
    heavy = [Waiting("heavy") for _ in range(3)]
    light = Waiting("light")
    for item in [*heavy, light]:
        queue.submit(item)
    order = [queue.take(1, 0.0) for _ in range(4)]
    assert order == [[heavy[0]], [light], [heavy[1]], [heavy[2]]]


def test_the_memory_queue_reports_positions_and_forgets_what_left() -> None:
    queue: MemoryQueue[Waiting] = MemoryQueue(capacity=10)
    first, second, third = Waiting("a"), Waiting("b", batch_key="x"), Waiting("c")
    for item in (first, second, third):
        queue.submit(item)
    assert [queue.position(item) for item in (first, second, third)] == [1, 2, 3]
    assert queue.cancel(second) and not queue.cancel(second)
    assert queue.position(third) == 2
    assert queue.take(2, 0.0) == [first, third]
    assert queue.position(first) == queue.position(third) == 0 and len(queue) == 0


def test_the_memory_queue_refuses_past_capacity_and_drains() -> None:
    queue: MemoryQueue[Waiting] = MemoryQueue(capacity=2)
    held = [Waiting("a"), Waiting("b")]
    for item in held:
        queue.submit(item)
    with pytest.raises(QueueFull):
        queue.submit(Waiting("c"))
    assert queue.drain() == held and len(queue) == 0


def test_a_take_waits_for_compatible_company_and_returns_when_woken_or_closed() -> None:
    queue: MemoryQueue[Waiting] = MemoryQueue(capacity=10)
    with ThreadPoolExecutor(1) as device_thread:
        first, second = Waiting("a"), Waiting("b")
        queue.submit(first)
        forming = device_thread.submit(queue.take, 2, LIMIT_S)  # room for two: it waits for the second
        queue.submit(second)
        assert forming.result(LIMIT_S) == [first, second]

        woken = device_thread.submit(queue.take, 1, 0.0)
        queue.wake()
        assert woken.result(LIMIT_S) == []
        closed = device_thread.submit(queue.take, 1, 0.0)
        queue.close()
        assert closed.result(LIMIT_S) is None
