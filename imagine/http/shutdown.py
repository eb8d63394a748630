"""Stopping without losing accepted work silently: drain it within a bounded grace, then fail the rest.

On SIGTERM (or SIGINT) the service keeps listening but refuses new work with
503 SERVICE_UNAVAILABLE and Retry-After, while every generation and job it
accepted runs on, watched or not, for up to `server.shutdown_grace_s`. Past
the grace, queued work fails with the same 503 (a waiting /generate hears it,
a job ends `failed`), a running generation stops at its next step, and one
log line counts what was drained and what failed. Pollers then have a moment
to read how their jobs ended before the runner stops listening and exits.

A runner stopped some other way (tests, no signal handlers) drains the same
way from `on_shutdown`, after it has stopped listening.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from imagine.engine.executor import STOP_JOIN_S
from imagine.http.app_keys import executor_key, jobs_key, settings_key

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the grace: for running generations to reach their next step, and
# finished ones to be encoded, before what is left fails anyway.
STOP_WAIT_S = 5.0
# After the drain, for clients polling GET /jobs/{id} to read how their job ended.
LINGER_S = 2.0
# What the runner then gives requests still in flight (answers being written,
# cloud calls, uploads) before cancelling them: pass it as its shutdown_timeout.
HANDLER_WAIT_S = 5.0
# The most a stop takes beyond the grace, but for closing files: the runner
# waits HANDLER_WAIT_S for handlers, then as long for the ones it cancelled.
# deploy/imagine@.service's TimeoutStopSec must leave at least this over the grace.
OVERRUN_S = STOP_WAIT_S + LINGER_S + 2 * HANDLER_WAIT_S + STOP_JOIN_S


@dataclass(frozen=True)
class DrainReport:
    generations: int  # queued or running when the intake closed
    generations_failed: int
    jobs: int  # unfinished when the intake closed
    jobs_failed: int

    @property
    def pending(self) -> bool:
        return bool(self.generations or self.jobs)


async def _wait(work: Iterable[asyncio.Future[Any]], timeout_s: float) -> None:
    pending = [item for item in work if not item.done()]
    if pending and timeout_s > 0:
        await asyncio.wait(pending, timeout=timeout_s)


class Shutdown:
    """The app's drain, run once whichever way the stop begins."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._drain: asyncio.Task[DrainReport] | None = None
        self._exit: asyncio.Task[None] | None = None

    def drain(self) -> asyncio.Future[DrainReport]:
        if self._drain is None:
            self._drain = asyncio.create_task(self._run(), name="imagine-shutdown")
        return asyncio.shield(self._drain)

    async def on_shutdown(self, app: web.Application) -> None:
        await self.drain()

    async def signals(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: take SIGTERM and SIGINT from the runner, whose handlers would stop listening at once."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        yield
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self._exit is None:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            self._exit = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            if (await self.drain()).pending:
                await asyncio.sleep(LINGER_S)
        finally:
            # What the runner's own handler does: the loop stops, and the runner shuts down.
            asyncio.get_running_loop().call_soon(_graceful_exit)

    async def _run(self) -> DrainReport:
        executor, jobs = self._app[executor_key], self._app[jobs_key]
        grace_s = self._app[settings_key].server.shutdown_grace_s
        generations = executor.close_intake()
        tracked = jobs.close_intake()
        if generations or tracked:
            log.info(
                "stopping: new work is refused; %d generations and %d jobs may finish within the %g s grace",
                len(generations), len(tracked), grace_s,
            )
        work = [item.future for item in generations] + tracked
        await _wait(work, grace_s)
        generations_failed = executor.fail_unfinished()
        late = [task for task in tracked if not task.done()]
        if generations_failed or late:
            await _wait(work, STOP_WAIT_S)
            await jobs.fail_unfinished()  # still busy past the device: cloud calls, encoding
        report = DrainReport(
            generations=len(generations),
            generations_failed=generations_failed,
            jobs=len(tracked),
            # Each job's task ends with the job's status.
            jobs_failed=sum(task.done() and not task.cancelled() and task.result() == "failed" for task in late),
        )
        log.log(
            logging.WARNING if report.generations_failed or report.jobs_failed else logging.INFO,
            "drained %d of %d generations and %d of %d jobs within the %g s grace; "
            "failed %d generations and %d jobs with SERVICE_UNAVAILABLE",
            report.generations - report.generations_failed, report.generations,
            report.jobs - report.jobs_failed, report.jobs,
            grace_s,
            report.generations_failed, report.jobs_failed,
        )
        return report


def _graceful_exit() -> None:
    raise web.GracefulExit()


def install(app: web.Application, *, handle_signals: bool) -> None:
    """Drain on the app's shutdown; with `handle_signals`, begin it on SIGTERM or SIGINT, while still listening."""
    shutdown = Shutdown(app)
    app.on_shutdown.append(shutdown.on_shutdown)
    if handle_signals:
        app.cleanup_ctx.append(shutdown.signals)
