"""The shared queue as deployed: deploy/nginx.conf in front of two `imagine serve` processes and one redis-server.

Each replica is a real process with one torch thread; Redis keeps an
append-only file, as a shared queue's Redis should, so it can be restarted
under load. Replicas are killed with SIGKILL, as a crashed machine would
stop, and started again by the fixture.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagine.settings import load_settings
from tests.conftest import data_url_png, make_token, pixels
from tests.processes import LOOPBACK, RedisServer, program, redis_server
from tests.test_deploy import DEPLOY, Replica, behind_nginx

TOKEN = {"Authorization": f"Bearer {make_token('cluster')}", "Content-Type": "application/json"}
VISIBILITY_S = 3
CONFIG = """\
[queue]
storage = "{redis_url}"
visibility_timeout_s = {visibility}
max_attempts = 2

[batch]
max_size = 1

[ratelimit]
global_burst = 100000
ip_burst = 100000
subject_burst = 100000

[models.sdxl]
min_size = 64
default_size = 64
"""
BODY = {"prompt": "a lighthouse", "model": "sdxl", "steps": 2, "seed": 11, "response_format": "json"}
# As long as the model allows: a few seconds on one CPU thread.
LONG = {**BODY, "steps": 100, "width": 256, "height": 256}


def request(port: int, method: str, path: str, body: Any = None, token: dict[str, str] = TOKEN) -> tuple[int, Any, dict[str, str]]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    try:
        connection.request(method, "/imagine" + path, body=None if body is None else json.dumps(body), headers=token)
        response = connection.getresponse()
        raw = response.read()
        kind = response.headers.get("Content-Type", "")
        return response.status, json.loads(raw) if kind.startswith("application/json") else raw, dict(response.headers)
    finally:
        connection.close()


@dataclass
class Cluster:
    folder: Path
    config: Path
    demo_folder: Path
    redis: RedisServer
    replicas: list[Replica]
    nginx_port: int
    generation: int = 0

    def poll(self, job_id: str, token: dict[str, str] = TOKEN) -> dict[str, Any]:
        """The job through nginx. Right after a kill nginx may count both replicas out for its fail_timeout
        (the restarted one failed there moments ago) and answer 502 itself: that is nginx, not the job."""
        deadline = time.monotonic() + 30
        while True:
            status, job, _ = request(self.nginx_port, "GET", f"/jobs/{job_id}", token=token)
            if status != 502 or time.monotonic() > deadline:
                assert status == 200, job
                return job
            time.sleep(0.5)

    def replica_running(self, job_id: str) -> int:
        """Which replica's device runs the job: its worker name carries the process id."""
        pid = int(self.poll(job_id)["worker"].split("-")[-2])
        return next(index for index, replica in enumerate(self.replicas) if replica.process.pid == pid)

    def wait(
        self,
        job_id: str,
        statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
        timeout: float = 90,
        token: dict[str, str] = TOKEN,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.poll(job_id, token)
            if job["status"] in statuses:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} is still {job['status']}")

    def restart(self, index: int) -> None:
        """Start replica `index` again (it was killed), on the same port: nginx's upstream names it."""
        self.generation += 1
        old = self.replicas[index]
        old.stop()
        replica = Replica(
            self.folder / f"replica-{index}-{self.generation}", self.config, self.demo_folder,
            environment=ONE_THREAD, port=old.port,
        )
        replica.wait_ready()
        self.replicas[index] = replica


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path) -> Iterator[Cluster]:
    program("nginx", "/usr/sbin/nginx")
    folder = tmp_path_factory.mktemp("cluster")
    with redis_server(folder / "redis", persistent=True) as redis:
        config = folder / "imagine.toml"
        config.write_text(CONFIG.format(redis_url=redis.url, visibility=VISIBILITY_S))
        replicas = [
            Replica(folder / f"replica-{index}", config, demo_folder, environment=ONE_THREAD) for index in range(2)
        ]
        try:
            for replica in replicas:
                replica.wait_ready()
            with behind_nginx(folder, replicas) as nginx_port:
                yield Cluster(folder, config, demo_folder, redis, replicas, nginx_port)
        finally:
            for replica in replicas:
                replica.stop()


