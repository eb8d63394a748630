"""AUTOMATIC1111's web API under `<base>/sdapi/v1/`, for the clients written against it.

txt2img and img2img run through the same front door, queue and gallery as
/generate; models, options, progress and interrupt are per caller (A1111 has
one of each for everybody). These routes also take HTTP Basic credentials
with the token as the password (A1111's `--api-auth`), and answer errors in
A1111's shape (see `imagine.http.sdapi_errors`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from aiohttp import web

from imagine.engine.work import Generated
from imagine.engine.jobs import preview_data_url
from imagine.errors import ApiError, validation_error
from imagine.http import sdapi_bodies
from imagine.http.app_keys import cluster_key, encode_pool_key, jobs_key, principal_key, registry_key, settings_key
from imagine.http.front_door import Admitted, admit
from imagine.http.query_params import query_values
from imagine.http.openapi import json_response, obj, operation, query_parameter
from imagine.http.png import SAMPLER_LABELS, parameters_text
from imagine.http.request_bodies import read_json
from imagine.http.sdapi_bodies import KARRAS, MODEL_OPTION, Img2ImgBody, Txt2ImgBody
from imagine.http.sdapi_choices import MemoryModelChoices, ModelChoices, RedisModelChoices
from imagine.http.sdapi_runs import Run, Runs
from imagine.http.views.generate import GENERATION_ERRORS
from imagine.security.tokens import Principal, basic_auth_allowed, requires

PREFIX = "/sdapi/v1"

runs_key = web.AppKey("sdapi_runs", Runs)
# The models callers chose (sd_model_checkpoint) when no shared queue holds them for every replica.
models_key = web.AppKey("sdapi_models", MemoryModelChoices)

A1111_ERROR = obj(
    {
        "error": {"type": "string", "description": "The contract's error code", "examples": ["VALIDATION_ERROR"]},
        "detail": {"type": "string"},
        "body": {"type": "object", "description": "The contract's error details, but the field errors"},
        "errors": {"type": "array", "items": obj({"loc": {"type": "array"}, "msg": {"type": "string"}})},
    },
    description="Every error on the /sdapi/ routes, in AUTOMATIC1111's shape (see imagine.http.sdapi_errors).",
)


def a1111_error(description: str) -> dict[str, Any]:
    return json_response(description, A1111_ERROR)


A1111_ERRORS: dict[Any, dict[str, Any]] = {
    401: a1111_error("Missing or invalid token, as a bearer token or as the Basic password"),
    403: a1111_error("The token lacks the scope, or the model"),
    429: a1111_error("A rate-limit bucket is empty (with `Retry-After`)"),
    "default": a1111_error("Any other error"),
}
GENERATING_ERRORS: dict[Any, dict[str, Any]] = {
    **{status: a1111_error(answer["description"]) for status, answer in GENERATION_ERRORS.items() if status != 406},
    400: a1111_error("Invalid body, or a field that would change the image and is not supported (named in `errors`)"),
    **A1111_ERRORS,
}
IMAGES = obj(
    {
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
        "parameters": {"type": "object", "description": "The request as received (input images left out)"},
        "info": {"type": "string", "contentMediaType": "application/json", "description": "A1111's info JSON"},
    }
)
REFUSED_TEXT = ", ".join(sorted(sdapi_bodies.REFUSED))


# ---- generating -----------------------------------------------------------------


def _model_choices(app: web.Application) -> ModelChoices:
    cluster = app.get(cluster_key)
    return RedisModelChoices(cluster.client) if cluster is not None else app[models_key]


async def _chosen_model(app: web.Application, principal: Principal, body: sdapi_bodies._SharedFields) -> str | None:
    overridden = (body.override_settings or {}).get(MODEL_OPTION)
    if overridden is not None:
        return sdapi_bodies.model_name(overridden, "override_settings")
    return await _model_choices(app).get(principal.sub)


async def _admit(request: web.Request, body: sdapi_bodies._SharedFields) -> Admitted:
    app, principal = request.app, request[principal_key]
    try:
        generator = app[registry_key].resolve(await _chosen_model(app, principal, body))
        scheduler = sdapi_bodies.scheduler_for(body, generator)
        return await admit(app, principal, sdapi_bodies.generate_fields(body, generator.name, scheduler))
    except ApiError as error:
        raise sdapi_bodies.in_a1111_terms(error) from None


async def _run(request: web.Request, admitted: Admitted) -> Generated | None:
    """The images, kept in the caller's gallery; None when the caller interrupted the run."""
    app, principal = request.app, request[principal_key]
    wanted = admitted.request
    run = Run(principal.sub, wanted.steps, wanted.num_images)
    # Through the job store, as every generating route: quotas are charged there, and with a shared
    # queue the device that runs it, on whichever replica, reports its steps and previews back here.
    work = await app[jobs_key].submit_generation(principal, wanted, admitted.generator, store=True, observer=run)
    run.task = asyncio.ensure_future(work)
    runs = app[runs_key]
    runs.add(run)
    try:
        return await run.task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if run.interrupted and not (current is not None and current.cancelling()):
            return None
        raise
    finally:
        runs.remove(run)


