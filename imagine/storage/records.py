"""What the gallery keeps about an image, whichever store keeps it: ids, metadata, records, queries.

Both stores index the same columns; `record_values` and `record_from_values`
turn a record into those columns' values and back, so a record read from one
store is the record written to the other.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ID_PREFIX = "img_"
_ID_PATTERN = re.compile(r"img_[A-Za-z0-9_-]{22}")  # "img_" + token_urlsafe(16)


def new_id() -> str:
    """128 random bits: ids can be neither guessed nor enumerated."""
    return ID_PREFIX + secrets.token_urlsafe(16)


def is_valid_id(text: str) -> bool:
    return _ID_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True)
class ImageMetadata:
    """How an image was made: what the gallery keeps beside the pixels."""

    prompt: str
    negative_prompt: str
    model: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    loras: tuple[tuple[str, float], ...]
    generation_time: float
    vram_used: float
    # With an input image: its strength and the short hashes of the image and the mask as sent.
    strength: float | None = None
    image_hash: str | None = None
    mask_hash: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: str
    owner: str
    created_at: float  # unix seconds
    metadata: ImageMetadata


@dataclass(frozen=True)
class ListQuery:
    owner: str | None  # None: every owner's images
    limit: int
    offset: int = 0
    model: str | None = None
    text: str | None = None  # a case-insensitive substring of the prompt


@dataclass(frozen=True)
class RecoveryReport:
    """What opening (or sweeping) a store repaired."""

    temporary_files: int = 0
    orphan_files: int = 0
    dangling_rows: int = 0


METADATA_COLUMNS = tuple(field.name for field in dataclasses.fields(ImageMetadata))
COLUMNS = ("id", "owner", "created_at", *METADATA_COLUMNS)


def record_values(record: ImageRecord) -> tuple[Any, ...]:
    """The record's values in COLUMNS order; LoRAs as JSON text."""
    metadata = dataclasses.asdict(record.metadata)
    metadata["loras"] = json.dumps([{"name": name, "weight": weight} for name, weight in record.metadata.loras])
    return (record.id, record.owner, record.created_at, *metadata.values())


def record_from_values(row: Sequence[Any]) -> ImageRecord:
    """The inverse of `record_values`."""
    values = dict(zip(COLUMNS, row, strict=True))
    values["loras"] = tuple((lora["name"], lora["weight"]) for lora in json.loads(values["loras"]))
    metadata = ImageMetadata(**{name: values[name] for name in METADATA_COLUMNS})
    return ImageRecord(values["id"], values["owner"], values["created_at"], metadata)
