"""Image quotas per subject: per UTC day and UTC month, in total and per model, overridable per token.

The limits come from `[quotas]` (0 = none), with per-model limits on top, and
a token's `quota` claim overrides them for that token. A generation of N
images costs N. A charge is one atomic step of the store (Redis or the
embedded database, see `imagine.security.redis_quotas` and
`imagine.security.sqlite_quotas`): it checks every limit that applies and
counts the images only if all of them have room, so concurrent requests, on
one replica or many, never admit more than a quota. A charge remembers the
windows it was counted in, so a refund after midnight gives back to the day it
was taken from.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from imagine.errors import ApiError
from imagine.settings import QuotaSettings

log = logging.getLogger(__name__)

# How long a count with no limit to check may wait to be written with the others: GET /usage and a
# refund write them at once, and so does shutting down; only a killed process loses them.
COUNT_EVERY_S = 1.0

TOTAL = "*"  # the counter of every model together; model names never contain it alone
# Kept past their window's end, so /usage and late refunds still find a window that just closed.
WINDOW_GRACE_S = 2 * 86400


@dataclass(frozen=True)
class Limits:
    """Images per day and per month; 0 = no limit."""

    day: int = 0
    month: int = 0


@dataclass(frozen=True)
class QuotaClaim:
    """A token's `quota` claim: what it sets overrides the settings, what it leaves out does not."""

    day: int | None = None
    month: int | None = None
    models: tuple[tuple[str, int | None, int | None], ...] = ()

    def for_model(self, model: str) -> tuple[int | None, int | None]:
        for name, day, month in self.models:
            if name == model:
                return day, month
        return None, None


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"'quota.{where}' must be a whole number, 0 (no limit) or more")
    return value


def parse_claim(value: Any) -> QuotaClaim:
    """`{"images_per_day": N, "images_per_month": N, "models": {name: {...}}}`; ValueError for anything else."""
    if not isinstance(value, Mapping):
        raise ValueError("'quota' must be an object")
    known = {"images_per_day", "images_per_month", "models"}
    if set(value) - known:
        raise ValueError(f"'quota' has unknown fields: {', '.join(sorted(set(value) - known))}")
    models = value.get("models") or {}
    if not isinstance(models, Mapping):
        raise ValueError("'quota.models' must map model names to limits")
    per_model = []
    for name, limits in models.items():
        if not isinstance(limits, Mapping) or set(limits) - {"images_per_day", "images_per_month"}:
            raise ValueError(f"'quota.models.{name}' takes images_per_day and images_per_month")
        per_model.append(
            (
                str(name),
                _count(limits.get("images_per_day"), f"models.{name}.images_per_day"),
                _count(limits.get("images_per_month"), f"models.{name}.images_per_month"),
            )
        )
    return QuotaClaim(
        day=_count(value.get("images_per_day"), "images_per_day"),
        month=_count(value.get("images_per_month"), "images_per_month"),
        models=tuple(per_model),
    )


@dataclass(frozen=True)
class Applied:
    """Every limit that applies to one subject and model."""

    total: Limits
    model: Limits

    @property
    def limiting(self) -> bool:
        """Whether any of them is a limit (0 is none)."""
        return any((self.total.day, self.total.month, self.model.day, self.model.month))


@dataclass(frozen=True)
class Windows:
    """The UTC day and month a moment falls in, their ids, and when they end."""

    day: str
    month: str
    day_ends_at: float
    month_ends_at: float
    now: float

    @property
    def day_reset_s(self) -> float:
        return self.day_ends_at - self.now

    @property
    def month_reset_s(self) -> float:
        return self.month_ends_at - self.now


def windows(now: float) -> Windows:
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    midnight = datetime.datetime(moment.year, moment.month, moment.day, tzinfo=datetime.UTC)
    days_in_month = calendar.monthrange(moment.year, moment.month)[1]
    month_start = datetime.datetime(moment.year, moment.month, 1, tzinfo=datetime.UTC)
    return Windows(
        day=f"d{moment:%Y-%m-%d}",
        month=f"m{moment:%Y-%m}",
        day_ends_at=(midnight + datetime.timedelta(days=1)).timestamp(),
        month_ends_at=(month_start + datetime.timedelta(days=days_in_month)).timestamp(),
        now=now,
    )


@dataclass(frozen=True)
class Counts:
    """Images counted so far in the windows of a charge: all models, and the charged model."""

    day: int
    month: int
    model_day: int
    model_month: int