def test_every_poll_through_nginx_finds_the_job_and_its_events_stream_from_either_replica(cluster: Cluster) -> None:
    status, accepted, headers = request(cluster.nginx_port, "POST", "/jobs", BODY)
    assert status == 202
    polls = [request(cluster.nginx_port, "GET", f"/jobs/{accepted['id']}")[0] for _ in range(8)]
    assert polls == [200] * 8
    cluster.wait(accepted["id"])
    for replica in cluster.replicas:
        status, events, _ = request(replica.port, "GET", f"/jobs/{accepted['id']}/events")
        assert status == 200
        kinds = [line[7:] for line in events.decode().splitlines() if line.startswith("event: ")]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded"


def test_a_cancel_sent_to_the_other_replica_stops_the_job(cluster: Cluster) -> None:
    _, job, _ = request(cluster.nginx_port, "POST", "/jobs", LONG)
    cluster.wait(job["id"], ("running",))
    other = cluster.replicas[1 - cluster.replica_running(job["id"])]
    status, cancelled, _ = request(other.port, "DELETE", f"/jobs/{job['id']}")
    assert status == 200 and cancelled["status"] == "cancelled"
    assert cancelled["progress"]["step"] < LONG["steps"]


def test_work_goes_to_the_idle_replica(cluster: Cluster) -> None:
    _, long_job, _ = request(cluster.nginx_port, "POST", "/jobs", LONG)
    cluster.wait(long_job["id"], ("running",))
    busy = cluster.replicas[cluster.replica_running(long_job["id"])]
    # Sent to the busy replica, run by the other one's device, answered by the busy one.
    status, answer, _ = request(busy.port, "POST", "/generate", BODY)
    assert status == 200 and answer["seed"] == 11
    status, still, _ = request(busy.port, "GET", f"/jobs/{long_job['id']}")
    assert still["status"] == "running", "the generation waited for the busy device"
    cluster.wait(long_job["id"])


def test_a_job_survives_the_replica_killed_while_running_it(cluster: Cluster) -> None:
    _, alone, _ = request(cluster.nginx_port, "POST", "/generate", LONG)
    _, job, _ = request(cluster.nginx_port, "POST", "/jobs", LONG)
    cluster.wait(job["id"], ("running",))
    victim = cluster.replica_running(job["id"])
    cluster.replicas[victim].kill()
    killed_at = time.monotonic()
    done = cluster.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert cluster.replica_running(job["id"]) == 1 - victim
    # Claimed after the visibility timeout, then one run (a generous bound on this shared machine).
    assert time.monotonic() - killed_at < VISIBILITY_S + 30
    np.testing.assert_array_equal(
        pixels(data_url_png(done["result"]["images"][0])), pixels(data_url_png(alone["images"][0]))
    )
    cluster.restart(victim)


def test_a_job_that_kills_every_worker_it_starts_on_fails_after_max_attempts(cluster: Cluster) -> None:
    _, job, _ = request(cluster.nginx_port, "POST", "/jobs", LONG)
    first = cluster.wait(job["id"], ("running",))
    victim = cluster.replica_running(job["id"])
    cluster.replicas[victim].kill()
    # The other replica claims it after the visibility timeout: its second attempt.
    deadline = time.monotonic() + 60
    while cluster.wait(job["id"], ("running",))["worker"] == first["worker"]:
        assert time.monotonic() < deadline, "no other worker claimed the job"
        time.sleep(0.2)
    survivor = 1 - victim
    cluster.replicas[survivor].kill()
    # A replica started again finds it stale with both attempts spent: it fails it instead of dying a third time.
    cluster.restart(victim)
    failed = cluster.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert failed["status"] == "failed", failed
    assert failed["error"]["error"]["details"] == {"attempts": 2}
    cluster.restart(survivor)


