"""`imagine bench`: the service measured against the bare pipeline, in one invocation.

Every mode runs its baseline in the same process, right before the service, so
the ratios hold on a noisy machine. Results are a table on stdout.

- overhead: the bare `pipe(...)` call vs the same requests through HTTP (PNG or JSON), beside the floor
  of a bare aiohttp route answering the same PNG.
- batching: the service with batch sizes learnt by measurement vs the best bare loop of 1, 2, 4 and 8 images a call.
- load: a bounded burst of concurrent HTTP clients; images/s, latency, statuses (--store: unstored, then stored).
- cluster: replica processes on a shared Redis queue vs the memory queue (imagine.devtools.cluster_bench).
- switches: one model's calls with the GPU switches added one at a time (imagine.devtools.switches_bench).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web

from imagine.security.tokens import JwtKeys, load_jwt_keys, sign_token
from imagine.errors import ApiError
from imagine.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from imagine.engine.registry import ModelRegistry

PROMPT = "a lighthouse at dusk, dramatic clouds"
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    name: str
    values: dict[str, str]


def print_table(title: str, rows: Sequence[Row]) -> None:
    columns = ["run", *rows[0].values]
    cells = [[row.name, *row.values.values()] for row in rows]
    widths = [max(len(str(line[index])) for line in [columns, *cells]) for index in range(len(columns))]
    print(f"\n{title}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if abs(seconds) >= 0.01 else f"{seconds * 1000:.2f} ms"


def bench_settings(settings: Settings, model: str, size: int, **sections: dict[str, Any]) -> Settings:
    """Allow the benchmark's size and switch off rate limits, which would distort the timings."""
    options = {name: dict(table) for name, table in settings.models.options.items()}
    options.setdefault(model, {})["min_size"] = min(size, int(options.get(model, {}).get("min_size", size)))
    return settings.replace(
        models={"options": options, "default": model},
        ratelimit={"enabled": False},
        **sections,
    )


# ---- the bare pipeline ---------------------------------------------------


class BarePipeline:
    """The service's own loaded pipeline, called directly, as a script would call it.

    Sharing the service's pipeline means the same weights and no second copy in
    memory: two copies of a full-size SDXL would not fit where one does.
    Construct and call it on the device thread (`Service.on_device`).
    """

    def __init__(self, service: Service, model: str) -> None:
        from imagine.http.app_keys import registry_key

        registry = service.app[registry_key]
        generator = registry.resolve(model)
        registry.ensure_loaded(generator)
        self._pipe = generator.pipe
        self._scheduler = generator.scheduler(generator.card.defaults.scheduler)
        self._guidance = generator.card.defaults.guidance

    def call(self, size: int, steps: int, seeds: Sequence[int]) -> float:
        """Seconds for one `pipe(...)` call making one image per seed."""
        return self.make(size, steps, seeds)[0]

    def make(self, size: int, steps: int, seeds: Sequence[int]) -> tuple[float, list[Image.Image]]:
        """One `pipe(...)` call making one image per seed: its seconds and its images."""
        import torch

        started = time.perf_counter()
        # The service sets the scheduler a request asks for on every call; so does this.
        self._pipe.scheduler = self._scheduler
        with torch.inference_mode():
            images = self._pipe(
                prompt=[PROMPT] * len(seeds),
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=self._guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="pil",
            ).images
        return time.perf_counter() - started, images


# ---- the service, in this process ----------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Service:
    url: str
    app: web.Application

    async def on_device(self, work: Callable[[], T]) -> T:
        """Run torch work on the service's device thread.

        One thread must do all of a process's torch work: a second live thread
        with an OpenMP team of its own halves the device thread's speed on a CPU,
        which would make any baseline run beside the service unfair to both.
        """
        from imagine.http.app_keys import executor_key

        return await self.app[executor_key].call(work)


