"""A real PostgreSQL server for the tests: its own cluster (initdb, pg_ctl) in a temporary folder on a loopback port.

One cluster per test run, started by the first test that asks for
`postgres` and stopped at the test run's end; each test gets a database of its
own (`new_database`). PostgreSQL refuses to run as root, so as root (CI) the
server runs as the `postgres` system user that Debian's package creates, in
a folder of the system's temporary directory that user may enter.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import LOOPBACK, free_port, program, wait_for_port

SUPERUSER = "postgres"


def _binary(name: str) -> str:
    return program(name, f"/usr/lib/postgresql/*/bin/{name}")


class PostgresCluster:
    """initdb'd once; `stop` and `start` again keep its data (for tests of an outage)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl, self.createdb = _binary("initdb"), _binary("pg_ctl"), _binary("createdb")
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        # As root the folder must be one the postgres user can reach: not under pytest's 0700 base.
        self.folder = Path(tempfile.mkdtemp(prefix="imagine-postgres-"))
        self.data = self.folder / "data"
        if self._as_root:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        self._run(self.initdb, "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr or done.stdout}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> None:
        # Durability is not under test: no fsyncs. No Unix socket: loopback TCP only.
        options = f"-p {self.port} -c listen_addresses={LOOPBACK} -c unix_socket_directories='' -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start")
        wait_for_port(self.port)

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"test_{secrets.token_hex(6)}"
        subprocess.run(
            [self.createdb, "-h", LOOPBACK, "-p", str(self.port), "-U", SUPERUSER, name],
            check=True, capture_output=True, timeout=30,
        )
        return self.url(name)


_cluster: PostgresCluster | None = None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The test run's one cluster (test modules that import this fixture share it)."""
    global _cluster
    if _cluster is None:
        _cluster = PostgresCluster()
        _cluster.start()
    yield _cluster
    if _cluster is not None:
        cluster, _cluster = _cluster, None
        try:
            cluster.stop()
        finally:
            cluster.remove()
