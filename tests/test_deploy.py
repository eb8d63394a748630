"""The deployment as shipped: deploy/nginx.conf in front of two `imagine serve` replicas sharing a redis-server.

Everything is real and on loopback: nginx with the shipped file (only its ports and log
folder filled in), two replica processes started as systemd would start them (a TOML
file, the JWT secret in the environment), and Redis for the shared buckets. Clients
connect from other loopback addresses (127.0.0.2...) so that nginx, the replicas' one
trusted proxy at 127.0.0.1, sees them as the outside clients they stand for.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from imagine.devtools.demo_models import names_weights
from imagine.devtools.processes import ServiceProcess
from imagine.settings import QueueSettings, ServerSettings, load_settings
from tests.conftest import SECRET, make_token
from tests.processes import LOOPBACK, fill_in, free_port, nginx, program, redis_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOKEN = {"Authorization": f"Bearer {make_token('deploy-test')}"}
IP_BURST = 5
# 8 x 60 requests at most: far past nginx's burst of 100 even if the refill (50/s) runs for seconds.
FLOOD_CONNECTIONS = 8
FLOOD_PER_CONNECTION = 60

# What the replicas share; the rest is the service's defaults.
REPLICA_CONFIG = """\
[server]
trusted_proxies = ["127.0.0.1"]

[ratelimit]
storage = "{redis_url}"
ip_burst = {ip_burst}
ip_rate = 0.001
global_burst = 100000
subject_burst = 100000

