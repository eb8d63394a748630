"""Real programs for the tests: redis-server and nginx on free loopback ports, in temporary folders.

Each is started with its own configuration and stopped by the fixture that
started it. Where a program is not installed, a test skips, except in CI
(`CI` set), where `.ci/run` installs them and a missing one is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def program(name: str, debian_path: str) -> str:
    """The program's path, or skip (fail in CI) when it is not installed."""
    found = shutil.which(name) or (debian_path if Path(debian_path).exists() else None)
    if found is None:
        message = f"{name} is not installed (apt-get install nginx redis-server; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer:
    """One redis-server, with nothing saved to disk; restartable on the same port."""

    def __init__(self, folder: Path) -> None:
        self.binary = program("redis-server", "/usr/bin/redis-server")
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--protected-mode", "yes", "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {folder}/nginx.pid;
error_log {folder}/error.log notice;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/imagine.conf;
}}
"""


def fill_in(text: str, replacements: dict[str, str]) -> str:
    """Replace each shipped value once; a value that is gone means the shipped file changed under the test."""
    for shipped, local in replacements.items():
        assert text.count(shipped) == 1, f"expected {shipped!r} exactly once in deploy/nginx.conf"
        text = text.replace(shipped, local)
    return text


@contextmanager
def nginx(folder: Path, site: str) -> Iterator[int]:
    """nginx in the foreground with `site` (an http-level file like deploy/nginx.conf) in a main config of its own.

    `site` must listen on {LOOPBACK}:<port> with <port> from free_port(); yields that port once it answers.
    """
    binary = program("nginx", "/usr/sbin/nginx")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imagine.conf").write_text(site)
    # As root, nginx would run its workers as an unprivileged user that cannot enter the test's folders.
    user = "user root;" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(NGINX_MAIN.format(folder=folder, user=user))
    port = int(site.split(f"listen {LOOPBACK}:", 1)[1].split(";", 1)[0])
    process = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    try:
        try:
            wait_for_port(port, process)
        except (RuntimeError, TimeoutError):
            raise RuntimeError((folder / "stderr.log").read_text() + (folder / "error.log").read_text()) from None
        yield port
    finally:
        stop(process)
