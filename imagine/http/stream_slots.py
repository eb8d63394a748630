"""How many event streams (a job's progress, a streamed chat answer) one caller may hold open on this replica.

A stream holds its connection for as long as the job or the answer lasts (and,
with a shared queue, a Redis connection blocked on the job's events), so a
caller opening hundreds would spend the server's connections, and Redis's,
for everyone. Past `jobs.max_streams_per_subject` a new one is 429, until one
of the caller's own streams ends.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from aiohttp import web

from imagine.errors import ApiError

# When a held stream may have ended: a job's next event, a chat's next token.
RETRY_AFTER_S = 5


class StreamSlots:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def held(self, subject: str) -> Iterator[None]:
        """One of `subject`'s slots for the block; 429 RATE_LIMIT_EXCEEDED if it holds them all."""
        if self._open[subject] >= self._limit:
            raise ApiError(
                429,
                "RATE_LIMIT_EXCEEDED",
                f"At most {self._limit} event streams open at once; close one or retry later",
                details={"bucket": "streams", "limit": self._limit},
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._open[subject] += 1
        try:
            yield
        finally:
            self._open[subject] -= 1
            if not self._open[subject]:
                del self._open[subject]


stream_slots_key = web.AppKey("stream_slots", StreamSlots)
