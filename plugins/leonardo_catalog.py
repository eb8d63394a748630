"""What Leonardo.ai offers through imagine: models, aspect ratios, preset styles, quality levels.

Plain data and the lookups that turn a request's words into Leonardo's values;
`plugins.leonardo` sends them, `GET /models` lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LeonardoModel:
    id: str
    name: str
    description: str


@dataclass(frozen=True)
class AspectRatio:
    name: str
    width: int
    height: int


@dataclass(frozen=True)
class QualityLevel:
    name: str
    description: str
    alchemy: bool


MODELS = {
    "phoenix-1-0": LeonardoModel(
        "de7d3faf-762f-48e0-b3b7-9d0ac3a3fcf3", "Phoenix 1.0", "Universal model for all kinds of images, strong prompt adherence"
    ),
    "phoenix-0-9": LeonardoModel(
        "6b645e3a-d64f-4341-a6d8-7a3690fbf042", "Phoenix 0.9", "Previous version of Phoenix"
    ),
    "lightning-xl": LeonardoModel(
        "b24e16ff-06e3-43eb-8d33-4416c2d75876", "Lightning XL", "Fast SDXL model for quick drafts"
    ),
    "kino-xl": LeonardoModel(
        "aa77f04e-3eec-4034-9c07-d0f619684628", "Kino XL", "Cinematic SDXL model, wide shots and film looks"
    ),
    "vision-xl": LeonardoModel(
        "5c232a9e-9061-4777-980a-ddc8e65647c6", "Vision XL", "Photorealistic SDXL model"
    ),
    "diffusion-xl": LeonardoModel(
        "1e60896f-3c26-4296-8ecc-53e2afecc132", "Diffusion XL", "General-purpose SDXL model"
    ),
    "albedobase-xl": LeonardoModel(
        "2067ae52-33fd-4a82-bb92-c2c55e7d2786", "AlbedoBase XL", "Versatile SDXL model for CG and art"
    ),
}

# Close to one megapixel, both sides multiples of 8 as Leonardo requires.
ASPECT_RATIOS = {
    "1:1": AspectRatio("Square", 1024, 1024),
    "16:9": AspectRatio("Widescreen", 1344, 768),
    "9:16": AspectRatio("Portrait widescreen", 768, 1344),
    "4:3": AspectRatio("Standard", 1152, 864),
    "3:4": AspectRatio("Portrait standard", 864, 1152),
    "3:2": AspectRatio("Photo", 1248, 832),
    "2:3": AspectRatio("Portrait photo", 832, 1248),
}

# Leonardo's presetStyle values (id -> name, description).
PRESET_STYLES = {
    "DYNAMIC": ("Dynamic", "Leonardo's default: bold colour and contrast"),
    "CREATIVE": ("Creative", "Balanced creative output"),
    "CINEMATIC": ("Cinematic", "Film-like lighting and framing"),
    "CINEMATIC_CLOSEUP": ("Cinematic close-up", "Cinematic look, tight framing"),
    "PHOTOGRAPHY": ("Photography", "Natural photographic rendering"),
    "PORTRAIT": ("Portrait", "People and faces"),
    "FASHION": ("Fashion", "Editorial fashion photography"),
    "FOOD": ("Food", "Food photography"),
    "MACRO": ("Macro", "Close-up detail"),
    "STOCK_PHOTO": ("Stock photo", "Clean commercial photography"),
    "BOKEH": ("Bokeh", "Shallow depth of field"),
    "LONG_EXPOSURE": ("Long exposure", "Light trails and motion blur"),
    "HDR": ("HDR", "High dynamic range"),
    "FILM": ("Film", "Analog film grain and colour"),
    "ENVIRONMENT": ("Environment", "Landscapes and scenery"),
    "ILLUSTRATION": ("Illustration", "Drawn and painted illustration"),
    "ANIME": ("Anime", "Japanese animation style"),
    "RENDER_3D": ("3D render", "Rendered 3D look"),
    "RAYTRACED": ("Raytraced", "Ray-traced lighting"),
    "SKETCH_BW": ("Sketch (black and white)", "Pencil sketch"),
    "SKETCH_COLOR": ("Sketch (colour)", "Coloured sketch"),
    "VIBRANT": ("Vibrant", "Saturated colour"),
    "MOODY": ("Moody", "Dark, atmospheric"),
    "MONOCHROME": ("Monochrome", "Single colour"),
    "MINIMALISTIC": ("Minimalistic", "Simple shapes, few elements"),
    "RETRO": ("Retro", "Vintage look"),
    "GENERAL": ("General", "No particular look"),
    "NONE": ("None", "No style applied"),
}

QUALITY_LEVELS = {
    "standard": QualityLevel("Standard", "Good quality, faster generation, fewer credits", alchemy=False),
    "high": QualityLevel("High", "Alchemy pipeline: more detail and coherence, costs more credits", alchemy=True),
}
DEFAULT_QUALITY = "standard"

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def model_key(value: str) -> str | None:
    """A table name or a raw model UUID, canonical; None when it is neither.

    Seed 003 clients send 'phoenix-1.0' where the table says 'phoenix-1-0': both work.
    """
    text = value.strip().lower()
    if _UUID.match(text):
        return text
    name = text.replace(".", "-").replace("_", "-")
    return name if name in MODELS else None


def model_id(key: str) -> str:
    """The UUID Leonardo takes as modelId, for a canonical `model_key`."""
    return MODELS[key].id if key in MODELS else key


def preset_key(value: str) -> str | None:
    text = value.strip().upper().replace(" ", "_").replace("-", "_")
    return text if text in PRESET_STYLES else None


def quality_key(value: str) -> str | None:
    text = value.strip().lower()
    return text if text in QUALITY_LEVELS else None


def aspect_key(value: str) -> str | None:
    text = value.strip().replace("x", ":").replace("/", ":")
    return text if text in ASPECT_RATIOS else None


def catalog(default_model: str) -> dict[str, Any]:
    """GET /models' view of all of it, in seed 003's shapes."""
    return {
        "models": {key: {"id": m.id, "name": m.name, "description": m.description} for key, m in MODELS.items()},
        "default_model": default_model,
        "aspect_ratios": [
            {"id": key, "name": ratio.name, "resolution": [ratio.width, ratio.height]}
            for key, ratio in ASPECT_RATIOS.items()
        ],
        "preset_styles": [
            {"id": key, "name": name, "description": description} for key, (name, description) in PRESET_STYLES.items()
        ],
        "quality_levels": [
            {"id": key, "name": level.name, "description": level.description, "alchemy": level.alchemy}
            for key, level in QUALITY_LEVELS.items()
        ],
    }
