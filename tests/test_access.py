"""Request ids on every response and one structured access-log line per request."""

from __future__ import annotations

import json
import logging
import re

import pytest

from tests.conftest import auth, make_token

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "imagine.access"]


@pytest.fixture
async def behind_proxy(make_client, base_settings):
    """The test client's address (127.0.0.1) is the trusted proxy, as nginx on the same host is."""
    return await make_client(base_settings.replace(server={"trusted_proxies": ("127.0.0.1", "::1")}))


async def test_every_response_carries_a_request_id(client) -> None:
    responses = [
        await client.get("/imagine/livez"),
        await client.get("/imagine/health"),  # 401
        await client.get("/imagine/nowhere"),  # 404
        await client.delete("/imagine/health", headers=auth()),  # 405
        await client.get("/imagine/health", headers=auth()),
    ]
    ids = [response.headers["X-Request-ID"] for response in responses]
    assert all(HEX_ID.match(identifier) for identifier in ids)
    assert len(set(ids)) == len(ids)
    preflight = await client.options(
        "/imagine/generate", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert HEX_ID.match(preflight.headers["X-Request-ID"])
    assert "X-Request-ID" in (await client.get("/imagine/livez", headers={"Origin": "https://app.example"})).headers[
        "Access-Control-Expose-Headers"
    ]


async def test_a_client_cannot_choose_its_request_id(client) -> None:
    response = await client.get("/imagine/livez", headers={"X-Request-ID": "forged-id-1234"})
    assert response.headers["X-Request-ID"] != "forged-id-1234"
    assert HEX_ID.match(response.headers["X-Request-ID"])


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("3f2a9c0d1b4e5f60718293a4b5c6d7e8", True),  # nginx's $request_id
        ("a1b2c3d4-0000-4000-8000-123456789abc", True),
        ("x" * 129, False),
        ("two words", False),
        ('"}, {"injected": true', False),
    ],
)
async def test_a_trusted_proxys_request_id_is_kept_when_it_looks_like_one(behind_proxy, sent, kept) -> None:
    response = await behind_proxy.get("/imagine/livez", headers={"X-Request-ID": sent})
    assert (response.headers["X-Request-ID"] == sent) is kept
    if not kept:
        assert HEX_ID.match(response.headers["X-Request-ID"])


async def test_one_json_line_per_request_with_id_subject_route_status_and_queue_wait(behind_proxy, caplog) -> None:
    caplog.set_level(logging.INFO, logger="imagine.access")
    token = make_token("alice")
    generated = await behind_proxy.post(
        "/imagine/generate?sig=query-secret",
        json={"prompt": "a fox", "model": "sdxl-turbo"},
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.51.100.23"},
    )
    assert generated.status == 200
    missing = await behind_proxy.get("/imagine/jobs/job_unknown", headers={"Authorization": f"Bearer {token}"})
    assert missing.status == 404

    first, second = access_lines(caplog)
    assert first["request_id"] == generated.headers["X-Request-ID"]
    assert first["sub"] == "alice"
    assert first["client"] == "198.51.100.23"
    assert (first["method"], first["route"], first["path"], first["status"]) == (
        "POST", "/imagine/generate", "/imagine/generate", 200
    )
    assert first["duration_ms"] > 0 and first["queue_wait_ms"] is not None and first["queue_wait_ms"] >= 0
    assert first["error"] is None
    assert (second["route"], second["path"], second["status"], second["error"]) == (
        "/imagine/jobs/{job_id}", "/imagine/jobs/job_unknown", 404, "NOT_FOUND"
    )
    assert second["queue_wait_ms"] is None
    # Neither the token nor anything from the query string is ever written.
    assert token not in caplog.text and "query-secret" not in caplog.text


async def test_the_access_log_can_be_turned_off(make_client, base_settings, caplog) -> None:
    caplog.set_level(logging.INFO, logger="imagine.access")
    client = await make_client(base_settings.replace(server={"access_log": False}))
    assert (await client.get("/imagine/livez")).status == 200
    assert access_lines(caplog) == []
