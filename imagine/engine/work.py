"""The unit of device work: one validated request waiting for, or running on, the device, and how it ends.

A `WorkItem` is what the queue holds and the device thread runs; its caller
awaits its future. It is not an HTTP job (`imagine.engine.jobs.TrackedJob`),
which may wrap one and outlives it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from imagine.errors import ApiError
from imagine.plugin.generators import GenerationRequest, Generator

if TYPE_CHECKING:
    from PIL import Image


class WorkState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationOutput:
    images: list[Image.Image]
    seeds: list[int]
    generation_time: float  # seconds on the device
    queue_time: float  # seconds waiting for it
    vram_used: float  # GB at the peak of this run; 0.0 without a GPU
    runtime: dict[str, Any]  # device and dtype, as the generator reports them
    # The PNGs, when the device thread encoded them itself (nothing else was waiting for it), and how long that took.
    pngs: list[bytes] | None = None
    encode_time: float = 0.0


@dataclass(frozen=True)
class Generated:
    """A finished generation: its request and generator, the device's output, its PNGs and where they were kept."""

    request: GenerationRequest
    generator: Generator
    output: GenerationOutput
    pngs: list[bytes]
    ids: list[str]  # gallery ids; empty when not stored
    encode_time: float = 0.0
    store_time: float = 0.0

    def timings(self) -> dict[str, float]:
        """Seconds spent in each stage after validation."""
        return {
            "queue": self.output.queue_time,
            "device": self.output.generation_time,
            "encode": self.encode_time,
            "store": self.store_time,
        }


def cancelled_error() -> ApiError:
    return ApiError(499, "CANCELLED", "The generation was cancelled")


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, "TIMEOUT", f"The generation did not finish within {timeout_s:g} s")


# A replica that stops is restarted, or another behind the proxy takes the retry, within seconds.
SHUTDOWN_RETRY_AFTER_S = 5


def shutting_down_error() -> ApiError:
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        "The service is shutting down, retry later",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
    )


class JobObserver(Protocol):
    """Told, on the event loop, how a generation moves through the queue and the device."""

    # Told each step (`progress`); else only its queueing and its start.
    wants_steps: bool
    # With `wants_steps`: a preview of the latents too, every `jobs.preview_every` steps.
    wants_preview: bool

    def queued(self, position: int, eta_s: float) -> None: ...

    def started(self) -> None: ...

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None: ...


@dataclass(eq=False)
class WorkItem:
    request: GenerationRequest
    generator: Generator
    timeout_s: float
    future: asyncio.Future[GenerationOutput]
    state: WorkState = WorkState.QUEUED
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    # Set by any thread to stop the work; `stop_error` says why.
    _stop: threading.Event = field(default_factory=threading.Event)
    stop_error: ApiError | None = None
    observer: JobObserver | None = None
    owner: str = ""  # the subject, for fair turns between callers

    @property
    def images(self) -> int:
        return self.request.num_images

    @property
    def batch_key(self) -> tuple[Any, ...]:
        return self.request.batch_key()

    @property
    def deadline(self) -> float:
        return self.submitted_at + self.timeout_s

    def request_stop(self, error: ApiError) -> None:
        if not self._stop.is_set():
            self.stop_error = error
            self._stop.set()

    def should_stop(self) -> bool:
        if not self._stop.is_set() and time.monotonic() > self.deadline:
            self.request_stop(timeout_error(self.timeout_s))
        return self._stop.is_set()
