"""The contract's error JSON, and the exception that carries it out of a handler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ApiError(Exception):
    """A failure that reaches the client as `{"detail", "error": {code, message, details}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    # `detail` keeps clients of the FastAPI-era seeds working; `error` is the structured form.
    return {"detail": message, "error": {"code": code, "message": message, "details": dict(details or {})}}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """400 with one `{"loc", "msg"}` per bad field and a one-line summary."""
    summary = "; ".join(f"{'.'.join(str(part) for part in error['loc'][1:]) or 'body'}: {error['msg']}" for error in errors)
    return ApiError(
        400, "VALIDATION_ERROR", f"Invalid request: {summary}", details={"errors": [dict(error) for error in errors]}
    )


def field_error(field: str, message: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": message}


def model_not_available(name: str, available: Sequence[str], reason: str | None = None) -> ApiError:
    details: dict[str, Any] = {"available_models": list(available)}
    if reason:
        details["reason"] = reason
        return ApiError(503, "MODEL_NOT_AVAILABLE", f"Model '{name}' not available: {reason}", details=details)
    return ApiError(404, "MODEL_NOT_AVAILABLE", f"Model '{name}' not available", details=details)


def renamed_fields(error: ApiError, names: Mapping[str, str]) -> ApiError:
    """A validation error with our field names replaced by the ones a compatible API's client sent (`names`)."""
    errors = error.details.get("errors")
    if error.code != "VALIDATION_ERROR" or not errors:
        return error
    renamed = []
    for entry in errors:
        loc = list(entry["loc"])
        if len(loc) > 1 and loc[0] == "body" and loc[1] in names:
            loc[1] = names[loc[1]]
        renamed.append({**entry, "loc": loc})
    return validation_error(renamed)
