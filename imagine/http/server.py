"""Running the HTTP server, with the requests aiohttp's parser refuses answered in the contract's JSON.

A request line or a header over the parser's limits, too many headers, or
bytes that are not HTTP never reach the app and its middlewares: aiohttp's
protocol handler answers them itself, in text/plain, without X-Request-ID,
echoing the start of the offending line (which can be a bearer token) and
logging it with a traceback. Here they get the contract's error JSON with a
fresh request id, echo nothing, and leave one access line.

`run_app` is aiohttp's `web.run_app` (same signals, same graceful shutdown)
around that server.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, InvalidHeader, InvalidURLError, LineTooLong

from imagine.http.access import REQUEST_ID_HEADER, access_log
from imagine.errors import error_body
from imagine.http.app_keys import settings_key

# aiohttp's run_app default; a client that stalls before sending its headers is cut after this.
KEEPALIVE_TIMEOUT_S = 75.0
# What a line that overflowed starts with when it is the request line: the
# target for the C parser ("/generate..."), the whole line for the pure-Python
# one ("GET /generate..."). A header's starts with its name or its value, so
# the rare header value that begins with "/" is taken for a long URL (414):
# neither parser says more about where it stopped.
_REQUEST_LINE = re.compile(rb"(?:[A-Z]+ )?[/*]")
# Both parsers' words for "more headers than max_headers": the exception has no type of its own.
_TOO_MANY_HEADERS = "Too many headers received"
_MALFORMED = (
    (InvalidURLError, "Malformed request target"),
    (BadStatusLine, "Malformed request line"),
    (InvalidHeader, "Malformed header"),
)


class Refusal(NamedTuple):
    status: int
    code: str
    message: str


class _RefusingRequestHandler(web.RequestHandler):
    """aiohttp's protocol handler, but its parser's refusals follow the contract."""

    __slots__ = ("_log_refusals",)

    def __init__(self, manager: web.Server, *, log_refusals: bool, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._log_refusals = log_refusals

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            # A failure past the parser: the app's error middleware answers
            # those, so this is aiohttp's own last resort; leave it as it is.
            return super().handle_error(request, status, exc, message)
        refusal = self.refusal(exc)
        identifier = uuid.uuid4().hex
        if self._log_refusals:
            access_log.info(json.dumps(_access_line(identifier, request.remote, refusal)))
        response = web.json_response(
            error_body(refusal.code, refusal.message),
            status=refusal.status,
            headers={REQUEST_ID_HEADER: identifier},
        )
        # The parser lost its place in the byte stream: nothing after this can be read as a request.
        response.force_close()
        return response

    def refusal(self, error: HttpProcessingError) -> Refusal:
        """Status, code and message for a parser error, in words of our own: the parser's quote the request."""
        if isinstance(error, LineTooLong):
            if _is_request_line(error.args[0]):
                return Refusal(414, "URI_TOO_LONG", f"Request line longer than {self.max_line_size} bytes")
            return Refusal(431, "HEADERS_TOO_LARGE", f"A header is longer than {self.max_field_size} bytes")
        if error.message == _TOO_MANY_HEADERS:
            return Refusal(431, "HEADERS_TOO_LARGE", f"More than {self.max_headers} headers")
        message = next((text for kind, text in _MALFORMED if isinstance(error, kind)), "Malformed HTTP request")
        return Refusal(400, "VALIDATION_ERROR", message)


def _is_request_line(overflowed: str | bytes | bytearray) -> bool:
    """Whether what overflowed was the request line, from the start of it that the parser reports."""
    start = overflowed.encode("utf-8", "surrogateescape") if isinstance(overflowed, str) else bytes(overflowed)
    return _REQUEST_LINE.match(start) is not None


def _access_line(identifier: str, client: str | None, refusal: Refusal) -> dict[str, Any]:
    """The access middleware's line; what the parser never read (method, path, token) is null."""
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": identifier,
        "client": client,
        "sub": None,
        "method": None,
        "route": None,
        "path": None,
        "status": refusal.status,
        "error": refusal.code,
        "duration_ms": None,
        "queue_wait_ms": None,
    }


class _RefusingServer(web.Server):
    """aiohttp's Server, which takes no request handler class: it makes ours, with the arguments it holds."""

    def __init__(self, *args: Any, log_refusals: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_refusals = log_refusals

    def __call__(self) -> web.RequestHandler:
        return _RefusingRequestHandler(self, loop=self._loop, log_refusals=self._log_refusals, **self._kwargs)


class _RefusingAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        # The app's startup, handler and request factory, exactly as aiohttp builds them.
        plain = await super()._make_server()
        return _RefusingServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            log_refusals=self.app[settings_key].server.access_log,
            **plain._kwargs,
        )


def make_runner(app: web.Application, *, shutdown_timeout: float = 60.0, handle_signals: bool = False) -> web.AppRunner:
    """The runner `imagine serve` serves the app with."""
    return _RefusingAppRunner(
        app,
        handle_signals=handle_signals,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        # A client that hangs up cancels its handler, and so its job.
        handler_cancellation=True,
        # imagine.http.access writes one structured line per request instead.
        access_log=None,
    )


async def _serve(
    app: web.Application, host: str, port: int, shutdown_timeout: float, on_ready: Callable[[], None]
) -> None:
    runner = make_runner(app, shutdown_timeout=shutdown_timeout, handle_signals=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        on_ready()
        # Until GracefulExit (SIGINT, SIGTERM) stops the loop.
        await asyncio.Event().wait()
    finally:
        # Stops listening, lets requests in flight finish for up to shutdown_timeout, runs the app's cleanup.
        await runner.cleanup()


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float = 60.0,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully: aiohttp's `web.run_app`, step for step."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, host, port, shutdown_timeout, on_ready))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            # Not when it ended by itself (a startup failure): that would replace its traceback.
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Only after the graceful shutdown: cancelled earlier, requests in flight would not finish."""
    leftovers = asyncio.all_tasks(loop)
    for task in leftovers:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    for task in leftovers:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception during shutdown", "exception": task.exception(), "task": task}
            )
