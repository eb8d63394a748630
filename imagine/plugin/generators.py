"""The typed interface between the service and its generator plugins.

A generator is registered by a plugin (see `imagine.plugin.hookspecs`). Local ones run
entirely on the device thread: `load`, `unload` and `generate` are only ever
called there, so they may use torch freely and need no locks of their own.
Cloud ones (`CloudGenerator`) are HTTP clients: they run on the event loop and
never occupy the device thread.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagine.security.cloud_api_keys import KeySpec

if TYPE_CHECKING:
    import aiohttp
    from PIL import Image


@dataclass(frozen=True)
class LoraWeight:
    name: str
    weight: float


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
    # Backend-specific fields (Leonardo's model, aspect ratio...) that local models ignore.
    options: tuple[tuple[str, str], ...] = ()

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i, so any single image can be reproduced alone."""
        return [self.seed + index for index in range(self.num_images)]

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call.

        Whether a negative prompt is empty counts too: SDXL encodes an empty
        one as zeros, which only works for a whole call at once.
        """
        return (self.model, self.width, self.height, self.steps, self.guidance, self.scheduler, self.loras, bool(self.negative_prompt))


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
    extra: dict[str, Any] = field(default_factory=dict)


class Generator(abc.ABC):
    """A text-to-image backend. Subclasses set `name` and `card`."""

    name: str
    card: ModelCard
    #: True for generators that need the device thread; False for cloud clients.
    uses_device: bool = True

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """True while the weights are in memory and `generate` can run."""

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

    def runtime_info(self) -> dict[str, Any]:
        """Device and dtype while loaded, for /models and the JSON result."""
        return {}

    def latent_preview(self, latents: Any) -> Image.Image | None:
        """A small picture of the work in progress (device thread), or None if not supported."""
        return None

    def listing(self) -> dict[str, Any]:
        """Model-specific fields for /models that can change at run time (the LoRAs on offer, say)."""
        return {}

    def memory_footprint(self) -> Mapping[int, int]:
        """Bytes held while loaded, per weight-holding object, keyed by `id()` (device thread).

        Keys are object identities so that a component two generators share is
        counted once; an empty mapping means nothing worth counting.
        """
        return {}

    def validate(self, request: GenerationRequest) -> list[dict[str, Any]]:
        """Checks beyond the card's limits, as `{"loc", "msg"}` field errors."""
        return []

    def with_options(self, request: GenerationRequest) -> GenerationRequest:
        """The validated request with what its backend options decide filled in (e.g. an aspect ratio's size)."""
        return request


@dataclass(frozen=True)
class RemoteImages:
    images: list[Image.Image]
    seeds: list[int]  # one per image, as the remote service reports them
    queue_time: float  # seconds spent waiting for a free slot at the remote service
    credits: float = 0.0  # what the provider charged, as it reported it (for metrics)


class CloudGenerator(Generator):
    """A generator behind a remote HTTP API: it runs on the event loop, never on the device thread.

    The app starts it with its shared client session and a lookup of its API key
    (`start`), and closes it on shutdown; `imagine.engine.generation` awaits
    `generate_remote` under the job's deadline instead of queueing it for the device.
    """

    uses_device = False
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

    def load(self) -> None:
        """Nothing to load: the weights live at the provider."""

    def unload(self) -> None:
        """Nothing to release."""

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        raise TypeError(f"{self.name} is a cloud generator: imagine.engine.generation awaits generate_remote instead")

    @abc.abstractmethod
    async def generate_remote(self, request: GenerationRequest) -> RemoteImages:
        """Run one request at the provider; cancelled by the caller when the job's deadline passes."""

    @abc.abstractmethod
    def problem(self) -> str | None:
        """Why requests would fail now (no key, key rejected), for /health; None when none is known."""

    @abc.abstractmethod
    def catalog(self) -> dict[str, Any]:
        """What /models lists for this backend: its models, sizes, styles, quality levels."""