@dataclass(frozen=True)
class Charge:
    """Images counted for a subject and model in two windows: what a refund gives back."""

    sub: str
    model: str
    images: int
    day: str
    month: str

    def to_json(self) -> str:
        return json.dumps([self.sub, self.model, self.images, self.day, self.month])

    @classmethod
    def from_json(cls, text: str) -> Charge:
        sub, model, images, day, month = json.loads(text)
        return cls(str(sub), str(model), int(images), str(day), str(month))


class QuotaStore(Protocol):
    async def charge(self, sub: str, model: str, images: int, at: Windows, applied: Applied) -> tuple[bool, Counts]:
        """Count `images` if every limit in `applied` has room, in one atomic step: (counted, counts now)."""

    async def refund(self, charge: Charge) -> None:
        """Give a charge's images back (never below zero)."""

    async def usage(self, sub: str, at: Windows) -> tuple[dict[str, int], dict[str, int]]:
        """Images counted this day and this month by model, TOTAL among them."""


class QuotaTelemetry(Protocol):
    def quota_counted(self, model: str, outcome: str, images: int) -> None:
        """Images `charged`, `refunded` or `refused` for a model."""

    def quota_used(self, fraction: float) -> None:
        """After a charge, the share of the subject's tightest quota now used (no subject label)."""


@dataclass(frozen=True)
class QuotaDecision:
    """What a generating response says about the tightest quota: `Quota-Limit`, `Quota-Remaining`, `Quota-Reset`."""

    limit: int
    remaining: int
    reset_s: float

    def headers(self) -> dict[str, str]:
        return {
            "Quota-Limit": str(self.limit),
            "Quota-Remaining": str(self.remaining),
            "Quota-Reset": str(max(1, math.ceil(self.reset_s))),
        }


def quota_exceeded(windows_over: list[tuple[str, int, float]]) -> ApiError:
    """429 until the last of the full windows resets (an exhausted month is not helped by a new day)."""
    what, limit, reset_s = max(windows_over, key=lambda over: over[2])
    return ApiError(
        429,
        "QUOTA_EXCEEDED",
        f"Image quota exceeded: {limit} images per {what}",
        details={"window": what, "limit": limit, "reset_seconds": math.ceil(reset_s)},
        headers={"Retry-After": str(max(1, math.ceil(reset_s))), **QuotaDecision(limit, 0, reset_s).headers()},
    )


