"""The typed interface between the service and its generator plugins.

A generator is registered by a plugin (see `imagine.plugin.hookspecs`) and is
one of two kinds, sibling subclasses of `Generator`:
- `LocalGenerator` runs entirely on the device thread: `load`, `unload` and
  `generate` are only ever called there, so they may use torch freely and need
  no locks of their own;
- `CloudGenerator` is an HTTP client: it runs on the event loop and never
  occupies the device thread.
The registry hands out each kind (`ModelRegistry.local()`, `.cloud()`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from imagine.security.cloud_api_keys import KeySpec

if TYPE_CHECKING:
    import aiohttp
    from PIL import Image


@dataclass(frozen=True)
class LoraWeight:
    name: str
    weight: float


class Options(BaseModel):
    """A generator's own request fields, beyond the core ones: subclass it as `Generator.Options`.

    A request is validated against the resolved generator's `Options` alone: a
    field another registered generator declares is accepted and ignored, one
    that no generator declares is refused. Give every field a default, as
    clients that do not know the backend send nothing, and a hashable type:
    only requests with equal options share a pipeline call.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True, eq=False)
class ImageInput:
    """An input image for image-to-image or inpainting, prepared by the core before a generator sees it.

    `image` is RGB at the request's width x height (resized, cropped, padded or
    outpainted as the request asked); `mask`, when present, is an "L" image of
    the same size, white where the generator repaints and feathered already.
    """

    image: Image.Image
    # 0..1: how much of the input is repainted (a pipeline runs about steps x strength steps).
    strength: float
    mask: Image.Image | None = None
    # Short hashes of the input and mask as sent, for the PNG's parameters and the gallery.
    image_hash: str = ""
    mask_hash: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, with every default filled in for its model."""

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    num_images: int
    seed: int
    scheduler: str
    loras: tuple[LoraWeight, ...] = ()
    # The validated `Options` of the request's generator, its defaults filled in.
    options: Options = field(default_factory=Options)
    # Image-to-image or inpainting; None for text to image.
    image: ImageInput | None = None

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i, so any single image can be reproduced alone."""
        return [self.seed + index for index in range(self.num_images)]

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call.

        Whether a negative prompt is empty counts too: some pipelines encode an
        empty one as zeros, which only works for a whole call at once. So do the
        kind of input (text, image, image and mask) and the strength: they choose
        the pipeline and its number of steps.
        """
        image = self.image
        inputs = None if image is None else (image.strength, image.mask is not None)
        return (
            self.model, self.width, self.height, self.steps, self.guidance, self.scheduler, self.loras,
            bool(self.negative_prompt), self.options, inputs,
        )


@dataclass(frozen=True)
class StepProgress:
    step: int  # steps done, 1..total
    total: int
    # The current latents, for previews; generators that have none pass None.
    latents: Any = None


# Called after every denoising step; returning True stops the run at once.
StepCallback = Callable[[StepProgress], bool]


class GenerationInterrupted(Exception):
    """The step callback asked the generator to stop."""


@dataclass(frozen=True)
class ModelExample:
    """A prompt that shows what a model is good at, for GET /examples."""

    name: str
    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class ModelDefaults:
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    # Applied when a request does not send `loras` at all (an explicit [] means none).
    loras: tuple[LoraWeight, ...] = ()


@dataclass(frozen=True)
class ModelLimits:
    min_size: int
    max_size: int
    min_steps: int = 1
    max_steps: int = 100
    # When set, only these step counts are valid (e.g. one per distilled checkpoint).
    step_choices: tuple[int, ...] | None = None
    max_guidance: float = 20.0
    schedulers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    """What /models tells a user about a generator."""

    description: str
    defaults: ModelDefaults
    limits: ModelLimits
    vram_required: str
    aliases: tuple[str, ...] = ()
    # What the results' `model_info.base_model` names; empty: the model's own name.
    base_model: str = ""
    # Whether requests may send `loras`.
    takes_loras: bool = False
    # What requests may give: "text" always; "image" (image to image) and "mask" (inpainting, outpainting).
    inputs: tuple[str, ...] = ("text",)
    examples: tuple[ModelExample, ...] = ()
    # How prompts for this model are best written: what POST /prompt/enhance tells the chat model
    # (empty: a general guide for text-to-image prompts).
    prompt_guide: str = ""


class Generator(abc.ABC):
    """What every backend has; subclass `LocalGenerator` or `CloudGenerator`, which set `name` and `card`."""

    name: str
    card: ModelCard
    #: The request fields this backend takes beyond the core ones (none by default).
    Options: ClassVar[type[Options]] = Options

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """True while requests can run now (weights in memory, or a cloud key set)."""

    def runtime_info(self) -> dict[str, Any]:
        """Device and dtype while loaded, for /models and the JSON result."""
        return {}

    def listing(self) -> dict[str, Any]:
        """Model-specific fields for /models that can change at run time (the LoRAs on offer, say)."""
        return {}

    def validate(self, request: GenerationRequest) -> list[dict[str, Any]]:
        """Checks beyond the card's limits and `Options`, as `{"loc", "msg"}` field errors."""
        return []

    def with_options(self, request: GenerationRequest) -> GenerationRequest:
        """The validated request with what its backend options decide filled in (e.g. an aspect ratio's size)."""
        return request


