"""`imagine bench --mode cluster`: the shared Redis queue measured on real replica processes.

Everything runs on loopback in a temporary folder: a redis-server of its own and
`imagine serve` replicas (ServiceProcess) with a TOML file written here, a
fresh JWT secret in their environment, and one torch thread each, so that two
replicas on a two-core machine have a core each.

- latency: one client's sequential requests to a memory-queue replica and to a
  Redis-queue replica, alternating request by request, so that a slow spell of
  the machine hits both alike; the difference at p50 is what the shared queue adds.
- throughput: images/s of one Redis-queue replica, then of two sharing the queue,
  with the clients spread over both and with every client sending to the first
  (the second's device pulls the work it is free for).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

import imagine
from imagine.devtools.bench import Outcome, Row, _body, drive, milliseconds, percentile, print_table
from imagine.devtools.demo_models import demo_settings
from imagine.devtools.processes import LOOPBACK, RedisServer, ServiceProcess
from imagine.security.tokens import SECRET_ENV, JwtKeys, sign_token
from imagine.settings import AuthSettings, ServerSettings, Settings

# One torch (OpenMP and MKL) thread per replica: N replicas on N cores, a core each.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# How long a replica may take to start and load its model.
START_TIMEOUT_S = 180.0
# Images a throughput run makes, per --requests: a run long enough that starting and ending clients hardly count.
THROUGHPUT_IMAGES = 4
# Far more than a benchmark's run: its timings must not see a token expire.
TOKEN_TTL_S = 86400


def _replica_config(storage: str, model: str, min_size: int) -> str:
    """The replicas' TOML: the queue under test, no rate limits, the benched model loaded at start-up."""
    return "\n".join(
        [
            "[queue]",
            f"storage = {json.dumps(storage)}",
            "",
            "[ratelimit]",
            "enabled = false",
            "",
            "[models]",
            f"preload = [{json.dumps(model)}]",
            "",
            f"[models.{json.dumps(model)}]",
            f"min_size = {min_size}",
            "",
        ]
    )


def _demo_models_only(settings: Settings) -> bool:
    """True when the settings serve the demo models alone: laying the demo settings over them changes nothing."""
    return demo_settings(settings, Path(settings.server.cache_dir) / "demo-models").models == settings.models


@dataclass(frozen=True)
class Replica:
    name: str
    process: ServiceProcess
    url: str


