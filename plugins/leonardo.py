"""leonardo: Leonardo.ai's REST API v1 as a cloud generator, on the event loop.

One job: POST /generations, poll GET /generations/{id} with backoff until it is
COMPLETE or FAILED, download the JPEGs from Leonardo's CDN and hand back
images that imagine encodes as PNG like any other generator's. The job's
deadline is the caller's (`imagine.http.generation` cancels us); the API key is read at
every job, sent only to Leonardo's API (never to the CDN), and scrubbed from
anything Leonardo says back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator

from imagine.security.cloud_api_keys import KeySpec
from imagine.errors import ApiError, field_error
from imagine.plugin.generators import (
    CloudGenerator,
    GenerationRequest,
    Generator,
    ModelCard,
    ModelDefaults,
    ModelLimits,
    Options,
    RemoteImages,
)
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings, SettingsError
from imagine_plugins import leonardo_catalog as catalog

log = logging.getLogger(__name__)

NAME = "leonardo"
# The [leonardo] section of the configuration, and IMAGINE_LEONARDO_* variables.
SECTION = "leonardo"

KEY_SERVICE = "leonardo-api"
KEY_ENV = "LEONARDO_API_KEY"
KEY_FILE_NAME = "leonardo-api-key"
ERROR_CODE = "LEONARDO_API_ERROR"
# A CDN image larger than this is not an image we asked for.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
# However long Leonardo asks us to wait after a 429, the job's deadline bounds it; so does this.
MAX_RETRY_WAIT_S = 60.0
# Upstream messages are quoted to the client, but not at any length.
MAX_API_ERROR_CHARS = 300
_GENERATION_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")

CARD = ModelCard(
    description="Leonardo.ai cloud generation (Phoenix, Lightning XL, Kino XL...): size by aspect ratio, preset styles",
    defaults=ModelDefaults(steps=15, guidance=7.0, width=1024, height=1024, scheduler="leonardo"),
    limits=ModelLimits(min_size=256, max_size=1536, min_steps=10, max_steps=60, schedulers=("leonardo",)),
    vram_required="none (cloud)",
    aliases=("leonardo-api",),
    prompt_guide=(
        "Leonardo.ai's models follow natural language well: two or three descriptive sentences naming the subject, "
        "composition, style, lighting and mood (under 80 words); its preset styles set the overall look."
    ),
)

NO_KEY_MESSAGE = (
    f"No Leonardo.ai API key is configured: set one with POST /api-key "
    f'{{"service": "{KEY_SERVICE}", "api_key": "..."}} (admin scope) or the {KEY_ENV} environment variable'
)
SET_KEY_SUGGESTION = f'Set a valid key with POST /api-key {{"service": "{KEY_SERVICE}"}} (admin) or {KEY_ENV}'


@dataclass(frozen=True)
class _Reply:
    """One HTTP answer from Leonardo's API; status 0 when it could not be reached."""

    status: int
    body: Any
    retry_after: str | None = None
    failure: str = ""  # why it could not be reached


@dataclass(frozen=True)
class LeonardoTable:
    """`[models.leonardo]`: nothing to set there (the backend's settings are `[leonardo]`), so any key is a mistake."""


@dataclass(frozen=True)
class LeonardoSettings:
    base_url: str = "https://cloud.leonardo.ai/api/rest/v1"
    # Generations in flight at once: Leonardo's own limit for an API key.
    max_concurrent: int = 10
    # A name from the model table (see GET /models) or a Leonardo model UUID.
    default_model: str = "phoenix-1-0"
    # Where a key set through POST /api-key is kept; default <server.state_dir>/leonardo-api-key.
    key_file: str = ""
    # Polling starts at poll_interval_s and backs off to poll_max_interval_s.
    poll_interval_s: float = 2.0
    poll_max_interval_s: float = 10.0
    # Limit for one HTTP call; the whole job is bounded by queue.timeout_s.
    request_timeout_s: float = 30.0
    # Retries after a 429 (or a failed poll), waiting retry_base_s * 2^attempt unless told otherwise.
    max_retries: int = 3
    retry_base_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("https://", "http://")):
            raise SettingsError("leonardo.base_url must be an http(s) URL")
        if self.max_concurrent < 1:
            raise SettingsError("leonardo.max_concurrent must be at least 1")
        if not 0 < self.poll_interval_s <= self.poll_max_interval_s:
            raise SettingsError("leonardo.poll_interval_s must be positive and at most leonardo.poll_max_interval_s")
        if self.request_timeout_s <= 0 or self.retry_base_s < 0 or self.max_retries < 0:
            raise SettingsError("leonardo.request_timeout_s must be positive, retry_base_s and max_retries not negative")


