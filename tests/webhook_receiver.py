"""A real webhook receiver for the tests: a small aiohttp server on a loopback port that records what it gets.

It answers 500 to the first `fail_first` deliveries and 200 afterwards
(or 307 to `redirect_to` for every one), and keeps each request's headers,
body and arrival time, so a test can verify signatures and retry spacing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from tests.processes import LOOPBACK, free_port


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


@dataclass
class Receiver:
    fail_first: int = 0
    redirect_to: str = ""
    received: list[Received] = field(default_factory=list)
    landed: int = 0  # requests to /landing: a followed redirect would end there
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    @property
    def accepted(self) -> list[Received]:
        return [entry for entry in self.received if entry.status == 200]

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.redirect_to:
            status = 307
        else:
            status = 500 if len(self.received) < self.fail_first else 200
        self.received.append(Received(dict(request.headers), body, time.monotonic(), status))
        self._arrived.set()
        if status == 307:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=status, text="ok" if status == 200 else "not now")

    async def _landing(self, request: web.Request) -> web.Response:
        self.landed += 1
        return web.Response(text="landed")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_route("*", "/landing", self._landing)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self._runner, LOOPBACK, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` requests have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(self.received)} webhook requests arrived, not {count}")
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                pass