def test_subjects_take_turns_across_both_replicas(cluster: Cluster) -> None:
    heavy = {"Authorization": f"Bearer {make_token('heavy')}", "Content-Type": "application/json"}
    light = {"Authorization": f"Bearer {make_token('light')}", "Content-Type": "application/json"}
    body = {**BODY, "steps": 60, "width": 128, "height": 128}
    jobs = [request(cluster.nginx_port, "POST", "/jobs", {**body, "seed": n}, heavy)[1]["id"] for n in range(8)]
    _, accepted, _ = request(cluster.nginx_port, "POST", "/jobs", body, light)
    single = accepted["id"]
    assert accepted["position"] >= 4, "the heavy subject's jobs should still be waiting"
    started = {job_id: cluster.wait(job_id, token=heavy)["started_at"] for job_id in jobs}
    light_started = cluster.wait(single, token=light)["started_at"]
    # The light subject's one image waited for at most one batch per replica of the heavy one's eight
    # beyond the one each device was running when it came (a device that was loading its model at the
    # time makes no difference: the order is the queue's, not the devices' speed).
    before = sum(at < light_started for at in started.values())
    assert before <= 4, f"{before} of the heavy subject's 8 jobs started first"


def test_redis_restarted_under_load_gives_only_answers_and_503s_then_recovers(cluster: Cluster) -> None:
    statuses: list[tuple[int, str | None]] = []
    unexpected: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, answer, headers = request(cluster.nginx_port, "POST", "/generate", BODY)
            statuses.append((status, headers.get("Retry-After")))
            if status not in (200, 503):
                unexpected.append(answer)
            if status == 503:
                time.sleep(0.2)  # a client backs off; hammering would meet nginx's own flood guard (429)

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(client) for _ in range(4)]
        time.sleep(2)
        cluster.redis.stop()
        time.sleep(1)
        cluster.redis.start()
        time.sleep(3)
        stop.set()
        for future in running:
            future.result()
    assert statuses and not unexpected, unexpected
    assert all(retry is not None for status, retry in statuses if status == 503)
    assert sum(status == 200 for status, _ in statuses) > 4
    # Recovered without a restart of any replica.
    status, answer, _ = request(cluster.nginx_port, "POST", "/generate", BODY)
    assert status == 200 and answer["seed"] == 11


def test_the_shipped_cluster_example_shares_queue_limits_and_gallery() -> None:
    example = load_settings(DEPLOY / "cluster.example.toml", {})
    assert example.queue.shared and example.ratelimit.shared and example.gallery.shared
    assert example.queue.storage != example.ratelimit.storage, "the queue and the buckets keep apart databases"


def test_a_worker_process_pulls_work_and_answers_only_livez_and_metrics(cluster: Cluster) -> None:
    worker = Replica(cluster.folder / "worker", cluster.config, cluster.demo_folder, command=("worker",), environment=ONE_THREAD)
    try:
        worker.wait_ready()
        assert request(worker.port, "GET", "/livez", token={})[:2] == (200, {"status": "ok"})
        assert request(worker.port, "POST", "/generate", BODY)[0] == 404
        # Three long jobs at once: each of the three devices takes one, the worker's included.
        jobs = [request(cluster.nginx_port, "POST", "/jobs", {**LONG, "seed": n})[1]["id"] for n in range(3)]
        ran_on = set()
        for job_id in jobs:
            job = cluster.wait(job_id)
            assert job["status"] == "succeeded"
            ran_on.add(int(job["worker"].split("-")[-2]))
        assert worker.process.pid in ran_on
        _, health, _ = request(cluster.nginx_port, "GET", "/health")
        assert len(health["queue"]["workers"]) >= 3
        metrics = {"Authorization": f"Bearer {make_token('ops', scope='metrics')}"}
        _, exposition, _ = request(worker.port, "GET", "/metrics", token=metrics)
        assert b"imagine_cluster_workers" in exposition and b"imagine_cluster_queue_depth 0.0" in exposition
    finally:
        worker.stop()