def _info(admitted: Admitted, generated: Generated | None, interrupted: bool) -> dict[str, Any]:
    """What A1111's `info` JSON says of a generation (its `Processed.js()`)."""
    wanted = admitted.request
    seeds = generated.output.seeds if generated is not None else wanted.seeds
    image = wanted.image
    return {
        "prompt": wanted.prompt,
        "all_prompts": [wanted.prompt] * len(seeds),
        "negative_prompt": wanted.negative_prompt,
        "all_negative_prompts": [wanted.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": wanted.width,
        "height": wanted.height,
        "sampler_name": SAMPLER_LABELS.get(wanted.scheduler, wanted.scheduler),
        "cfg_scale": wanted.guidance,
        "steps": wanted.steps,
        "batch_size": wanted.num_images,
        "restore_faces": False,
        "sd_model_name": wanted.model,
        "sd_model_hash": None,
        "denoising_strength": image.strength if image is not None else 0,
        "extra_generation_params": {"Lora": {lora.name: lora.weight for lora in wanted.loras}} if wanted.loras else {},
        "index_of_first_image": 0,
        "infotexts": [parameters_text(wanted, seed) for seed in seeds],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": image is not None and image.mask is not None,
        # Ours: the images' gallery ids, and whether the caller interrupted the run (then no images).
        "image_ids": generated.ids if generated is not None else [],
        "interrupted": interrupted,
    }


async def _answer(request: web.Request, raw: dict[str, Any], body: sdapi_bodies._SharedFields) -> web.Response:
    admitted = await _admit(request, body)
    generated = await _run(request, admitted)
    images: list[str] = []
    if generated is not None and body.send_images:
        pngs = generated.pngs
        images = await asyncio.get_running_loop().run_in_executor(
            request.app[encode_pool_key], lambda: [base64.b64encode(png).decode("ascii") for png in pngs]
        )
    parameters = dict(raw)
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    info = _info(admitted, generated, interrupted=generated is None)
    return web.json_response({"images": images, "parameters": parameters, "info": json.dumps(info)})


@basic_auth_allowed
@requires("generate")
@operation(
    "Text to image, AUTOMATIC1111's API",
    tags=["a1111"],
    description="A1111's txt2img body: `prompt` (with `(word:1.3)` weights and `<lora:name:weight>` tags), "
    "`negative_prompt`, `seed`, `sampler_name` and `scheduler` (`automatic` or `karras`), `batch_size` x `n_iter` "
    "images (at most 4), `steps`, `cfg_scale`, `width`, `height`, `override_settings` (`sd_model_checkpoint`). "
    "Omitted sizes and steps are the model's defaults. Refused unless off, as they would change the image: "
    f"{REFUSED_TEXT}. Other fields are ignored. Images are kept in the caller's gallery.",
    body=Txt2ImgBody,
    responses={200: json_response("The images as base64 PNG, the request, and `info`", IMAGES), **GENERATING_ERRORS},
)
async def txt2img(request: web.Request) -> web.Response:
    raw = await read_json(request)
    return await _answer(request, raw, sdapi_bodies.parse(Txt2ImgBody, raw))


@basic_auth_allowed
@requires("generate")
@operation(
    "Image to image and inpainting, AUTOMATIC1111's API",
    tags=["a1111"],
    description="txt2img's fields, plus `init_images` (one base64 image), `mask` (white = repaint), "
    "`denoising_strength`, `mask_blur`, `resize_mode` (0 resize, 1 crop, 2 fill, 3 resize) and "
    "`include_init_images`. `inpainting_fill` 0 and 1 both start from the image; `inpaint_full_res` is ignored.",
    body=Img2ImgBody,
    responses={200: json_response("The images as base64 PNG, the request, and `info`", IMAGES), **GENERATING_ERRORS},
)
async def img2img(request: web.Request) -> web.Response:
    raw = await read_json(request)
    return await _answer(request, raw, sdapi_bodies.parse(Img2ImgBody, raw))


# ---- progress and interrupt --------------------------------------------------------

SKIP_CURRENT_IMAGE = "skip_current_image"


def _flag(request: web.Request, name: str) -> bool:
    value = query_values(request, (name,)).get(name, "false").lower()
    if value not in ("true", "false"):
        raise validation_error([{"loc": ["query", name], "msg": "must be true or false"}])
    return value == "true"


PROGRESS = obj(
    {
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "eta_relative": {"type": "number"},
        "state": obj(
            {
                "skipped": {"type": "boolean"},
                "interrupted": {"type": "boolean"},
                "job": {"type": "string"},
                "job_count": {"type": "integer"},
                "job_timestamp": {"type": "string"},
                "job_no": {"type": "integer"},
                "sampling_step": {"type": "integer"},
                "sampling_steps": {"type": "integer"},
            }
        ),
        "current_image": {"type": ["string", "null"], "contentEncoding": "base64"},
        "textinfo": {"type": ["string", "null"]},
    }
)


@basic_auth_allowed
@requires("generate")
@operation(
    "The caller's own generation in progress, AUTOMATIC1111's API",
    tags=["a1111"],
    description="The caller's most recent running txt2img/img2img call (else its most recent queued one): step, "
    "total, an estimate of the time left and, unless `skip_current_image=true`, a low-resolution preview as "
    "base64 PNG. Idle: progress 0 and no image.",
    parameters=[query_parameter(SKIP_CURRENT_IMAGE, "Leave the preview out", {"type": "boolean", "default": False})],
    responses={200: json_response("Progress", PROGRESS), 400: a1111_error("A bad query parameter"), **A1111_ERRORS},
)
async def progress(request: web.Request) -> web.Response:
    skip_image = _flag(request, SKIP_CURRENT_IMAGE)
    principal = request[principal_key]
    runs = request.app[runs_key]
    run = runs.current(principal.sub)
    if run is None:
        return web.json_response(_progress(0.0, 0.0, 0, 0, 0, None, None))
    image = None
    if run.preview is not None and not skip_image:
        # A latent-sized picture: cheap enough to encode here.
        image = preview_data_url(run.preview).partition(",")[2]
    textinfo = None if run.started_at is not None else f"Waiting in the queue at position {run.position}"
    job_count = len(runs.of(principal.sub))
    return web.json_response(_progress(run.fraction, run.eta_s(), job_count, run.step, run.total_steps, image, textinfo))


def _progress(
    fraction: float, eta_s: float, job_count: int, step: int, total: int, image: str | None, textinfo: str | None
) -> dict[str, Any]:
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(eta_s, 3),
        "state": {
            "skipped": False,
            "interrupted": False,
            "job": "",
            "job_count": job_count,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": image,
        "textinfo": textinfo,
    }


@basic_auth_allowed
@requires("generate")
@operation(
    "Interrupt the caller's own running generation, AUTOMATIC1111's API",
    tags=["a1111"],
    description="Stops the caller's running txt2img/img2img calls at their next step (their answer has no images "
    "and `info.interrupted` true); queued ones and other callers' run on.",
    responses={200: json_response("Done", {"type": "object"}), **A1111_ERRORS},
)
async def interrupt(request: web.Request) -> web.Response:
    request.app[runs_key].interrupt(request[principal_key].sub)
    return web.json_response({})


# ---- models, options, samplers, LoRAs --------------------------------------------------


async def _current_model(request: web.Request) -> str:
    app = request.app
    chosen = await _model_choices(app).get(request[principal_key].sub)
    return app[registry_key].resolve(chosen).name


SD_MODEL = obj(
    {
        "title": {"type": "string"},
        "model_name": {"type": "string"},
        "hash": {"type": ["string", "null"]},
        "sha256": {"type": ["string", "null"]},
        "filename": {"type": "string"},
        "config": {"type": ["string", "null"]},
    }
)


@basic_auth_allowed
@operation(
    "The models, as AUTOMATIC1111's checkpoints",
    tags=["a1111"],
    description="Every model the token may use; `title` is what `sd_model_checkpoint` takes.",
    responses={200: json_response("The models", {"type": "array", "items": SD_MODEL}), **A1111_ERRORS},
)
async def sd_models(request: web.Request) -> web.Response:
    principal = request[principal_key]
    names = [name for name in request.app[registry_key].names if principal.may_use(name)]
    return web.json_response(
        [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None} for name in names]
    )


