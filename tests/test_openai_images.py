"""POST /v1/images/generations through the official `openai` client, and signed image links."""

from __future__ import annotations

import base64
import io
import re
import time
import urllib.parse

import aiohttp
import openai
import pytest
from PIL import Image

from imagine.http.app_keys import url_signer_key
from tests.conftest import auth, make_token

ROUTE = "/imagine/v1/images/generations"
SIGNED_URL = re.compile(r"http://127\.0\.0\.1:\d+/imagine/gallery/(img_[A-Za-z0-9_-]{22})\.png\?expires=\d+&signature=[A-Za-z0-9_-]{43}")


@pytest.fixture
async def openai_client():
    """`openai_client(test_client, token)`: the official client pointed at the test server."""
    opened: list[openai.AsyncOpenAI] = []

    def make(client, token: str | None = None) -> openai.AsyncOpenAI:
        # No retries: a refusal must surface at once, not after back-off.
        opened.append(
            openai.AsyncOpenAI(base_url=str(client.make_url("/imagine/v1")), api_key=token or make_token(), max_retries=0)
        )
        return opened[-1]

    yield make
    for each in opened:
        await each.close()


async def fetch(url: str, **headers: str) -> tuple[int, bytes]:
    """An HTTP client that holds no token unless told: what a browser or a chat app does with a link."""
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read()


def png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


async def test_b64_json_images_from_the_openai_client(client, openai_client) -> None:
    before = int(time.time())
    result = await openai_client(client).images.generate(
        prompt="a red fox in the snow",
        model="sdxl-turbo",
        n=2,
        size="64x64",
        response_format="b64_json",
        quality="hd",
        style="vivid",
        user="end-user-42",
    )
    assert before <= result.created <= int(time.time()) + 1
    assert len(result.data) == 2
    pngs = [base64.b64decode(image.b64_json) for image in result.data]
    assert [png_size(png) for png in pngs] == [(64, 64), (64, 64)]
    assert pngs[0] != pngs[1]  # seed, seed + 1
    gallery = await (await client.get("/imagine/gallery", headers=auth())).json()
    assert gallery["total_count"] == 2 and gallery["images"][0]["model"] == "sdxl-turbo"


async def test_url_images_are_fetched_without_a_token(client, openai_client) -> None:
    # No model: the configured default.
    result = await openai_client(client).images.generate(prompt="a lighthouse", size="64x64", response_format="url")
    url = result.data[0].url
    match = SIGNED_URL.fullmatch(url)
    assert match, url
    status, png = await fetch(url)
    assert status == 200
    assert png_size(png) == (64, 64)
    stored = await client.get(f"/imagine/gallery/{match.group(1)}", headers=auth())
    assert (await stored.json())["model"] == "sdxl"


async def test_tampered_expired_or_missing_signatures_are_refused(client, openai_client) -> None:
    result = await openai_client(client).images.generate(prompt="a fox", size="64x64", response_format="url", n=2)
    url, other_url = (image.url for image in result.data)
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    image_id = SIGNED_URL.fullmatch(url).group(1)

    def with_query(**changes: str) -> str:
        return parts._replace(query=urllib.parse.urlencode({**query, **changes})).geturl()

    signature = query["signature"]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    expired = client.app[url_signer_key].sign(image_id, now=time.time() - 2 * 3600)
    other_query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(other_url).query))
    refused = {
        "modified signature": with_query(signature=flipped),
        "later expiry": with_query(expires=str(int(query["expires"]) + 3600)),
        "expired": with_query(**expired),
        "another image's signature": with_query(**other_query),
        "no signature": with_query(signature=""),
        "no expiry": parts._replace(query=urllib.parse.urlencode({"signature": signature})).geturl(),
    }
    for name, bad_url in refused.items():
        status, body = await fetch(bad_url)
        assert status == 403, name
        assert b'"FORBIDDEN"' in body
    # Without a token or any signature it is an ordinary unauthenticated request.
    assert (await fetch(parts._replace(query="").geturl()))[0] == 401
    # With a token the link works like any gallery request: the owner may, others may not.
    plain = parts._replace(query="").geturl()
    assert (await fetch(plain, **auth()))[0] == 200
    assert (await fetch(plain, **auth("bob")))[0] == 404
    assert (await fetch(url))[0] == 200  # the untouched link still works


