"""An aiohttp app on a free loopback port, on an event loop of its own in a thread.

For clients that block (a browser driven by selenium, schemathesis): the app's
loop keeps running while the test waits on them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web

from tests.processes import LOOPBACK, free_port


@contextmanager
def serving(app: web.Application, runner_for: Callable[[web.Application], web.AppRunner] | None = None) -> Iterator[str]:
    """`app` served by `runner_for(app)` (a plain runner whose handlers a client's hang-up cancels, by default);
    yields its origin."""
    loop = asyncio.new_event_loop()
    runner = runner_for(app) if runner_for is not None else web.AppRunner(app, handler_cancellation=True)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, LOOPBACK, port).start())
    thread = threading.Thread(target=loop.run_forever, name="served-app", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
