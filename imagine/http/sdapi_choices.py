"""The model each caller's A1111 client chose (`sd_model_checkpoint`), which its txt2img and img2img use.

In this process by default; with a shared queue, in its Redis, so that a
client's choice holds on whichever replica nginx sends its next request to.
"""

from __future__ import annotations

import collections
from typing import Protocol

import redis.asyncio as redis

from imagine.cluster import keys
from imagine.cluster.jobs import redis_errors

# Subjects whose choice this process remembers; the least recently set is forgotten first.
MAX_SUBJECTS = 10_000
# How long Redis keeps a choice nobody set again: a client that comes back after that starts on the default model.
REMEMBER_S = 30 * 86400


class ModelChoices(Protocol):
    async def get(self, sub: str) -> str | None: ...

    async def set(self, sub: str, model: str) -> None: ...


class MemoryModelChoices:
    def __init__(self) -> None:
        self._chosen: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def get(self, sub: str) -> str | None:
        return self._chosen.get(sub)

    async def set(self, sub: str, model: str) -> None:
        self._chosen[sub] = model
        self._chosen.move_to_end(sub)
        while len(self._chosen) > MAX_SUBJECTS:
            self._chosen.popitem(last=False)


class RedisModelChoices:
    """Every replica's answer; an unreachable Redis is a 503 with Retry-After, as for the queue itself."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    async def get(self, sub: str) -> str | None:
        with redis_errors():
            chosen = await self._client.get(keys.sdapi_model(sub))
        return chosen.decode() if chosen is not None else None

    async def set(self, sub: str, model: str) -> None:
        with redis_errors():
            await self._client.set(keys.sdapi_model(sub), model, ex=REMEMBER_S)
