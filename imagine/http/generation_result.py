"""The JSON result of a generation: /generate's answer, each batch item's and each finished job's.

One pydantic model is both what the routes send (`GenerationResult.of(generated).model_dump()`)
and what the OpenAPI document publishes (its `model_json_schema()`), so the two cannot drift.
"""

from __future__ import annotations

import base64
from typing import Annotated

from pydantic import BaseModel, Field

from imagine.engine.generation import Generated


class AppliedLora(BaseModel):
    name: str
    weight: float


class GenerationParameters(BaseModel):
    """What the images were generated with, every default filled in (also kept with each gallery image)."""

    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    loras: list[AppliedLora]


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