OPTIONS = obj(
    {MODEL_OPTION: {"type": "string"}},
    required=[],
    additionalProperties=True,
    description="A1111's options: sd_model_checkpoint chooses the caller's model; options that would change the "
    f"image are refused unless at their default ({', '.join(sdapi_bodies.REFUSED_OPTIONS)}); others are ignored.",
)


@basic_auth_allowed
@operation(
    "The caller's options, AUTOMATIC1111's API",
    tags=["a1111"],
    responses={200: json_response("The options in effect for this caller", OPTIONS), **A1111_ERRORS},
)
async def get_options(request: web.Request) -> web.Response:
    return web.json_response(
        {
            MODEL_OPTION: await _current_model(request),
            "sd_checkpoint_hash": None,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "samples_format": "png",
            "live_previews_enable": True,
            "show_progress_every_n_steps": request.app[settings_key].jobs.preview_every,
        }
    )


@basic_auth_allowed
@requires("generate")
@operation(
    "Set the caller's options, AUTOMATIC1111's API",
    tags=["a1111"],
    description="Per caller, never global: `sd_model_checkpoint` is the model this caller's txt2img and img2img use "
    "from now on.",
    body=OPTIONS,
    responses={
        200: json_response("Set", {"type": "null"}),
        400: a1111_error("Not an object, or an option that would change the image"),
        404: a1111_error("Unknown model"),
        **A1111_ERRORS,
    },
)
async def set_options(request: web.Request) -> web.Response:
    app, principal = request.app, request[principal_key]
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise validation_error([{"loc": ["body"], "msg": "must be a JSON object"}])
    errors = sdapi_bodies.refusals(raw, sdapi_bodies.REFUSED_OPTIONS)
    if errors:
        raise validation_error(errors)
    if MODEL_OPTION in raw:
        generator = app[registry_key].resolve(sdapi_bodies.model_name(raw[MODEL_OPTION]))
        if not principal.may_use(generator.name):
            raise ApiError(403, "FORBIDDEN", f"This token may not use model '{generator.name}'")
        await _model_choices(app).set(principal.sub, generator.name)
    return web.json_response(None)


