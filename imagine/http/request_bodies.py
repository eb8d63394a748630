"""Request bodies: parsing, field validation, and filling in a model's defaults.

pydantic checks types and ranges field by field (strictly: "512" is not a
width); what depends on the chosen model (sizes, steps, schedulers) is checked
once the model is known, and reported in the same `{"loc", "msg"}` form.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationError,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from imagine.errors import ApiError, field_error, validation_error
from imagine.plugin.generators import GenerationRequest, Generator, LoraWeight, Options
from imagine.plugin.manager import PluginError
from imagine.http.app_keys import generate_body_key, settings_key
from imagine.http.openapi import FromApp

MAX_SEED = 4_294_967_295
# Text stores (PostgreSQL) and PNG text chunks cannot hold NUL, and no prompt, name or filter needs one.
NUL_MESSAGE = "must not contain the NUL character"
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
Body = TypeVar("Body", bound=BaseModel)

# Seed-compatible aliases (and A1111's name for strength): alias -> canonical field.
ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "denoising_strength": "strength"}
# What only means something with an input image: refused without `init_image`.
IMAGE_FIELDS = ("mask_image", "strength", "mask_blur", "outpaint", "resize_mode")
IMAGE_SOURCE = "A data URL (data:image/png;base64,...), plain base64, or gallery:<id> (one of the caller's images)"


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    weight: float = Field(1.0, ge=-2.0, le=2.0, allow_inf_nan=False)


class Outpaint(BaseModel):
    """Pixels added on each side of `init_image`, then repainted: the result is the padded size."""

    model_config = ConfigDict(extra="forbid", strict=True)

    left: int = Field(0, ge=0, le=8192, multiple_of=8)
    right: int = Field(0, ge=0, le=8192, multiple_of=8)
    top: int = Field(0, ge=0, le=8192, multiple_of=8)
    bottom: int = Field(0, ge=0, le=8192, multiple_of=8)

    @model_validator(mode="after")
    def _adds_something(self) -> Outpaint:
        if not any((self.left, self.right, self.top, self.bottom)):
            raise ValueError("must add pixels on at least one side")
        return self


def _document_aliases(schema: dict[str, Any]) -> None:
    """The aliases are merged before validation, so pydantic never sees them: the OpenAPI document must."""
    properties = schema["properties"]
    for alias, canonical in ALIASES.items():
        properties[alias] = {**properties[canonical], "title": alias, "description": f"Alias of {canonical}"}


class GenerateBody(BaseModel):
    """POST /generate, and every route that takes the same body: the core fields.

    An app parses with `generate_body_model`'s subclass, which adds the option
    fields of the generators it registered.
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_document_aliases)

    prompt: Prompt
    negative_prompt: str = Field("", max_length=2000)
    model: str | None = None
    width: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    img_size: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, allow_inf_nan=False)
    num_images: int = Field(1, ge=1, le=4)
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED)
    loras: list[LoraSpec] = Field(default_factory=list, max_length=8)
    scheduler: str | None = None
    response_format: Literal["png", "json"] | None = None
    store: bool = True
    # Jobs only: progress events carry a low-resolution preview.
    preview: bool = False
    init_image: str | None = Field(
        None, min_length=1, description=f"Start from this image (PNG, JPEG or WebP). {IMAGE_SOURCE}"
    )
    mask_image: str | None = Field(
        None, min_length=1, description=f"Repaint where white, keep where black; resized with init_image. {IMAGE_SOURCE}"
    )
    strength: float = Field(
        0.75, ge=0.0, le=1.0, allow_inf_nan=False, description="How much of init_image is repainted (0..1)"
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Pixels of feathering at the mask's edge (a Gaussian's radius)")
    outpaint: Outpaint | None = None
    resize_mode: Literal["resize", "crop", "fill"] = Field(
        "resize",
        description="How init_image is brought to width x height when they differ from its size: stretch, "
        "scale and crop the overflow, or fit inside and pad",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be blank")
        return prompt


# An Options class's own validators: they run for its generator's requests only.
_VALIDATORS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def generate_body_model(generators: Iterable[Generator]) -> type[GenerateBody]:
    """GenerateBody plus every option field the generators declare: what the app's routes parse and document.

    A field keeps its declared type and constraints, so the document tells what
    it takes and any model refuses a value of the wrong shape; a field that
    generators declare differently takes any JSON value here, and each
    generator's `Options` checks its own in `resolve_request`.
    """
    declared: dict[str, list[tuple[str, FieldInfo]]] = {}
    for generator in generators:
        for name, field in generator.Options.model_fields.items():
            if name in GenerateBody.model_fields or name in ALIASES:
                raise PluginError(f"option '{name}' of model {generator.name} is a core request field")
            declared.setdefault(name, []).append((generator.name, field))
    fields: dict[str, Any] = {name: _option_field(owners) for name, owners in sorted(declared.items())}
    return create_model("GenerateBody", __base__=GenerateBody, **fields)


def _option_field(owners: Sequence[tuple[str, FieldInfo]]) -> tuple[Any, FieldInfo]:
    """One option field of the body, never required: the models that do not declare it ignore it."""
    models = ", ".join(model for model, _ in owners)
    shapes = [(field.annotation, [item for item in field.metadata if not isinstance(item, _VALIDATORS)]) for _, field in owners]
    if any(shape != shapes[0] for shape in shapes[1:]):
        return Any, Field(None, description=f"Option of {models}, each with its own values")
    annotation, constraints = shapes[0]
    first = owners[0][1]
    description = f"Option of {models}: {first.description}" if first.description else f"Option of {models}"
    typed = Annotated[annotation, *constraints] if constraints else annotation
    return typed, Field(None, description=description, examples=first.examples)


# For the OpenAPI document: the app's body, with its generators' options.
GENERATE_BODY = FromApp(lambda app: app[generate_body_key])


class LoadModelBody(BaseModel):
    """POST /load_model (seed 003)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]


def _json_object(raw: Any) -> dict[str, Any]:
    """400 unless the body is a JSON object."""
    if not isinstance(raw, dict):
        raise validation_error([{"loc": ["body"], "msg": "must be a JSON object"}])
    return raw


def parse_body(model: type[Body], raw: Any, *, found: Sequence[Mapping[str, Any]] = ()) -> Body:
    """`raw` (a JSON value) as `model`, or 400 with one `{"loc", "msg"}` per bad field.

    `found` are errors the caller already found in the same body; they are answered
    together with the fields' own, so a client learns everything in one round.
    """
    fields = _json_object(raw)
    try:
        parsed = model.model_validate(fields)
    except ValidationError as error:
        raise validation_error([*found, *pydantic_errors(error)]) from None
    if found:
        raise validation_error(found)
    return parsed


def pydantic_errors(error: ValidationError, where: str = "body") -> list[dict[str, Any]]:
    """`{"loc", "msg"}` per field, `loc` under `where` ("body", "query"); the rejected value is never echoed."""
    return [{"loc": [where, *entry["loc"]], "msg": _message(entry)} for entry in error.errors(include_url=False)]


def _message(entry: Mapping[str, Any]) -> str:
    """A validator's own words: pydantic prefixes what one raised with "Value error, " or "Assertion failed, "."""
    raised = entry.get("ctx", {}).get("error")
    if entry["type"] in ("value_error", "assertion_error") and raised is not None and str(raised):
        return str(raised)
    return str(entry["msg"])


# Deeper than any body this contract defines; far below where the decoder or
# anything that walks the result (validation, logging) would recurse too deep.
MAX_JSON_DEPTH = 32


async def read_json(request: web.Request, *, items: bool = False) -> Any:
    """The body as JSON, refused with 400 unless it is one plain, shallow JSON document.

    With `items` the body is a list whose elements are judged one by one (a
    batch): text holding NUL fails only its own element (`refuse_nul`).
    413 is aiohttp's (`client_max_size`); a body that stalls gets 408 after
    `server.body_timeout_s`.
    """
    if request.content_type != "application/json":
        raise validation_error([{"loc": ["header", "Content-Type"], "msg": "must be application/json"}])
    raw = await read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise validation_error([{"loc": ["body"], "msg": "malformed JSON: not UTF-8"}]) from None
    try:
        document = json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_non_finite)
    except _DuplicateKey as duplicate:
        raise validation_error([{"loc": ["body", duplicate.key], "msg": "appears more than once"}]) from None
    except json.JSONDecodeError as error:
        raise validation_error([{"loc": ["body"], "msg": f"malformed JSON: {error}"}]) from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        # int() refuses numbers of more than sys.get_int_max_str_digits() digits.
        raise validation_error([{"loc": ["body"], "msg": "malformed JSON: a number is too long"}]) from None
    if _depth(document) > MAX_JSON_DEPTH:
        raise _too_deep()
    if not (items and isinstance(document, list)):
        # Only the escape \u0000 decodes to NUL (JSON refuses raw control characters): look closer only then.
        if "\\u0000" in text:
            refuse_nul(document)
        if "NaN" in text or "Infinity" in text:
            where = _location(document, lambda value: value is NON_FINITE)
            if where is not None:
                raise validation_error([{"loc": ["body", *where], "msg": NON_FINITE_MESSAGE}])
    return document


