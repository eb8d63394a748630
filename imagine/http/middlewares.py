"""Cross-cutting request handling, outermost first: CORS, errors, rate limits, auth.

The order matters: the per-IP and global buckets run before token
verification so that a flood never reaches the JWT code, and the error
middleware sits outside both so that a refusal from either is contract JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from imagine.security.tokens import (
    BASIC_AUTH_ATTRIBUTE,
    PUBLIC_ATTRIBUTE,
    SCOPE_ATTRIBUTE,
    SIGNED_URL_ATTRIBUTE,
    InvalidToken,
    basic_password,
)
from imagine.errors import ApiError, error_body, validation_error
from imagine.http.app_keys import (
    error_code_key,
    started_response_key,
    limiter_key,
    principal_key,
    rate_decisions_key,
    settings_key,
    trusted_networks_key,
    verifier_key,
)
from imagine.http.openai_errors import is_openai_route, openai_error_body
from imagine.http.request_bodies import NUL_MESSAGE
from imagine.http.sdapi_errors import is_sdapi_route, sdapi_error_body
from imagine.security.ratelimit import OPERATIONAL_ATTRIBUTE, BucketDecision, client_ip, most_restrictive
from imagine.security.url_signing import SIGNATURE_PARAMS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Headers a browser script may read from our responses.
EXPOSED_HEADERS = (
    "X-Seed, X-Model, X-Generation-Time, X-Image-Id, Content-Disposition, Retry-After, Server-Timing, "
    "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Quota-Limit, Quota-Remaining, Quota-Reset, "
    "WWW-Authenticate, X-Request-ID"
)

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_ERROR",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def _http_message(error: web.HTTPException, request: web.Request) -> str:
    if error.status == 404:
        return "Not found"
    if error.status == 405:
        return f"Method {request.method} not allowed"
    if error.status == 413:
        return f"Request body larger than {request.app[settings_key].server.max_body_bytes} bytes"
    return error.reason


def _allowed_origin(request: web.Request) -> str | None:
    origins = request.app[settings_key].server.cors_origins
    origin = request.headers.get("Origin")
    if origin is None or not ("*" in origins or origin in origins):
        return None
    # Bearer tokens, not cookies, carry identity, so "*" is safe here.
    return "*" if "*" in origins else origin


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights before auth (they carry no token by design)."""
    if (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and _allowed_origin(request) is not None
    ):
        # The route's own methods; a preflight for an unknown path learns nothing.
        allowed = getattr(request.match_info.http_exception, "allowed_methods", None) or {"GET", "POST", "DELETE"}
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ", ".join(sorted({*allowed, "OPTIONS"})),
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"
                ),
                "Access-Control-Max-Age": "600",
            },
        )
    return await handler(request)


async def note_started_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a handler that fails after this cannot answer again (`error_middleware`)."""
    request[started_response_key] = response


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CORS and RateLimit-* headers, added as headers go out: streamed responses too."""
    origin = _allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if origin != "*":
            response.headers["Vary"] = "Origin"
    binding = most_restrictive(request.get(rate_decisions_key, []))
    if binding is not None:
        for key, value in binding.headers().items():
            response.headers.setdefault(key, value)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the contract's error JSON, and never with a stack trace."""
    try:
        return await handler(request)
    except ConnectionResetError:
        # The client hung up while its answer was being written, before aiohttp
        # noticed and cancelled the handler: the same event as that
        # cancellation (499 in the access log), not a failure of ours.
        raise asyncio.CancelledError() from None
    except Exception as error:
        if isinstance(error, web.HTTPException) and error.status < 400:
            raise
        started = request.get(started_response_key)
        if started is not None:
            # A stream already on its way cannot be followed by an answer of its own: it ends here (an event
            # stream's client reconnects, with Last-Event-ID). A body of a stated length cut short is told
            # only by closing the connection.
            expected = isinstance(error, (ApiError, web.HTTPException))
            log.warning("%s %s failed after its stream started: %s", request.method, request.path, error, exc_info=not expected)
            if started.content_type != "text/event-stream" and request.transport is not None:
                # A document cut short (a JSON page, say) must not end as a whole one would: the connection
                # is dropped, with no last chunk, so the client sees an incomplete answer, not a bad document.
                request.transport.abort()
            elif not started.chunked:
                started.force_close()
            return started
        return _error_answer(request, error)


