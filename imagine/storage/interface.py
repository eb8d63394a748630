"""The gallery interface: what the HTTP routes and the generations ask of a store, whichever one it is.

Two stores implement it: the embedded one (`imagine.storage.gallery`: files
and SQLite under the state folder, one host) and the shared one
(`imagine.storage.shared_gallery`: PostgreSQL and an S3 bucket, any number of
replicas). Both keep the same promises: a PNG is stored whole before its row
is committed, a row never points at a missing PNG, a delete removes both, and
what a crash leaves (a PNG without a row) is swept.

A store that cannot reach what it keeps its images in raises
`gallery_unavailable`: the caller gets 503 with `Retry-After`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from imagine.errors import ApiError
from imagine.storage.records import ImageMetadata, ImageRecord, ListQuery, RecoveryReport

# What a client is told to wait before trying a store again.
RETRY_AFTER_S = 5


def gallery_unavailable(what: str) -> ApiError:
    """503 for a store whose database or object storage cannot be reached."""
    return ApiError(
        503,
        "SERVICE_UNAVAILABLE",
        f"The gallery is unavailable ({what}); try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@dataclass(frozen=True)
class StoredPng:
    """A stored PNG on its way out: its size, then its bytes in chunks."""

    length: int
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class GalleryState:
    """What /health says about the gallery."""

    backend: str  # "embedded" or "shared"
    ok: bool


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Gallery(abc.ABC):
    backend: str

    @abc.abstractmethod
    async def open(self) -> RecoveryReport:
        """Create or open the store, repair what a crash left, apply retention."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add(self, owner: str, images: Sequence[tuple[bytes, ImageMetadata]]) -> list[str]:
        """Store images for `owner`, each PNG whole before its row; their ids, in order.

        Once started, an add finishes even if the caller is cancelled, so it
        never stops between a PNG and its row.
        """

    @abc.abstractmethod
    async def delete(self, image_id: str, owner: str | None) -> bool:
        """Delete one image of `owner` (None: of anyone), row and PNG; False if there is none."""

    @abc.abstractmethod
    async def get(self, image_id: str, owner: str | None) -> ImageRecord | None:
        """One image of `owner` (None: of anyone); None for another caller's, a missing or a malformed id."""

    @abc.abstractmethod
    async def list(self, query: ListQuery) -> tuple[list[ImageRecord], int]:
        """One page, newest first, and how many images match in all."""

    @abc.abstractmethod
    async def read_png(self, image_id: str) -> bytes | None:
        """The PNG bytes, or None for a malformed id or an image deleted meanwhile."""

    @contextlib.asynccontextmanager
    async def open_png(self, image_id: str) -> AsyncIterator[StoredPng | None]:
        """The PNG to send to a client, or None (as `read_png`); stores that can stream override it."""
        png = await self.read_png(image_id)
        yield None if png is None else StoredPng(len(png), _one_chunk(png))

    async def png_link(self, image_id: str) -> str | None:
        """A short-lived URL a client may fetch the PNG from directly, where the store offers one."""
        return None

    @abc.abstractmethod
    async def apply_retention(self, owner: str | None = None, added: int = 0) -> int:
        """Remove images past the age limit and the oldest beyond the count limits; how many.

        With `owner`, after it added `added` images: the per-subject limit is checked for it
        alone, and the images just added stay even where they alone are past a limit (a
        generation never answers ids already gone). Without, the per-subject limit is checked
        for every subject (at start, after a change of the setting).
        """

    @property
    @abc.abstractmethod
    def periodic_upkeep(self) -> bool:
        """Whether `maintain` has anything to do between generations."""

    @abc.abstractmethod
    async def maintain(self) -> None:
        """What runs every few minutes: retention, and sweeping what crashes left. Never raises."""

    @abc.abstractmethod
    async def state(self) -> GalleryState: ...
