"""OpenAI's error shape for the routes OpenAI client libraries call (everything under `<base>/v1/`).

Those clients read `{"error": {"message", "type", "param", "code"}}`; the
contract's codes map onto OpenAI's where OpenAI has one, and are otherwise
passed on in lower case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from imagine.http.app_keys import settings_key

# (our code, status) -> OpenAI's code, where OpenAI has its own.
_CODES = {
    ("MODEL_NOT_AVAILABLE", 404): "model_not_found",
    ("AUTHENTICATION_ERROR", 401): "invalid_api_key",
}


def is_openai_route(request: web.Request) -> bool:
    return request.path.startswith(request.app[settings_key].server.base_path + "/v1/")


def _type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "requests"  # what OpenAI sends for a request-rate limit
    return "invalid_request_error"


def _param(details: Mapping[str, Any]) -> str | None:
    """The first offending body field, as OpenAI's `param`."""
    for error in details.get("errors", []):
        loc = error.get("loc", [])
        if len(loc) > 1 and loc[0] == "body":
            return str(loc[1])
    return None


def openai_error_body(status: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """The contract's error JSON (see `imagine.errors.error_body`) in OpenAI's shape."""
    error = body["error"]
    return {
        "error": {
            "message": error["message"],
            "type": _type(status),
            "param": _param(error.get("details", {})),
            "code": _CODES.get((error["code"], status), error["code"].lower()),
        }
    }
