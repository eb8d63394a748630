"""`imagine bench`: the service measured against the bare pipeline, in one invocation.

Every mode runs its baseline in the same process, right before the service, so
the ratios hold on a noisy machine. Results are a table on stdout.

- overhead: the bare `pipe(...)` loop vs the same requests through HTTP (PNG).
- batching: bare loops at batch 1 and batch N vs the service with batching off and on.
- load: a bounded burst of concurrent HTTP clients; images/s, latency, statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from imagine.auth import KeyMaterial, load_key_material, sign_token
from imagine.settings import Settings

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
    return f"{seconds * 1000:.1f} ms"


def bench_settings(settings: Settings, model: str, size: int, **sections: dict[str, Any]) -> Settings:
    """Allow the benchmark's size, switch off what would distort timings (limits, previews)."""
    options = {name: dict(table) for name, table in settings.models.options.items()}
    options.setdefault(model, {})["min_size"] = min(size, int(options.get(model, {}).get("min_size", size)))
    return settings.replace(
        models={"options": options, "default": model},
        ratelimit={"enabled": False},
        **sections,
    )


# ---- the bare pipeline ---------------------------------------------------


class BarePipeline:
    """The model loaded by the same plugin code the service uses, called directly."""

    def __init__(self, settings: Settings, model: str) -> None:
        from imagine.plugins import collect_generators, plugin_manager

        self._generator = collect_generators(plugin_manager(), settings)[model]
        self._generator.load()
        self._pipe = self._generator.pipe
        self._pipe.scheduler = self._generator.scheduler(self._generator.card.defaults.scheduler)
        self._guidance = self._generator.card.defaults.guidance

    def call(self, size: int, steps: int, seeds: Sequence[int]) -> float:
        """Seconds for one `pipe(...)` call making one image per seed."""
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            self._pipe(
                prompt=[PROMPT] * len(seeds),
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=self._guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="pil",
            )
        return time.perf_counter() - started

    def close(self) -> None:
        self._generator.unload()


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
        from imagine.keys import executor_key

        return await self.app[executor_key].call(work)


@contextlib.asynccontextmanager
async def running_service(settings: Settings, keys: KeyMaterial) -> AsyncIterator[Service]:
    from imagine.app import create_app

    app = create_app(settings, keys=keys)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Service(f"http://127.0.0.1:{port}{settings.server.base_path}", app)
    finally:
        await runner.cleanup()


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
    url: str, token: str, body: Callable[[int], dict[str, Any]], *, concurrency: int, requests: int | None, duration: float | None
) -> Outcome:
    """`concurrency` clients sending requests back to back; stops after `requests` or `duration`."""
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
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - started
    return outcome


def _body(model: str, size: int, steps: int) -> Callable[[int], dict[str, Any]]:
    return lambda number: {
        "prompt": PROMPT,
        "model": model,
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": number,
        "store": False,
    }


# ---- modes -----------------------------------------------------------------


async def overhead(settings: Settings, keys: KeyMaterial, token: str, arguments: argparse.Namespace) -> None:
    """Bare calls and HTTP requests alternate, so drifts in machine load hit both alike."""
    size, steps = arguments.size, arguments.steps
    bare: list[float] = []
    served = Outcome([], Counter(), 0, 0.0)
    async with running_service(settings, keys) as service:
        pipeline = await service.on_device(lambda: BarePipeline(settings, arguments.model))
        try:
            body = _body(arguments.model, size, steps)
            await service.on_device(lambda: pipeline.call(size, steps, [0]))
            await drive(service.url, token, body, concurrency=1, requests=1, duration=None)  # load and warm up
            for number in range(arguments.requests):
                bare.append(await service.on_device(partial(pipeline.call, size, steps, [number])))
                # The same seed as the bare call just made, so both make the same image.
                one = await drive(service.url, token, lambda _, seed=number: body(seed), concurrency=1, requests=1, duration=None)
                served.latencies += one.latencies
                served.server_timing += one.server_timing
        finally:
            await service.on_device(pipeline.close)
    bare_p50, served_p50 = statistics.median(bare), statistics.median(served.latencies)
    # Each request ran right after its bare twin: the median of the differences
    # is far steadier than the difference of two wide distributions' medians.
    paired_extra = statistics.median(s - b for s, b in zip(served.latencies, bare, strict=True))
    print_table(
        f"overhead: {arguments.model} {arguments.size}x{arguments.size}, {arguments.steps} steps, {arguments.requests} sequential requests",
        [
            Row(
                "bare pipe()",
                {
                    "p50": milliseconds(bare_p50),
                    "p95": milliseconds(percentile(bare, 0.95)),
                    "ratio (p50)": "1.000",
                    "paired extra": "",
                    "paired ratio": "1.000",
                },
            ),
            Row(
                "service (HTTP, PNG)",
                {
                    "p50": milliseconds(served_p50),
                    "p95": milliseconds(percentile(served.latencies, 0.95)),
                    "ratio (p50)": f"{served_p50 / bare_p50:.3f}",
                    "paired extra": milliseconds(paired_extra),
                    "paired ratio": f"{(bare_p50 + paired_extra) / bare_p50:.3f}",
                },
            ),
        ],
    )
    if served.server_timing:
        parts = sorted({name for timing in served.server_timing for name in timing})
        print_table(
            "where a request's time goes (service side, median)",
            [Row(part, {"ms": f"{statistics.median(t.get(part, 0.0) for t in served.server_timing):.2f}"}) for part in parts],
        )


