"""The deliverer: sends due webhooks, signed, and retries the failed ones with exponential backoff.

Each attempt is one POST with the stored body and fresh Standard Webhooks
headers (the same `webhook-id` every time, so receivers can drop repeats),
through a session whose resolver refuses non-public addresses (see
`imagine.webhooks.targets`), never following a redirect, reading at most
`webhooks.max_response_bytes` of the answer, bounded by `webhooks.timeout_s`.
A 2xx answer delivers; anything else waits `backoff_s * 2^(n-1)` (at most
`max_backoff_s`) until `max_attempts` have been made. Every attempt is logged
and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import urllib.parse
from typing import Protocol

import aiohttp
from redis.exceptions import RedisError

from imagine import __version__
from imagine.settings import WebhookSettings
from imagine.webhooks.outbox import Delivery, Outbox
from imagine.webhooks.signing import Signer
from imagine.webhooks.targets import GuardedResolver, TargetPolicy, TargetRefused

log = logging.getLogger(__name__)

# Deliveries sent side by side by one replica...
CONCURRENCY = 16
# ...and at most this many of them to one receiver (host and port): one that answers slowly, or
# never, holds these slots for up to webhooks.timeout_s each, never every slot.
PER_RECEIVER = 4
# ...and at most this many of one caller's jobs: a caller with receivers of its own that stall cannot
# hold every slot, and everyone else's webhooks go on.
PER_CALLER = 8


class WebhookTelemetry(Protocol):
    def webhook_attempted(self, outcome: str, seconds: float) -> None:
        """One attempt: `delivered`, `http_error` (a non-2xx answer), `network_error`, `timeout` or `refused`."""

    def webhook_ended(self, outcome: str) -> None:
        """A delivery's end: `delivered` or `gave_up`."""


def _receiver(url: str) -> str:
    """The host and port a URL reaches, however it is spelt (`Host.:080` is `host:80`): one receiver, one cap."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


def backoff_s(settings: WebhookSettings, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt."""
    return min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempts - 1))


def retry_span_s(settings: WebhookSettings) -> float:
    """The longest a delivery's last attempt can come after its first: the waits between its attempts."""
    return sum(backoff_s(settings, attempt) for attempt in range(1, settings.max_attempts))


def keep_for_s(settings: WebhookSettings) -> float:
    """How long a pending delivery can be waiting, at most, plus a day of slack."""
    return sum(backoff_s(settings, attempt) for attempt in range(1, settings.max_attempts + 1)) + 86400


class Deliverer:
    def __init__(
        self, outbox: Outbox, signer: Signer | None, policy: TargetPolicy, settings: WebhookSettings, telemetry: WebhookTelemetry
    ) -> None:
        # Without a signer (webhooks off) the outbox is still read: a shared one also settles ended jobs' quotas.
        self._outbox = outbox
        self._signer = signer
        self._policy = policy
        self._settings = settings
        self._telemetry = telemetry
        # Looked at this often, and at once when this process queues a delivery (`wake`).
        self._poll_s = min(1.0, settings.backoff_s / 2)
        self._lease_s = settings.timeout_s + 30
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # Deliveries under way, by receiver and by the caller whose job it is.
        self._under_way: collections.Counter[tuple[str, str]] = collections.Counter()

    def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._policy), limit=CONCURRENCY)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            headers={"User-Agent": f"imagine/{__version__} (webhooks)"},
            # Proxies from the environment would bypass the address check.
            trust_env=False,
        )
        self._task = asyncio.create_task(self._run(), name="imagine-webhooks")

    async def stop(self) -> None:
        """Stop sending; what is pending stays in the outbox for the next start (or another replica)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Attempts under way finish and are recorded (or their lease would hold them back after a restart).
        if self._sending:
            await asyncio.wait(self._sending, timeout=self._settings.timeout_s + 1)
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.wait(self._sending)
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                room = CONCURRENCY - len(self._sending)
                due = await self._outbox.claim(self._lease_s, room) if room > 0 else []
                for delivery in due:
                    shares = (("receiver", _receiver(delivery.url)), ("caller", delivery.owner))
                    if self._under_way[shares[0]] >= PER_RECEIVER or self._under_way[shares[1]] >= PER_CALLER:
                        # Back in line, no attempt spent: behind what else is due, until one of its share ends.
                        await self._outbox.retry_at(delivery, delivery.attempts, time.time() + self._poll_s)
                        continue
                    self._under_way.update(shares)
                    task = asyncio.create_task(self._attempt(delivery))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)
                    task.add_done_callback(lambda _, shares=shares: self._release(shares))
            except RedisError as error:
                # A shared outbox that cannot be read now (Redis restarting) is read again at the next poll.
                log.warning("could not read the webhook outbox: %s", error)
            except Exception:
                log.exception("could not read the webhook outbox")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            self._wake.clear()

    def _release(self, shares: tuple[tuple[str, str], ...]) -> None:
        self._under_way.subtract(shares)
        for share in shares:
            if not self._under_way[share]:
                del self._under_way[share]

    async def _attempt(self, delivery: Delivery) -> None:
        attempt = delivery.attempts + 1
        host = urllib.parse.urlsplit(delivery.url).hostname
        started = time.monotonic()
        outcome, detail = await self._post(delivery)
        self._telemetry.webhook_attempted(outcome, time.monotonic() - started)
        log.info(
            "webhook for job %s to %s: attempt %d of %d, %s (%s)",
            delivery.job_id, host, attempt, self._settings.max_attempts, outcome, detail,
        )
        try:
            if outcome == "delivered":
                await self._outbox.delivered(delivery)
                self._telemetry.webhook_ended("delivered")
            elif outcome == "refused" or attempt >= self._settings.max_attempts:
                log.warning("webhook for job %s to %s given up after %d attempts", delivery.job_id, host, attempt)
                await self._outbox.give_up(delivery)
                self._telemetry.webhook_ended("gave_up")
            else:
                await self._outbox.retry_at(delivery, attempt, time.time() + backoff_s(self._settings, attempt))
        except Exception:
            # Not recorded: the lease runs out and the delivery is claimed again (at least once).
            log.exception("could not record the webhook attempt for job %s", delivery.job_id)

    async def _post(self, delivery: Delivery) -> tuple[str, str]:
        assert self._session is not None
        try:
            # The policy may have changed since the job was submitted (a restart with other settings).
            self._policy.parse(delivery.url)
        except TargetRefused as refused:
            return "refused", str(refused)
        if self._signer is None:
            return "refused", "webhooks are off"
        headers = {
            "Content-Type": "application/json",
            **self._signer.headers(delivery.message_id, int(time.time()), delivery.body),
        }
        try:
            async with self._session.post(
                delivery.url, data=delivery.body.encode(), headers=headers, allow_redirects=False
            ) as response:
                # Bounded: a receiver's answer is never read whole.
                await response.content.read(self._settings.max_response_bytes)
                if 200 <= response.status < 300:
                    return "delivered", f"HTTP {response.status}"
                return "http_error", f"HTTP {response.status}"
        except TimeoutError:
            return "timeout", f"no answer within {self._settings.timeout_s:g} s"
        except aiohttp.ClientConnectorError as error:
            return "network_error", str(error.os_error)
        except (aiohttp.ClientError, OSError) as error:
            return "network_error", type(error).__name__
