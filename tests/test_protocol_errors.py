"""Requests the HTTP parser refuses, sent as raw bytes to the server `imagine serve` runs.

They never reach the app's middlewares, yet answer in the contract's JSON with
an X-Request-ID, quote nothing of what was sent (a bearer token is often the
line that is too long), and leave one log line without it or a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest
from aiohttp import http_parser, web, web_protocol

from imagine.http.app import create_app
from imagine.http.server import make_runner
from imagine.settings import Settings
from tests.conftest import KEYS
from tests.processes import LOOPBACK

SECRET = b"SECRETTOKEN"
# Over the 8190 bytes aiohttp's parser takes in a request line or a header.
OVERSIZED = 9000
PARSERS = {
    "C parser": getattr(http_parser, "HttpRequestParserC", None),
    "pure-Python parser": http_parser.HttpRequestParserPy,
}


class Answer(NamedTuple):
    raw: bytes
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture(params=list(PARSERS))
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of aiohttp's two parsers (the pure-Python one serves where the C one is not built)."""
    chosen = PARSERS[request.param]
    if chosen is None:
        pytest.skip("aiohttp's C parser is not built on this platform")
    monkeypatch.setattr(web_protocol, "HttpRequestParser", chosen)


@pytest.fixture
async def port(base_settings: Settings) -> AsyncIterator[int]:
    runner = make_runner(create_app(base_settings, keys=KEYS))
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def exchange(port: int, request: bytes) -> Answer:
    """Send the bytes, read until the server closes: it does after refusing a request."""
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(request)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    return Answer(raw, int(status_line.split()[1]), headers, body)


def assert_refused(answer: Answer, status: int, code: str, caplog: pytest.LogCaptureFixture) -> None:
    assert answer.status == status
    assert answer.headers["content-type"].startswith("application/json")
    document = json.loads(answer.body)
    assert document["error"]["code"] == code
    assert document["detail"] == document["error"]["message"]
    request_id = answer.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert SECRET not in answer.raw

    # One access line, with the id the client saw; no traceback, nothing of the request.
    assert [record.name for record in caplog.records] == ["imagine.access"]
    line = json.loads(caplog.records[0].getMessage())
    assert (line["request_id"], line["status"], line["error"]) == (request_id, status, code)
    assert all(record.exc_info is None for record in caplog.records)
    assert SECRET.decode() not in caplog.text


@pytest.fixture(autouse=True)
def access_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def test_a_url_over_the_limit_is_414(parser: None, port: int, caplog: pytest.LogCaptureFixture) -> None:
    target = b"/imagine/health?access_token=" + SECRET + b"a" * OVERSIZED
    answer = await exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_refused(answer, 414, "URI_TOO_LONG", caplog)


async def test_a_header_over_the_limit_is_431(parser: None, port: int, caplog: pytest.LogCaptureFixture) -> None:
    token = b"Bearer " + SECRET + b"x" * OVERSIZED
    answer = await exchange(port, b"GET /imagine/health HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + token + b"\r\n\r\n")
    assert_refused(answer, 431, "HEADERS_TOO_LARGE", caplog)


async def test_ten_thousand_headers_are_431(parser: None, port: int, caplog: pytest.LogCaptureFixture) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (number, SECRET) for number in range(10_000))
    answer = await exchange(port, b"GET /imagine/health HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
    assert_refused(answer, 431, "HEADERS_TOO_LARGE", caplog)


async def test_a_malformed_request_line_is_400(parser: None, port: int, caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(port, b"GET /imagine/livez HTTP/1.1 " + SECRET + b"\r\nHost: localhost\r\n\r\n")
    assert_refused(answer, 400, "VALIDATION_ERROR", caplog)


# The pure-Python parser lets the byte through to the router.
@pytest.mark.parametrize("parser", ["C parser"], indirect=True)
async def test_a_raw_ff_byte_in_the_url_is_400(parser: None, port: int, caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(port, b"GET /imagine/\xff" + SECRET + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_refused(answer, 400, "VALIDATION_ERROR", caplog)