def _error_answer(request: web.Request, error: Exception) -> web.Response:
    if isinstance(error, ApiError):
        request[error_code_key] = error.code
        return _error_response(request, error.status, error.body(), error.headers)
    if isinstance(error, web.HTTPException):
        code = _HTTP_CODES.get(error.status, "INTERNAL_ERROR" if error.status >= 500 else "VALIDATION_ERROR")
        request[error_code_key] = code
        headers = {key: value for key, value in error.headers.items() if key.lower() == "allow"}
        return _error_response(request, error.status, error_body(code, _http_message(error, request)), headers)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
    request[error_code_key] = "INTERNAL_ERROR"
    return _error_response(request, 500, error_body("INTERNAL_ERROR", "Internal server error"), {})


def _error_response(
    request: web.Request, status: int, body: Mapping[str, Any], headers: Mapping[str, str]
) -> web.Response:
    # OpenAI's client libraries read only their own error shape, 401 and 429 included.
    if is_openai_route(request):
        body = openai_error_body(status, body)
    elif is_sdapi_route(request):
        body = sdapi_error_body(body)
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def nul_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No NUL in a path or query (%00): no id, name or filter of ours holds one, and text stores refuse it."""
    if "%00" in request.raw_path:
        if "\x00" in request.path:
            raise validation_error([{"loc": ["path"], "msg": NUL_MESSAGE}])
        for name, value in request.query.items():
            if "\x00" in name or "\x00" in value:
                raise validation_error([{"loc": ["query", name.replace("\x00", "")], "msg": NUL_MESSAGE}])
    return await handler(request)


def _is_public(request: web.Request) -> bool:
    return getattr(request.match_info.handler, PUBLIC_ATTRIBUTE, False)


def _is_operational(request: web.Request) -> bool:
    return getattr(request.match_info.handler, OPERATIONAL_ATTRIBUTE, False)


def _unmatched(request: web.Request) -> bool:
    """404 and 405 answer without a token: there is nothing behind them to protect."""
    return request.match_info.http_exception is not None


def _signed_url_attempt(request: web.Request) -> bool:
    """No token, but URL signature parameters on a route that takes them: its handler judges the signature."""
    return (
        getattr(request.match_info.handler, SIGNED_URL_ATTRIBUTE, False)
        and "Authorization" not in request.headers
        and any(name in request.query for name in SIGNATURE_PARAMS)
    )


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The per-IP and global buckets; `add_response_headers` reports them on the way out."""
    limiter = request.app[limiter_key]
    if not limiter.enabled or request.path == request.app[settings_key].server.base_path + "/livez":
        return await handler(request)
    trusted = request.app[trusted_networks_key]
    ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), trusted)
    decisions = await limiter.before_auth(ip, operational=_is_operational(request))
    request[rate_decisions_key] = decisions
    if not all(decision.allowed for decision in decisions):
        raise _rate_limited(decisions)
    return await handler(request)


def _rate_limited(decisions: list[BucketDecision]) -> ApiError:
    refused = most_restrictive(decisions)
    assert refused is not None
    return ApiError(
        429,
        "RATE_LIMIT_EXCEEDED",
        "Rate limit exceeded",
        details={"bucket": refused.bucket},
        headers=refused.headers(),
    )


def _unauthorized(reason: str | None, token_sent: bool) -> ApiError:
    challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
    return ApiError(
        401,
        "AUTHENTICATION_ERROR",
        "Invalid token",
        details={"reason": reason} if reason else None,
        headers={"WWW-Authenticate": challenge},
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token, then the route's scope, then the caller's own bucket."""
    if request.method == "OPTIONS" or _is_public(request) or _unmatched(request) or _signed_url_attempt(request):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "basic" and getattr(request.match_info.handler, BASIC_AUTH_ATTRIBUTE, False):
        # A1111's --api-auth clients send credentials, not tokens: the password is the token.
        token = basic_password(token) or ""
        scheme = "bearer" if token else scheme
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing bearer token" if not header else "malformed Authorization header", bool(header))
    try:
        principal = request.app[verifier_key].verify(token.strip())
    except InvalidToken as error:
        raise _unauthorized(str(error), True) from None
    request[principal_key] = principal
    needed = getattr(request.match_info.handler, SCOPE_ATTRIBUTE, frozenset())
    if needed and not needed & principal.scopes:
        raise ApiError(403, "FORBIDDEN", f"This token lacks the scope {' or '.join(sorted(needed))}")
    limiter = request.app[limiter_key]
    if limiter.enabled:
        decision = await limiter.for_subject(principal.sub, operational=_is_operational(request))
        request.setdefault(rate_decisions_key, []).append(decision)
        if not decision.allowed:
            raise _rate_limited([decision])
    return await handler(request)