[models.sdxl-turbo]
min_size = 64
default_size = 64
"""


def test_the_shipped_files_agree_with_the_service() -> None:
    nginx_conf = (DEPLOY / "nginx.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)m;", nginx_conf)
    assert limit and int(limit.group(1)) * 1024 * 1024 == ServerSettings().max_body_bytes
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", nginx_conf)
    assert read_timeout and int(read_timeout.group(1)) > QueueSettings().timeout_s
    example = load_settings(DEPLOY / "imagine.example.toml", {})
    assert example.server.host == "127.0.0.1"
    assert example.server.trusted_proxies == ("127.0.0.1",)
    assert example.ratelimit.shared and example.ratelimit.redis_failure == "closed"
    # One client at its own limit must not empty the bucket every client shares.
    assert example.ratelimit.global_rate >= 10 * example.ratelimit.ip_rate
    assert example.ratelimit.global_burst >= 10 * example.ratelimit.ip_burst
    assert example.server.public_url.startswith("https://")
    assert example.server.max_body_bytes == ServerSettings().max_body_bytes
    assert names_weights(example)
    unit = (DEPLOY / "imagine@.service").read_text()
    for line in ("Environment=CUDA_VISIBLE_DEVICES=%i", "EnvironmentFile=/etc/imagine/secrets.env"):
        assert line in unit
    assert "imagine serve --port $$((9000 + %i))" in unit


class Replica(ServiceProcess):
    """An imagine process started as systemd would start it: a TOML file, the JWT secret in the environment."""

    def __init__(
        self,
        folder: Path,
        config: Path,
        demo_folder: Path,
        *,
        command: tuple[str, ...] = ("serve",),
        environment: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(
            folder,
            config,
            command=command,
            port=port,
            environment={
                "IMAGINE_JWT_SECRET": SECRET.decode(),
                "IMAGINE_SERVER_STATE_DIR": str(folder / "state"),
                # The demo models of this test run stand in for real weights.
                "IMAGINE_SERVER_CACHE_DIR": str(demo_folder.parent),
                # This checkout's code, whatever the interpreter has installed.
                "PYTHONPATH": str(ROOT),
                **(environment or {}),
            },
        )


@contextmanager
def behind_nginx(folder: Path, replicas: list[Replica]) -> Iterator[int]:
    """The shipped deploy/nginx.conf (only its ports and log folder filled in) in front of two replicas; its port."""
    port = free_port()
    site = fill_in(
        (DEPLOY / "nginx.conf").read_text(),
        {
            "listen 80;": f"listen {LOOPBACK}:{port};",
            "server 127.0.0.1:9000 ": f"server {LOOPBACK}:{replicas[0].port} ",
            "server 127.0.0.1:9001 ": f"server {LOOPBACK}:{replicas[1].port} ",
            "/var/log/nginx/": f"{folder / 'nginx'}/",
        },
    )
    with nginx(folder / "nginx", site) as listening:
        yield listening


@dataclass
class Stack:
    port: int
    replicas: list[Replica]
    nginx_folder: Path

    def request(
        self,
        method: str,
        path: str,
        *,
        client: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request through nginx from the loopback address `client`."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=120, source_address=(client, 0))
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def served_by(self, request_id: str) -> list[dict]:
        lines = [line for replica in self.replicas for line in replica.access_lines()]
        return [line for line in lines if line["request_id"] == request_id]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path) -> Iterator[Stack]:
    program("nginx", "/usr/sbin/nginx")
    folder = tmp_path_factory.mktemp("deploy")
    with redis_server(folder / "redis") as redis:
        config = folder / "imagine.toml"
        config.write_text(REPLICA_CONFIG.format(redis_url=redis.url, ip_burst=IP_BURST))
        replicas = [Replica(folder / f"replica-{number}", config, demo_folder) for number in range(2)]
        try:
            for replica in replicas:
                replica.wait_ready()
            with behind_nginx(folder, replicas) as port:
                yield Stack(port, replicas, folder / "nginx")
        finally:
            for replica in replicas:
                replica.stop()


def test_curl_output_through_nginx_writes_the_png(stack, tmp_path) -> None:
    image = tmp_path / "image.png"
    headers = tmp_path / "headers.txt"
    subprocess.run(
        [
            "curl", "--fail", "--silent", "--show-error", "--interface", "127.0.0.4",
            "-H", f"Authorization: {TOKEN['Authorization']}", "-H", "Content-Type: application/json",
            "-d", '{"prompt": "a lighthouse at dusk", "model": "sdxl-turbo", "seed": 7}',
            "--dump-header", str(headers), "--output", str(image),
            f"http://{LOOPBACK}:{stack.port}/imagine/generate",
        ],
        check=True,
        timeout=120,
    )
    png = Image.open(io.BytesIO(image.read_bytes()))
    assert png.format == "PNG" and png.size == (64, 64)
    assert "a lighthouse at dusk" in png.text["parameters"]
    request_id = re.search(r"(?im)^x-request-id: (\S+)", headers.read_text()).group(1)
    # nginx's id reached the replica (its trusted proxy) and is the one both logs carry.
    (line,) = stack.served_by(request_id)
    assert (line["route"], line["status"], line["client"], line["sub"]) == (
        "/imagine/generate", 200, "127.0.0.4", "deploy-test"
    )
    assert line["queue_wait_ms"] is not None
    assert request_id in (stack.nginx_folder / "imagine.access.log").read_text()


def test_a_client_sent_forwarded_host_does_not_decide_a_links_host(stack) -> None:
    status, _, answer = stack.request(
        "POST",
        "/imagine/v1/images/generations",
        client="127.0.0.5",
        headers={**TOKEN, "Content-Type": "application/json", "X-Forwarded-Host": "evil.example"},
        body=b'{"prompt": "a fox", "model": "sdxl-turbo", "size": "64x64", "response_format": "url"}',
    )
    assert status == 200, answer
    (image,) = json.loads(answer)["data"]
    # The Host the client reached nginx by, as nginx passes it on, not the header it made up.
    assert image["url"].startswith(f"http://{LOOPBACK}:{stack.port}/imagine/gallery/img_"), image["url"]


def test_one_client_is_one_bucket_across_both_replicas(stack) -> None:
    answers = [stack.request("GET", "/imagine/health", client="127.0.0.2", headers=TOKEN) for _ in range(IP_BURST + 3)]
    assert [status for status, _, _ in answers] == [200] * IP_BURST + [429] * 3
    refused = json.loads(answers[-1][2])
    assert refused["error"]["code"] == "RATE_LIMIT_EXCEEDED" and refused["error"]["details"]["bucket"] == "ip"
    # Both replicas served this client: Redis held the one bucket they counted in.
    served = [
        sum(line["client"] == "127.0.0.2" for line in replica.access_lines()) for replica in stack.replicas
    ]
    assert sum(served) == IP_BURST + 3 and min(served) >= 1


def test_a_client_sent_forwarded_for_cannot_dodge_its_bucket(stack) -> None:
    answers = [
        stack.request(
            "GET", "/imagine/models", client="127.0.0.3", headers={**TOKEN, "X-Forwarded-For": f"203.0.113.{number}"}
        )
        for number in range(IP_BURST + 2)
    ]
    assert [status for status, _, _ in answers] == [200] * IP_BURST + [429] * 2
    for _, headers, _ in answers:
        (line,) = stack.served_by(headers["X-Request-ID"])
        assert line["client"] == "127.0.0.3"


def test_nginx_refuses_an_oversized_body_with_contract_json(stack) -> None:
    body = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    headers = {**TOKEN, "Content-Type": "application/json"}
    status, headers, answer = stack.request("POST", "/imagine/generate", client="127.0.0.5", headers=headers, body=body)
    assert status == 413
    assert headers["Content-Type"] == "application/json"
    error = json.loads(answer)
    assert error["detail"] == error["error"]["message"]
    assert error["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert error["error"]["details"]["request_id"] == headers["X-Request-ID"]
    # Outside the service's base path, also JSON.
    status, headers, answer = stack.request("GET", "/", client="127.0.0.5")
    assert status == 404 and json.loads(answer)["error"]["code"] == "NOT_FOUND"


def test_nginx_flood_guard_answers_contract_json(stack) -> None:
    """/livez is never limited by the service: every 429 here is nginx's own (50/s, burst 100)."""

    def flood(_: int) -> list[tuple[int, http.client.HTTPMessage, bytes]]:
        # Several connections at once outrun the refill however slow the machine; each stops at its first 429.
        connection = http.client.HTTPConnection(LOOPBACK, stack.port, timeout=30, source_address=("127.0.0.6", 0))
        answers = []
        try:
            for _ in range(FLOOD_PER_CONNECTION):
                connection.request("GET", "/imagine/livez")
                response = connection.getresponse()
                answers.append((response.status, response.headers, response.read()))
                if response.status == 429:
                    break
        finally:
            connection.close()
        return answers

    with ThreadPoolExecutor(max_workers=FLOOD_CONNECTIONS) as pool:
        answers = [answer for batch in pool.map(flood, range(FLOOD_CONNECTIONS)) for answer in batch]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 100
    _, headers, body = next(answer for answer in answers if answer[0] == 429)
    assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["code"] == "RATE_LIMIT_EXCEEDED"


def test_the_service_answers_through_the_other_replica_when_one_stops(stack) -> None:
    """Last in this module: it stops the replicas."""
    stack.replicas[0].stop()
    statuses = [stack.request("GET", "/imagine/livez", client="127.0.0.7")[0] for _ in range(6)]
    assert statuses == [200] * 6
    status, headers, png = stack.request(
        "POST",
        "/imagine/generate",
        client="127.0.0.7",
        headers={**TOKEN, "Content-Type": "application/json"},
        body=b'{"prompt": "a fox", "model": "sdxl-turbo"}',
    )
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert stack.served_by(headers["X-Request-ID"])[0]["status"] == 200

    stack.replicas[1].stop()
    status, headers, answer = stack.request("GET", "/imagine/livez", client="127.0.0.7")
    assert status == 502
    assert json.loads(answer)["error"]["code"] == "UPSTREAM_ERROR"
    assert headers["Content-Type"] == "application/json"
