"""The one way a request body becomes a generation: every generating route comes through here.

In this order: the body's own fields (400), the model it names (404), whether
the caller's token may use that model once aliases and the default are resolved
(403), then the model's defaults and limits (400). A route with a body of its own (OpenAI's, seed 004's) maps it
to /generate's fields first, so its errors read the same as /generate's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from imagine.http.app_keys import generate_body_key, registry_key
from imagine.http.request_bodies import GenerateBody, parse_generate_body, resolve_request
from imagine.plugin.generators import GenerationRequest, Generator
from imagine.security.tokens import Principal, check_model_grant


@dataclass(frozen=True)
class Admitted:
    """A body that may run: as sent (for the route's own fields), its generator, the filled-in request."""

    body: GenerateBody
    generator: Generator
    request: GenerationRequest


def admit(
    app: web.Application,
    principal: Principal,
    raw: Any,
    *,
    check_body: Callable[[GenerateBody], object] | None = None,
) -> Admitted:
    """`raw` (a JSON value) as a generation `principal` may run, or the ApiError that says why not.

    `check_body` is what the route itself refuses on the body alone (an Accept it
    cannot answer): it runs before the model is looked up, so its error comes first.
    """
    body = parse_generate_body(raw, app[generate_body_key])
    if check_body is not None:
        check_body(body)
    generator = app[registry_key].resolve(body.model)
    check_model_grant(principal, generator.name)
    return Admitted(body, generator, resolve_request(body, generator))
