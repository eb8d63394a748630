"""Owner-only files written whole or not at all: secrets, keys, gallery images."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def private_folder(path: Path) -> Path:
    """Create `path` (and parents) readable by its owner only; an existing folder is kept as is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_private(path: Path, data: bytes, *, keep_existing: bool = False) -> None:
    """Whole file or nothing under `path`, mode 0600 from the first byte: temporary file, fsync, rename.

    With `keep_existing`, a file already there wins (a link instead of a rename),
    so two processes creating the same secret end up sharing one.
    """
    private_folder(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_existing:
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
            temporary.unlink()
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def secret_in(path: Path) -> bytes:
    """The random secret kept in `path`, created on first use."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48).encode(), keep_existing=True)
    return path.read_bytes().strip()
