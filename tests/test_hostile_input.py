"""Hostile bodies and headers get a 4xx in the contract's shape, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import socket
import struct

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from imagine.http.app import create_app
from tests.conftest import KEYS, auth
from tests.slow_plugin import SlowPlugin

# Every route that reads a JSON body.
JSON_ROUTES = [
    "/imagine/generate",
    "/imagine/jobs",
    "/imagine/generate/batch",
    "/imagine/generate-image",
    "/imagine/v1/images/generations",
    "/imagine/load_model",
    "/imagine/api-key",
]

ADMIN = auth(scope="generate admin")
AUTH_LINE = "Authorization: " + auth()["Authorization"]


def error_code(route: str, body: dict) -> str:
    """The contract's code, or OpenAI's error type under /v1."""
    if "/v1/" in route:
        return body["error"]["type"]
    return body["error"]["code"]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


async def post_raw(client, route: str, body: str | bytes):
    return await client.post(route, data=body, headers={**ADMIN, "Content-Type": "application/json"})


@pytest.mark.parametrize("route", JSON_ROUTES)
async def test_deeply_nested_json_is_a_400_on_every_route(client, caplog, route) -> None:
    for depth in (1000, 100_000):
        response = await post_raw(client, route, "[" * depth + "]" * depth)
        assert response.status == 400, await response.text()
        body = await response.json()
        assert error_code(route, body) in ("VALIDATION_ERROR", "invalid_request_error")
        assert "nested" in json.dumps(body)
    assert_no_traceback(caplog)


async def test_nesting_inside_a_field_is_refused_before_validation(client) -> None:
    nested = '{"prompt": "x", "loras": ' + "[" * 500 + "]" * 500 + "}"
    response = await post_raw(client, "/imagine/generate", nested)
    assert response.status == 400
    assert "nested more than" in (await response.json())["detail"]


@pytest.mark.parametrize("route", JSON_ROUTES)
async def test_a_number_of_thousands_of_digits_is_a_400(client, caplog, route) -> None:
    response = await post_raw(client, route, '{"prompt":"x","seed":' + "9" * 4301 + "}")
    assert response.status == 400, await response.text()
    assert "number is too long" in json.dumps(await response.json())
    assert_no_traceback(caplog)


async def test_a_large_but_parseable_seed_is_a_field_error(client) -> None:
    response = await post_raw(client, "/imagine/generate", '{"prompt":"x","seed":' + "9" * 4000 + "}")
    assert response.status == 400
    errors = (await response.json())["error"]["details"]["errors"]
    assert errors[0]["loc"] == ["body", "seed"]


@pytest.mark.parametrize("route", ["/imagine/generate", "/imagine/jobs", "/imagine/v1/images/generations"])
async def test_duplicate_keys_are_refused(client, route) -> None:
    response = await post_raw(client, route, '{"prompt":"x","width":99999,"width":64}')
    assert response.status == 400, await response.text()
    body = await response.json()
    assert "width" in json.dumps(body)
    assert "more than once" in json.dumps(body)


async def test_duplicate_keys_in_a_nested_object_are_refused(client) -> None:
    body = '{"prompt":"x","loras":[{"name":"a","name":"b"}]}'
    response = await post_raw(client, "/imagine/generate", body)
    assert response.status == 400
    assert (await response.json())["error"]["details"]["errors"][0]["loc"] == ["body", "name"]


async def test_a_body_that_is_not_utf8_is_a_400(client) -> None:
    response = await post_raw(client, "/imagine/generate", b'{"prompt":"\xe9"}')
    assert response.status == 400
    assert "UTF-8" in (await response.json())["detail"]


async def raw_exchange(client, request: bytes, *, keep_open_s: float = 0.0, read_timeout_s: float = 20.0) -> bytes:
    """Send raw bytes to the test server and read what comes back until it closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        if keep_open_s:
            await asyncio.sleep(keep_open_s)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout_s)
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), read_timeout_s)
    finally:
        writer.close()


def status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize("token", [b"\xe9", b"abc\xff.def.ghi", "é".encode()])
async def test_a_token_that_is_not_ascii_is_a_401(client, caplog, token) -> None:
    answer = await raw_exchange(
        client, b"GET /imagine/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    )
    status, body = status_and_body(answer)
    assert status == 401
    assert body["error"]["code"] == "AUTHENTICATION_ERROR"
    assert body["error"]["details"]["reason"] == "malformed token"
    assert_no_traceback(caplog)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "eyJhbGciOi.\u00b7.x", "e30.e30.x", "!!!.***.???"])
