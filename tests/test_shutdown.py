"""Stopping the service: accepted work drains within server.shutdown_grace_s, the rest fails with a 503 someone hears.

The process tests run `imagine serve` as systemd does and send it a real
SIGTERM; the slow test generator is installed the way pip installs a plugin.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from imagine.engine.executor import DeviceExecutor
from imagine.http.app_keys import executor_key
from imagine.settings import ServerSettings, SettingsError, load_settings
from imagine.http.shutdown import OVERRUN_S
from tests.conftest import SECRET, auth
from tests.processes import LOOPBACK, free_port, stop, wait_for_port
from tests.slow_plugin import SlowPlugin
from tests.test_jobs import only_events, read_events, wait_for

ROOT = Path(__file__).resolve().parents[1]
JOBS = "/imagine/jobs"
GENERATE = "/imagine/generate"

PLUGIN = """\
from imagine.plugin.hookspecs import hookimpl
from tests.slow_plugin import SlowGenerator


@hookimpl
def register_generators(register):
    register(SlowGenerator(step_seconds={step_s}))
"""

CONFIG = """\
[server]
shutdown_grace_s = {grace_s}

[ratelimit]
enabled = false

[batch]
max_size = 1

# Naming weights keeps `serve` from building and preloading the demo models; the slow generator needs none.
[models.slow]
source = "none"
"""


class Service:
    """`imagine serve` in its own process, with the slow generator installed through the `imagine` entry points."""

    def __init__(self, folder: Path, *, grace_s: float, step_s: float) -> None:
        self.grace_s = grace_s
        plugins = folder / "site"
        dist_info = plugins / "imagine_shutdown_test-1.0.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: imagine-shutdown-test\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text("[imagine]\nslow = shutdown_slow_plugin\n")
        (plugins / "shutdown_slow_plugin.py").write_text(PLUGIN.format(step_s=step_s))
        config = folder / "imagine.toml"
        config.write_text(CONFIG.format(grace_s=grace_s))
        self.stderr = folder / "stderr.log"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith(("IMAGINE_", "LEONARDO_"))
        } | {
            "IMAGINE_JWT_SECRET": SECRET.decode(),
            "IMAGINE_SERVER_STATE_DIR": str(folder / "state"),
            "PYTHONPATH": f"{plugins}{os.pathsep}{ROOT}",
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagine.cli", "serve", "--config", str(config), "--port", str(self.port)],
            cwd=folder,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr, "wb"),  # noqa: SIM115 - closed with the process
        )
        try:
            wait_for_port(self.port, self.process, timeout=60)
        except (RuntimeError, TimeoutError):
            raise RuntimeError(self.log()[-3000:]) from None

    def log(self) -> str:
        return self.stderr.read_text()

    async def terminate(self) -> None:
        """SIGTERM, as systemctl stop sends it; returns once the service has taken it."""
        self.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: asyncio.sleep(0, result="SIGTERM received" in self.log()))

    async def exit_code(self) -> int:
        """The process's exit status; it must be gone within the grace and the bounded overrun."""
        return await asyncio.to_thread(self.process.wait, self.grace_s + OVERRUN_S + 10)


@pytest.fixture
def start_service(tmp_path: Path):
    started: list[Service] = []

    def start(*, grace_s: float, step_s: float) -> Service:
        started.append(Service(tmp_path, grace_s=grace_s, step_s=step_s))
        return started[-1]

    yield start
    for service in started:
        stop(service.process)


async def submit(session: aiohttp.ClientSession, steps: int) -> dict:
    response = await session.post(JOBS, json={"prompt": f"{steps} steps", "model": "slow", "steps": steps}, headers=auth())
    assert response.status == 202, await response.text()
    return await response.json()


async def status(session: aiohttp.ClientSession, job_id: str) -> dict:
    return await (await session.get(f"{JOBS}/{job_id}", headers=auth())).json()


async def assert_shutting_down(response: aiohttp.ClientResponse) -> None:
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert int(response.headers["Retry-After"]) >= 1