class Quotas:
    def __init__(
        self, settings: QuotaSettings, store: QuotaStore, telemetry: QuotaTelemetry, clock: Callable[[], float] = time.time
    ) -> None:
        self._settings = settings
        self._store = store
        self._telemetry = telemetry
        self._clock = clock
        # Counts with no limit to check, summed by (subject, model, day, month) until they are written.
        self._unwritten: dict[tuple[str, str, str, str], tuple[int, Windows, Applied]] = {}
        self._write_timer: asyncio.TimerHandle | None = None
        # The last of the writes of those counts, each after the one before.
        self._pending: asyncio.Future[None] | None = None

    def applied(self, claim: QuotaClaim | None, model: str) -> Applied:
        settings = self._settings
        configured = settings.models.get(model, {})
        day = settings.images_per_day
        month = settings.images_per_month
        model_day = int(configured.get("images_per_day", 0))
        model_month = int(configured.get("images_per_month", 0))
        if claim is not None:
            day = day if claim.day is None else claim.day
            month = month if claim.month is None else claim.month
            claimed_day, claimed_month = claim.for_model(model)
            model_day = model_day if claimed_day is None else claimed_day
            model_month = model_month if claimed_month is None else claimed_month
        return Applied(Limits(day, month), Limits(model_day, model_month))

    async def charge(self, sub: str, claim: QuotaClaim | None, model: str, images: int) -> tuple[Charge, QuotaDecision | None]:
        """Count a generation of `images` images, or raise 429 QUOTA_EXCEEDED; the charge and the headers' decision."""
        at = windows(self._clock())
        applied = self.applied(claim, model)
        if not applied.limiting:
            # No limit to check before admitting: the count is bookkeeping (GET /usage), kept off the request's path.
            self._count_later(sub, model, images, at, applied)
            self._telemetry.quota_counted(model, "charged", images)
            return Charge(sub, model, images, at.day, at.month), None
        counted, counts = await self._store.charge(sub, model, images, at, applied)
        checks = _checks(applied, counts, at, model)
        if not counted:
            self._telemetry.quota_counted(model, "refused", images)
            raise quota_exceeded(_over(checks, images))
        self._telemetry.quota_counted(model, "charged", images)
        decision = None
        if checks:
            what, limit, used, reset = min(checks, key=lambda check: check[1] - check[2])
            decision = QuotaDecision(limit, max(0, limit - used), reset)
            self._telemetry.quota_used(used / limit)
        return Charge(sub, model, images, at.day, at.month), decision

    async def check(self, sub: str, claim: QuotaClaim | None, model: str, images: int) -> None:
        """429 QUOTA_EXCEEDED now if `images` more would not fit, counting nothing: for work worth refusing
        before it is done (decoding a caller's input images). The charge itself decides, atomically, later."""
        at = windows(self._clock())
        applied = self.applied(claim, model)
        if not applied.limiting:
            return
        await self.settle()  # this replica's unwritten counts, so the read sees them
        day, month = await self._store.usage(sub, at)
        counts = Counts(day.get(TOTAL, 0), month.get(TOTAL, 0), day.get(model, 0), month.get(model, 0))
        if over := _over(_checks(applied, counts, at, model), images):
            self._telemetry.quota_counted(model, "refused", images)
            raise quota_exceeded(over)

    def _count_later(self, sub: str, model: str, images: int, at: Windows, applied: Applied) -> None:
        """Add to the counts written together within COUNT_EVERY_S: one write a second, not one a request."""
        key = (sub, model, at.day, at.month)
        counted = self._unwritten.get(key)
        self._unwritten[key] = ((counted[0] if counted else 0) + images, at, applied)
        if self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(COUNT_EVERY_S, self._write_counts)

    def _write_counts(self) -> None:
        self._write_timer = None
        counts, self._unwritten = self._unwritten, {}
        previous = self._pending

        async def write() -> None:
            if previous is not None:
                await previous
            for (sub, model, _, _), (images, at, applied) in counts.items():
                try:
                    await self._store.charge(sub, model, images, at, applied)
                except Exception as error:
                    log.warning("could not count %d images of %s for usage: %s", images, model, error)

        self._pending = asyncio.ensure_future(write())

    async def settle(self) -> None:
        """Write the counts not yet written, and wait for them (before a read, a refund, or the store closing)."""
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_counts()
        if self._pending is not None:
            await self._pending

    async def refund(self, charge: Charge) -> None:
        # After the counts queued before it: a refund never lands ahead of its own charge.
        await self.settle()
        await self._store.refund(charge)
        self._telemetry.quota_counted(charge.model, "refunded", charge.images)

    async def usage(self, sub: str, claim: QuotaClaim | None) -> dict[str, Any]:
        """GET /usage's answer for `sub`: images this day and month, the limits, by model."""
        await self.settle()
        at = windows(self._clock())
        day, month = await self._store.usage(sub, at)
        applied = self.applied(claim, "")
        return {
            "sub": sub,
            "day": _window(day, applied.total.day, at.day_reset_s),
            "month": _window(month, applied.total.month, at.month_reset_s),
        }


def _window(counted: dict[str, int], limit: int, reset_s: float) -> dict[str, Any]:
    return {
        "images": counted.get(TOTAL, 0),
        "limit": limit or None,
        "reset_seconds": math.ceil(reset_s),
        "by_model": {model: images for model, images in sorted(counted.items()) if model != TOTAL and images > 0},
    }


def _over(checks: list[tuple[str, int, int, float]], images: int) -> list[tuple[str, int, float]]:
    """(what, limit, seconds to reset) of each limit that `images` more would pass."""
    return [(what, limit, reset) for what, limit, used, reset in checks if used + images > limit]


def _checks(applied: Applied, counts: Counts, at: Windows, model: str) -> list[tuple[str, int, int, float]]:
    """(what, limit, used, seconds to reset) of each limit that applies."""
    every = [
        ("day", applied.total.day, counts.day, at.day_reset_s),
        ("month", applied.total.month, counts.month, at.month_reset_s),
        (f"day of {model}", applied.model.day, counts.model_day, at.day_reset_s),
        (f"month of {model}", applied.model.month, counts.model_month, at.month_reset_s),
    ]
    return [check for check in every if check[1] > 0]
