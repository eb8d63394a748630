"""PNG bytes with the generation parameters embedded the way other Stable Diffusion tools read them."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from PIL.PngImagePlugin import PngInfo

from imagine.generators import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

# Our scheduler names -> the sampler labels that A1111-style tools write and parse.
SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "pndm": "PNDM",
    "lcm": "LCM",
}

PARAMETERS_KEY = "parameters"


def parameters_text(request: GenerationRequest, seed: int) -> str:
    """The prompt, an optional `Negative prompt:` line, then one line of settings."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        f"Steps: {request.steps}",
        f"Sampler: {SAMPLER_LABELS.get(request.scheduler, request.scheduler)}",
        f"CFG scale: {request.guidance:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {request.model}",
    ]
    if request.loras:
        settings.append("Lora: " + " ".join(f"{lora.name}:{lora.weight:g}" for lora in request.loras))
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: str, compress_level: int) -> bytes:
    """Pillow writes tEXt when the text is Latin-1 and iTXt (UTF-8) otherwise."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
