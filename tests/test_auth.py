"""Bearer tokens: pinned algorithms, required claims, scopes and the `models` claim."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from imagine.http.app import create_app
from tests.conftest import SECRET, auth, make_token

GENERATE_TOO_WIDE = {"prompt": "a cat", "width": 4096}  # passes auth, then fails validation (400)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict, payload: dict, sign=None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{_b64(signature)}"


def _claims(**extra: object) -> dict:
    return {"sub": "mallory", "scope": "generate admin", "exp": int(time.time()) + 600, **extra}


async def assert_invalid_token(client, token: str | None, *, token_sent: bool = True) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = await client.get("/imagine/health", headers=headers)
    assert response.status == 401
    body = await response.json()
    assert body["detail"] == "Invalid token"
    assert body["error"]["code"] == "AUTHENTICATION_ERROR"
    expected = 'Bearer error="invalid_token"' if token_sent else "Bearer"
    assert response.headers["WWW-Authenticate"] == expected


async def test_missing_token_is_refused_with_a_bearer_challenge(client) -> None:
    await assert_invalid_token(client, None, token_sent=False)


async def test_malformed_and_wrongly_signed_tokens_are_refused(client) -> None:
    await assert_invalid_token(client, "not-a-jwt")
    await assert_invalid_token(client, make_token(secret=b"another-secret-that-is-long-enough-0123456789"))
    response = await client.get("/imagine/health", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status == 401


async def test_alg_none_is_refused(client) -> None:
    await assert_invalid_token(client, _unsigned({"alg": "none", "typ": "JWT"}, _claims()))


async def test_expiry_not_before_and_required_claims(client) -> None:
    now = int(time.time())
    await assert_invalid_token(client, make_token(exp=now - 120))  # beyond the 30 s leeway
    await assert_invalid_token(client, make_token(nbf=now + 120))
    await assert_invalid_token(client, jwt.encode({"sub": "alice", "scope": "generate"}, SECRET, "HS256"))
    await assert_invalid_token(client, make_token(sub=""))
    # Inside the leeway an expired clock still passes.
    response = await client.get("/imagine/health", headers={"Authorization": f"Bearer {make_token(exp=now - 5)}"})
    assert response.status == 200


async def test_claims_no_store_can_hold_or_no_clock_can_read_are_refused(client) -> None:
    """A subject names the caller's rows in every store, and a time is a JSON number: else a 500 later."""
    now = int(time.time())
    subjects = ["\ud800x", "ali\u0000ce", "bob\nINFO forged log line", "a" * 256]
    for sub in subjects:
        await assert_invalid_token(client, jwt.encode({"sub": sub, "scope": "generate", "exp": now + 600}, SECRET, "HS256"))
    for times in ({"exp": 10**400}, {"exp": now + 600, "nbf": -(10**400)}, {"exp": str(now + 600)}, {"exp": True}):
        await assert_invalid_token(client, jwt.encode({"sub": "alice", "scope": "generate", **times}, SECRET, "HS256"))
    longest = jwt.encode({"sub": "é" * 255, "scope": "generate", "exp": now + 600}, SECRET, "HS256")
    assert (await client.get("/imagine/usage", headers={"Authorization": f"Bearer {longest}"})).status == 200


async def test_scopes_are_separated_by_spaces_only(client) -> None:
    for scope in ("generate\u00a0admin", "generate\tadmin"):
        token = make_token(scope=scope)
        response = await client.post("/imagine/models/sdxl/unload", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 403, scope


async def test_a_remembered_token_still_expires_and_a_changed_one_is_checked_again(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(auth={"leeway_s": 0}))
    token = make_token(exp=int(time.time()) + 2)
    assert (await client.get("/imagine/health", headers={"Authorization": f"Bearer {token}"})).status == 200
    # A byte changed in the signature is another token: checked in full, and refused.
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    await assert_invalid_token(client, tampered)
    assert (await client.get("/imagine/health", headers={"Authorization": f"Bearer {token}"})).status == 200
    await asyncio.sleep(3)
    await assert_invalid_token(client, token)


async def test_token_in_query_string_is_ignored(client) -> None:
    response = await client.get(f"/imagine/health?access_token={make_token()}")
    assert response.status == 401


async def test_audience_and_issuer_are_checked_when_configured(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(auth={"audience": "imagine-api", "issuer": "https://id.example"}))
    good = {"aud": "imagine-api", "iss": "https://id.example"}
    assert (await client.get("/imagine/health", headers=auth(**good))).status == 200
    await assert_invalid_token(client, make_token(aud="other-api", iss="https://id.example"))
    await assert_invalid_token(client, make_token(aud="imagine-api", iss="https://evil.example"))
    await assert_invalid_token(client, make_token())


async def test_scopes_are_checked_per_route(client) -> None:
    # Read-only routes need a valid token and nothing else.
    assert (await client.get("/imagine/health", headers=auth(scope=""))).status == 200
    refused = await client.post("/imagine/generate", json=GENERATE_TOO_WIDE, headers=auth(scope="metrics"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "FORBIDDEN"
    # A scope given as a JSON list works too: the request gets as far as validation.
    allowed = await client.post("/imagine/generate", json=GENERATE_TOO_WIDE, headers=auth(scope=["generate"]))
    assert allowed.status == 400


async def test_models_claim_is_checked_against_the_resolved_model(client) -> None:
    only_turbo = auth(models=["sdxl-turbo"])
    refused = await client.post("/imagine/generate", json={**GENERATE_TOO_WIDE, "model": "sdxl"}, headers=only_turbo)
    assert refused.status == 403
    # The default model (sdxl) is resolved before the check.
    assert (await client.post("/imagine/generate", json=GENERATE_TOO_WIDE, headers=only_turbo)).status == 403
    # An alias of a granted model is the granted model.
    only_sdxl = auth(models=["sdxl"])
    aliased = await client.post(
        "/imagine/generate", json={**GENERATE_TOO_WIDE, "model": "stable-diffusion-xl"}, headers=only_sdxl
    )
    assert aliased.status == 400


async def test_public_routes_need_no_token(client) -> None:
    response = await client.get("/imagine/livez")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


def _write_public_key(private_key, path: Path) -> None:
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


async def test_rs256_rejects_hs256_tokens_signed_with_the_public_key(aiohttp_client, base_settings, tmp_path) -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_file = tmp_path / "public.pem"
    _write_public_key(private_key, public_file)
    settings = base_settings.replace(auth={"algorithm": "RS256", "public_key_file": str(public_file)})
    client = await aiohttp_client(create_app(settings))

    good = jwt.encode(_claims(), private_key, algorithm="RS256")
    assert (await client.get("/imagine/health", headers={"Authorization": f"Bearer {good}"})).status == 200

    public_pem = public_file.read_bytes()
    confused = _unsigned(
        {"alg": "HS256", "typ": "JWT"}, _claims(), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
    )
    await assert_invalid_token(client, confused)
    await assert_invalid_token(client, _unsigned({"alg": "none"}, _claims()))


async def test_es256_tokens_verify_with_the_configured_public_key(aiohttp_client, base_settings, tmp_path) -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_file = tmp_path / "public.pem"
    _write_public_key(private_key, public_file)
    settings = base_settings.replace(auth={"algorithm": "ES256", "public_key_file": str(public_file)})
    client = await aiohttp_client(create_app(settings))
    good = jwt.encode(_claims(), private_key, algorithm="ES256")
    assert (await client.get("/imagine/health", headers={"Authorization": f"Bearer {good}"})).status == 200
    other = jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    await assert_invalid_token(client, other)