class LocalGenerator(Generator):
    """Weights in this process, run on the device thread."""

    @abc.abstractmethod
    def load(self) -> None:
        """Bring the weights into memory (device thread)."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release every reference to the weights (device thread)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        """Run compatible requests (equal `batch_key`) together; one image list per request.

        Raises GenerationInterrupted when `on_step` returned True.
        """

    def latent_preview(self, latents: Any) -> Image.Image | None:
        """A small picture of the work in progress (device thread), or None if not supported."""
        return None

    def switch_cost_s(self, request: GenerationRequest) -> float:
        """Seconds the loaded model would spend getting ready for `request` that it spends for no
        request like the last one (swapping a checkpoint in, say), as last measured; 0 when none,
        or not measured yet (device thread). Work it is ready for may go first meanwhile.
        """
        return 0.0

    def memory_footprint(self) -> Mapping[int, int]:
        """Bytes held while loaded, per weight-holding object, keyed by `id()` (device thread).

        Keys are object identities so that a component two generators share is
        counted once; an empty mapping means nothing worth counting.
        """
        return {}


@dataclass(frozen=True)
class RemoteImages:
    images: list[Image.Image]
    seeds: list[int]  # one per image, as the remote service reports them
    queue_time: float  # seconds spent waiting for a free slot at the remote service
    credits: float = 0.0  # what the provider charged, as it reported it (for metrics)


class CloudGenerator(Generator):
    """A generator behind a remote HTTP API: it runs on the event loop, never on the device thread.

    The app starts it with its shared client session and a lookup of its API key
    (`start`), and closes it on shutdown (`imagine.security.cloud_api_keys`);
    `imagine.http.generation` awaits `generate_remote` under the job's deadline.
    """

    #: Where its API key comes from (POST /api-key service name, environment variable, key file).
    key_spec: KeySpec

    @abc.abstractmethod
    async def start(self, session: aiohttp.ClientSession, api_key: Callable[[], str | None]) -> None:
        """Keep the session and the key lookup for the requests to come."""

    async def close(self) -> None:
        """Release what `start` acquired; the app closes the shared session itself."""

    @property
    @abc.abstractmethod
    def configured(self) -> bool:
        """True when a key is set, so requests can be sent."""

    @property
    def loaded(self) -> bool:
        # Nothing lives in local memory: "loaded" means ready to send requests.
        return self.configured

    @abc.abstractmethod
    async def generate_remote(self, request: GenerationRequest, started: Callable[[], None]) -> RemoteImages:
        """Run one request at the provider; cancelled by the caller when the job's deadline passes.

        Call `started` as the request goes to the provider, after any wait of the plugin's own (a limit on
        calls in flight): a generation stopped before it started is refunded, one stopped after is not.
        """

    @abc.abstractmethod
    def problem(self) -> str | None:
        """Why requests would fail now (no key, key rejected), for /health; None when none is known."""

    @abc.abstractmethod
    def catalog(self) -> dict[str, Any]:
        """What /models lists for this backend: its models, sizes, styles, quality levels."""
