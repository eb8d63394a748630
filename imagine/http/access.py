"""Per-request bookkeeping, outermost of all: the request id, the access log, the HTTP metrics.

Every response carries `X-Request-ID`. The id is the one our reverse proxy
sent (nginx's `$request_id`), so one id follows a request through nginx's log
and the replica's; from anyone else, or when it does not look like an id, it
is replaced, so a client can neither forge log lines nor stuff the log.

One JSON line per request on the `imagine.access` logger (this replaces
aiohttp's access log): id, client, subject, method, route, status, duration,
queue wait. Never the query string or any header: that is where tokens and
signatures travel.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from imagine.http.app_keys import (
    error_code_key,
    metrics_key,
    principal_key,
    queue_wait_key,
    request_id_key,
    settings_key,
    trusted_networks_key,
)
from imagine.security.ratelimit import client_ip, is_trusted

access_log = logging.getLogger("imagine.access")

REQUEST_ID_HEADER = "X-Request-ID"
# nginx's $request_id is 32 hex digits; UUIDs and other tracing ids fit too.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# nginx's name for "the client went away before the answer": the handler was cancelled.
CLIENT_CLOSED = 499
# A path is the client's text: enough of it to recognise, never a whole 8 KB request line.
MAX_LOGGED_PATH = 300

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(request: web.Request) -> str:
    """The proxy's id when a trusted proxy sent a sane one, else a new one."""
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    if _SANE_REQUEST_ID.match(sent) and is_trusted(request.remote, request.app[trusted_networks_key]):
        return sent
    return uuid.uuid4().hex


def route_label(request: web.Request) -> str:
    """The route's path template (`/imagine/jobs/{job_id}`): the raw path would make a series per job id."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request[request_id_key] = request_id(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exception:  # a redirect; errors were turned into responses inside
        status = exception.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        _record(request, status, time.perf_counter() - started)


def _record(request: web.Request, status: int, seconds: float) -> None:
    route = route_label(request)
    metrics = request.app[metrics_key]
    metrics.request_served(route, request.method, status, seconds)
    code = request.get(error_code_key)
    if code is not None:
        metrics.error_returned(code)
    if not request.app[settings_key].server.access_log:
        return
    principal = request.get(principal_key)
    queue_wait = request.get(queue_wait_key)
    line = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request[request_id_key],
        "client": client_ip(request.remote, request.headers.get("X-Forwarded-For"), request.app[trusted_networks_key]),
        "sub": principal.sub if principal is not None else None,
        "method": request.method,
        "route": route,
        "path": request.path[:MAX_LOGGED_PATH],
        "status": status,
        "error": code,
        "duration_ms": round(seconds * 1000, 2),
        "queue_wait_ms": round(queue_wait * 1000, 2) if queue_wait is not None else None,
    }
    access_log.info(json.dumps(line))


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed responses (events) get the header too."""
    identifier = request.get(request_id_key)
    if identifier is not None:
        response.headers[REQUEST_ID_HEADER] = identifier
