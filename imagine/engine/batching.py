"""Which queued jobs run next, and together: fair across subjects, compatible within a batch.

Subjects take turns: the next batch starts with the oldest job of the subject
served longest ago, and fills up round-robin across subjects with jobs that can
share its pipeline call. So a subject that queued fifty images delays another
subject's single image by at most one batch.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol, TypeVar


class Batchable(Protocol):
    owner: str

    @property
    def images(self) -> int: ...

    @property
    def batch_key(self) -> Hashable: ...


J = TypeVar("J", bound=Batchable)


class FairBatcher:
    def __init__(self) -> None:
        self._served = itertools.count()
        self._last_served: dict[str, int] = {}  # owner -> number of the last batch it was in

    def _turn_order(self, owners: Iterable[str]) -> list[str]:
        """Owners never served first, then the one served longest ago (queue order breaks ties)."""
        return sorted(dict.fromkeys(owners), key=lambda owner: self._last_served.get(owner, -1))

    def take(self, queue: collections.deque[J], max_images: int | Callable[[J], int]) -> list[J]:
        """Remove and return the next batch from `queue` (never empty when the queue is not).

        `max_images` bounds the batch's images, or says the bound for a batch headed by a given job.
        """
        if not queue:
            return []
        head_owner = self._turn_order(job.owner for job in queue)[0]
        head = next(job for job in queue if job.owner == head_owner)
        limit = max_images(head) if callable(max_images) else max_images
        batch = [head]
        batch.extend(self.compatible(queue, head.batch_key, limit - head.images, head=head))
        for job in batch:
            queue.remove(job)
        self.mark_served(batch)
        return batch

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