async def test_openai_errors_come_in_openai_shape(make_client, base_settings, openai_client) -> None:
    client = await make_client(base_settings)
    images = openai_client(client).images

    with pytest.raises(openai.NotFoundError) as not_found:
        await images.generate(prompt="a fox", model="dall-e-3")
    assert not_found.value.code == "model_not_found"
    assert not_found.value.type == "invalid_request_error"

    for arguments, param in (
        ({"size": "big"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"size": "100x64"}, "size"),
        ({"n": 5}, "n"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"extra_body": {"seed": 1}}, "seed"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            await images.generate(prompt="a fox", model="sdxl", **arguments)
        assert bad.value.param == param, (arguments, bad.value.body)
        assert bad.value.type == "invalid_request_error"

    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await openai_client(client, token="not-a-token").images.generate(prompt="a fox")
    assert unauthenticated.value.code == "invalid_api_key"

    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        await openai_client(client, token=make_token(scope="metrics")).images.generate(prompt="a fox")
    assert forbidden.value.code == "forbidden"

    with pytest.raises(openai.PermissionDeniedError):
        await openai_client(client, token=make_token(models=["sdxl-turbo"])).images.generate(prompt="a fox")


async def test_every_v1_error_has_openai_shape_and_keeps_its_headers(make_client, base_settings, openai_client) -> None:
    slow = {"global_rate": 0.001, "ip_rate": 0.001, "subject_rate": 0.001, "subject_burst": 1}
    client = await make_client(base_settings.replace(ratelimit=slow))
    missing = await client.post(ROUTE, json={"prompt": "a fox"})
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    body = await missing.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}

    unknown_route = await client.get("/imagine/v1/models", headers=auth())
    assert unknown_route.status == 404
    assert (await unknown_route.json())["error"]["code"] == "not_found"

    assert (await client.get("/imagine/health", headers=auth())).status == 200  # the subject's one token
    with pytest.raises(openai.RateLimitError) as limited:
        await openai_client(client).images.generate(prompt="a fox", size="64x64")
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    # Outside /v1/ the contract's own shape is unchanged.
    refused = await client.get("/imagine/health")
    assert "detail" in await refused.json()


async def test_urls_honour_the_public_url_setting(make_client, base_settings, openai_client) -> None:
    client = await make_client(base_settings.replace(server={"public_url": "https://images.example.com"}))
    result = await openai_client(client).images.generate(prompt="a fox", size="64x64", response_format="url")
    assert result.data[0].url.startswith("https://images.example.com/imagine/gallery/img_")


async def test_forwarded_host_and_proto_count_only_from_a_trusted_proxy(make_client, base_settings) -> None:
    forwarded = {**auth(), "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gpu.example.org"}
    body = {"prompt": "a fox", "size": "64x64", "response_format": "url"}

    untrusted = await make_client(base_settings)
    url = (await (await untrusted.post(ROUTE, json=body, headers=forwarded)).json())["data"][0]["url"]
    assert url.startswith("http://127.0.0.1:")

    trusted = await make_client(base_settings.replace(server={"trusted_proxies": ("127.0.0.1", "::1")}))
    url = (await (await trusted.post(ROUTE, json=body, headers=forwarded)).json())["data"][0]["url"]
    assert url.startswith("https://gpu.example.org/imagine/gallery/img_")
    # A forged host that is no host name is ignored even from the proxy.
    bad_host = {**forwarded, "X-Forwarded-Host": "evil.example/@x"}
    url = (await (await trusted.post(ROUTE, json=body, headers=bad_host)).json())["data"][0]["url"]
    assert url.startswith("https://127.0.0.1:")


async def test_a_host_header_that_is_no_host_is_refused_before_any_work(client) -> None:
    body = {"prompt": "a fox", "size": "64x64", "response_format": "url"}
    response = await client.post(ROUTE, json=body, headers={**auth(), "Host": "evil.example/#"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "Host" in error["message"]
    assert "evil" not in await response.text()
    listing = await (await client.get("/imagine/gallery", headers=auth())).json()
    assert listing["total_count"] == 0


def test_signing_secret_is_owner_only_and_stable_or_from_the_environment(tmp_path) -> None:
    from imagine.settings import SettingsError
    from imagine.security.url_signing import SECRET_ENV, SECRET_FILE, UrlSigner, load_url_secret

    secret = load_url_secret(tmp_path, {})
    assert len(secret) >= 32
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert load_url_secret(tmp_path, {}) == secret  # links survive a restart
    shared = "s" * 40
    assert load_url_secret(tmp_path, {SECRET_ENV: shared}) == shared.encode()
    with pytest.raises(SettingsError):
        load_url_secret(tmp_path, {SECRET_ENV: "too short"})
    # Another secret (another deployment) cannot vouch for our links.
    query = UrlSigner(b"x" * 32, 60).sign("img_" + "A" * 22)
    assert not UrlSigner(secret, 60).verify("img_" + "A" * 22, query)
    assert UrlSigner(b"x" * 32, 60).verify("img_" + "A" * 22, query)


def test_public_url_and_link_lifetime_settings(tmp_path) -> None:
    from imagine.settings import SettingsError, load_settings

    assert load_settings(None, {}).gallery.url_ttl_s == 3600
    settings = load_settings(None, {"IMAGINE_SERVER_PUBLIC_URL": "https://images.example.com", "IMAGINE_GALLERY_URL_TTL_S": "600"})
    assert (settings.server.public_url, settings.gallery.url_ttl_s) == ("https://images.example.com", 600)
    for variable, value in (
        ("IMAGINE_GALLERY_URL_TTL_S", "0"),
        ("IMAGINE_SERVER_PUBLIC_URL", "https://images.example.com/imagine"),
        ("IMAGINE_SERVER_PUBLIC_URL", "images.example.com"),
    ):
        with pytest.raises(SettingsError):
            load_settings(None, {variable: value})
