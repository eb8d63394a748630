"""Real programs for the tests: redis-server and nginx on free loopback ports, in temporary folders.

Each is started with its own configuration and stopped by the fixture that
started it. Where a program is not installed, a test skips, except in CI
(`CI` set), where `.ci/run` installs them and a missing one is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagine.devtools.processes import LOOPBACK, RedisServer, free_port, stop, wait_for_port

__all__ = ["LOOPBACK", "PACKAGES", "RedisServer", "free_port", "nginx", "program", "redis_server", "stop", "wait_for_port"]


# The Debian package of each program the tests start, where the names differ (.ci/run installs them).
PACKAGES = {"chromedriver": "chromium-driver", "initdb": "postgresql", "pg_ctl": "postgresql", "postgres": "postgresql"}


def program(name: str, debian_path: str) -> str:
    """The program's path (on PATH, else `debian_path`, a glob: the newest match), or skip (fail in CI) when it is not installed."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(debian_path), reverse=True)), None)
    if found is None:
        message = f"{name} is not installed (apt-get install {PACKAGES.get(name, name)}; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def redis_binary() -> str:
    return program("redis-server", "/usr/bin/redis-server")


@contextmanager
def redis_server(folder: Path, *, persistent: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), folder, persistent=persistent)
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