class Processes:
    """The replicas and redis-server of one run, each in its own folder under `folder`; stopped on close."""

    def __init__(self, folder: Path, settings: Settings, model: str) -> None:
        self.folder = folder
        self.model = model
        self._cache_dir = settings.server.cache_dir
        # `imagine bench` has allowed the benchmark's size in the settings (bench_settings).
        self._min_size = int(settings.models.options[model]["min_size"])
        secret = secrets.token_urlsafe(32)
        self._environment = {
            SECRET_ENV: secret,
            "IMAGINE_SERVER_CACHE_DIR": str(self._cache_dir),
            # The code this process runs, wherever it was started from.
            "PYTHONPATH": os.pathsep.join(
                [str(Path(imagine.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            **ONE_THREAD,
        }
        keys = JwtKeys("HS256", secret.encode(), secret.encode(), "environment", SECRET_ENV)
        self.token = sign_token(keys, AuthSettings(), sub="bench", scopes=("generate", "metrics"), ttl_s=TOKEN_TTL_S)
        self._redis: RedisServer | None = None
        self._replicas: list[Replica] = []

    def redis_url(self) -> str:
        """The run's redis-server, started on first use."""
        if self._redis is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit(
                    "imagine bench --mode cluster needs redis-server on the PATH "
                    "(apt-get install redis-server, brew install redis, or your distribution's package)"
                )
            self._redis = RedisServer(binary, self.folder / "redis")
            self._redis.start()
        return self._redis.url

    async def start(self, *storages: str) -> list[Replica]:
        """One replica per storage ("memory" or a Redis URL), started together; returned once each has its model loaded."""
        started = []
        for storage in storages:
            name = f"replica-{len(self._replicas) + 1}"
            config = self.folder / f"{name}.toml"
            config.write_text(_replica_config(storage, self.model, self._min_size))
            process = ServiceProcess(
                self.folder / name,
                config,
                environment={**self._environment, "IMAGINE_SERVER_STATE_DIR": str(self.folder / name / "state")},
            )
            replica = Replica(name, process, f"http://{LOOPBACK}:{process.port}{ServerSettings().base_path}")
            self._replicas.append(replica)
            started.append(replica)
        for replica in started:
            await asyncio.to_thread(replica.process.wait_ready, START_TIMEOUT_S)
        await asyncio.gather(*(self._model_loaded(replica) for replica in started))
        return started

    async def _model_loaded(self, replica: Replica) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as session:
            while time.monotonic() < deadline:
                async with session.get(f"{replica.url}/health") as response:
                    status = (await response.json()).get("model_status", {}).get(self.model, {})
                if status.get("loaded"):
                    return
                if status.get("error"):
                    raise RuntimeError(f"{replica.name} could not load {self.model}: {status['error']}")
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{replica.name} did not load {self.model} in {START_TIMEOUT_S:g} s")

    def stop(self, replica: Replica) -> None:
        replica.process.stop()
        self._replicas.remove(replica)

    def close(self) -> None:
        for replica in list(self._replicas):
            self.stop(replica)
        if self._redis is not None:
            self._redis.stop()

    def cpu_seconds(self) -> float:
        """CPU time the running replicas have used so far, all their threads together."""
        return sum(sum(psutil.Process(replica.process.process.pid).cpu_times()[:2]) for replica in self._replicas)

    async def images_run(self, replica: Replica) -> float:
        """Images the replica's own device has made so far (its /metrics)."""
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as session:
            async with session.get(f"{replica.url}/metrics") as response:
                text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "imagine_images_generated_total" and sample.labels.get("model") == self.model:
                    return sample.value
        return 0.0


@contextlib.contextmanager
def _processes(settings: Settings, model: str) -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="imagine-bench-cluster-") as folder:
        processes = Processes(Path(folder), settings, model)
        try:
            yield processes
        finally:
            processes.close()


def _succeeded(outcome: Outcome, where: str) -> Outcome:
    """The outcome, or an error naming what the replicas answered instead of images."""
    if set(outcome.statuses) != {200}:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(outcome.statuses.items()))
        raise RuntimeError(f"{where} answered {statuses}; see the replicas' stderr.log")
    return outcome


async def _one(url: str, token: str, body: Callable[[int], dict[str, Any]], number: int) -> Outcome:
    """One request, made alone."""
    return _succeeded(await drive(url, token, lambda _: body(number), concurrency=1, requests=1, duration=None), url)


@dataclass(frozen=True)
class Throughput:
    images_per_s: float
    # The share of the images that the second replica's device made.
    second_share: float
    # Cores' worth of CPU the replicas got: on a machine busy with other work, less than one per replica.
    replica_cores: float


async def _throughput(
    processes: Processes, targets: list[Replica], clients: int, images: int, body: Callable[[int], dict[str, Any]], second: Replica | None
) -> Throughput:
    """`clients` closed-loop clients dealt round-robin over `targets`, `images` requests in all."""
    before = await processes.images_run(second) if second is not None else 0.0
    shares = [(clients // len(targets)) + (index < clients % len(targets)) for index in range(len(targets))]
    runs = [
        drive(
            target.url,
            processes.token,
            # Seeds differ between targets, as different users' requests would.
            lambda number, offset=index * images: body(number + offset),
            concurrency=share,
            requests=images * share // clients,
            duration=None,
        )
        for index, (target, share) in enumerate(zip(targets, shares, strict=True))
        if share
    ]
    started, cpu_before = time.perf_counter(), processes.cpu_seconds()
    outcomes = await asyncio.gather(*runs)
    elapsed, cpu = time.perf_counter() - started, processes.cpu_seconds() - cpu_before
    made = sum(_succeeded(outcome, "a replica").images for outcome in outcomes)
    after = await processes.images_run(second) if second is not None else 0.0
    return Throughput(made / elapsed, (after - before) / made, cpu / elapsed)


async def cluster(settings: Settings, arguments: argparse.Namespace) -> None:
    if not _demo_models_only(settings):
        raise SystemExit("imagine bench --mode cluster runs the demo models in replicas of its own; it does not use --config's weights")
    model, size, steps, requests, clients = arguments.model, arguments.size, arguments.steps, arguments.requests, arguments.concurrency
    body = _body(model, size, steps)
    with _processes(settings, model) as processes:
        redis_url = processes.redis_url()
        memory, first = await processes.start("memory", redis_url)
        for replica in (memory, first):
            await _one(replica.url, processes.token, body, 0)  # a pipeline's first call is slower
        served = {"memory": Outcome([], Counter(), 0, 0.0), "redis": Outcome([], Counter(), 0, 0.0)}
        for number in range(requests):
            # Which goes first alternates: the second of a pair can run a little slower, whichever it is.
            order = [("memory", memory), ("redis", first)][:: 1 if number % 2 else -1]
            for name, replica in order:
                one = await _one(replica.url, processes.token, body, number)
                served[name].latencies += one.latencies
                served[name].server_timing += one.server_timing
        processes.stop(memory)
        images = max(THROUGHPUT_IMAGES * requests, 2 * clients)
        # Each warm-up run lets a device make its first batches (new shapes) before the timed run.
        await _throughput(processes, [first], clients, clients, body, None)
        single = await _throughput(processes, [first], clients, images, body, None)
        (second,) = await processes.start(redis_url)
        await _throughput(processes, [first, second], clients, clients, body, None)
        spread = await _throughput(processes, [first, second], clients, images, body, second)
        to_first = await _throughput(processes, [first], clients, images, body, second)
    _print_latency(served, model, size, steps, requests)
    _print_throughput(single, spread, to_first, model, size, steps, clients, images)


def _print_latency(served: dict[str, Outcome], model: str, size: int, steps: int, requests: int) -> None:
    latencies = {name: outcome.latencies for name, outcome in served.items()}
    # A request's latency less its own pipeline call (Server-Timing's `device`): what the
    # service and its queue add, free of the pipeline's call-to-call jitter.
    own = {
        name: [latency - timing["device"] / 1000 for latency, timing in zip(outcome.latencies, outcome.server_timing, strict=True)]
        for name, outcome in served.items()
    }
    memory_p50, memory_own = statistics.median(latencies["memory"]), statistics.median(own["memory"])
    # Each Redis request ran right beside a memory one: the median of the pairs' differences is steadier.
    paired = statistics.median(r - m for r, m in zip(latencies["redis"], latencies["memory"], strict=True))
    rows = [
        Row(
            f"{name} queue",
            {
                "p50": milliseconds(statistics.median(samples)),
                "p90": milliseconds(percentile(samples, 0.9)),
                "extra (p50)": milliseconds(statistics.median(samples) - memory_p50),
                "ratio (p50)": f"{statistics.median(samples) / memory_p50:.3f}",
                "paired extra": milliseconds(paired) if name == "redis" else "",
                "own time (p50)": milliseconds(statistics.median(own[name])),
                "own extra": milliseconds(statistics.median(own[name]) - memory_own),
            },
        )
        for name, samples in latencies.items()
    ]
    print_table(
        f"cluster latency: one replica, one client, {model} {size}x{size}, {steps} steps, "
        f"{requests} sequential requests to each queue, alternating",
        rows,
    )


def _print_throughput(
    single: Throughput, spread: Throughput, to_first: Throughput, model: str, size: int, steps: int, clients: int, images: int
) -> None:
    runs = [
        ("1 replica", single, False),
        ("2 replicas, clients spread over both", spread, True),
        (f"2 replicas, all {clients} clients to the first", to_first, True),
    ]
    print_table(
        f"cluster throughput: Redis queue, one torch thread per replica, {model} {size}x{size}, {steps} steps, "
        f"{clients} clients, {images} images a run",
        [
            Row(
                name,
                {
                    "images/s": f"{run.images_per_s:.2f}",
                    "vs 1 replica": f"{run.images_per_s / single.images_per_s:.2f}",
                    "made by the second replica": f"{run.second_share:.0%}" if counted else "",
                    "replicas' CPU (cores)": f"{run.replica_cores:.2f}",
                },
            )
            for name, run, counted in runs
        ],
    )
