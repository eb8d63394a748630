"""The one way a request body becomes a generation: every generating route comes through here.

In this order: the body's own fields (400), the model it names (404), whether
the caller's token may use that model once aliases and the default are resolved
(403), whether the model takes the input images sent (400), with input images whether the caller's quota
has room (429, before a pixel is decoded), the images themselves (400; 404 for another caller's gallery
id), then the model's defaults and limits (400), and last the images' preparation at the request's size.
A route with a body of its own (OpenAI's, seed 004's) maps it to /generate's fields first, so its errors
read the same as /generate's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from imagine.http import image_inputs
from imagine.http.app_keys import generate_body_key, registry_key, settings_key
from imagine.http.a1111_prompts import read_a1111_prompts
from imagine.http.quota_gate import quotas_key
from imagine.http.request_bodies import GenerateBody, parse_generate_body, resolve_request
from imagine.plugin.generators import GenerationRequest, Generator
from imagine.security.tokens import Principal, check_model_grant


@dataclass(frozen=True)
class Admitted:
    """A body that may run: as sent (for the route's own fields), its generator, the filled-in request."""

    body: GenerateBody
    generator: Generator
    request: GenerationRequest


async def admit(
    app: web.Application,
    principal: Principal,
    raw: Any,
    *,
    check_body: Callable[[GenerateBody], object] | None = None,
) -> Admitted:
    """`raw` (a JSON value) as a generation `principal` may run, or the ApiError that says why not.

    `check_body` is what the route itself refuses on the body alone (an Accept it
    cannot answer): it runs before the model is looked up, so its error comes first.
    Input images are decoded and prepared on the app's CPU pool, never on the loop.
    """
    body = parse_generate_body(raw, app[generate_body_key])
    if app[settings_key].models.prompt_syntax == "a1111":
        body = read_a1111_prompts(body)
    if check_body is not None:
        check_body(body)
    generator = app[registry_key].resolve(body.model)
    check_model_grant(principal, generator.name)
    if body.init_image is None:
        return Admitted(body, generator, resolve_request(body, generator))
    image_inputs.check_model_takes(body, generator)
    # Decoding an image is the costly part of admitting a body: not for a caller whose quota is spent.
    await app[quotas_key].check(principal.sub, principal.quota, generator.name, body.num_images)
    sent = await image_inputs.read_inputs(app, principal, body)
    request = resolve_request(body, generator, size=image_inputs.output_size(body, sent.init.image.size))
    return Admitted(body, generator, await image_inputs.with_inputs(app, body, sent, request))
