"""The A1111 routes' generations in flight, per subject: what `/sdapi/v1/progress` reads and `/interrupt` stops.

AUTOMATIC1111 has one global job; here each caller sees and stops only its
own. A `Run` is one txt2img/img2img call while its caller waits: the
executor's observer for it (queue position, steps, the latest latent preview)
and the task that awaits its images, which `interrupt` cancels (the device
stops it at its next step, as when a client hangs up).

Runs live in the caller's replica. With a shared queue the generation may
run on another replica's device: the start, steps and previews it writes to
the job's events there reach the run here, and an interrupt cancels the job
through the queue, which stops it at its next step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


@dataclass(eq=False)
class Run:
    """One waiting A1111 generation; also its `JobObserver`."""

    owner: str
    total_steps: int
    images: int
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    position: int = 0
    step: int = 0
    preview: Image.Image | None = None
    task: asyncio.Task[Any] | None = None
    interrupted: bool = False
    wants_steps: bool = True
    # Previews are a matmul on the latents every `jobs.preview_every` steps: cheap enough to always want.
    wants_preview: bool = True

    def queued(self, position: int, eta_s: float) -> None:
        self.position = position

    def started(self) -> None:
        self.started_at = time.time()
        self.position = 0

    def progress(self, step: int, total: int, preview: Image.Image | None) -> None:
        self.step, self.total_steps = step, total
        if preview is not None:
            self.preview = preview

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def eta_s(self) -> float:
        """What is left, extrapolated from the steps so far (0 before the first)."""
        if self.started_at is None or not self.step:
            return 0.0
        elapsed = time.time() - self.started_at
        return max(0.0, elapsed / self.fraction - elapsed)


class Runs:
    def __init__(self) -> None:
        self._runs: dict[str, list[Run]] = {}

    def add(self, run: Run) -> None:
        self._runs.setdefault(run.owner, []).append(run)

    def remove(self, run: Run) -> None:
        owned = self._runs.get(run.owner, [])
        if run in owned:
            owned.remove(run)
        if not owned:
            self._runs.pop(run.owner, None)

    def of(self, owner: str) -> list[Run]:
        """The subject's runs, oldest first."""
        return list(self._runs.get(owner, ()))

    def current(self, owner: str) -> Run | None:
        """The most recent running one, else the most recent waiting one."""
        owned = self.of(owner)
        running = [run for run in owned if run.started_at is not None]
        return (running or owned or [None])[-1]

    def interrupt(self, owner: str) -> int:
        """Stop the subject's running generations (queued ones go on, as in A1111); how many were stopped."""
        stopped = 0
        for run in self.of(owner):
            if run.started_at is not None and run.task is not None and not run.task.done():
                run.interrupted = True
                run.task.cancel()
                stopped += 1
        return stopped
