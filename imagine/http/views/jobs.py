"""Asynchronous jobs: submit (202), poll, stream progress as Server-Sent Events, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from imagine.security.tokens import requires
from imagine.errors import ApiError, validation_error
from imagine.engine.jobs import body_fingerprint
from imagine.http.app_keys import jobs_key, principal_key, settings_key
from imagine.http.front_door import admit
from imagine.http.json_answers import json_bytes
from imagine.http.job_followups import ORIGIN_FIELD, WEBHOOK_FIELD, followups_key
from imagine.http.stream_slots import stream_slots_key
from imagine.http.urls import public_origin
from imagine.http.generation_result import GenerationResult
from imagine.http.openapi import (
    ERROR,
    Component,
    content_response,
    error_response,
    header_parameter,
    json_response,
    obj,
    operation,
    path_parameter,
)
from imagine.http.request_bodies import GENERATE_BODY, read_json
from imagine.http.views.generate import GENERATION_ERRORS

MAX_IDEMPOTENCY_KEY = 255
# Event ids are 1, 2, 3... in one process, Redis stream ids ("1764590000000-0") with a shared queue:
# the stream's own ids are the only values Last-Event-ID may carry.
EVENT_ID = "[0-9]{1,15}(-[0-9]{1,9})?"

JOB_ID = path_parameter("job_id", "The id POST /jobs answered with")
ACCEPTED = obj(
    {
        "id": {"type": "string"},
        "status": {"const": "queued"},
        "position": {"type": "integer", "description": "1 for the next job to run; 0 when it was taken at once"},
        "eta_seconds": {"type": "number"},
    },
    description="What accepting the job answered. A replay (`Idempotent-Replayed: true`) answers it again, "
    "however far the job has got since: its state now is at `Location`.",
)
JOB = Component(
    "Job",
    obj(
        {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "position": {"type": "integer"},
            "eta_seconds": {"type": "number"},
            "progress": obj({"step": {"type": "integer"}, "total": {"type": "integer"}}),
            "created_at": {"type": "number", "description": "Unix time"},
            "started_at": {"type": "number", "description": "Unix time it (last) started on a device"},
            "finished_at": {"type": "number", "description": "Unix time, once it ended"},
            "worker": {
                "type": "string",
                "description": "Shared queue only: the worker that ran it last (host, process and start), once started",
            },
            "result": GenerationResult,
            "error": ERROR,
        },
        required=["id", "status", "position", "eta_seconds", "progress", "created_at"],
    ),
)
NOT_FOUND = {404: error_response("No such job for this caller")}
# One event of the stream (what OpenAPI 3.2 calls the itemSchema); `data` is JSON text.
EVENT = obj(
    {
        "id": {"type": "string", "pattern": f"^{EVENT_ID}$"},
        "event": {"enum": ["queued", "started", "progress", "succeeded", "failed", "cancelled"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    }
)


def accepted(request: web.Request, acceptance: dict[str, Any], *, replayed: bool) -> web.Response:
    headers = {"Location": f"{request.app[settings_key].server.base_path}/jobs/{acceptance['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(acceptance, status=202, headers=headers)


def resume_after(request: web.Request) -> str | None:
    """The Last-Event-ID a reconnecting client sent (None without one); 400 for anything but an event id."""
    value = request.headers.get("Last-Event-ID")
    return None if value is None else request.app[jobs_key].parse_event_id(value)


@requires("generate")
@operation(
    "Queue a generation and answer at once",
    tags=["jobs"],
    description="The body is /generate's, plus `preview` for latent previews in progress events and "
    "`webhook_url` (a string: an http(s) URL whose host is in webhooks.allowed_hosts) for a signed POST "
    "(Standard Webhooks) when the job ends. The same "
    "`Idempotency-Key` and body from the same caller return the same job (`Idempotent-Replayed: true`) with "
    "the same answer.",
    parameters=[
        header_parameter(
            "Idempotency-Key", "Makes retries safe: same key, same body, same job", {"type": "string", "maxLength": 255}
        )
    ],
    body=GENERATE_BODY,
    responses={
        202: json_response(
            "Queued (`Location` is the job's URL)", ACCEPTED, headers=["Location", "Idempotent-Replayed"]
        ),
        409: error_response("Idempotency-Key reused with another body"),
        **GENERATION_ERRORS,
    },
)
async def submit_job(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and _utf8(key)):
        raise validation_error([{"loc": ["header", "Idempotency-Key"], "msg": "must be 1-255 characters of UTF-8 text"}])
    raw = await read_json(request)
    # Only a replay compares bodies; a body with an image is megabytes to hash, so off the loop.
    fingerprint = await asyncio.to_thread(body_fingerprint, raw) if key is not None else ""
    jobs = app[jobs_key]
    earlier = await jobs.replay(principal, key, fingerprint)
    if earlier is not None:
        return accepted(request, earlier, replayed=True)
    try:
        acceptance, replayed = await _submit(request, raw, key, fingerprint)
    except ApiError as error:
        # Retries of one request sent together: each is charged until the job store tells it is a replay,
        # so those past the quota meanwhile are refused though the job they repeat was accepted.
        if key is None or error.code != "QUOTA_EXCEEDED" or (earlier := await jobs.replay(principal, key, fingerprint)) is None:
            raise
        acceptance, replayed = earlier, True
    return accepted(request, acceptance, replayed=replayed)


async def _submit(request: web.Request, raw: Any, key: str | None, fingerprint: str) -> tuple[dict[str, Any], bool]:
    app, principal = request.app, request[principal_key]
    # The jobs body's own field: the generation body (admit's) does not know it.
    webhook_url = raw.pop(WEBHOOK_FIELD, None) if isinstance(raw, dict) else None
    admitted = await admit(app, principal, raw)
    after_end = None
    if webhook_url is not None:
        await app[followups_key].check_target(webhook_url, admitted.body.store)
        after_end = {WEBHOOK_FIELD: webhook_url, ORIGIN_FIELD: public_origin(request)}
    return await app[jobs_key].submit(
        principal,
        key,
        fingerprint,
        admitted.request,
        admitted.generator,
        store=admitted.body.store,
        preview=admitted.body.preview,
        after_end=after_end,
    )


@requires("generate")
@operation(
    "A job's state, and its result or error once finished",
    tags=["jobs"],
    parameters=[JOB_ID],
    responses={200: json_response("The job", JOB), **NOT_FOUND},
)
async def get_job(request: web.Request) -> web.Response:
    job = await request.app[jobs_key].snapshot(request[principal_key], request.match_info["job_id"])
    return await _job_answer(request.app, job)


async def _job_answer(app: web.Application, job: dict[str, Any]) -> web.Response:
    """A finished job's JSON holds its images: serialised off the loop (30 ms at four 1024² images)."""
    if "result" not in job:  # no images in it: small
        return web.json_response(job)
    return web.Response(body=await json_bytes(app, lambda: job), content_type="application/json")


