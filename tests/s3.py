"""An S3-protocol server for the tests: moto's server mode in a subprocess on a loopback port.

S3 itself cannot run here, so a real server speaking its protocol stands in:
the code under test talks HTTP to it exactly as to AWS or MinIO. One server
per test run (started by the first test that asks for `s3`); each test
makes a bucket of its own.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.processes import LOOPBACK, free_port, stop, wait_for_port

# moto accepts any credentials; the service reads them from the standard AWS variables.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "imagine-test",
    "AWS_SECRET_ACCESS_KEY": "imagine-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance-metadata lookups when a credential is missing.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self):  # noqa: ANN201 - boto3's client classes are generated at run time
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        name = f"gallery-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every key in the bucket, sorted."""
        answer = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in answer.get("Contents", []))


_server: tuple[subprocess.Popen[bytes], S3Server] | None = None


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The test run's one server (test modules that import this fixture share it)."""
    global _server
    if _server is None:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, process)
        _server = (process, S3Server(f"http://{LOOPBACK}:{port}"))
    yield _server[1]
    if _server is not None:
        (process, _), _server = _server, None
        stop(process)
