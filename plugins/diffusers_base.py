"""What the diffusers-backed generators share: loading, schedulers, seeded batched calls, image inputs.

torch and diffusers are imported inside the methods, which run on the device
thread only; importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imagine.engine import device
from imagine.plugin.generators import (
    GenerationInterrupted,
    GenerationRequest,
    ImageInput,
    LocalGenerator,
    ModelCard,
    StepCallback,
    StepProgress,
)
from imagine.settings import ModelsSettings
from imagine_plugins import prompt_weights, schedulers, speed_ups
from imagine_plugins.components import POOL

if TYPE_CHECKING:
    from PIL import Image

# Fixed linear maps from the 4 latent channels to RGB (rows: channels), fitted by
# the community for live previews: a preview costs one tiny matmul, no VAE call.
LATENT_RGB_SDXL = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
LATENT_RGB_BIAS_SDXL = (0.1084, -0.0175, -0.0011)
LATENT_RGB_SD15 = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
LATENT_RGB_BIAS_SD15 = (0.0, 0.0, 0.0)

# What an image request runs on, by whether it has a mask: the diffusers
# auto-pipeline that builds the right one from the text-to-image pipeline.
IMAGE_PIPELINES = {False: "AutoPipelineForImage2Image", True: "AutoPipelineForInpainting"}


@dataclass(frozen=True)
class CardTable:
    """The keys of a `[models.<name>]` table that adjust the model's card (unset: the card's own).

    An operator can tighten or widen what the real checkpoint is known to do well.
    """

    description: str | None = None
    default_steps: int | None = None
    default_guidance: float | None = None
    default_size: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    max_steps: int | None = None


@dataclass(frozen=True)
class DiffusersTable(CardTable):
    """`[models.<name>]` of a model loaded from one diffusers pipeline folder."""

    # A local folder or a hub id; empty: the weights the model is published with.
    source: str = ""
    # A local folder or hub id of an inpainting model of the same family (a UNet
    # taking the mask and the masked image, 9 input channels): only its UNet is
    # loaded, for masked requests. Empty: the base weights inpaint. What is put
    # on the base UNet (LoRA adapters, Lightning's step checkpoints) does not
    # reach this one: masked requests run without them, and nothing is refused.
    inpaint_source: str = ""
    # A local folder or hub id of a standalone VAE to use instead of the pipeline's, e.g.
    # madebyollin/sdxl-vae-fp16-fix, which decodes in float16 where SDXL's own VAE must be
    # upcast to float32 (diffusers does that upcast by itself when no such VAE is given).
    vae_source: str = ""


# Loading builds modules on the meta device by patching torch.nn.Module's methods for the whole
# process while it runs (accelerate's init_empty_weights): two device threads of one process loading
# at once would build each other's modules empty. One load at a time, process-wide.
LOADING = threading.Lock()


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (tied weights once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def denoising_steps(steps: int, strength: float, longest: int) -> int | None:
    """The schedule length to ask an image pipeline for, so that at least one step runs.

    diffusers runs the last int(steps x strength) steps of a schedule of `steps`.
    When that is none (SDXL-Turbo's one step at strength 0.75, say), the schedule
    is lengthened until its last step falls within the strength, as Turbo's
    authors advise (2 steps at strength 0.5). None: not even a schedule of every
    training timestep (`longest`) reaches the strength, so nothing is repainted.
    """
    for length in range(steps, max(steps, longest) + 1):
        if int(length * strength) >= 1:
            return length
    return None


def card_with_overrides(card: ModelCard, table: CardTable) -> ModelCard:
    def changed(**values: Any) -> dict[str, Any]:
        return {name: value for name, value in values.items() if value is not None}

    size = table.default_size
    defaults = dataclasses.replace(
        card.defaults, **changed(steps=table.default_steps, guidance=table.default_guidance, width=size, height=size)
    )
    limits = dataclasses.replace(
        card.limits, **changed(min_size=table.min_size, max_size=table.max_size, max_steps=table.max_steps)
    )
    return dataclasses.replace(card, defaults=defaults, limits=limits, **changed(description=table.description))


class DiffusersGenerator(LocalGenerator):
    """A generator over one diffusers text-to-image pipeline class."""

    pipeline_class: str  # e.g. "StableDiffusionXLPipeline"
    latent_rgb: tuple[tuple[float, float, float], ...] = LATENT_RGB_SDXL
    latent_rgb_bias: tuple[float, float, float] = LATENT_RGB_BIAS_SDXL
    # Components taken from (and offered to) other pipelines loaded from the same
    # weights. Only components nothing modifies in place may be listed here.
    shared_components: tuple[str, ...] = ()

    def __init__(self, name: str, card: ModelCard, source: str, models: ModelsSettings, table: CardTable) -> None:
        self.name = name
        self.source = source
        self.card = card_with_overrides(card, table)
        if not self.card.base_model:
            self.card = dataclasses.replace(self.card, base_model=source)
        self._device_preference = models.device
        self._prompt_syntax = models.prompt_syntax
        self._dtype_preference = models.dtype
        self._models = models
        # What speed_ups.apply did at the last load (attention, compile time...).
        self.speed_ups: dict[str, Any] = {}
        self.device = "cpu"
        self.dtype = "float32"
        self.pipe: Any = None
        # Tables of other shapes (Lightning's) have no dedicated inpainting weights or VAE.
        self.inpaint_source = table.inpaint_source if isinstance(table, DiffusersTable) else ""
        self.vae_source = table.vae_source if isinstance(table, DiffusersTable) else ""
        # The UNet loaded from `inpaint_source`, while the inpainting pipeline holds it.
        self._inpaint_unet: Any = None
        # Image-to-image and inpainting pipelines around the same components, by "has a mask"; built on first use.
        self._image_pipes: dict[bool, Any] = {}
        self._schedulers: dict[str, Any] = {}
        self._footprint: dict[int, int] | None = None

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load(self) -> None:
        import diffusers
        import torch
        from huggingface_hub.utils import are_progress_bars_disabled

        # diffusers' own bars ("Loading pipeline components") have no switch
        # of their own in the environment: they follow the hub's.
        if are_progress_bars_disabled():
            diffusers.utils.logging.disable_progress_bar()

        self.device = device.choose_device(self._device_preference)
        self.dtype = device.choose_dtype(self._dtype_preference, self.device)
        torch_dtype = getattr(torch, self.dtype)
        pipeline_class = getattr(diffusers, self.pipeline_class)
        with LOADING:
            shared = POOL.find(self.source, self.shared_components, self.device, self.dtype)
            self._load_with(pipeline_class, torch_dtype, shared)
            POOL.add(self.source, self.pipe, self.shared_components, self.device, self.dtype)

    def _load_with(self, pipeline_class: Any, torch_dtype: Any, shared: dict[str, Any]) -> None:
        import diffusers

        try:
            if self.vae_source:
                shared = {**shared, "vae": diffusers.AutoencoderKL.from_pretrained(self.vae_source, dtype=torch_dtype)}
            # Components passed in are used as they are; diffusers loads only the others.
            pipe = pipeline_class.from_pretrained(
                self.source, dtype=torch_dtype, **shared, **self.load_arguments(torch_dtype)
            )
            self.pipe = self.prepare(pipe.to(self.device))
            self.speed_ups = speed_ups.apply(self.pipe, self._models, self.device, self._warm_up)
        except BaseException:
            self.unload()  # whatever a half-done load allocated goes back now
            raise

    def _warm_up(self) -> None:
        """One small generation at the default size, so what compiles does so now, not in a request."""
        defaults, limits = self.card.defaults, self.card.limits
        request = GenerationRequest(
            prompt="warm-up", negative_prompt="", model=self.name, width=defaults.width, height=defaults.height,
            steps=limits.step_choices[0] if limits.step_choices else limits.min_steps, guidance=defaults.guidance,
            num_images=1, seed=0, scheduler=defaults.scheduler,
        )
        self.generate([request], lambda progress: False)

    def load_arguments(self, torch_dtype: Any) -> dict[str, Any]:
        """Extra `from_pretrained` arguments: replacement components or loading options."""
        return {}

    def prepare(self, pipe: Any) -> Any:
        """Adjust a freshly loaded pipeline; subclasses swap components here."""
        pipe.set_progress_bar_config(disable=True)
        self._schedulers = {}
        return pipe

    def unload(self) -> None:
        self.pipe = None
        self._inpaint_unet = None
        self._image_pipes = {}
        self._schedulers = {}
        self._footprint = None
        device.free_cache(self.device)

    def memory_footprint(self) -> Mapping[int, int]:
        """Parameter and buffer bytes of each component of every pipeline held; cached until the weights change."""
        if self.pipe is None:
            return {}
        if self._footprint is None:
            self._footprint = {
                id(component): module_bytes(component)
                for pipe in (self.pipe, *self._image_pipes.values())
                for component in pipe.components.values()
                if hasattr(component, "parameters")
            }
        return self._footprint

    def weights_changed(self) -> None:
        """Subclasses that add or remove weights (LoRA adapters) call this so they are measured again."""
        self._footprint = None

    def runtime_info(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "speed_ups": self.speed_ups} if self.loaded else {}

    def latent_preview(self, latents: Any) -> Image.Image:
        import torch
        from PIL import Image

        factors = torch.tensor(self.latent_rgb, dtype=torch.float32)
        bias = torch.tensor(self.latent_rgb_bias, dtype=torch.float32)
        first = latents[0].detach().float().cpu()  # (channels, height, width)
        rgb = torch.einsum("chw,cr->hwr", first, factors) + bias
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
        return Image.fromarray(pixels, "RGB")

    def scheduler(self, name: str) -> Any:
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.build(name, self.scheduler_config(name))
        return self._schedulers[name]

    def scheduler_config(self, name: str) -> Mapping[str, Any]:
        """The config a named scheduler is built from: the checkpoint's own by default."""
        return self.pipe.scheduler.config

    def ready_for(self, requests: Sequence[GenerationRequest]) -> None:
        """Put the pipeline in the state these requests need; subclasses add weights or adapters."""
        self.pipe.scheduler = self.scheduler(requests[0].scheduler)

    def call_arguments(self, requests: Sequence[GenerationRequest]) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline call (LoRA scales, say)."""
        return {}

    def pipeline_for(self, image: ImageInput | None) -> Any:
        """The pipeline that serves this kind of input, in the state `ready_for` left the loaded one.

        An image pipeline is built once from the loaded pipeline's components:
        `from_pipe` hands it the very same modules, so it holds no second copy of
        any weight, and what those modules carry (Lightning's step checkpoint,
        LoRA adapters) serves it too. With `inpaint_source` set, the inpainting
        pipeline has that model's UNet instead, and everything else of the
        loaded pipeline's.
        """
        if image is None:
            return self.pipe
        masked = image.mask is not None
        pipe = self._image_pipes.get(masked)
        if pipe is None:
            import diffusers

            own_unet = {"unet": self._load_inpaint_unet()} if masked and self.inpaint_source else {}
            pipe = getattr(diffusers, IMAGE_PIPELINES[masked]).from_pipe(self.pipe, **own_unet)
            pipe.set_progress_bar_config(disable=True)
            self._image_pipes[masked] = pipe
            self.weights_changed()
        # Components `ready_for` swapped on the loaded pipeline (the request's scheduler) apply here too.
        own = pipe.components
        for name, component in self.pipe.components.items():
            if name == "unet" and own[name] is self._inpaint_unet:
                continue  # the dedicated inpainting UNet stays
            if name in own and own[name] is not component:
                setattr(pipe, name, component)
        return pipe

    def _load_inpaint_unet(self) -> Any:
        """The UNet of `inpaint_source`, on the loaded pipeline's device and dtype.

        It is a separate set of weights: what `ready_for` puts on the loaded
        UNet (SD 1.5's LoRA adapters) does not reach it, so masked requests
        inpaint without them.
        """
        import torch
        from diffusers import UNet2DConditionModel

        with LOADING:
            unet = UNet2DConditionModel.from_pretrained(self.inpaint_source, subfolder="unet", dtype=getattr(torch, self.dtype))
        self._inpaint_unet = unet.to(self.device).eval()
        return self._inpaint_unet

    def generate(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[Image.Image]]:
        import torch

        first = requests[0]
        prompts: list[str] = []
        negatives: list[str] = []
        generators = []
        # One input (and mask) per image: each request's own, repeated for its num_images.
        inputs: list[ImageInput] = []
        for request in requests:
            for seed in request.seeds:
                prompts.append(request.prompt)
                negatives.append(request.negative_prompt)
                # CPU generators give the same noise on every device and, one per
                # image, the same image whether it runs alone or in a batch.
                generators.append(torch.Generator("cpu").manual_seed(seed))
                if request.image is not None:
                    inputs.append(request.image)

        arguments = self._input_arguments(first, inputs)
        if arguments is None:
            return self._split(requests, [given.image.copy() for given in inputs])

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # The pipeline's own count: an image request runs about steps x strength of them.
            if on_step(StepProgress(index + 1, pipe.num_timesteps, tensors.get("latents"))):
                # Raising skips the remaining steps and the VAE decode, where
                # pipe._interrupt would still decode latents nobody wants.
                raise GenerationInterrupted()
            return tensors

        self.ready_for(requests)
        pipeline = self.pipeline_for(first.image)
        schedulers.seed_noise(pipeline.scheduler, [seed for request in requests for seed in request.seeds])
        with torch.inference_mode():
            result = pipeline(
                **prompt_weights.prompt_arguments(pipeline, prompts, negatives, self._prompt_syntax),
                guidance_scale=first.guidance,
                generator=generators,
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                output_type="pil",
                **arguments,
                **self.call_arguments(requests),
            )
        images = list(result.images)
        if first.image is not None and first.image.mask is not None:
            images = [paste_back(made, given.image, given.mask) for made, given in zip(images, inputs, strict=True)]
        return self._split(requests, images)

    def _input_arguments(self, first: GenerationRequest, inputs: Sequence[ImageInput]) -> dict[str, Any] | None:
        """The call's size, steps and input images; None when the strength is too low for any step to run.

        The kind of input and the strength are the whole batch's: both are part of the batch key.
        """
        size = {"width": first.width, "height": first.height}
        image = first.image
        if image is None:
            return {**size, "num_inference_steps": first.steps}
        steps = denoising_steps(first.steps, image.strength, self.pipe.scheduler.config.num_train_timesteps)
        if steps is None:
            return None
        arguments = {"image": [given.image for given in inputs], "strength": image.strength, "num_inference_steps": steps}
        if image.mask is None:
            return arguments  # image to image takes its size from the input
        return {**arguments, **size, "mask_image": [given.mask for given in inputs]}

    @staticmethod
    def _split(requests: Sequence[GenerationRequest], images: list[Image.Image]) -> list[list[Image.Image]]:
        """The batch's images, in order, as one list per request."""
        split = []
        for request in requests:
            split.append(images[: request.num_images])
            images = images[request.num_images :]
        return split


def paste_back(made: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The inpainted image where the mask is white, the input as it was where it is black, blended between.

    Outside the mask the pipeline keeps the input's latents, but the VAE's
    round trip still shifts every pixel a little: what the mask keeps is taken
    from the input itself.
    """
    from PIL import Image

    return Image.composite(made, original, mask)
