"""What the loaded models hold in memory, with shared components counted once.

Each model reports its footprint as bytes per weight-holding object (keyed by
identity). A part held by several models is counted for the one that loaded
first and shown as shared by the others, so the per-model figures add up to
the real total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class ModelMemory:
    counted_bytes: int  # counted for this model in the total
    shared_bytes: int  # used by this model, counted for another one
    shared_with: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {"bytes": self.counted_bytes, "shared_bytes": self.shared_bytes, "shared_with": list(self.shared_with)}


NOTHING = ModelMemory(0, 0, ())


def account(footprints: Sequence[tuple[str, Mapping[int, int]]]) -> dict[str, ModelMemory]:
    """Per-model memory for footprints given in load order (earliest first)."""
    owner: dict[int, str] = {}
    users: dict[int, list[str]] = {}
    for name, parts in footprints:
        for part in parts:
            owner.setdefault(part, name)
            users.setdefault(part, []).append(name)
    result = {}
    for name, parts in footprints:
        counted = sum(size for part, size in parts.items() if owner[part] == name)
        shared = sum(size for part, size in parts.items() if owner[part] != name)
        partners = sorted({other for part in parts for other in users[part] if other != name})
        result[name] = ModelMemory(counted, shared, tuple(partners))
    return result


def total_bytes(footprints: Sequence[Mapping[int, int]]) -> int:
    """Bytes held by all of them together, each part once."""
    union: dict[int, int] = {}
    for parts in footprints:
        union.update(parts)
    return sum(union.values())


def gigabytes(size: int) -> float:
    return round(size / GIB, 3)
