"""The `imagine` command as a user runs it: serve prints a working curl line, token signs."""

from __future__ import annotations

import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from PIL import Image

from imagine.cli import main


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_token_signs_with_the_environment_secret(monkeypatch, capsys, tmp_path) -> None:
    secret = "s" * 40
    monkeypatch.setenv("IMAGINE_JWT_SECRET", secret)
    monkeypatch.setenv("IMAGINE_SERVER_STATE_DIR", str(tmp_path))
    assert main(["token", "--sub", "ci-bot", "--scope", "generate admin", "--models", "sdxl,sdxl-turbo", "--ttl", "2h"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "ci-bot"
    assert claims["scope"] == "generate admin"
    assert claims["models"] == ["sdxl", "sdxl-turbo"]
    assert 7190 <= claims["exp"] - time.time() <= 7200


def test_token_refuses_a_short_secret_and_a_bad_ttl(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv("IMAGINE_SERVER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("IMAGINE_JWT_SECRET", "too-short")
    assert main(["token", "--sub", "x"]) == 2
    assert "shorter than 32 bytes" in capsys.readouterr().err
    monkeypatch.setenv("IMAGINE_JWT_SECRET", "s" * 40)
    assert main(["token", "--sub", "x", "--ttl", "soon"]) == 2
    assert "invalid duration" in capsys.readouterr().err


def test_settings_errors_are_one_clear_line(tmp_path, capsys) -> None:
    config = tmp_path / "imagine.toml"
    config.write_text("[queue]\nmax_sise = 3\n")
    assert main(["token", "--config", str(config), "--sub", "x"]) == 2
    assert capsys.readouterr().err.strip() == "imagine: unknown setting queue.max_sise"


@pytest.fixture
def served(tmp_path: Path, demo_folder: Path):
    """`imagine serve` with no configuration, as the README's first command runs it."""
    port = free_port()
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("IMAGINE_")
    } | {
        "IMAGINE_SERVER_STATE_DIR": str(tmp_path / "state"),
        # The demo models of this test run stand in for the user's cache.
        "IMAGINE_SERVER_CACHE_DIR": str(demo_folder.parent),
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "imagine.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("curl "):
                break
        yield process, lines, environment
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_prints_a_token_and_a_curl_line_that_writes_a_png(served, tmp_path) -> None:
    process, lines, environment = served
    output = "".join(lines)
    assert "DEMO models" in output and "random" in output
    assert "development secret" in output
    curl_line = lines[-1].strip()
    assert curl_line.startswith("curl ") and "--output image.png" in curl_line

    subprocess.run(shlex.split(curl_line) + ["--fail", "--silent", "--show-error"], cwd=tmp_path, check=True, timeout=60)
    image = Image.open(io.BytesIO((tmp_path / "image.png").read_bytes()))
    assert image.format == "PNG"
    assert image.size == (512, 512)  # sdxl-turbo's default size
    assert "a lighthouse at dusk" in image.text["parameters"]

    # The development secret is private to its owner and survives for `imagine token`.
    secret_file = tmp_path / "state" / "dev-jwt-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    token = subprocess.run(
        [sys.executable, "-m", "imagine.cli", "token", "--sub", "second", "--scope", "generate"],
        env=environment, capture_output=True, text=True, check=True,
    ).stdout.strip()
    url = re.search(r"(http://\S+)/generate", curl_line).group(1)
    health = subprocess.run(
        ["curl", "--fail", "--silent", "-H", f"Authorization: Bearer {token}", f"{url}/health"],
        capture_output=True, text=True, timeout=30,
    )
    assert health.returncode == 0 and '"status": "healthy"' in health.stdout


def test_serve_preloads_the_curl_lines_model_and_keeps_library_noise_out(served) -> None:
    process, lines, _ = served
    # The curl line's model loads before anyone asks for it, so the first request does not wait.
    while not any("model sdxl-turbo loaded" in line for line in lines):
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    process.terminate()
    lines.append(process.stdout.read())
    output = "".join(lines)
    assert "loading model sdxl-turbo" in output
    # No progress bars or library advice among the service's own lines.
    assert "it/s]" not in output and "%|" not in output, output
    assert "torchvision" not in output, output
