"""A validated request as stream-entry fields and back: what a worker on another replica needs to run it.

The request travels fully resolved (the seed chosen, defaults filled in, the
input image already prepared), so every worker that runs it, a second one
after a crash included, makes the same images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

from imagine.plugin.generators import GenerationRequest, Generator, ImageInput, LoraWeight


def batch_key_digest(request: GenerationRequest) -> str:
    """Equal for requests that may share one pipeline call, in every replica running the same code."""
    return hashlib.sha256(repr(request.batch_key()).encode()).hexdigest()[:32]


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def request_fields(request: GenerationRequest) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {
        "request": json.dumps(
            {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "model": request.model,
                "width": request.width,
                "height": request.height,
                "steps": request.steps,
                "guidance": request.guidance,
                "num_images": request.num_images,
                "seed": request.seed,
                "scheduler": request.scheduler,
                "loras": [[lora.name, lora.weight] for lora in request.loras],
                "options": request.options.model_dump(mode="json"),
            }
        ),
    }
    image = request.image
    if image is not None:
        fields["input"] = json.dumps(
            {"strength": image.strength, "image_hash": image.image_hash, "mask_hash": image.mask_hash}
        )
        fields["image"] = _png(image.image)
        if image.mask is not None:
            fields["mask"] = _png(image.mask)
    return fields


def request_from_fields(fields: Mapping[str, bytes], generator: Generator) -> GenerationRequest:
    """The request `request_fields` wrote, its options validated again by the generator that will run it."""
    data = json.loads(fields["request"])
    image: ImageInput | None = None
    if "input" in fields:
        from PIL import Image

        described = json.loads(fields["input"])
        mask = Image.open(io.BytesIO(fields["mask"])) if "mask" in fields else None
        image = ImageInput(
            image=Image.open(io.BytesIO(fields["image"])).convert("RGB"),
            strength=described["strength"],
            mask=None if mask is None else mask.convert("L"),
            image_hash=described["image_hash"],
            mask_hash=described["mask_hash"],
        )
    return GenerationRequest(
        prompt=data["prompt"],
        negative_prompt=data["negative_prompt"],
        model=data["model"],
        width=data["width"],
        height=data["height"],
        steps=data["steps"],
        guidance=data["guidance"],
        num_images=data["num_images"],
        seed=data["seed"],
        scheduler=data["scheduler"],
        loras=tuple(LoraWeight(name, weight) for name, weight in data["loras"]),
        options=generator.Options.model_validate_json(json.dumps(data["options"])),
        image=image,
    )
