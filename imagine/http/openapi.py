"""The OpenAPI 3.1 document, assembled from what each route declares next to its handler.

A handler carries its operation (summary, parameters, body, responses) with
`@operation`; `build_document` walks the app's router, so a route is in the
document exactly when it is served, at the path it is served on. What follows
from the route's `public`/`requires` annotations (security, 401, 403), the
rate limits (429 and the RateLimit-* headers), `X-Request-ID` and the contract's
error body for any other failure is added here and never repeated in the views.

Request bodies are the pydantic models the handlers validate with; response
schemas are written by hand in the views, as `Component`s when shared. A schema
that depends on what the app registered (its plugins' names, say) is a
`FromApp`, made when the document is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from imagine import __version__
from imagine.security.tokens import PUBLIC_ATTRIBUTE, SCOPE_ATTRIBUTE, SIGNED_URL_ATTRIBUTE

log = logging.getLogger(__name__)

OPENAPI_ATTRIBUTE = "__imagine_openapi__"
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True)
class Component:
    """A schema published once under components/schemas and referenced wherever it is used."""

    name: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class FromApp:
    """A schema only the app knows (what its plugins registered, say): made when the document is built."""

    build: Callable[[web.Application], Schema]


# Anything a view may put where a schema goes: plain JSON Schema, a Component, a pydantic model, a FromApp.
Schema = Mapping[str, Any] | Component | type[BaseModel] | FromApp

ERROR = Component(
    "Error",
    {
        "type": "object",
        "description": "Every error, from every route (OpenAI-compatible routes excepted).",
        "required": ["detail", "error"],
        "properties": {
            "detail": {"type": "string", "description": "Human-readable message (FastAPI-era clients read this)"},
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string", "examples": ["VALIDATION_ERROR", "RATE_LIMIT_EXCEEDED"]},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            },
        },
    },
)

_PATH_PARAMETER = re.compile(r"{([^}:]+)}")
_NOT_NAME = re.compile(r"[^A-Za-z0-9]+")
_HEADERS = {
    "X-Request-ID": {
        "description": "This request's id, also in the access log (taken from a trusted proxy or generated)",
        "required": True,
        "schema": {"type": "string"},
    },
    "RateLimit-Limit": {"description": "Size of the most restrictive bucket", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "Tokens left in it", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "Seconds until it is full again", "schema": {"type": "integer"}},
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}},
}


def _form(fields: Schema | None, files: Mapping[str, str]) -> dict[str, Any]:
    """A multipart form: the text fields of a pydantic model beside the named files (the first one required)."""
    schema: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    if isinstance(fields, type) and issubclass(fields, BaseModel):
        schema = fields.model_json_schema()
        schema.pop("title", None)
    properties = {name: {"type": "string", "contentMediaType": "application/octet-stream", "description": text}
                  for name, text in files.items()}
    return {**schema, "properties": {**properties, **schema["properties"]}, "required": [*files][:1] + schema.get("required", [])}


def operation(
    summary: str,
    *,
    tags: Sequence[str],
    responses: Mapping[int | str, Mapping[str, Any]],
    description: str = "",
    parameters: Sequence[Mapping[str, Any]] = (),
    body: Schema | None = None,
    multipart: Mapping[str, str] | None = None,
    rate_limited: bool = True,
) -> Callable[[H], H]:
    """Document the decorated handler's operation (what is route-specific; the rest is added when built)."""
    declared: dict[str, Any] = {
        "summary": summary,
        "tags": list(tags),
        "parameters": list(parameters),
        "responses": {str(status): dict(answer) for status, answer in responses.items()},
        "x-rate-limited": rate_limited,
    }
    if description:
        declared["description"] = description
    if multipart is not None:
        declared["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _form(body, multipart)}}}
    elif body is not None:
        declared["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}

    def mark(handler: H) -> H:
        setattr(handler, OPENAPI_ATTRIBUTE, declared)
        return handler

    return mark


# ---- helpers the views use -----------------------------------------------------


def json_response(description: str, schema: Schema, *, headers: Sequence[str] = ()) -> dict[str, Any]:
    return content_response(description, {"application/json": schema}, headers=headers)


def content_response(description: str, media: Mapping[str, Schema], *, headers: Sequence[str] = ()) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {media_type: {"schema": schema} for media_type, schema in media.items()},
    }
    if headers:
        answer["headers"] = {name: {"schema": {"type": "string"}} for name in headers}
    return answer


def error_response(description: str) -> dict[str, Any]:
    return json_response(description, ERROR)


def path_parameter(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


def query_parameter(name: str, description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": dict(schema)}


def header_parameter(name: str, description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": dict(schema)}


def obj(properties: Mapping[str, Any], *, required: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """An object schema; every listed property is required unless `required` says otherwise."""
    return {
        "type": "object",
        "required": list(properties) if required is None else list(required),
        "properties": dict(properties),
        **extra,
    }


# ---- building the document -------------------------------------------------------


def documented(handler: Callable[..., Any]) -> bool:
    return hasattr(handler, OPENAPI_ATTRIBUTE)


def build_document(app: web.Application, base_path: str) -> dict[str, Any]:
    """The whole document for the routes registered on `app` (call once the router is complete)."""
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        # aiohttp serves HEAD beside every GET; HTTP defines it as GET without a body.
        if resource is None or route.method == "HEAD":
            continue
        declared = getattr(route.handler, OPENAPI_ATTRIBUTE, None)
        if declared is None:
            log.warning("route %s %s has no OpenAPI description", route.method, resource.canonical)
            continue
        path = resource.canonical.removeprefix(base_path) or "/"
        answer = _complete(declared, route.handler, route.method, path)
        paths.setdefault(path, {})[route.method.lower()] = _resolve(answer, schemas, app)
    schemas[ERROR.name] = dict(ERROR.schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagine",
            "version": __version__,
            "description": (
                "Self-hosted text-to-image service. Every route needs `Authorization: Bearer <JWT>` unless marked "
                "otherwise; errors are `{detail, error: {code, message, details}}`; every response carries "
                "`X-Request-ID`."
            ),
        },
        "servers": [{"url": base_path}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "headers": _HEADERS,
        },
    }


def _complete(declared: Mapping[str, Any], handler: Callable[..., Any], method: str, path: str) -> dict[str, Any]:
    answer = {key: value for key, value in declared.items() if key != "x-rate-limited"}
    # From the method and path, so it is unique even when one handler serves several routes.
    answer["operationId"] = f"{method.lower()}_{_NOT_NAME.sub('_', path).strip('_')}"
    public = getattr(handler, PUBLIC_ATTRIBUTE, False)
    scopes = sorted(getattr(handler, SCOPE_ATTRIBUTE, frozenset()))
    if public:
        answer["security"] = []
    else:
        answer["security"] = [{"bearer": []}]
        if getattr(handler, SIGNED_URL_ATTRIBUTE, False):
            # Or no token at all: the route checks the URL signature its operation declares.
            answer["security"].append({})
        needs = f"Needs a token with scope {' or '.join(scopes)}." if scopes else "Needs a valid token."
        answer["description"] = f"{answer.get('description', '')}\n\n{needs}".strip()
    named = {parameter["name"] for parameter in answer["parameters"] if parameter["in"] == "path"}
    answer["parameters"] = list(answer["parameters"]) + [
        path_parameter(name, name) for name in _PATH_PARAMETER.findall(path) if name not in named
    ]
    if not answer["parameters"]:
        del answer["parameters"]
    responses = dict(answer["responses"])
    if not public:
        responses.setdefault("401", error_response("Missing or invalid token (with `WWW-Authenticate: Bearer`)"))
    if scopes:
        responses.setdefault("403", error_response("The token lacks the scope (or the model)"))
    rate_limited = declared["x-rate-limited"]
    if rate_limited:
        responses.setdefault("429", error_response("A rate-limit bucket is empty (with `Retry-After`)"))
    responses.setdefault("default", error_response("Any other error, in the contract's error format"))
    answer["responses"] = {status: _with_headers(response, rate_limited) for status, response in responses.items()}
    return answer


def _with_headers(response: Mapping[str, Any], rate_limited: bool) -> dict[str, Any]:
    names = ["X-Request-ID"]
    if rate_limited:
        names += ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After"]
    headers = {name: {"$ref": f"#/components/headers/{name}"} for name in names}
    return {**response, "headers": {**headers, **response.get("headers", {})}}


def _resolve(value: Any, schemas: dict[str, Any], app: web.Application) -> Any:
    """Copy `value`, publishing Components and pydantic models under components/schemas."""
    if isinstance(value, FromApp):
        return _resolve(value.build(app), schemas, app)
    if isinstance(value, Component):
        if value.name not in schemas:
            schemas[value.name] = _resolve(dict(value.schema), schemas, app)
        return {"$ref": f"#/components/schemas/{value.name}"}
    if isinstance(value, type) and issubclass(value, BaseModel):
        if value.__name__ not in schemas:
            schema = value.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[value.__name__] = schema
        return {"$ref": f"#/components/schemas/{value.__name__}"}
    if isinstance(value, Mapping):
        return {key: _resolve(item, schemas, app) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(item, schemas, app) for item in value]
    return value
