"""Which queued jobs run next, and together: fair across subjects, compatible within a batch.

Subjects take turns: the next batch starts with the oldest job of the subject
served longest ago, and fills up round-robin across subjects with jobs that can
share its pipeline call. So a subject that queued fifty images delays another
subject's single image by at most one batch.

Given what getting the device ready for a job would cost (reloading a model
that was unloaded for another, swapping a checkpoint in), the turns defer a
switch: while jobs the device is ready for wait too, those go first, for as
long as the switch itself would take, and then the switch happens. Each job
waits at most that much more than its turn, and the device spends at most
about half its time switching, where strict turns between callers of two
models that do not fit together would reload before every batch.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol, TypeVar


class Batchable(Protocol):
    owner: str

    @property
    def images(self) -> int: ...

    @property
    def batch_key(self) -> Hashable: ...


J = TypeVar("J", bound=Batchable)


# Seconds the device would spend getting ready to run a job (0: ready, or not known).
SwitchCost = Callable[[J], float]


class FairBatcher:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}  # owner -> number of the last batch it was in
        self._clock = clock
        # batch key -> when a batch with it was first put off for one the device was ready for
        self._deferred_since: dict[Hashable, float] = {}

    def _turn_order(self, owners: Iterable[str]) -> list[str]:
        """Owners never served first, then the one served longest ago (queue order breaks ties)."""
        return sorted(dict.fromkeys(owners), key=lambda owner: self._last_served.get(owner, -1))

    def take(
        self,
        queue: collections.deque[J],
        max_images: int | Callable[[J], int],
        switch_cost: SwitchCost[J] | None = None,
    ) -> list[J]:
        """Remove and return the next batch from `queue` (never empty when the queue is not).

        `max_images` bounds the batch's images, or says the bound for a batch headed by a given job.
        With `switch_cost`, a batch the device must get ready for may be put off (see above).
        """
        if not queue:
            return []
        head = self._fairest(queue)
        if switch_cost is not None:
            head = self._deferring_switch(queue, head, switch_cost)
        limit = max_images(head) if callable(max_images) else max_images
        batch = [head]
        batch.extend(self.compatible(queue, head.batch_key, limit - head.images, head=head))
        for job in batch:
            queue.remove(job)
        self.mark_served(batch)
        return batch

    def _fairest(self, jobs: Sequence[J]) -> J:
        """The oldest job of the subject served longest ago."""
        head_owner = self._turn_order(job.owner for job in jobs)[0]
        return next(job for job in jobs if job.owner == head_owner)

    def _deferring_switch(self, queue: Sequence[J], head: J, switch_cost: SwitchCost[J]) -> J:
        """`head`, or the fairest job the device is ready for while `head`'s switch is put off.

        A switch is put off for at most what it costs, counted from when it was first put off,
        whatever the queue holds meanwhile: under a steady load every job has waited longer than
        a switch, and counting its whole wait would switch before every batch again.
        """
        queued_keys = {job.batch_key for job in queue}
        self._deferred_since = {key: since for key, since in self._deferred_since.items() if key in queued_keys}
        costs: dict[Hashable, float] = {}

        def cost(job: J) -> float:
            if job.batch_key not in costs:
                costs[job.batch_key] = switch_cost(job)
            return costs[job.batch_key]

        needed = cost(head)
        ready = [job for job in queue if cost(job) <= 0] if needed > 0 else []
        if ready:
            now = self._clock()
            since = self._deferred_since.setdefault(head.batch_key, now)
            if now - since < needed:
                return self._fairest(ready)
        self._deferred_since.pop(head.batch_key, None)
        return head

    def compatible(self, queue: Iterable[J], key: Hashable, room: int, head: J | None = None) -> list[J]:
        """Jobs that can join a batch with `key`, one per subject per round, within `room` images.

        The head's subject already has its place in this round, so it comes last.
        """
        by_owner: dict[str, collections.deque[J]] = collections.defaultdict(collections.deque)
        for job in queue:
            if job is not head and job.batch_key == key:
                by_owner[job.owner].append(job)
        chosen: list[J] = []
        order = self._turn_order(by_owner)
        if head is not None and head.owner in order:
            order.remove(head.owner)
            order.append(head.owner)
        while room > 0 and any(by_owner.values()):
            for owner in order:
                waiting = by_owner[owner]
                if waiting and waiting[0].images <= room:
                    job = waiting.popleft()
                    chosen.append(job)
                    room -= job.images
                elif waiting:
                    waiting.clear()  # its next job does not fit: keep its order, stop taking from it
        return chosen

    def mark_served(self, batch: Iterable[Batchable]) -> None:
        number = next(self._served)
        for job in batch:
            self._last_served[job.owner] = number