SAMPLER = obj({"name": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}}, "options": {"type": "object"}})


@basic_auth_allowed
@operation(
    "The samplers of the caller's model, by AUTOMATIC1111's names",
    tags=["a1111"],
    responses={200: json_response("The samplers", {"type": "array", "items": SAMPLER}), **A1111_ERRORS},
)
async def samplers(request: web.Request) -> web.Response:
    offered = request.app[registry_key].resolve(await _current_model(request)).card.limits.schedulers
    return web.json_response(
        [{"name": SAMPLER_LABELS.get(name, name), "aliases": [name], "options": {}} for name in offered]
    )


SCHEDULE = obj(
    {
        "name": {"type": "string"},
        "label": {"type": "string"},
        "aliases": {"type": ["array", "null"]},
        "default_rho": {"type": "number"},
        "need_inner_model": {"type": "boolean"},
    }
)


@basic_auth_allowed
@operation(
    "The schedule types of the caller's model, AUTOMATIC1111's API",
    tags=["a1111"],
    description="`automatic` (each sampler's own), and `karras` where the model offers a Karras variant of a sampler.",
    responses={200: json_response("The schedule types", {"type": "array", "items": SCHEDULE}), **A1111_ERRORS},
)
async def schedulers(request: web.Request) -> web.Response:
    offered = request.app[registry_key].resolve(await _current_model(request)).card.limits.schedulers
    types = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    if any(name.endswith("_" + KARRAS) for name in offered):
        types.append({"name": KARRAS, "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False})
    return web.json_response(types)


LORA = obj({"name": {"type": "string"}, "alias": {"type": "string"}, "path": {"type": "string"}, "metadata": {"type": "object"}})


@basic_auth_allowed
@operation(
    "The LoRAs on offer, AUTOMATIC1111's API",
    tags=["a1111"],
    description="The LoRA folder's files, for `<lora:name:weight>` tags (models that take LoRAs only); `path` is the "
    "file name alone.",
    responses={200: json_response("The LoRAs", {"type": "array", "items": LORA}), **A1111_ERRORS},
)
async def loras(request: web.Request) -> web.Response:
    names: set[str] = set()
    for generator in request.app[registry_key].generators():
        if generator.card.takes_loras:
            names.update(generator.listing().get("loras", []))
    return web.json_response(
        [{"name": name, "alias": name, "path": f"{name}.safetensors", "metadata": {}} for name in sorted(names)]
    )


# What clients probe at start, for features this service does not have: honest empty answers.
EMPTY_LISTS = ("upscalers", "sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "latent-upscale-modes", "script-info")
EMPTY_ANSWERS: dict[str, Any] = {
    "embeddings": {"loaded": {}, "skipped": {}},
    "cmd-flags": {},
    "scripts": {"txt2img": [], "img2img": []},
}


def _empty(answer: Any, what: str) -> Any:
    @basic_auth_allowed
    @operation(
        f"{what}: none here, AUTOMATIC1111's API",
        tags=["a1111"],
        description="Answered so that clients that ask at start-up work; this service has none.",
        responses={200: json_response("Nothing", {"type": "array" if isinstance(answer, list) else "object"}), **A1111_ERRORS},
    )
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(answer)

    return handler


def _refresh(what: str) -> Any:
    @basic_auth_allowed
    @operation(
        f"Refresh {what}, AUTOMATIC1111's API",
        tags=["a1111"],
        description="Nothing to do: models and LoRAs are listed as they are whenever asked.",
        responses={200: json_response("Done", {"type": "null"}), **A1111_ERRORS},
    )
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(None)

    return handler


def routes(base: str) -> list[web.RouteDef]:
    root = base + PREFIX
    return [
        web.post(root + "/txt2img", txt2img),
        web.post(root + "/img2img", img2img),
        web.get(root + "/progress", progress),
        web.post(root + "/interrupt", interrupt),
        web.get(root + "/sd-models", sd_models),
        web.get(root + "/options", get_options),
        web.post(root + "/options", set_options),
        web.get(root + "/samplers", samplers),
        web.get(root + "/schedulers", schedulers),
        web.get(root + "/loras", loras),
        *(web.get(f"{root}/{name}", _empty([], name)) for name in EMPTY_LISTS),
        *(web.get(f"{root}/{name}", _empty(answer, name)) for name, answer in EMPTY_ANSWERS.items()),
        web.post(root + "/refresh-checkpoints", _refresh("checkpoints")),
        web.post(root + "/refresh-loras", _refresh("LoRAs")),
    ]


def setup(app: web.Application) -> None:
    """The per-app state these routes keep: runs in flight, the models callers chose."""
    app[runs_key] = Runs()
    app[models_key] = MemoryModelChoices()
