"""API keys of the cloud backends: where each comes from, and how a new one is kept.

Sources, first found wins: a key set at runtime (POST /api-key, also written
to the key file), the service's environment variable, then its key file. A key
is only ever handed to the generator that sends it; everything else sees a
masked preview.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagine.security.private_files import write_private

if TYPE_CHECKING:
    import aiohttp

    from imagine.plugin.generators import CloudGenerator

log = logging.getLogger(__name__)

PREVIEW_MASK = "*" * 12
# Below this length the last four characters would give away too much of the key.
PREVIEW_MIN_LENGTH = 16


@dataclass(frozen=True)
class KeySpec:
    """Where one cloud service's key may come from."""

    service: str  # the name POST /api-key takes, chosen by the plugin
    env_var: str
    file: Path


def key_preview(key: str) -> str:
    """'************9721': enough to tell keys apart, too little to use one."""
    return PREVIEW_MASK + (key[-4:] if len(key) >= PREVIEW_MIN_LENGTH else "")


def _read_key_file(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        log.warning("cannot read the key file %s: %s", path, getattr(error, "strerror", None) or type(error).__name__)
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the key file %s is readable by other users; chmod 600 it", path)
    return text or None


class CloudKeys:
    def __init__(self, specs: Iterable[KeySpec], environ: Mapping[str, str] | None = None) -> None:
        self._specs = {spec.service: spec for spec in specs}
        self._environ = os.environ if environ is None else environ
        self._runtime: dict[str, str] = {}
        # Read once: a key set at runtime replaces the file, so it is never stale here.
        self._from_file = {service: _read_key_file(spec.file) for service, spec in self._specs.items()}
        for service, spec in self._specs.items():
            where = f"from {self.source(service)}" if self.get(service) else f"not set (POST /api-key or {spec.env_var})"
            log.info("%s API key: %s", service, where)

    @property
    def services(self) -> list[str]:
        return sorted(self._specs)

    def get(self, service: str) -> str | None:
        environment = self._environ.get(self._specs[service].env_var, "").strip()
        return self._runtime.get(service) or environment or self._from_file[service]

    def source(self, service: str) -> str | None:
        """'runtime', 'environment', 'file' or None: where the key in use comes from."""
        if service in self._runtime:
            return "runtime"
        if self._environ.get(self._specs[service].env_var, "").strip():
            return "environment"
        return "file" if self._from_file[service] else None

    def getter(self, service: str) -> Callable[[], str | None]:
        """A lookup for one service, read at every call so a new key applies at once."""
        if service not in self._specs:  # fail at startup, not at the first request
            raise KeyError(f"no cloud key service named {service!r}")
        return lambda: self.get(service)

    async def set(self, service: str, key: str) -> None:
        """Persist the key (in a thread: file I/O), then use it; if it cannot be kept, nothing changes."""
        await asyncio.to_thread(write_private, self._specs[service].file, (key + "\n").encode())
        self._runtime[service] = key
        self._from_file[service] = key


@contextlib.asynccontextmanager
async def started_cloud_generators(
    generators: Sequence[CloudGenerator], keys: CloudKeys, session: aiohttp.ClientSession
) -> AsyncIterator[None]:
    """Each cloud generator started with the shared session and its own key's lookup, closed on the way out."""
    try:
        for generator in generators:
            await generator.start(session, keys.getter(generator.key_spec.service))
        yield
    finally:
        for generator in generators:
            await generator.close()
