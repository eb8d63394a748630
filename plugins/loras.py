"""The LoRA folder: which LoRAs exist, and safe name checks.

A request names a LoRA by its file name without `.safetensors`. Names are only
ever looked up in a listing of the folder, so a request never makes us open a
path it wrote: `../x`, `a/b` or `/etc/x` are refused before anything touches
the file system, and unknown names are refused against the listing. Only
safetensors files are offered (pickled `.bin`/`.pt` files can run code on load).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imagine.plugin.generators import LoraWeight

SUFFIX = ".safetensors"


def is_path_like(name: str) -> bool:
    return "/" in name or "\\" in name or "\0" in name or name.startswith(".") or os.path.isabs(name)


class LoraFolder:
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser() if folder else None

    def available(self) -> dict[str, str]:
        """LoRA name -> file name, listed now: files dropped in later are offered at once."""
        if self.folder is None:
            return {}
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return {}
        return {
            entry.name[: -len(SUFFIX)]: entry.name
            for entry in entries
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file()
        }

    def problems(self, loras: Iterable[LoraWeight]) -> list[dict[str, Any]]:
        """Field errors (`{"loc", "msg"}`) for names that are paths, unknown or repeated."""
        errors = []
        available = self.available()
        seen = set()
        for index, lora in enumerate(loras):
            loc = ["body", "loras", index, "name"]
            if is_path_like(lora.name):
                errors.append({"loc": loc, "msg": f"'{lora.name}' is a path: name a LoRA file of the LoRA folder, without '.safetensors'"})
            elif self.folder is None:
                errors.append({"loc": loc, "msg": "no LoRA folder is configured (setting models.lora_dir)"})
            elif lora.name not in available:
                offered = ", ".join(sorted(available)) or "none"
                errors.append({"loc": loc, "msg": f"unknown LoRA '{lora.name}'; available: {offered}"})
            elif lora.name in seen:
                errors.append({"loc": loc, "msg": f"LoRA '{lora.name}' is listed twice"})
            seen.add(lora.name)
        return errors

    def path(self, name: str) -> Path:
        """The file of a listed LoRA; KeyError for a name the folder does not hold (any more)."""
        assert self.folder is not None
        return self.folder / self.available()[name]