@requires("generate")
@operation(
    "Cancel a job: dropped if queued, stopped at its next step if running",
    tags=["jobs"],
    parameters=[JOB_ID],
    responses={200: json_response("The job, cancelled (or already finished)", JOB), **NOT_FOUND},
)
async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[jobs_key].cancel(request[principal_key], request.match_info["job_id"])
    return await _job_answer(request.app, job)


@requires("generate")
@operation(
    "A job's progress as Server-Sent Events",
    tags=["jobs"],
    description="Events `queued`, `started`, `progress` (step, total, optional `preview` data URL), then "
    "`succeeded` (the /generate JSON), `failed` or `cancelled`. Numbered: reconnect with `Last-Event-ID` to "
    "resume. Closing the stream never cancels the job.",
    parameters=[
        JOB_ID,
        header_parameter(
            "Last-Event-ID", "Resume after this event (the `id` of one)", {"type": "string", "pattern": f"^{EVENT_ID}$"}
        ),
    ],
    responses={
        200: content_response("The event stream", {"text/event-stream": EVENT}),
        400: error_response("Last-Event-ID is not an event id"),
        429: error_response("The caller holds jobs.max_streams_per_subject streams already"),
        **NOT_FOUND,
    },
)
async def job_events(request: web.Request) -> web.StreamResponse:
    after = resume_after(request)
    principal = request[principal_key]
    # The job's own checks first (another caller's is 404 whatever that caller holds), then a slot.
    events = await request.app[jobs_key].events(principal, request.match_info["job_id"], after)
    with request.app[stream_slots_key].held(principal.sub):
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # nginx must pass events through as they come, not buffer them.
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        async for event in events:
            # A comment line keeps proxies from closing an idle stream.
            await response.write(b": keep-alive\n\n" if event is None else event)
        await response.write_eof()
    return response


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.post(base + "/jobs", submit_job),
        web.get(base + "/jobs/{job_id}", get_job),
        web.delete(base + "/jobs/{job_id}", cancel_job),
        web.get(base + "/jobs/{job_id}/events", job_events),
    ]


def _utf8(header: str) -> bool:
    """aiohttp keeps a header's bytes that are not UTF-8 as lone surrogates, which no store can keep."""
    try:
        header.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
