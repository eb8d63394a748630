"""POST /api-key and where cloud keys come from: runtime, environment, key file."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagine.security.cloud_api_keys import CloudKeys, KeySpec, key_preview
from imagine.settings import Settings
from tests.conftest import auth
from tests.fake_leonardo import API_PREFIX, FakeLeonardo

URL = "/imagine/api-key"
NEW_KEY = "5f0c2a4e-77d1-4c3b-b8e2-6a9d0e1f9721"
ENV_KEY = "env-key-0a1b2c3d4e5f60718293a4b5"
ADMIN = {"sub": "root", "scope": "admin"}


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEONARDO_API_KEY", raising=False)


@pytest.fixture
def fake() -> FakeLeonardo:
    return FakeLeonardo(api_key=NEW_KEY, pending_polls=0)


@pytest.fixture
async def settings(aiohttp_server: Callable[..., Any], fake: FakeLeonardo, base_settings: Settings) -> Settings:
    server = await aiohttp_server(fake.app())
    return base_settings.replace(
        leonardo={"base_url": str(server.make_url(API_PREFIX)), "poll_interval_s": 0.01, "poll_max_interval_s": 0.02}
    )


def key_file(settings: Settings) -> Path:
    return Path(settings.server.state_dir) / "leonardo-api-key"


async def generate(client: Any) -> Any:
    return await client.post("/imagine/generate", json={"prompt": "a fox", "model": "leonardo"}, headers=auth())


async def test_admin_sets_the_key_and_generation_uses_it_at_once(make_client, settings, fake, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(settings)
    seen: list[bytes] = []  # every response's headers and body: the key must appear in none

    async def record(response: Any) -> Any:
        seen.append(str(dict(response.headers)).encode() + await response.read())
        return response

    assert (await record(await generate(client))).status == 503
    body = {"service": "leonardo-api", "api_key": NEW_KEY}
    response = await record(await client.post(URL, json=body, headers=auth(**ADMIN)))
    assert response.status == 200
    assert await response.json() == {
        "message": "API key updated successfully",
        "service": "leonardo-api",
        "key_preview": "************9721",
    }
    assert (await record(await generate(client))).status == 200
    assert fake.posts  # Leonardo got the new key
    for path in ("/imagine/models", "/imagine/health", "/imagine/status", "/imagine/info?model=leonardo"):
        assert (await record(await client.get(path, headers=auth()))).status == 200
    fake.api_key = "rotated-upstream-0000000000000"
    assert (await record(await generate(client))).status == 502  # rejected: the fake echoes our key back

    assert not any(NEW_KEY.encode() in seen_bytes for seen_bytes in seen)
    assert NEW_KEY not in caplog.text
    assert "API key for leonardo-api set by root" in caplog.text


async def test_the_key_file_is_owner_only_and_survives_a_restart(make_client, settings, fake) -> None:
    client = await make_client(settings)
    response = await client.post(URL, json={"service": "leonardo-api", "api_key": NEW_KEY}, headers=auth(**ADMIN))
    assert response.status == 200
    path = key_file(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0  # the folder it made is the owner's only
    assert path.read_text().strip() == NEW_KEY
    assert [entry.name for entry in path.parent.iterdir() if entry.name.startswith(".leonardo")] == []  # no temporary left

    restarted = await make_client(settings)
    assert (await generate(restarted)).status == 200


async def test_sources_runtime_then_environment_then_file(make_client, settings, fake, monkeypatch) -> None:
    path = key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("file-key-00000000000000000000\n")
    os.chmod(path, 0o600)
    monkeypatch.setenv("LEONARDO_API_KEY", ENV_KEY)
    fake.api_key = ENV_KEY
    client = await make_client(settings)
    assert (await generate(client)).status == 200  # the environment wins over the file

    await client.post(URL, json={"service": "leonardo-api", "api_key": NEW_KEY}, headers=auth(**ADMIN))
    fake.api_key = NEW_KEY
    assert (await generate(client)).status == 200  # the runtime key wins over the environment

    monkeypatch.delenv("LEONARDO_API_KEY")
    assert (await generate(await make_client(settings))).status == 200  # the persisted one, from the file


async def test_only_admins_may_set_keys(make_client, settings) -> None:
    client = await make_client(settings)
    body = {"service": "leonardo-api", "api_key": NEW_KEY}
    assert (await client.post(URL, json=body)).status == 401
    refused = await client.post(URL, json=body, headers=auth(scope="generate"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "FORBIDDEN"
    assert not key_file(settings).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"service": "replicate", "api_key": NEW_KEY}, "service"),
        ({"service": "leonardo-api", "api_key": "short"}, "api_key"),
        ({"service": "leonardo-api", "api_key": "has a space in it 123456"}, "api_key"),
        ({"service": "leonardo-api", "api_key": NEW_KEY, "extra": 1}, "extra"),
        ({"service": "leonardo-api"}, "api_key"),
    ],
)
async def test_bad_bodies_are_refused_without_echoing_the_key(make_client, settings, body, field) -> None:
    client = await make_client(settings)
    response = await client.post(URL, json=body, headers=auth(**ADMIN))
    assert response.status == 400
    text = await response.text()
    errors = (await response.json())["error"]["details"]["errors"]
    assert [error["loc"][1] for error in errors] == [field]
    if "api_key" in body:
        assert body["api_key"] not in text
    assert not key_file(settings).exists()


def test_preview_shows_the_last_four_only_of_a_long_key() -> None:
    assert key_preview(NEW_KEY) == "************9721"
    assert key_preview("short-key-123") == "************"


def test_a_world_readable_key_file_is_used_with_a_warning(tmp_path, caplog) -> None:
    path = tmp_path / "key"
    path.write_text(NEW_KEY)
    os.chmod(path, 0o644)
    keys = CloudKeys([KeySpec("leonardo-api", "LEONARDO_API_KEY", path)], environ={})
    assert keys.get("leonardo-api") == NEW_KEY
    assert keys.source("leonardo-api") == "file"
    assert "readable by other users" in caplog.text
    assert NEW_KEY not in caplog.text