# NaN and Infinity are not JSON, though Python reads them: they parse to this, and a field holding it
# is refused by name (in a batch, by its item's own validation).
NON_FINITE = object()
NON_FINITE_MESSAGE = "must be a finite number: NaN and Infinity are not JSON"


def _non_finite(name: str) -> object:
    return NON_FINITE


def refuse_nul(document: Any) -> None:
    """400 naming where a string or key of a JSON document holds NUL, if one does."""
    where = _location(document, lambda value: isinstance(value, str) and "\x00" in value, lambda key: "\x00" in key)
    if where is not None:
        raise validation_error([{"loc": ["body", *where], "msg": NUL_MESSAGE}])


# The codings aiohttp decodes a request body from (br and zstd through Brotli and backports.zstd).
DECODED_CODINGS = ("br", "deflate", "gzip", "identity", "zstd")


def refuse_undecoded_coding(request: web.Request) -> None:
    """400 unless the body comes in one coding that is decoded, or none: aiohttp hands on a body in any
    other coding (or in several, stacked) as it came, to be misread rather than refused."""
    codings = request.headers.getall(hdrs.CONTENT_ENCODING, [])
    if len(codings) > 1 or (codings and codings[0].lower() not in DECODED_CODINGS):
        message = f"must be one of {', '.join(DECODED_CODINGS)}, and only one"
        raise validation_error([{"loc": ["header", "Content-Encoding"], "msg": message}])


