"""AUTOMATIC1111's txt2img/img2img bodies and options as /generate fields, and its names for ours.

A1111 clients send every field their library knows, most at harmless
defaults. A field that would change the image and has no counterpart here
(hires fix, refiner, scripts, face restoration, tiling, variation seeds...)
is refused with 400 naming it unless it carries its "off" value; anything
else unknown is ignored, as A1111 itself ignores unknown fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagine.errors import ApiError, field_error, renamed_fields, validation_error
from imagine.http.png import SAMPLER_LABELS
from imagine.http.request_bodies import pydantic_errors
from imagine.plugin.generators import Generator

# /generate's fields as A1111 names them, for error messages.
A1111_FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "init_image": "init_images",
    "mask_image": "mask",
    "strength": "denoising_strength",
    "scheduler": "sampler_name",
    "model": "sd_model_checkpoint",
}
# A1111's resize_mode numbers: just resize, crop and resize, resize and fill, latent upscale (a plain resize here).
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}
# The old k-diffusion aliases clients still send.
SAMPLER_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_lms": "lms",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_sde": "dpmpp_sde",
}
# A1111's schedule types (its `scheduler` field, 1.9 and later) we offer: automatic = the sampler's own.
KARRAS = "karras"
SCHEDULE_TYPES = ("automatic", KARRAS)


def _off(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in (None, *values)


# Fields that change the image and are not supported: harmless only at these values.
REFUSED: Mapping[str, tuple[str, Callable[[Any], bool]]] = {
    "enable_hr": ("hires fix is not supported", _off(False)),
    "refiner_checkpoint": ("the refiner is not supported", _off("", "None")),
    "script_name": ("scripts are not supported", _off("", "None")),
    "alwayson_scripts": ("scripts (ControlNet, ADetailer...) are not supported", lambda value: not value),
    "styles": ("prompt styles are not supported", lambda value: not value),
    "restore_faces": ("face restoration is not supported", _off(False)),
    "tiling": ("tiling is not supported", _off(False)),
    "subseed_strength": ("variation seeds are not supported", _off(0)),
    "seed_resize_from_h": ("seed resizing is not supported", _off(0, -1)),
    "seed_resize_from_w": ("seed resizing is not supported", _off(0, -1)),
    "s_churn": ("sampler noise settings are not supported", _off(0)),
    "s_tmin": ("sampler noise settings are not supported", _off(0)),
    "s_noise": ("sampler noise settings are not supported", _off(1)),
    "initial_noise_multiplier": ("the initial noise multiplier is not supported", _off(1)),
    "inpainting_mask_invert": ("inverted masks are not supported: send the mask inverted", _off(0, False)),
    # 0 (fill) and 1 (original) both start from the input image here; latent noise and nothing are not offered.
    "inpainting_fill": ("only inpainting_fill 0 or 1 (start from the image) is supported", _off(0, 1)),
    "latent_mask": ("a separate latent mask is not supported", _off("")),
    "infotext": ("settings from infotext are not supported", _off("")),
    "disable_extra_networks": ("disabling <lora:...> tags is not supported: set models.prompt_syntax", _off(False)),
}
# Options (POST /options, override_settings) that change the image: harmless only at these values.
REFUSED_OPTIONS: Mapping[str, tuple[str, Callable[[Any], bool]]] = {
    "CLIP_stop_at_last_layers": ("clip skip is not supported", _off(1)),
    "eta_noise_seed_delta": ("a noise seed delta is not supported", _off(0)),
    "sd_vae": ("choosing a VAE is not supported", _off("Automatic", "None", "")),
}
MODEL_OPTION = "sd_model_checkpoint"
# A1111's checkpoint titles end in a short hash: "name.safetensors [6ce0161689]".
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


class _SharedFields(BaseModel):
    """The fields that map onto /generate's, as A1111 names them; unknown ones are ignored (A1111 ignores them)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    # batch_size x n_iter images in all, at most /generate's num_images (4); seeds run on as in A1111.
    batch_size: int = Field(1, ge=1, le=4)
    n_iter: int = Field(1, ge=1, le=4)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


class Txt2ImgBody(_SharedFields):
    pass


