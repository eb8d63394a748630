"""The JSON result of a generation: /generate's answer, each batch item's and each finished job's.

One pydantic model is both what the routes send (`GenerationResult.of(generated).model_dump()`)
and what the OpenAPI document publishes (its `model_json_schema()`), so the two cannot drift.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from pydantic import BaseModel, Field

from imagine.engine.work import Generated


class AppliedLora(BaseModel):
    name: str
    weight: float


def _absent(value: object) -> bool:
    return value is None


def input_parameters(strength: float, image_hash: str | None, mask_hash: str | None) -> dict[str, Any]:
    """What `parameters` says of an input image, in the JSON result and the gallery alike."""
    return {"strength": strength, "image_hash": image_hash, **({"mask_hash": mask_hash} if mask_hash else {})}


class GenerationParameters(BaseModel):
    """What the images were generated with, every default filled in (also kept with each gallery image)."""

    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    loras: list[AppliedLora]
    # With an input image only: a text-only result keeps the keys it always had.
    strength: float | None = Field(
        None, exclude_if=_absent, description="How much of init_image was repainted (with an input image only)"
    )
    image_hash: str | None = Field(
        None, exclude_if=_absent, description="The first 10 hex digits of the SHA-256 of init_image's bytes as sent"
    )
    mask_hash: str | None = Field(None, exclude_if=_absent, description="The same of mask_image's, when one was sent")


class GenerationModelInfo(BaseModel):
    base_model: str
    lora_applied: bool
    device: str | None
    dtype: str | None


class GenerationResult(BaseModel):
    images: list[Annotated[str, Field(description="data:image/png;base64,...")]]
    ids: list[str] = Field(description="Gallery ids (empty when not stored)")
    seed: int
    seeds: list[int]
    model: str
    prompt: str
    negative_prompt: str
    generation_time: float
    queue_time: float
    vram_used: float = Field(description="GB at the peak of the run; 0.0 without a GPU")
    parameters: GenerationParameters
    model_info: GenerationModelInfo

    @classmethod
    def of(cls, generated: Generated) -> GenerationResult:
        """Megabytes of base64 for large images: build it off the loop where the caller can."""
        request, output, generator = generated.request, generated.output, generated.generator
        image = request.image
        return cls(
            images=[data_url(png) for png in generated.pngs],
            ids=generated.ids,
            seed=output.seeds[0],
            seeds=output.seeds,
            model=request.model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            generation_time=round(output.generation_time, 3),
            queue_time=round(output.queue_time, 3),
            vram_used=output.vram_used,
            parameters=GenerationParameters(
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                width=request.width,
                height=request.height,
                scheduler=request.scheduler,
                loras=[AppliedLora(name=lora.name, weight=lora.weight) for lora in request.loras],
                **({} if image is None else input_parameters(image.strength, image.image_hash, image.mask_hash)),
            ),
            model_info=GenerationModelInfo(
                base_model=generator.card.base_model or generator.name,
                lora_applied=bool(request.loras),
                device=output.runtime.get("device"),
                dtype=output.runtime.get("dtype"),
            ),
        )


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
