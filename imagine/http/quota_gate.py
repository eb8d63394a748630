"""Where quotas meet generations: charged as the job store accepts one, refunded when it ends without running.

Every generating route, whatever its body, ends in the app's job store
(`jobs_key`): `submit_generation` for a generation someone waits for,
`submit` for a job. `QuotaJobs` wraps that store, so this one seam covers
every route, in one process or across replicas: it charges the images just
before the store accepts the work (after every check of the body, so a 400
costs nothing) and refunds them when the store refuses it (queue full, too
many jobs, shutting down) or an idempotent replay returns an earlier job.

- A generation someone waits for is refunded when it ends in an error (but a
  timeout once it ran), or when it is stopped before it started running (its
  caller hung up while it was queued, or interrupted it). Stopped once running,
  it stays charged: the device's time was spent, and hanging up must not make
  that time free. One the service stops as it shuts down is refunded: nobody
  asked it to stop.
- A job carries its charge in its `after_end` fields; what follows its end
  (`imagine.http.job_followups`) refunds it if the job failed (but timed out
  while running), or was cancelled before it started.

The quota decision of the request reaches its response through
`quota_headers_middleware`: `Quota-Limit`, `Quota-Remaining`, `Quota-Reset`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imagine.errors import ApiError
from imagine.plugin.generators import GenerationRequest, Generator
from imagine.security.quotas import Charge, QuotaDecision, Quotas
from imagine.security.tokens import Principal

if TYPE_CHECKING:
    from PIL import Image

    from imagine.engine.work import Generated, JobObserver
    from imagine.engine.jobs import JobStore

log = logging.getLogger(__name__)

quotas_key = web.AppKey("quotas", Quotas)
# The key of a job's after_end fields that holds its charge.
CHARGE_FIELD = "quota"

# The quota decisions of the request being handled (set by quota_headers_middleware).
_decisions: contextvars.ContextVar[list[QuotaDecision] | None] = contextvars.ContextVar("imagine_quota_decisions", default=None)


def _noted(decision: QuotaDecision | None) -> None:
    decisions = _decisions.get()
    if decision is not None and decisions is not None:
        decisions.append(decision)


def _tightest(decisions: list[QuotaDecision]) -> QuotaDecision | None:
    return min(decisions, key=lambda decision: decision.remaining, default=None)


@web.middleware
async def quota_headers_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    decisions: list[QuotaDecision] = []
    token = _decisions.set(decisions)
    try:
        response = await handler(request)
    except ApiError as error:
        tightest = _tightest(decisions)
        if tightest is not None:
            for name, value in tightest.headers().items():
                error.headers.setdefault(name, value)
        raise
    finally:
        _decisions.reset(token)
    tightest = _tightest(decisions)
    if tightest is not None and not response.prepared:
        response.headers.update(tightest.headers())
    return response


class _StartWatch:
    """The observer a waited-for generation is given: it notes whether the generation started running, and
    tells the caller's own observer (A1111's progress), if there is one, all it hears."""

    def __init__(self, inner: JobObserver | None) -> None:
        self._inner = inner
        self.ran = False
        # Without an observer of its own, the start is all there is to follow: no event per step.
        self.wants_steps = inner is not None and inner.wants_steps
        self.wants_preview = inner is not None and inner.wants_preview

    def queued(self, position: int, eta_s: float) -> None:
        if self._inner is not None:
            self._inner.queued(position, eta_s)

    def started(self) -> None:
        self.ran = True
        if self._inner is not None:
            self._inner.started()

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        if self._inner is not None:
            self._inner.progress(step, total, preview)


class QuotaJobs:
    """A job store (`imagine.engine.jobs.JobStore`) that charges quotas; everything else is the store's own."""

    def __init__(self, inner: JobStore, quotas: Quotas) -> None:
        self._inner = inner
        self._quotas = quotas
        self._refunds: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def _charge(self, principal: Principal, request: GenerationRequest) -> Charge:
        charge, decision = await self._quotas.charge(principal.sub, principal.quota, request.model, request.num_images)
        _noted(decision)
        return charge

    def refund_soon(self, charge: Charge) -> None:
        """Refund in a task of its own: the caller may be a handler being cancelled."""

        async def refund() -> None:
            try:
                await self._quotas.refund(charge)
            except Exception:
                log.exception("could not refund %d images of %s", charge.images, charge.model)

        task = asyncio.ensure_future(refund())
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    async def submit_generation(
        self,
        principal: Principal,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        observer: JobObserver | None = None,
    ) -> Coroutine[Any, Any, Generated]:
        charge = await self._charge(principal, request)
        watch = _StartWatch(observer)
        try:
            work = await self._inner.submit_generation(principal, request, generator, store=store, observer=watch)
        except BaseException:
            self.refund_soon(charge)
            raise
        return self._refunded_unless_delivered(work, charge, watch)

    async def _refunded_unless_delivered(self, work: Coroutine[Any, Any, Generated], charge: Charge, watch: _StartWatch) -> Generated:
        try:
            return await work
        except asyncio.CancelledError:
            # Stopped by its caller (gone, or an A1111 interrupt): refunded unless it ran, as a cancelled job is.
            # Stopped by the service shutting down: refunded, as the generations it fails then are.
            if not watch.ran or self._stopping:
                self.refund_soon(charge)
            raise
        except ApiError as error:
            if not ran_out_of_time(error.code, watch.ran):
                self.refund_soon(charge)
            raise
        except BaseException:
            self.refund_soon(charge)
            raise

    async def submit(
        self,
        principal: Principal,
        key: str | None,
        fingerprint: str,
        request: GenerationRequest,
        generator: Generator,
        *,
        store: bool,
        preview: bool,
        after_end: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        charge = await self._charge(principal, request)
        fields = {**(after_end or {}), CHARGE_FIELD: charge.to_json()}
        try:
            acceptance, replayed = await self._inner.submit(
                principal, key, fingerprint, request, generator, store=store, preview=preview, after_end=fields
            )
        except BaseException:
            self.refund_soon(charge)
            raise
        if replayed:
            self.refund_soon(charge)
        return acceptance, replayed

    # ---- the store's own --------------------------------------------------------

    async def replay(self, principal: Principal, key: str | None, fingerprint: str) -> dict[str, Any] | None:
        return await self._inner.replay(principal, key, fingerprint)

    async def snapshot(self, principal: Principal, job_id: str) -> dict[str, Any]:
        return await self._inner.snapshot(principal, job_id)

    async def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]:
        return await self._inner.cancel(principal, job_id)

    def parse_event_id(self, value: str) -> str:
        return self._inner.parse_event_id(value)

    async def events(self, principal: Principal, job_id: str, after: str | None) -> AsyncIterator[bytes | None]:
        return await self._inner.events(principal, job_id, after)

    def close_intake(self) -> list[asyncio.Task[str]]:
        self._stopping = True
        return self._inner.close_intake()

    async def fail_unfinished(self) -> int:
        return await self._inner.fail_unfinished()

    async def settle(self) -> None:
        """Wait for the refunds under way (at shutdown)."""
        if self._refunds:
            await asyncio.wait(self._refunds)


def ran_out_of_time(code: str, started: bool) -> bool:
    """A failure that stays charged: the deadline (`queue.timeout_s`) passed while it ran. The device's time
    was spent, as on a generation stopped while running; else a request too large to finish in time ran for free."""
    return code == "TIMEOUT" and started


def refund_due(snapshot: Mapping[str, Any]) -> bool:
    """A job's charge comes back if it failed (but for running out of time), or was cancelled before it started."""
    status = snapshot.get("status")
    started = snapshot.get("started_at") is not None
    if status == "failed":
        error = snapshot.get("error") or {}
        return not ran_out_of_time(str((error.get("error") or {}).get("code", "")), started)
    return status == "cancelled" and not started
