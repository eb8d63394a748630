"""What the core reports about its work, without knowing who listens.

The executor, the model registry, the rate limiter and the cloud path call
these few methods; `imagine.http.metrics` implements them with Prometheus. Keeping
the interface here means no metrics library is imported anywhere else, and a
component built without a listener (a test, the benchmark) reports to nobody.
Every method may be called from any thread.
"""

from __future__ import annotations

from typing import Protocol


class Telemetry(Protocol):
    def queue_waited(self, seconds: float) -> None:
        """A job left the queue for the device after waiting this long."""

    def generated(self, model: str, seconds: float, images: int) -> None:
        """One pipeline call (or one cloud generation) made `images` images in `seconds`."""

    def batched(self, jobs: int) -> None:
        """One pipeline call served this many jobs together."""

    def model_loaded(self, model: str, seconds: float, *, ok: bool) -> None:
        """A model load finished (or failed) after this long."""

    def credits_spent(self, model: str, credits: float) -> None:
        """A cloud backend reported what a generation cost."""

    def rate_limited(self, bucket: str) -> None:
        """A bucket ("global", "ip", "subject") refused a request."""


class NoTelemetry:
    """Reports to nobody."""

    def queue_waited(self, seconds: float) -> None:
        pass

    def generated(self, model: str, seconds: float, images: int) -> None:
        pass

    def batched(self, jobs: int) -> None:
        pass

    def model_loaded(self, model: str, seconds: float, *, ok: bool) -> None:
        pass

    def credits_spent(self, model: str, credits: float) -> None:
        pass

    def rate_limited(self, bucket: str) -> None:
        pass


NO_TELEMETRY: Telemetry = NoTelemetry()