async def read_body(request: web.Request) -> bytes:
    """The whole body, or 408 if it has not arrived within `server.body_timeout_s`, or 400 if it cannot be read."""
    refuse_undecoded_coding(request)
    timeout_s = request.app[settings_key].server.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408, "REQUEST_TIMEOUT", f"The request body did not arrive within {timeout_s:g} seconds"
        ) from None
    except UNREADABLE_BODY:
        raise unreadable_body() from None


# What aiohttp raises for a body it cannot take apart: a Content-Encoding that does not decode, a broken
# chunked encoding, a malformed multipart part header.
UNREADABLE_BODY = (RequestPayloadError, HttpProcessingError)


def unreadable_body() -> ApiError:
    return validation_error([{"loc": ["body"], "msg": "unreadable: its encoding or framing is malformed"}])


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A proxy or client library may read the first of two equal keys while we read the last."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _location(
    document: Any, bad: Callable[[Any], bool], bad_key: Callable[[str], bool] = lambda key: False
) -> list[str | int] | None:
    """Where the first value (or key) found bad sits in a JSON document, walked without recursion; None if nowhere."""
    pending: list[tuple[Any, list[str | int]]] = [(document, [])]
    while pending:
        value, where = pending.pop()
        if bad(value):
            return where
        if isinstance(value, dict):
            for key, child in value.items():
                if bad_key(key):
                    return [*where, key]
                pending.append((child, [*where, key]))
        elif isinstance(value, list):
            pending.extend((child, [*where, index]) for index, child in enumerate(value))
    return None


def _depth(document: Any) -> int:
    """Nesting depth, walked without recursion (the document may be hostile)."""
    deepest = 0
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep() -> ApiError:
    return validation_error([{"loc": ["body"], "msg": f"nested more than {MAX_JSON_DEPTH} levels deep"}])