async def test_accepted_jobs_that_nobody_watches_finish_before_the_process_exits(start_service) -> None:
    service = start_service(grace_s=30, step_s=0.02)
    async with aiohttp.ClientSession(service.url) as session:
        jobs = [await submit(session, steps=20) for _ in range(5)]
        await service.terminate()

        # Still answering, but no new work is taken.
        await assert_shutting_down(
            await session.post(JOBS, json={"prompt": "late", "model": "slow"}, headers=auth())
        )
        await assert_shutting_down(
            await session.post(GENERATE, json={"prompt": "late", "model": "slow"}, headers=auth())
        )
        seen: dict[str, str] = {}

        async def all_succeeded() -> bool:
            for job in jobs:
                if seen.get(job["id"]) != "succeeded":
                    seen[job["id"]] = (await status(session, job["id"]))["status"]
            return all(state == "succeeded" for state in seen.values())

        await wait_for(all_succeeded, timeout=30)
    assert await service.exit_code() == 0
    counts = re.search(r"drained (\d+) of (\d+) generations and (\d+) of (\d+) jobs within the 30 s grace", service.log())
    assert counts, service.log()[-3000:]
    generations_drained, generations, jobs_drained, unfinished_jobs = map(int, counts.groups())
    assert generations_drained == generations and jobs_drained == unfinished_jobs >= 1
    assert "failed 0 generations and 0 jobs with SERVICE_UNAVAILABLE" in service.log()


async def test_past_the_grace_queued_work_fails_with_503_and_the_process_exits(start_service) -> None:
    service = start_service(grace_s=1, step_s=0.05)
    async with aiohttp.ClientSession(service.url) as session:
        # Each would take 20 s: far more than the grace. Different step counts never share a batch.
        running = await submit(session, steps=400)
        await wait_for(lambda: _is_running(session, running["id"]))
        waiting = [
            asyncio.create_task(session.post(GENERATE, json={"prompt": "sync", "model": "slow", "steps": steps}, headers=auth()))
            for steps in (401, 402)
        ]
        queued = await submit(session, steps=403)
        await wait_for(lambda: _queue_depth_is(session, 3))
        stream = await session.get(f"{JOBS}/{queued['id']}/events", headers=auth())
        events = asyncio.create_task(read_events(stream))
        await service.terminate()

        ended: dict[str, dict] = {}

        async def both_jobs_ended() -> bool:
            for job in (running, queued):
                ended[job["id"]] = await status(session, job["id"])
            return all(polled["status"] not in ("queued", "running") for polled in ended.values())

        await wait_for(both_jobs_ended, timeout=30)
        for polled in ended.values():
            assert polled["status"] == "failed"
            assert polled["error"]["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert ended[running["id"]]["progress"]["step"] < 400  # stopped at a step, not run out
        for request in waiting:
            await assert_shutting_down(await request)
        last = only_events(await events)[-1]
        assert last["event"] == "failed" and last["data"]["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert await service.exit_code() == 0
    assert (
        "drained 0 of 4 generations and 0 of 2 jobs within the 1 s grace; "
        "failed 4 generations and 2 jobs with SERVICE_UNAVAILABLE" in service.log()
    )


async def _is_running(session: aiohttp.ClientSession, job_id: str) -> bool:
    return (await status(session, job_id))["status"] == "running"


async def _queue_depth_is(session: aiohttp.ClientSession, depth: int) -> bool:
    health = await (await session.get("/imagine/health", headers=auth())).json()
    return health["queue"]["depth"] == depth


async def test_the_executor_refuses_new_work_once_closed_and_fails_what_it_holds(make_client, base_settings) -> None:
    plugin = SlowPlugin(step_seconds=0.02)
    client = await make_client(base_settings.replace(batch={"max_size": 1}), plugins=(plugin,))
    executor: DeviceExecutor = client.app[executor_key]

    def generate(steps: int) -> asyncio.Task:
        body = {"prompt": "slow", "model": "slow", "steps": steps}
        return asyncio.create_task(client.post(GENERATE, json=body, headers=auth()))

    running = generate(500)
    await asyncio.to_thread(plugin.generator.started.wait, 10)
    queued = generate(501)
    await wait_for(lambda: asyncio.sleep(0, result=executor.depth == 1))

    assert len(executor.close_intake()) == 2
    await assert_shutting_down(await client.post(GENERATE, json={"prompt": "late", "model": "slow"}, headers=auth()))
    assert executor.fail_unfinished() == 2
    for request in (running, queued):
        await assert_shutting_down(await request)
    await wait_for(lambda: asyncio.sleep(0, result=bool(plugin.generator.finished_runs)))
    assert plugin.generator.finished_runs == ["interrupted"]  # the queued one never ran
    assert executor.outcomes["failed"] == 2


def test_the_grace_is_validated_and_systemd_waits_past_the_longest_stop() -> None:
    with pytest.raises(SettingsError, match="shutdown_grace_s"):
        load_settings(None, {"IMAGINE_SERVER_SHUTDOWN_GRACE_S": "-1"})
    unit = (ROOT / "deploy" / "imagine@.service").read_text()
    timeout = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert timeout and int(timeout.group(1)) >= ServerSettings().shutdown_grace_s + OVERRUN_S