@contextlib.asynccontextmanager
async def _on_loopback(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port: its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_service(settings: Settings, keys: JwtKeys) -> AsyncIterator[Service]:
    from imagine.http.app import create_app

    app = create_app(settings, keys=keys)
    async with _on_loopback(app) as url:
        yield Service(url + settings.server.base_path, app)


@contextlib.asynccontextmanager
async def aiohttp_floor(service: Service, pipeline: BarePipeline, size: int, steps: int) -> AsyncIterator[str]:
    """The least an aiohttp service adds to the bare call: one route that reads the JSON body, makes the
    image with the bare call on the service's device thread, encodes it there with the service's PNG
    encoder and answers it. No auth, validation, queue, jobs, metrics or access log: what the service's
    own time has above this floor's is what those cost. Its base URL."""
    from imagine.http.app_keys import png_encoder_key

    encoder = service.app[png_encoder_key]

    async def generate(request: web.Request) -> web.Response:
        seed = int((await request.json())["seed"])

        def make() -> tuple[float, bytes]:
            seconds, images = pipeline.make(size, steps, [seed])
            return seconds, encoder.encode(images[0], PROMPT)

        seconds, png = await service.on_device(make)
        return web.Response(body=png, content_type="image/png", headers={"Server-Timing": f"device;dur={seconds * 1000:.2f}"})

    app = web.Application()
    app.router.add_post("/generate", generate)
    async with _on_loopback(app) as url:
        yield url


@dataclass
class Outcome:
    latencies: list[float]
    statuses: Counter[int]
    images: int
    elapsed: float
    refusals_without_retry_after: int = 0
    server_timing: list[dict[str, float]] = field(default_factory=list)


def _server_timing(header: str) -> dict[str, float]:
    """`queue;dur=0.1, generate;dur=130.2` -> {"queue": 0.1, "generate": 130.2} (milliseconds)."""
    parts = {}
    for entry in header.split(","):
        name, _, rest = entry.strip().partition(";dur=")
        if rest:
            parts[name] = float(rest)
    return parts


async def drive(
    url: str,
    token: str,
    body: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    session: aiohttp.ClientSession | None = None,
) -> Outcome:
    """`concurrency` clients sending requests back to back; stops after `requests` or `duration`.
    With `session`, its kept-alive connections carry them (else a session of their own, closed after)."""
    outcome = Outcome([], Counter(), 0, 0.0)
    numbers = iter(range(10**9))
    deadline = time.monotonic() + duration if duration else None
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=600)

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            number = next(numbers)
            if (requests is not None and number >= requests) or (deadline is not None and time.monotonic() > deadline):
                return
            started = time.perf_counter()
            async with session.post(f"{url}/generate", json=body(number), headers=headers) as response:
                await response.read()
                outcome.statuses[response.status] += 1
                if response.status == 200:
                    outcome.latencies.append(time.perf_counter() - started)
                    outcome.images += 1
                    if "Server-Timing" in response.headers:
                        outcome.server_timing.append(_server_timing(response.headers["Server-Timing"]))
                elif response.status == 503 and "Retry-After" not in response.headers:
                    outcome.refusals_without_retry_after += 1
                if response.status in (429, 503):
                    await asyncio.sleep(0.05)

    started = time.perf_counter()
    if session is not None:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    else:
        async with aiohttp.ClientSession(timeout=timeout) as own:
            await asyncio.gather(*(client(own) for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - started
    return outcome


@dataclass(frozen=True)
class _body:
    """The generate body of request `number` (its seed): a plain value, so it crosses to a client process."""

    model: str
    size: int
    steps: int
    response: str = "png"
    store: bool = False

    def __call__(self, number: int) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "model": self.model,
            "width": self.size,
            "height": self.size,
            "num_inference_steps": self.steps,
            "seed": number,
            "response_format": self.response,
            "store": self.store,
        }


def _drive_here(url: str, token: str, body: _body, concurrency: int, requests: int | None, duration: float | None) -> Outcome:
    return asyncio.run(drive(url, token, body, concurrency=concurrency, requests=requests, duration=duration))


DriveClients = Callable[..., Awaitable[Outcome]]


@contextlib.asynccontextmanager
async def client_process() -> AsyncIterator[DriveClients]:
    """Clients in a process of their own, as a service's callers are: clients in the service's process would
    hold its GIL while they write requests and read answers, and the device thread, which needs the GIL
    between torch's operations, would wait for them. Yields an async
    `drive(url, token, body, concurrency=, requests=, duration=)`, `drive`'s outcome from that process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        await loop.run_in_executor(pool, time.sleep, 0)  # started before anything is timed

        async def drive_there(
            url: str, token: str, body: _body, *, concurrency: int, requests: int | None = None, duration: float | None = None
        ) -> Outcome:
            return await loop.run_in_executor(pool, _drive_here, url, token, body, concurrency, requests, duration)

        yield drive_there


# ---- modes -----------------------------------------------------------------


def _own_time(outcome: Outcome) -> float:
    """Median of each request's latency minus its own pipeline call (Server-Timing's `device`): what the
    server adds, measured within one request, so free of the call-to-call jitter that pairs still carry."""
    return statistics.median(
        latency - timing["device"] / 1000 for latency, timing in zip(outcome.latencies, outcome.server_timing, strict=True)
    )


async def overhead(settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace) -> None:
    """Bare calls, requests to the aiohttp floor and requests to the service are made in threes, so drifts
    in machine load hit all alike."""
    size, steps = arguments.size, arguments.steps
    bare: list[float] = []
    floor, served = Outcome([], Counter(), 0, 0.0), Outcome([], Counter(), 0, 0.0)
    # One connection kept alive for every request, as an HTTP client (or nginx's upstream keepalive) keeps it:
    # opening a TCP connection per request is the client's cost, not the service's.
    async with running_service(settings, keys) as service, aiohttp.ClientSession() as session:
        pipeline = await service.on_device(lambda: BarePipeline(service, arguments.model))
        body = _body(arguments.model, size, steps, arguments.response, arguments.store)

        async def bare_call(seed: int) -> None:
            bare.append(await service.on_device(partial(pipeline.call, size, steps, [seed])))

        async def request(url: str, outcome: Outcome, seed: int) -> None:
            # The same seed as the bare call, so all three make the same image.
            one = await drive(url, token, lambda _: body(seed), concurrency=1, requests=1, duration=None, session=session)
            outcome.latencies += one.latencies
            outcome.server_timing += one.server_timing

        async with aiohttp_floor(service, pipeline, size, steps) as floor_url:
            await service.on_device(partial(pipeline.call, size, steps, [0]))  # warm up
            await request(service.url, Outcome([], Counter(), 0, 0.0), 0)
            await request(floor_url, Outcome([], Counter(), 0, 0.0), 0)
            for number in range(arguments.requests):
                measures = [
                    partial(bare_call, number), partial(request, service.url, served, number),
                    partial(request, floor_url, floor, number),
                ]
                # Each goes first, second and third in turn: a later one runs a few milliseconds slower here,
                # whichever it is.
                turn = number % len(measures)
                for measure in measures[turn:] + measures[:turn]:
                    await measure()
    bare_p50 = statistics.median(bare)
    floor_own, served_own = _own_time(floor), _own_time(served)

    def measured(outcome: Outcome, own: float) -> dict[str, str]:
        p50 = statistics.median(outcome.latencies)
        # Each request ran beside its bare twin: the median of the differences
        # is far steadier than the difference of two wide distributions' medians.
        paired_extra = statistics.median(s - b for s, b in zip(outcome.latencies, bare, strict=True))
        return {
            "p50": milliseconds(p50),
            "p95": milliseconds(percentile(outcome.latencies, 0.95)),
            "ratio (p50)": f"{p50 / bare_p50:.3f}",
            "paired extra": milliseconds(paired_extra),
            "paired ratio": f"{(bare_p50 + paired_extra) / bare_p50:.3f}",
            "own time": milliseconds(own),
            "own ratio": f"{(bare_p50 + own) / bare_p50:.3f}",
        }

    bare_row = {"p50": milliseconds(bare_p50), "p95": milliseconds(percentile(bare, 0.95)), "ratio (p50)": "1.000"}
    print_table(
        f"overhead: {arguments.model} {size}x{size}, {steps} steps, {arguments.requests} sequential requests, "
        f"{arguments.response.upper()} responses{', stored' if arguments.store else ''}",
        [
            Row(
                "bare pipe()",
                {**bare_row, "paired extra": "", "paired ratio": "1.000", "own time": "", "own ratio": "1.000", "above floor": ""},
            ),
            Row("aiohttp floor (PNG)", {**measured(floor, floor_own), "above floor": ""}),
            Row("service (HTTP)", {**measured(served, served_own), "above floor": milliseconds(served_own - floor_own)}),
        ],
    )
    if served.server_timing:
        parts = sorted({name for timing in served.server_timing for name in timing})
        print_table(
            "where a request's time goes (service side, median)",
            [Row(part, {"ms": f"{statistics.median(t.get(part, 0.0) for t in served.server_timing):.2f}"}) for part in parts],
        )


@dataclass(frozen=True)
class DeviceWork:
    """What a service's metrics say its device did so far."""

    calls: float
    jobs: float
    generating_s: float

    @classmethod
    def of(cls, service: Service, model: str) -> DeviceWork:
        from imagine.http.app_keys import metrics_key

        registry = service.app[metrics_key].registry
        return cls(
            calls=registry.get_sample_value("imagine_batch_jobs_count") or 0.0,
            jobs=registry.get_sample_value("imagine_batch_jobs_sum") or 0.0,
            generating_s=registry.get_sample_value("imagine_generation_seconds_sum", {"model": model}) or 0.0,
        )