async def test_a_garbage_token_is_called_malformed(client, token) -> None:
    response = await client.get("/imagine/health", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 401
    assert (await response.json())["error"]["details"]["reason"] == "malformed token"


async def test_a_stalled_body_gets_408(make_client, base_settings, caplog) -> None:
    client = await make_client(base_settings.replace(server={"body_timeout_s": 0.5}))
    token = ADMIN["Authorization"].encode()
    head = (
        b"POST /imagine/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + token + b"\r\nContent-Length: 100\r\n\r\n"
    )
    status, body = status_and_body(await raw_exchange(client, head + b'{"prom'))
    assert status == 408
    assert body["error"]["code"] == "REQUEST_TIMEOUT"
    assert_no_traceback(caplog)


async def test_a_trickling_chunked_body_gets_408(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(server={"body_timeout_s": 0.5}))
    token = ADMIN["Authorization"].encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /imagine/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + token + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    async def trickle() -> None:
        for byte in b'{"prompt":"a slow cat"}':
            writer.write(b"1\r\n" + bytes([byte]) + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 408"), head
    finally:
        trickling.cancel()
        writer.close()


async def test_closing_an_event_stream_early_is_a_499_not_an_error(base_settings, caplog) -> None:
    # Handlers are not cancelled when their client leaves, so every close below
    # meets the handler's next write: the race `imagine serve` (which cancels
    # them) loses now and then.
    runner = web.AppRunner(
        create_app(base_settings, keys=KEYS, extra_plugins=(SlowPlugin(step_seconds=0.01),)), handler_cancellation=False
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            submitted = await client.post("/imagine/jobs", json={"prompt": "a", "model": "slow", "steps": 400}, headers=auth())
            job_id = (await submitted.json())["id"]
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET /imagine/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n\r\n".encode())
                await reader.readuntil(b"\r\n\r\n")
                await reader.read(1)
                # SO_LINGER 0: close with a reset, as a killed client does.
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
            route = 'route="/imagine/jobs/{job_id}/events"'
            for _ in range(200):
                text = await (await client.get("/imagine/metrics", headers=auth(scope="metrics"))).text()
                served = [line for line in text.splitlines() if line.startswith("imagine_http_requests_total") and route in line]
                if sum(float(line.rsplit(" ", 1)[1]) for line in served) >= 5:
                    break
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert served and all('status="499"' in line for line in served), served
    assert 'code="INTERNAL_ERROR"' not in text
    assert_no_traceback(caplog)


@pytest.mark.parametrize("route", ["/imagine/generate", "/imagine/jobs", "/imagine/v1/images/generations", "/imagine/sdapi/v1/txt2img"])
async def test_a_nul_character_in_a_body_is_a_400_and_nothing_is_made(client, caplog, route) -> None:
    # PostgreSQL's text cannot hold NUL and PNG text chunks may not: refused before any image is made.
    response = await client.post(route, json={"prompt": "a \u0000 fox", "width": 64, "height": 64}, headers=ADMIN)
    assert response.status == 400
    body = await response.json()
    if "/sdapi/" in route:
        assert body["error"] == "VALIDATION_ERROR" and body["errors"][0]["loc"] == ["body", "prompt"]
    elif "/v1/" in route:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "prompt"
    else:
        assert body["error"]["details"]["errors"][0] == {"loc": ["body", "prompt"], "msg": "must not contain the NUL character"}
    listing = await (await client.get("/imagine/gallery", headers=ADMIN)).json()
    assert listing["total_count"] == 0
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    "path", ["/imagine/gallery?q=%00", "/imagine/gallery?model=a%00b", "/imagine/chat/sessions/%00", "/imagine/jobs/job_%00"]
)
async def test_a_nul_character_in_a_path_or_query_is_a_400(client, caplog, path) -> None:
    response = await client.get(path, headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "VALIDATION_ERROR"
    assert_no_traceback(caplog)


async def test_a_body_whose_content_encoding_does_not_decode_is_a_400(client, caplog) -> None:
    headers = {**ADMIN, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = await client.post("/imagine/generate", data=b"\x00not gzip", headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "VALIDATION_ERROR"
    # aiohttp itself then logs the unread rest of the body and closes the connection: none of ours fails.
    assert not [record for record in caplog.records if record.name.startswith("imagine") and record.levelno >= logging.ERROR]


def compressed(encoding: str, data: bytes) -> bytes:
    """`data` in a Content-Encoding that clients send bodies in."""
    if encoding == "br":
        import brotli

        return brotli.compress(data)
    if encoding == "zstd":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        return zstd.compress(data)
    return gzip.compress(data)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_a_body_in_each_content_encoding_is_decoded_and_read(client, encoding) -> None:
    headers = {**ADMIN, "Content-Type": "application/json", "Content-Encoding": encoding}
    body = compressed(encoding, json.dumps({"prompt": "a fox", "width": 7}).encode())
    response = await client.post("/imagine/generate", data=body, headers=headers)
    assert response.status == 400  # read to the end: the width it names is inside the compressed body
    assert (await response.json())["error"]["details"]["errors"][0]["loc"] == ["body", "width"]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_a_compressed_body_that_decodes_past_the_size_limit_is_a_413(make_client, base_settings, caplog, encoding) -> None:
    client = await make_client(base_settings.replace(server={"max_body_bytes": 4096}))
    # A few hundred bytes on the wire, a mebibyte once decoded: the limit holds for what the body decodes to.
    bomb = compressed(encoding, b'{"prompt": "' + b"x" * 2**20 + b'"}')
    assert len(bomb) < 4096
    headers = {**ADMIN, "Content-Type": "application/json", "Content-Encoding": encoding}
    response = await client.post("/imagine/generate", data=bomb, headers=headers)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert_no_traceback(caplog)


@pytest.mark.parametrize("coding", ["compress", "xyz", "gzip, br"])
@pytest.mark.parametrize("route", ["/imagine/generate", "/imagine/v1/images/edits"])
async def test_a_body_in_a_coding_that_is_not_decoded_is_a_400_not_misread(client, caplog, coding, route) -> None:
    # aiohttp would hand such a body on as it came; a stack of codings would be decoded as if it were one.
    content_type = "multipart/form-data; boundary=abc" if "edits" in route else "application/json"
    headers = {**ADMIN, "Content-Type": content_type, "Content-Encoding": coding}
    response = await client.post(route, data=gzip.compress(b'{"prompt": "a fox"}'), headers=headers)
    assert response.status == 400
    body = await response.json()
    if "edits" in route:
        assert body["error"]["type"] == "invalid_request_error" and "Content-Encoding" in body["error"]["message"]
    else:
        assert body["error"]["details"]["errors"][0]["loc"] == ["header", "Content-Encoding"]
    assert_no_traceback(caplog)


async def test_a_multipart_part_without_its_headers_is_a_400(client, caplog) -> None:
    headers = {**ADMIN, "Content-Type": "multipart/form-data; boundary=abc"}
    response = await client.post("/imagine/v1/images/edits", data=b"--abc\r\nnothing\r\n", headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert_no_traceback(caplog)


async def test_an_idempotency_key_that_is_not_utf8_is_a_400(client, caplog) -> None:
    body = b'{"prompt": "a fox", "width": 64, "height": 64}'
    head = (
        f"POST /imagine/jobs HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode()
    status, answer = status_and_body(await raw_exchange(client, head + b"Idempotency-Key: \xff\xfe\r\n\r\n" + body))
    assert status == 400
    assert answer["error"]["details"]["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert_no_traceback(caplog)


async def test_nan_anywhere_in_a_body_is_refused_by_name_not_echoed(client) -> None:
    # Python reads NaN and Infinity, JSON has neither: an A1111 field it ignores would come back as invalid JSON.
    response = await post_raw(client, "/imagine/sdapi/v1/txt2img", '{"prompt": "a cat", "width": 64, "height": 64, "foo": NaN}')
    assert response.status == 400
    assert (await response.json())["errors"][0]["loc"] == ["body", "foo"]


@pytest.mark.parametrize("n", ["²", "٣"])
async def test_a_form_count_in_other_digits_is_refused_by_name(client, n) -> None:
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    form = aiohttp.FormData()
    form.add_field("image", png.getvalue(), filename="a.png", content_type="image/png")
    form.add_field("prompt", "a fox")
    form.add_field("n", n)
    response = await client.post("/imagine/v1/images/edits", data=form, headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "n"