def _merge_aliases(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Move seed aliases to their canonical fields; an alias may only repeat its field's value."""
    merged = dict(body)
    errors = []
    for alias, canonical in ALIASES.items():
        if alias not in merged:
            continue
        value = merged.pop(alias)
        if canonical in merged and merged[canonical] != value:
            errors.append(field_error(alias, f"conflicts with {canonical}; send one of them"))
        else:
            merged[canonical] = value
    return merged, errors


def parse_generate_body(body: Any, body_model: type[GenerateBody] = GenerateBody) -> GenerateBody:
    """`body_model` is the app's (`app[generate_body_key]`) wherever clients may send generators' options."""
    merged, errors = _merge_aliases(_json_object(body))
    parsed = parse_body(body_model, merged, found=errors)
    if parsed.img_size is not None:
        for name in ("width", "height"):
            if getattr(parsed, name) not in (None, parsed.img_size):
                errors.append(field_error(name, "conflicts with img_size, which sets width and height"))
    if parsed.init_image is None:
        errors.extend(field_error(name, "needs init_image") for name in IMAGE_FIELDS if name in parsed.model_fields_set)
    if errors:
        raise validation_error(errors)
    return parsed


def _options(body: GenerateBody, generator: Generator) -> tuple[Options | None, list[dict[str, Any]]]:
    """The body's fields that the generator's `Options` declare, validated by it; or None and the field errors.

    Fields other generators declare are ignored: seed 003's clients send
    their cloud backend's fields to every model.
    """
    sent = {name: getattr(body, name) for name in generator.Options.model_fields if name in body.model_fields_set}
    try:
        return generator.Options.model_validate(sent), []
    except ValidationError as error:
        return None, pydantic_errors(error)


def resolve_request(body: GenerateBody, generator: Generator, *, size: tuple[int, int] | None = None) -> GenerationRequest:
    """Fill in the model's defaults and check the values against its limits.

    `size` is the width and height an input image makes of the body's
    (`imagine.http.image_inputs.output_size`); the model's limits apply to it.
    """
    card = generator.card
    defaults, limits = card.defaults, card.limits
    if size is None:
        width = body.width or body.img_size or defaults.width
        height = body.height or body.img_size or defaults.height
    else:
        width, height = size
    steps = body.num_inference_steps if body.num_inference_steps is not None else defaults.steps
    guidance = body.guidance_scale if body.guidance_scale is not None else defaults.guidance
    scheduler = body.scheduler or defaults.scheduler
    # Image i uses seed + i, and each must be a seed a request may send, to remake that image alone.
    last_offset = body.num_images - 1
    seed = secrets.randbelow(MAX_SEED + 1 - last_offset) if body.seed in (None, -1) else body.seed

    errors = []
    if seed + last_offset > MAX_SEED:
        errors.append(field_error("seed", f"must be at most {MAX_SEED - last_offset} with {body.num_images} images: image i uses seed + i"))
    for name, value in (("width", width), ("height", height)):
        if not limits.min_size <= value <= limits.max_size:
            made = "" if size is None else f", and is {value} with init_image"
            errors.append(
                field_error(name, f"must be between {limits.min_size} and {limits.max_size} for {generator.name}{made}")
            )
    steps_field = "num_inference_steps"
    if limits.step_choices is not None:
        if steps not in limits.step_choices:
            choices = ", ".join(str(choice) for choice in limits.step_choices)
            errors.append(field_error(steps_field, f"{generator.name} has checkpoints for {choices} steps only"))
    elif not limits.min_steps <= steps <= limits.max_steps:
        errors.append(field_error(steps_field, f"must be between {limits.min_steps} and {limits.max_steps} for {generator.name}"))
    if guidance > limits.max_guidance:
        errors.append(field_error("guidance_scale", f"must be at most {limits.max_guidance:g} for {generator.name}"))
    if limits.schedulers and scheduler not in limits.schedulers:
        errors.append(field_error("scheduler", f"must be one of {', '.join(limits.schedulers)} for {generator.name}"))
    if body.loras and not card.takes_loras:
        errors.append(field_error("loras", f"{generator.name} does not take LoRAs"))
    if "loras" in body.model_fields_set:
        loras = tuple(LoraWeight(lora.name, lora.weight) for lora in body.loras)
    else:
        loras = defaults.loras
    options, option_errors = _options(body, generator)
    errors.extend(option_errors)
    if errors:
        raise validation_error(errors)
    assert options is not None  # no errors: the options validated

    request = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=generator.name,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        num_images=body.num_images,
        seed=seed,
        scheduler=scheduler,
        loras=loras,
        options=options,
    )
    errors = generator.validate(request)
    if errors:
        raise validation_error(errors)
    return generator.with_options(request)