@dataclass
class PairedRounds:
    """Images/s of bare loops (one per batch size) and of the service, measured in alternation."""

    bare: dict[int, list[float]] = field(default_factory=dict)  # batch size -> one rate per round
    served: list[float] = field(default_factory=list)
    jobs_per_call: float = 0.0
    # The share of the service's wall time its device spent in pipeline calls.
    device_busy: float = 0.0
    # The service's pipeline seconds per image: against the best bare loop's, what the service loses inside
    # its calls (other batch sizes, its HTTP and encoding work slowing torch on the same cores).
    device_s_per_image: float = 0.0
    # The batch size the service settled on for the benched shape (None: fixed batches).
    learnt_size: int | None = None

    def best_bare(self, round_index: int) -> tuple[int, float]:
        """The bare loop that made the most images/s in that round: (batch size, rate)."""
        return max(((size, rates[round_index]) for size, rates in self.bare.items()), key=lambda pair: pair[1])

    @property
    def ratios(self) -> list[float]:
        return [served / self.best_bare(index)[1] for index, served in enumerate(self.served)]


async def paired_rounds(
    settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace, bare_batches: Sequence[int]
) -> PairedRounds:
    """Round after round: a bare loop at each of `bare_batches` images a call and N closed-loop clients, in turn."""
    size, steps, images = arguments.size, arguments.steps, arguments.requests
    body = _body(arguments.model, size, steps)
    result = PairedRounds(bare={batch: [] for batch in bare_batches})
    async with running_service(settings, keys) as service, client_process() as clients:
        pipeline = await service.on_device(lambda: BarePipeline(service, arguments.model))
        for batch in bare_batches:  # warm up every shape of call
            await service.on_device(lambda batch=batch: pipeline.call(size, steps, range(batch)))
        # The service warms up under the rounds' load, long enough to have measured every batch size it may choose
        # as often as it takes to judge them, and then some: learning happens once per shape in a service's life,
        # not in every round.
        from imagine.engine.batch_sizing import SAMPLES_TO_TRUST

        warm_up = max(2 * images, SAMPLES_TO_TRUST * sum(bare_batches) + images)
        await clients(service.url, token, body, concurrency=arguments.concurrency, requests=warm_up)
        before, serving_s = DeviceWork.of(service, arguments.model), 0.0

        async def bare_loops(batches: Sequence[int]) -> None:
            for batch in batches:
                calls = max(1, images // batch)
                seconds = [
                    await service.on_device(partial(pipeline.call, size, steps, range(n * batch, (n + 1) * batch)))
                    for n in range(calls)
                ]
                result.bare[batch].append(calls * batch / sum(seconds))

        for round_index in range(arguments.rounds):
            # Rounds alternate the order (bare loops then the service, then the service then the bare loops
            # reversed), so a machine slowing down or speeding up over a run favours neither side.
            if round_index % 2 == 0:
                await bare_loops(bare_batches)
            outcome = await clients(service.url, token, body, concurrency=arguments.concurrency, requests=images)
            result.served.append(outcome.images / outcome.elapsed)
            serving_s += outcome.elapsed
            if round_index % 2 == 1:
                await bare_loops(bare_batches[::-1])
        after = DeviceWork.of(service, arguments.model)
        from imagine.http.app_keys import executor_key

        sizer = service.app[executor_key].batch_sizer
        if sizer is not None:
            learnt = sizer.learnt()
            result.learnt_size = next(
                (best for shape, best in learnt.items() if (shape.width, shape.height, shape.steps) == (size, size, steps)),
                None,
            )
    result.jobs_per_call = (after.jobs - before.jobs) / max(1.0, after.calls - before.calls)
    result.device_busy = (after.generating_s - before.generating_s) / serving_s
    result.device_s_per_image = (after.generating_s - before.generating_s) / max(1.0, after.jobs - before.jobs)
    return result


def _call_time_vs_bare(rounds: PairedRounds) -> str:
    """The service's pipeline time per image over the best bare loop's: with the device's busy share,
    this splits what the service loses into calls slower than bare ones and time between calls."""
    if not rounds.device_s_per_image:
        return "-"
    return f"{rounds.device_s_per_image * max(statistics.median(rates) for rates in rounds.bare.values()):.3f}"


async def batching(settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace) -> None:
    """Images/s of the service with batch sizes learnt by measurement, against the best of bare loops of 1, 2, 4
    and 8 images a call (up to --concurrency) in the same rounds.

    The rounds alternate the bare loops and the service, so a slow spell of a shared
    machine hits every side of a round alike: each round's ratio is the service over
    that round's best bare loop, and their mean and median are the figures to read.
    """
    concurrency = arguments.concurrency
    sizes = [batch for batch in (1, 2, 4, 8) if batch <= concurrency] or [1]
    batch_settings = {"max_size": max(sizes), "max_wait_ms": arguments.max_wait_ms, "adaptive": True}
    rounds = await paired_rounds(settings.replace(batch=batch_settings), keys, token, arguments, sizes)
    best_overall = max(statistics.median(rates) for rates in rounds.bare.values())
    winners = Counter(rounds.best_bare(index)[0] for index in range(len(rounds.served)))
    rows = [
        Row(
            f"bare loop, batch {batch}",
            {
                "images/s": f"{statistics.median(rates):.2f}",
                "vs best bare": f"{statistics.median(rates) / best_overall:.2f}",
                "rounds won": str(winners.get(batch, 0)),
            },
        )
        for batch, rates in rounds.bare.items()
    ]
    rows.append(
        Row(
            f"service, learnt batch sizes (max {max(sizes)}, wait {arguments.max_wait_ms:g} ms)",
            {
                "images/s": f"{statistics.median(rounds.served):.2f}",
                "vs best bare": f"{statistics.median(rounds.served) / best_overall:.2f}",
                "learnt size": "-" if rounds.learnt_size is None else str(rounds.learnt_size),
                "jobs per call": f"{rounds.jobs_per_call:.1f}",
                "device busy": f"{rounds.device_busy:.3f}",
                "call time vs bare": _call_time_vs_bare(rounds),
                "vs round's best (mean)": f"{statistics.mean(rounds.ratios):.3f}",
                "rounds' ratios": " ".join(f"{ratio:.2f}" for ratio in rounds.ratios),
            },
        )
    )
    columns = (
        "images/s", "vs best bare", "rounds won", "learnt size", "jobs per call", "device busy", "call time vs bare",
        "vs round's best (mean)", "rounds' ratios",
    )
    print_table(
        f"batching: {arguments.model} {arguments.size}x{arguments.size}, {arguments.steps} steps, concurrency {concurrency}, "
        f"{arguments.requests} images a round, {arguments.rounds} rounds",
        [Row(row.name, {column: row.values.get(column, "") for column in columns}) for row in rows],
    )


async def load(settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace) -> None:
    """With --store, the same load twice, `"store": false` then `"store": true`: what keeping each image costs."""
    variants = [False, True] if arguments.store else [False]
    bodies = {store: _body(arguments.model, arguments.size, arguments.steps, store=store) for store in variants}

    outcomes: dict[bool, Outcome] = {}
    async with client_process() as clients:

        async def run(url: str, store: bool) -> Outcome:
            return await clients(url, token, bodies[store], concurrency=arguments.concurrency, duration=arguments.duration)

        if arguments.url:
            for store in variants:
                outcomes[store] = await run(arguments.url.rstrip("/"), store)
        else:
            async with running_service(settings.replace(queue={"max_size": arguments.queue_size}), keys) as service:
                for store in variants:
                    await clients(service.url, token, bodies[store], concurrency=1, requests=1)
                for store in variants:
                    outcomes[store] = await run(service.url, store)
    rows = []
    for store, outcome in outcomes.items():
        latencies = outcome.latencies or [0.0]
        stored = [timing.get("store", 0.0) / 1000 for timing in outcome.server_timing]
        rows.append(
            Row(
                f"{arguments.url or 'in-process service'}{', stored' if store else ''}",
                {
                    "images/s": f"{outcome.images / outcome.elapsed:.2f}",
                    "p50": milliseconds(statistics.median(latencies)),
                    "p95": milliseconds(percentile(latencies, 0.95)),
                    "store p50 (Server-Timing)": milliseconds(statistics.median(stored)) if store and stored else "",
                    "statuses": ", ".join(f"{status}: {count}" for status, count in sorted(outcome.statuses.items())),
                    "503 without Retry-After": str(outcome.refusals_without_retry_after),
                },
            )
        )
    if arguments.store:
        extra = statistics.median(outcomes[True].latencies or [0.0]) - statistics.median(outcomes[False].latencies or [0.0])
        rows.append(Row("extra per stored image (p50 latency)", {"p50": milliseconds(extra)}))
    print_table(
        f"load: {arguments.concurrency} clients for {arguments.duration:g} s, {arguments.size}x{arguments.size}",
        [Row(row.name, {column: row.values.get(column, "") for column in rows[0].values}) for row in rows],
    )


async def cluster(settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace) -> None:
    """Replicas of their own, with a key of their own: this process's service, key and token are not used."""
    from imagine.devtools.cluster_bench import cluster as run_cluster

    await run_cluster(settings, arguments)


async def switches(settings: Settings, keys: JwtKeys, token: str, arguments: argparse.Namespace) -> None:
    """No service: each row loads the model in a process of its own (imagine.devtools.switches_bench)."""
    from imagine.devtools.switches_bench import switches as run_switches

    await asyncio.to_thread(run_switches, settings, arguments)


MODES = {"overhead": overhead, "batching": batching, "load": load, "cluster": cluster, "switches": switches}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present, else the demo models)")
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests (overhead, cluster) or images (batching) to time")
    parser.add_argument("--response", choices=("png", "json"), default="png", help="response format (overhead mode)")
    parser.add_argument(
        "--store",
        action="store_true",
        help="keep the images in the gallery too (overhead mode); load mode runs without, then with, and prints the difference",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (load mode)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of bare loop and service, alternating (batching mode)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=25.0,
        help="batch.max_wait_ms of the batching-on service: closed-loop clients resubmit together, a moment apart",
    )
    parser.add_argument("--queue-size", type=int, default=16, help="queue.max_size of the in-process service (load mode)")
    parser.add_argument("--batch", type=int, default=1, help="images a pipeline call (switches mode)")
    parser.add_argument(
        "--switches",
        help="switches mode: the steps, in order, each adding to the ones before "
        "(float32, float16, bfloat16, eager, sdpa, channels_last, tf32, compile, max-autotune, cuda-graphs, trace; "
        "default eager,sdpa,channels_last,tf32,compile,cuda-graphs)",
    )
    parser.add_argument("--url", help="load mode: a running service's base URL instead of an in-process one")
    parser.add_argument("--token", help="load mode with --url: bearer token (default: signed with the local key)")


def plugin_registry(settings: Settings) -> ModelRegistry:
    """The models the installed plugins register under `settings`, none of them loaded."""
    from imagine.engine.registry import ModelRegistry
    from imagine.plugin.manager import collect_generators, plugin_manager

    return ModelRegistry(collect_generators(plugin_manager(), settings), settings.models.default)


def canonical_model(settings: Settings, name: str) -> str:
    """A model's own name for a name or alias: settings and metrics know it by that name alone."""
    return plugin_registry(settings).resolve(name).name


def run(settings: Settings, arguments: argparse.Namespace) -> int:
    try:
        arguments.model = canonical_model(settings, arguments.model)
    except ApiError as error:
        print(f"imagine bench: {error.message}", file=sys.stderr)
        return 2
    keys = load_jwt_keys(settings.auth, Path(settings.server.state_dir))
    settings = bench_settings(settings, arguments.model, arguments.size)
    token = arguments.token or sign_token(keys, settings.auth, sub="bench", scopes=("generate",), ttl_s=86400)
    asyncio.run(MODES[arguments.mode](settings, keys, token, arguments))
    return 0
