"""Asynchronous jobs: submit (202), poll, stream progress as Server-Sent Events, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from imagine import service
from imagine.auth import check_model_grant, requires
from imagine.errors import validation_error
from imagine.jobs import TrackedJob, body_fingerprint
from imagine.keys import encode_pool_key, jobs_key, principal_key, registry_key, settings_key
from imagine.schemas import parse_generate_body, read_json, resolve_request

MAX_IDEMPOTENCY_KEY = 255


def job_url(request: web.Request, job: TrackedJob) -> str:
    return f"{request.app[settings_key].server.base_path}/jobs/{job.id}"


def accepted(request: web.Request, job: TrackedJob, *, replayed: bool) -> web.Response:
    headers = {"Location": job_url(request, job)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    snapshot = job.snapshot()
    body = {key: snapshot[key] for key in ("id", "status", "position", "eta_seconds")}
    return web.json_response(body, status=202, headers=headers)


@requires("generate")
async def submit_job(request: web.Request) -> web.Response:
    app = request.app
    principal = request[principal_key]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise validation_error([{"loc": ["header", "Idempotency-Key"], "msg": "must be 1-255 characters"}])
    raw = await read_json(request)
    fingerprint = body_fingerprint(raw)
    jobs = app[jobs_key]
    earlier = jobs.replay(principal, key, fingerprint)
    if earlier is not None:
        return accepted(request, earlier, replayed=True)
    body = parse_generate_body(raw)
    generator = app[registry_key].resolve(body.model)
    check_model_grant(principal, generator.name)
    generation = resolve_request(body, generator)

    async def to_json(generated: service.Generated) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(app[encode_pool_key], service.result_json, generated)

    job = jobs.submit(
        principal,
        key,
        fingerprint,
        generation.steps,
        body.preview,
        lambda observer: service.start(app, principal, generation, generator, store=body.store, observer=observer),
        to_json,
    )
    return accepted(request, job, replayed=False)


@requires("generate")
async def get_job(request: web.Request) -> web.Response:
    job = request.app[jobs_key].get(request[principal_key], request.match_info["job_id"])
    return web.json_response(job.snapshot())


@requires("generate")
async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[jobs_key].cancel(request[principal_key], request.match_info["job_id"])
    return web.json_response(job.snapshot())


@requires("generate")
async def job_events(request: web.Request) -> web.StreamResponse:
    job = request.app[jobs_key].get(request[principal_key], request.match_info["job_id"])
    try:
        after = max(0, int(request.headers.get("Last-Event-ID", "0")))
    except ValueError:
        after = 0
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # nginx must pass events through as they come, not buffer them.
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    async for event in job.stream(after, request.app[settings_key].jobs.keepalive_s):
        # A comment line keeps proxies from closing an idle stream.
        await response.write(b": keep-alive\n\n" if event is None else event.sse())
    await response.write_eof()
    return response


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.post(base + "/jobs", submit_job),
        web.get(base + "/jobs/{job_id}", get_job),
        web.delete(base + "/jobs/{job_id}", cancel_job),
        web.get(base + "/jobs/{job_id}/events", job_events),
    ]
