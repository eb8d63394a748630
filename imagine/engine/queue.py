"""Where submitted work waits for the device: the interface the device loop relies on, and its in-memory queue.

`WorkQueue` is all the executor knows of a queue. The queue shared between
replicas (`imagine.cluster`, Redis Streams) does not replace it but sits in
front: a replica's worker pulls a batch from Redis only when this process's
device is free and hands it to this queue in one `submit`, so the device loop
is the same with or without it. The batch a queue hands out is chosen by
`imagine.engine.batching.FairBatcher`: fair across subjects, compatible
within the batch.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from imagine.engine.batching import Batchable, FairBatcher, SwitchCost

W = TypeVar("W", bound=Batchable)


class QueueFull(Exception):
    """The queue already holds as many items as it may."""

    def __init__(self, depth: int, capacity: int) -> None:
        super().__init__(f"the queue holds {depth} of {capacity} items")
        self.depth = depth
        self.capacity = capacity


class WorkQueue(Protocol[W]):
    """A bounded queue that hands the device thread fair, compatible batches.

    Every method may be called from any thread; only the device thread calls `take`.
    """

    @property
    def capacity(self) -> int: ...

    def __len__(self) -> int: ...

    def submit(self, *items: W) -> None:
        """Queue `items` last, together: all or none (QueueFull when they would not fit)."""
        ...

    def position(self, item: W) -> int:
        """1 for the next item to run, 0 once `item` left the queue (taken, cancelled or drained)."""
        ...

    def waiting(self) -> list[W]:
        """The items waiting, in queue order."""
        ...

    def cancel(self, item: W) -> bool:
        """Remove `item` if it is still waiting; False when it already left."""
        ...

    def take(
        self, max_images: int | Callable[[W], int], max_wait_s: float, switch_cost: SwitchCost[W] | None = None
    ) -> list[W] | None:
        """Block until work waits, then remove and return the next batch of up to `max_images` images
        (or as many as `max_images(head)` allows for the batch's first item).

        With `switch_cost`, a batch the device must get ready for may wait a while behind work it is
        ready for (see `imagine.engine.batching`). The batch waits up to `max_wait_s` for compatible company while it has room.
        Returns [] when `wake` was called (the device thread has other work) and
        None once the queue is closed.
        """
        ...

    def wake(self) -> None:
        """Make a `take` that blocks now, or the next one, return [] at once."""
        ...

    def drain(self) -> list[W]:
        """Remove and return every waiting item."""
        ...

    def close(self) -> None:
        """Hand out nothing more: `take` returns None from now on."""
        ...


class MemoryQueue(Generic[W]):
    """The queue of one process: a deque under a condition variable."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: collections.deque[W] = collections.deque()
        self._batcher = FairBatcher()
        self._condition = threading.Condition()
        self._woken = False
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def submit(self, *items: W) -> None:
        with self._condition:
            if len(self._items) + len(items) > self._capacity:
                raise QueueFull(len(self._items), self._capacity)
            self._items.extend(items)
            self._condition.notify()

    def position(self, item: W) -> int:
        with self._condition:
            try:
                return self._items.index(item) + 1
            except ValueError:
                return 0

    def waiting(self) -> list[W]:
        with self._condition:
            return list(self._items)

    def cancel(self, item: W) -> bool:
        with self._condition:
            try:
                self._items.remove(item)
            except ValueError:
                return False
            return True

    def take(
        self, max_images: int | Callable[[W], int], max_wait_s: float, switch_cost: SwitchCost[W] | None = None
    ) -> list[W] | None:
        with self._condition:
            while not self._items and not self._woken and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            if self._woken:
                self._woken = False
                return []
            chosen: list[int] = []

            def limit(head: W) -> int:
                # Asked once per batch: a learnt limit is a decision, not a lookup.
                chosen.append(max_images(head) if callable(max_images) else max_images)
                return chosen[0]

            batch = self._batcher.take(self._items, limit, switch_cost)
            self._wait_for_company(batch, chosen[0], max_wait_s)
            return batch

    def _wait_for_company(self, batch: list[W], max_images: int, max_wait_s: float) -> None:
        """Give compatible work a moment to arrive and join (lock held; waiting releases it)."""
        deadline = time.monotonic() + max_wait_s
        while (room := max_images - sum(item.images for item in batch)) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return
            self._condition.wait(remaining)
            joining = self._batcher.compatible(self._items, batch[0].batch_key, room)
            for item in joining:
                self._items.remove(item)
            batch.extend(joining)

    def wake(self) -> None:
        with self._condition:
            self._woken = True
            self._condition.notify_all()

    def drain(self) -> list[W]:
        with self._condition:
            drained = list(self._items)
            self._items.clear()
            return drained

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