class Img2ImgBody(_SharedFields):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    denoising_strength: float | None = None
    mask_blur: int | None = None
    resize_mode: int = Field(0, ge=0, le=3)
    include_init_images: bool = False


def parse(model: type[_SharedFields], raw: Any) -> _SharedFields:
    """The body as `model`, or 400 naming every refused or malformed field at once."""
    if not isinstance(raw, dict):
        raise validation_error([{"loc": ["body"], "msg": "must be a JSON object"}])
    errors = refusals(raw, REFUSED)
    errors.extend(refusals(raw.get("override_settings") or {}, REFUSED_OPTIONS, "override_settings"))
    try:
        parsed = model.model_validate(raw)
    except ValidationError as error:
        raise validation_error([*errors, *pydantic_errors(error)]) from None
    if errors:
        raise validation_error(errors)
    return parsed


def refusals(fields: Mapping[str, Any], refused: Mapping[str, tuple[str, Callable[[Any], bool]]], *within: str) -> list[dict[str, Any]]:
    if not isinstance(fields, Mapping):
        return []
    return [
        {"loc": ["body", *within, name], "msg": f"{why} ({name} = {_shown(repr(fields[name]))})"}
        for name, (why, harmless) in refused.items()
        if name in fields and not harmless(fields[name])
    ]


# The most of a refused value an error shows: enough to recognise it, never the whole of a hostile one.
_SHOWN_CHARACTERS = 60


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARACTERS else text[:_SHOWN_CHARACTERS] + "…"


def model_name(value: Any, *within: str) -> str:
    """A checkpoint as A1111 clients name it: our model name, maybe with a title's hash after it.
    `within`: where the option sits in the body (`override_settings`), for the error's `loc`."""
    if not isinstance(value, str) or not value.strip():
        raise validation_error([{"loc": ["body", *within, MODEL_OPTION], "msg": "must be a model name from /sdapi/v1/sd-models"}])
    return _TITLE_HASH.sub("", value.strip())


def scheduler_for(body: _SharedFields, generator: Generator) -> str | None:
    """Our scheduler for A1111's sampler name and schedule type; None: the model's default."""
    sampler = body.sampler_name or body.sampler_index
    schedule = (body.scheduler or "automatic").lower()
    if schedule not in SCHEDULE_TYPES:
        raise validation_error([field_error("scheduler", f"must be one of {', '.join(SCHEDULE_TYPES)}")])
    offered = generator.card.limits.schedulers
    if not sampler:
        return None
    by_label = {label.lower(): name for name, label in SAMPLER_LABELS.items()}
    name = by_label.get(sampler.lower()) or SAMPLER_ALIASES.get(sampler.lower()) or sampler.lower()
    if schedule == KARRAS and not name.endswith("_" + KARRAS):
        name = f"{name}_{KARRAS}"
    if name not in offered:
        labels = ", ".join(SAMPLER_LABELS.get(each, each) for each in offered)
        shown = _shown(sampler) if schedule != KARRAS else f"{_shown(sampler)} with the Karras schedule"
        raise validation_error([field_error("sampler_name", f"{shown} is not offered by {generator.name}; offered: {labels}")])
    return name


def generate_fields(body: _SharedFields, model: str, scheduler: str | None) -> dict[str, Any]:
    """The /generate body for an A1111 body, once its model and scheduler are known."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "model": model,
        "num_images": body.batch_size * body.n_iter,
        "seed": body.seed if body.seed >= 0 else -1,
    }
    for ours, value in (
        ("width", body.width),
        ("height", body.height),
        ("num_inference_steps", body.steps),
        ("guidance_scale", body.cfg_scale),
        ("scheduler", scheduler),
    ):
        if value is not None:
            fields[ours] = value
    if isinstance(body, Img2ImgBody):
        fields["init_image"] = body.init_images[0]
        fields["resize_mode"] = RESIZE_MODES[body.resize_mode]
        for ours, value in (("mask_image", body.mask), ("strength", body.denoising_strength), ("mask_blur", body.mask_blur)):
            if value is not None:
                fields[ours] = value
    return fields


def in_a1111_terms(error: ApiError) -> ApiError:
    """Rename /generate's field names in a validation error to the ones an A1111 client sent."""
    return renamed_fields(error, A1111_FIELDS)
