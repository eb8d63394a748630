"""AUTOMATIC1111's error shape for the routes its clients call (everything under `<base>/sdapi/`).

A1111 answers an error as `{"error", "detail", "body", "errors"}`: here
`error` is the contract's code, `detail` its message, `errors` the
`{"loc", "msg"}` list of a validation error (empty otherwise) and `body` the
rest of the contract's details; the status codes are the contract's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from imagine.http.app_keys import settings_key

PREFIX = "/sdapi/"


def is_sdapi_route(request: web.Request) -> bool:
    return request.path.startswith(request.app[settings_key].server.base_path + PREFIX)


def sdapi_error_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The contract's error JSON (see `imagine.errors.error_body`) in A1111's shape."""
    error = body["error"]
    details = dict(error.get("details", {}))
    errors = details.pop("errors", [])
    return {"error": error["code"], "detail": error["message"], "body": details, "errors": errors}