# Each option's lookup to its canonical value, and what a value it does not know is told.
_OPTION_LOOKUPS: dict[str, tuple[Callable[[str], str | None], str]] = {
    "leonardo_model": (catalog.model_key, f"must be a Leonardo model UUID or one of {', '.join(catalog.MODELS)}"),
    "aspect_ratio": (catalog.aspect_key, f"must be one of {', '.join(catalog.ASPECT_RATIOS)}"),
    "preset_style": (catalog.preset_key, f"must be one of {', '.join(catalog.PRESET_STYLES)}"),
    "quality": (catalog.quality_key, f"must be one of {', '.join(catalog.QUALITY_LEVELS)}"),
}


class LeonardoOptions(Options):
    """Seed 003's Leonardo fields; other models accept and ignore them, as its clients send them everywhere."""

    leonardo_model: str | None = Field(
        None, description="Leonardo's model: a name GET /models lists or a model UUID (default: leonardo.default_model)"
    )
    aspect_ratio: str | None = Field(None, description="One of GET /models' aspect ratios; sets width and height")
    preset_style: str | None = Field(None, description="One of GET /models' preset styles")
    quality: str | None = Field(None, description=f"One of {', '.join(catalog.QUALITY_LEVELS)} (default {catalog.DEFAULT_QUALITY})")

    @field_validator(*_OPTION_LOOKUPS)
    @classmethod
    def _canonical(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Seed 003's spellings ('phoenix-1.0', 'creative') as the catalog's keys."""
        if value is None:
            return None
        lookup, refusal = _OPTION_LOOKUPS[str(info.field_name)]
        key = lookup(value)
        if key is None:
            raise ValueError(refusal)
        return key


def _options(request: GenerationRequest) -> LeonardoOptions:
    options = request.options
    # The core validated them against LeonardoGenerator.Options.
    assert isinstance(options, LeonardoOptions)
    return options


def _fingerprint(key: str) -> str:
    # Remembering which key was refused without keeping another copy of it.
    return hashlib.sha256(key.encode()).hexdigest()


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class LeonardoGenerator(CloudGenerator):
    name = NAME
    card = CARD
    Options = LeonardoOptions

    def __init__(self, settings: LeonardoSettings, key_file: Path) -> None:
        default_model = catalog.model_key(settings.default_model)
        if default_model is None:
            raise SettingsError(
                f"leonardo.default_model must be a Leonardo model UUID or one of {', '.join(catalog.MODELS)}"
            )
        self.key_spec = KeySpec(KEY_SERVICE, KEY_ENV, key_file)
        self._settings = settings
        self._default_model = default_model
        self._base_url = settings.base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._session: aiohttp.ClientSession | None = None
        self._api_key: Callable[[], str | None] = lambda: None
        self._rejected_key: str | None = None  # fingerprint of the last key Leonardo refused
        self._deleting: set[asyncio.Task[None]] = set()  # generations given up, being deleted upstream

    # ---- lifecycle and state ------------------------------------------------

    async def start(self, session: aiohttp.ClientSession, api_key: Callable[[], str | None]) -> None:
        self._session = session
        self._api_key = api_key

    async def close(self) -> None:
        if self._deleting:
            await asyncio.gather(*self._deleting, return_exceptions=True)
        self._session = None

    @property
    def configured(self) -> bool:
        return self._session is not None and bool(self._api_key())

    def problem(self) -> str | None:
        key = self._api_key()
        if not key:
            return NO_KEY_MESSAGE
        if self._rejected_key == _fingerprint(key):
            return "Leonardo API key rejected"
        return None

    def runtime_info(self) -> dict[str, Any]:
        return {"device": "cloud", "dtype": None}

    def catalog(self) -> dict[str, Any]:
        return catalog.catalog(self._default_model)

    # ---- request fields ------------------------------------------------------

    def validate(self, request: GenerationRequest) -> list[dict[str, Any]]:
        # Leonardo takes guidance_scale as an integer from 1 to 20.
        if request.guidance < 1 or not request.guidance.is_integer():
            return [field_error("guidance_scale", "must be a whole number from 1 to 20 for leonardo")]
        return []

    def with_options(self, request: GenerationRequest) -> GenerationRequest:
        """The defaults filled in; an aspect ratio's size wins over width/height."""
        options = _options(request)
        filled = options.model_copy(
            update={
                "leonardo_model": options.leonardo_model or self._default_model,
                "quality": options.quality or catalog.DEFAULT_QUALITY,
            }
        )
        width, height = request.width, request.height
        if options.aspect_ratio is not None:
            ratio = catalog.ASPECT_RATIOS[options.aspect_ratio]
            width, height = ratio.width, ratio.height
        return dataclasses.replace(request, width=width, height=height, options=filled)

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        options = _options(request)
        assert options.leonardo_model is not None and options.quality is not None  # filled in by with_options
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "modelId": catalog.model_id(options.leonardo_model),
            "width": request.width,
            "height": request.height,
            "num_images": request.num_images,
            "alchemy": catalog.QUALITY_LEVELS[options.quality].alchemy,
            "seed": request.seed,
            "guidance_scale": int(request.guidance),
            "num_inference_steps": request.steps,
        }
        if request.negative_prompt:
            payload["negative_prompt"] = request.negative_prompt
        if options.preset_style is not None:
            payload["presetStyle"] = options.preset_style
        return payload

    # ---- one job ----------------------------------------------------------------

    async def generate_remote(self, request: GenerationRequest, started: Callable[[], None]) -> RemoteImages:
        key = self._api_key()
        if self._session is None or not key:
            raise ApiError(503, "SERVICE_UNAVAILABLE", NO_KEY_MESSAGE, details={"service": KEY_SERVICE})
        waiting_since = time.perf_counter()
        async with self._slots:  # Leonardo's own limit on generations in flight
            queue_time = time.perf_counter() - waiting_since
            started()
            generation_id, credits = await self._create(self._payload(request), key)
            try:
                generation = await self._wait_for(generation_id, key)
            except asyncio.CancelledError:
                # Cancelled, or past its deadline: nobody will fetch it, so it leaves the account's library too.
                self._delete_soon(generation_id, key)
                raise
        urls = [
            image["url"]
            for image in generation.get("generated_images") or []
            if isinstance(image, Mapping) and isinstance(image.get("url"), str)
        ]
        if not urls:
            raise self._error(
                f"generation {generation_id} is COMPLETE but lists no images",
                "Retry; if it persists, try another model or preset style",
            )
        images = await asyncio.gather(*(self._download(url) for url in urls))
        # One Leonardo generation draws all of its images from one seed.
        seed = generation.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else request.seed
        return RemoteImages(images=list(images), seeds=[seed] * len(images), queue_time=queue_time, credits=credits)

    async def _create(self, payload: dict[str, Any], key: str) -> tuple[str, float]:
        """The new generation's id, and the API credits Leonardo says it costs (0 when it does not say)."""
        attempt = 0
        while True:
            reply = await self._send("POST", "/generations", key, payload)
            if reply.status != 429 or attempt >= self._settings.max_retries:
                break
            await asyncio.sleep(self._retry_delay(attempt, reply.retry_after))
            attempt += 1
        if reply.status != 200:
            raise self._failure(reply, key)
        job = reply.body.get("sdGenerationJob") if isinstance(reply.body, Mapping) else None
        generation_id = job.get("generationId") if isinstance(job, Mapping) else None
        # The id goes into a URL path that carries our key: accept nothing but an id.
        if not isinstance(generation_id, str) or not _GENERATION_ID.match(generation_id):
            raise self._error("the answer to POST /generations has no valid sdGenerationJob.generationId", "Retry later")
        cost = job.get("apiCreditCost")
        credits = float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0 else 0.0
        log.info("leonardo generation %s queued (%s API credits)", generation_id, cost if cost is not None else "?")
        return generation_id, credits

    def _delete_soon(self, generation_id: str, key: str) -> None:
        """DELETE the generation in a task of its own: the caller's task is being cancelled."""

        async def delete() -> None:
            reply = await self._send("DELETE", f"/generations/{generation_id}", key)
            if reply.status == 200:
                log.info("leonardo generation %s deleted: its job was cancelled", generation_id)
            else:
                log.warning("leonardo generation %s could not be deleted (%s)", generation_id, reply.failure or reply.status)

        task = asyncio.create_task(delete())
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def _wait_for(self, generation_id: str, key: str) -> Mapping[str, Any]:
        """Poll with backoff; a few failed polls in a row are forgiven, the deadline is the caller's."""
        interval = self._settings.poll_interval_s
        failed_polls = 0
        while True:
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self._settings.poll_max_interval_s)
            reply = await self._send("GET", f"/generations/{generation_id}", key)
            if reply.status == 429 or reply.status == 0 or reply.status >= 500:
                failed_polls += 1
                if failed_polls > self._settings.max_retries:
                    raise self._failure(reply, key)
                continue
            if reply.status != 200:
                raise self._failure(reply, key)
            failed_polls = 0
            generation = reply.body.get("generations_by_pk") if isinstance(reply.body, Mapping) else None
            # Right after creation Leonardo may not show the generation yet: that is pending too.
            status = generation.get("status") if isinstance(generation, Mapping) else None
            log.debug("leonardo generation %s: %s", generation_id, status or "not visible yet")
            if status == "COMPLETE":
                assert isinstance(generation, Mapping)
                return generation
            if status == "FAILED":
                raise self._error(
                    f"generation {generation_id} FAILED",
                    "Leonardo.ai could not make this image (often its content filter): "
                    "try another prompt, model or preset style",
                )

    async def _download(self, url: str) -> Image.Image:
        if yarl.URL(url).scheme not in ("https", "http"):
            raise self._error("an image URL is not http(s)", "Retry later")
        assert self._session is not None
        try:
            # No authorization header: the CDN is not Leonardo's API and must never see the key.
            async with self._session.get(url, timeout=self._timeout) as response:
                if response.status != 200:
                    raise self._error(f"the image CDN answered HTTP {response.status}", "Retry later")
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > MAX_IMAGE_BYTES:
                        raise self._error("an image from the CDN is too large", "Retry later")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._error(
                f"the image CDN could not be reached ({type(error).__name__})", "Check this server's network access"
            ) from None
        try:
            return await asyncio.to_thread(_decode_image, bytes(data))
        except (OSError, Image.DecompressionBombError):
            raise self._error("an image from the CDN cannot be decoded", "Retry later") from None

    # ---- HTTP and failures -------------------------------------------------------

    async def _send(self, method: str, path: str, key: str, payload: dict[str, Any] | None = None) -> _Reply:
        assert self._session is not None
        headers = {"authorization": f"Bearer {key}", "accept": "application/json"}
        try:
            async with self._session.request(
                method, self._base_url + path, json=payload, headers=headers, timeout=self._timeout
            ) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:  # an HTML error page from a proxy, say
                    body = None
                reply = _Reply(response.status, body, response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as error:
            return _Reply(0, None, failure=f"{type(error).__name__} on {method} {path}")
        if reply.status == 200 and self._rejected_key == _fingerprint(key):
            self._rejected_key = None
        return reply

    def _retry_delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self._settings.retry_base_s * 2**attempt
        if retry_after is not None and retry_after.strip().isdigit():
            delay = float(retry_after.strip())
        return min(delay, MAX_RETRY_WAIT_S)

    def _error(self, api_error: str, suggestion: str, *, details: Mapping[str, Any] | None = None) -> ApiError:
        log.warning("leonardo request failed: %s", api_error)
        return ApiError(
            502,
            ERROR_CODE,
            f"Leonardo.ai generation failed: {api_error}",
            details={"api_error": api_error, "suggestion": suggestion, **(details or {})},
        )

    def _failure(self, reply: _Reply, key: str) -> ApiError:
        """Leonardo's `{"error", "path", "code"}` answers (or none at all) as the contract's errors."""
        if reply.status == 0:
            return self._error(
                f"Leonardo.ai could not be reached ({reply.failure})",
                "Check this server's network access to Leonardo.ai and leonardo.base_url",
            )
        body = reply.body if isinstance(reply.body, Mapping) else {}
        # Whatever Leonardo echoes back, the key itself never leaves this process.
        message = str(body.get("error") or f"HTTP {reply.status}").replace(key, "[redacted]")[:MAX_API_ERROR_CHARS]
        details: dict[str, Any] = {"upstream_status": reply.status}
        if body.get("code"):
            details["api_code"] = str(body["code"]).replace(key, "[redacted]")[:MAX_API_ERROR_CHARS]
        if reply.status in (401, 403):
            self._rejected_key = _fingerprint(key)
            log.warning("leonardo rejected the API key (HTTP %d)", reply.status)
            return ApiError(
                502,
                ERROR_CODE,
                "Leonardo API key rejected",
                details={"api_error": message, "suggestion": SET_KEY_SUGGESTION, **details},
            )
        if reply.status == 429:
            retry_after = self._retry_delay(self._settings.max_retries + 1, reply.retry_after)
            log.warning("leonardo is rate limiting this service")
            return ApiError(
                503,
                "SERVICE_UNAVAILABLE",
                "Leonardo.ai is rate limiting this service; retry later",
                details={"api_error": message, "suggestion": "Retry after the Retry-After delay", **details},
                headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        if reply.status == 402:
            suggestion = "Check the API credits of the Leonardo.ai account"
        elif reply.status >= 500:
            suggestion = "Leonardo.ai failed on its side; retry later"
        else:
            suggestion = "Check leonardo_model, aspect_ratio, preset_style and quality against GET /models"
        return self._error(message, suggestion, details=details)


@hookimpl
def register_settings(register: Callable[[str, type], None]) -> None:
    register(SECTION, LeonardoSettings)


@hookimpl
def register_generators(register: Callable[[Generator], None], settings: Settings) -> None:
    section = settings.section(SECTION, LeonardoSettings)
    settings.models.table(NAME, LeonardoTable)  # refuses any key, naming it
    key_file = Path(section.key_file).expanduser() if section.key_file else Path(settings.server.state_dir) / KEY_FILE_NAME
    register(LeonardoGenerator(section, key_file))
