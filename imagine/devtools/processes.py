"""Real processes on loopback for benchmarks and tests: imagine replicas and redis-server, each in its own folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


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
    """One redis-server, restartable on the same port; with `persistent`, what it holds survives a restart
    (an append-only file written on every change, as a shared queue's Redis should run)."""

    def __init__(self, binary: str, folder: Path, *, persistent: bool = False) -> None:
        self.binary = binary
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                *(("--appendonly", "yes", "--appendfsync", "always") if self.persistent else ("--appendonly", "no")),
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


class ServiceProcess:
    """`imagine serve` (or `worker`, or `serve --no-device`) in its own process and folder.

    Its stdout is the access log, one JSON line per request; `environment`
    adds to this process's own, less its IMAGINE_ settings (the replica's come from its config).
    """

    def __init__(
        self,
        folder: Path,
        config: Path,
        *,
        command: Sequence[str] = ("serve",),
        environment: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("IMAGINE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagine.cli", *command, "--config", str(config), "--port", str(self.port)],
            cwd=folder,
            env=inherited | dict(environment or {}) | {"PYTHONUNBUFFERED": "1"},
            stdout=open(folder / "stdout.log", "ab"),  # noqa: SIM115 - closed with the process
            stderr=open(folder / "stderr.log", "ab"),  # noqa: SIM115
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            wait_for_port(self.port, self.process, timeout=timeout)
        except (RuntimeError, TimeoutError):
            raise RuntimeError((self.folder / "stderr.log").read_text()[-3000:]) from None

    def access_lines(self) -> list[dict[str, Any]]:
        text = (self.folder / "stdout.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def kill(self) -> None:
        """kill -9: no drain, no goodbye, as a crashed or preempted machine."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop(self.process)