async def batching(settings: Settings, keys: KeyMaterial, token: str, arguments: argparse.Namespace) -> None:
    """Images/s of bare loops (batch 1 and N) and of the service with batching off and on.

    Every configuration runs once per round, rounds one after another, and the
    best round counts: on a shared machine a passing spike then hurts no one row.
    """
    size, steps, model, concurrency, images = (
        arguments.size, arguments.steps, arguments.model, arguments.concurrency, arguments.requests,
    )
    body = _body(model, size, steps)
    services = {
        "service, batching off": {"max_size": 1},
        f"service, batching on (max {concurrency}, wait {arguments.max_wait_ms:g} ms)": {
            "max_size": concurrency,
            "max_wait_ms": arguments.max_wait_ms,
        },
    }
    rates: dict[str, float] = {}

    def record(name: str, rate: float) -> None:
        rates[name] = max(rates.get(name, 0.0), rate)

    async def bare_loops(service: Service) -> None:
        pipeline = await service.on_device(lambda: BarePipeline(settings, model))
        try:
            await service.on_device(lambda: pipeline.call(size, steps, range(concurrency)))  # warm up
            singles = [await service.on_device(partial(pipeline.call, size, steps, [n])) for n in range(images)]
            record("bare loop, batch 1", len(singles) / sum(singles))
            calls = max(2, images // concurrency)
            batches = [
                await service.on_device(partial(pipeline.call, size, steps, range(n * concurrency, (n + 1) * concurrency)))
                for n in range(calls)
            ]
            record(f"bare loop, batch {concurrency}", calls * concurrency / sum(batches))
        finally:
            await service.on_device(pipeline.close)

    for _ in range(arguments.rounds):
        for index, (name, batch) in enumerate(services.items()):
            async with running_service(settings.replace(batch=batch), keys) as service:
                if index == 0:  # the baselines, on this service's device thread while it is idle
                    await bare_loops(service)
                await drive(service.url, token, body, concurrency=1, requests=1, duration=None)
                outcome = await drive(service.url, token, body, concurrency=concurrency, requests=images, duration=None)
            record(name, outcome.images / outcome.elapsed)
    single = rates["bare loop, batch 1"]
    batched = rates[f"bare loop, batch {concurrency}"]
    print_table(
        f"batching: {model} {size}x{size}, {steps} steps, concurrency {concurrency}, {images} images, "
        f"best of {arguments.rounds} rounds",
        [
            Row(name, {"images/s": f"{rate:.2f}", "vs batch-1 loop": f"{rate / single:.2f}", "vs batch-N loop": f"{rate / batched:.2f}"})
            for name, rate in rates.items()
        ],
    )


async def load(settings: Settings, keys: KeyMaterial, token: str, arguments: argparse.Namespace) -> None:
    body = _body(arguments.model, arguments.size, arguments.steps)

    async def run(url: str) -> Outcome:
        return await drive(url, token, body, concurrency=arguments.concurrency, requests=None, duration=arguments.duration)

    if arguments.url:
        outcome = await run(arguments.url.rstrip("/"))
    else:
        async with running_service(settings.replace(queue={"max_size": arguments.queue_size}), keys) as service:
            await drive(service.url, token, body, concurrency=1, requests=1, duration=None)
            outcome = await run(service.url)
    latencies = outcome.latencies or [0.0]
    print_table(
        f"load: {arguments.concurrency} clients for {arguments.duration:g} s",
        [
            Row(
                arguments.url or "in-process service",
                {
                    "images/s": f"{outcome.images / outcome.elapsed:.2f}",
                    "p50": milliseconds(statistics.median(latencies)),
                    "p95": milliseconds(percentile(latencies, 0.95)),
                    "statuses": ", ".join(f"{status}: {count}" for status, count in sorted(outcome.statuses.items())),
                    "503 without Retry-After": str(outcome.refusals_without_retry_after),
                },
            )
        ],
    )


MODES = {"overhead": overhead, "batching": batching, "load": load}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present, else the demo models)")
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests (overhead) or images (batching) to time")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (load mode)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every configuration (batching mode)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=25.0,
        help="batch.max_wait_ms of the batching-on service: closed-loop clients resubmit together, a moment apart",
    )
    parser.add_argument("--queue-size", type=int, default=16, help="queue.max_size of the in-process service (load mode)")
    parser.add_argument("--url", help="load mode: a running service's base URL instead of an in-process one")
    parser.add_argument("--token", help="load mode with --url: bearer token (default: signed with the local key)")


def run(settings: Settings, arguments: argparse.Namespace) -> int:
    keys = load_key_material(settings.auth, Path(settings.server.state_dir))
    settings = bench_settings(settings, arguments.model, arguments.size)
    token = arguments.token or sign_token(keys, settings.auth, sub="bench", scopes=("generate",), ttl_s=86400)
    asyncio.run(MODES[arguments.mode](settings, keys, token, arguments))
    return 0
