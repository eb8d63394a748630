"""The shared gallery: rows in PostgreSQL, PNGs in an S3 bucket, one gallery for every replica that names both.

The embedded store's promises, across processes:

- An object is written whole (an S3 PUT is atomic) before its row is
  committed, and an id reaches a client only after the commit: a row never
  points at a missing object.
- An add that fails before its COMMIT removes its objects again. One whose
  COMMIT went out unanswered leaves them: its rows may exist, and removing
  their objects could leave rows pointing at nothing.
- A delete commits the row's removal first, then removes the object; an
  object whose removal failed is left to the sweep.
- The sweep removes objects without a row: a replica killed between PUT and
  COMMIT, an add whose cleanup failed. Only objects older than
  `gallery.orphan_grace_s` are judged (a younger one may be another replica's
  add between its PUT and its COMMIT), and one replica sweeps at a time (an
  advisory lock); every replica tries at start-up and every few minutes. It
  also removes rows whose object is gone (deleted behind the gallery's back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from imagine.errors import ApiError
from imagine.settings import GallerySettings
from imagine.storage.interface import Gallery, GalleryState, StoredPng, gallery_unavailable
from imagine.storage.postgres_index import CommitUnknown, PostgresIndex
from imagine.storage.records import ImageMetadata, ImageRecord, ListQuery, RecoveryReport, is_valid_id, new_id
from imagine.storage.s3_objects import S3Objects

log = logging.getLogger(__name__)

# How long a redirect's presigned URL stays valid: the client follows it at once.
PRESIGNED_TTL_S = 60
HEALTH_TIMEOUT_S = 2.0
# Rows (and the objects beside them) the sweep holds at a time.
SWEEP_BATCH = 1000


class SharedGallery(Gallery):
    backend = "shared"

    def __init__(
        self,
        settings: GallerySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = PostgresIndex(settings.database)
        self.objects = S3Objects(settings)
        self._max_images = settings.max_images
        self._max_per_subject = settings.max_images_per_subject
        self._max_age_s = settings.max_age_days * 86400
        self._redirect = settings.redirect
        self._orphan_grace_s = settings.orphan_grace_s
        self._clock = clock

    # ---- life cycle ---------------------------------------------------------

    async def open(self) -> RecoveryReport:
        """Connect (a database or bucket that is down makes routes answer 503 until it is back), sweep, retain."""
        await self.objects.open()
        try:
            await self.index.open()
        except BaseException:
            await self.objects.close()
            raise
        report = RecoveryReport()
        try:
            report = await self.sweep()
            await self.apply_retention()
        except ApiError as error:
            log.warning("shared gallery: %s", error.message)
        return report

    async def close(self) -> None:
        await self.index.close()
        await self.objects.close()

    # ---- writing ------------------------------------------------------------

    async def add(self, owner: str, images: Sequence[tuple[bytes, ImageMetadata]]) -> list[str]:
        return await asyncio.shield(self._add(owner, images))

    async def _add(self, owner: str, images: Sequence[tuple[bytes, ImageMetadata]]) -> list[str]:
        ids = [new_id() for _ in images]
        now = self._clock()
        records = [ImageRecord(image_id, owner, now, metadata) for image_id, (_, metadata) in zip(ids, images, strict=True)]
        try:
            await self.objects.put_all(ids, [png for png, _ in images])
            await self.index.insert(records)
        except CommitUnknown:
            log.warning("shared gallery: the database went away during a commit; the sweep settles %d object(s)", len(ids))
            raise gallery_unavailable("its database went away while storing") from None
        except BaseException:
            # Nothing was committed: remove what was written, else the sweep will.
            await self._remove_objects(ids)
            raise
        await self._retain_quietly(owner, len(ids))
        return ids

    async def copy_in(self, record: ImageRecord, png: bytes) -> bool:
        """Store an image under its own id, owner and time (a migration); False if that id is here already."""
        if await self.index.existing([record.id]):
            return False
        await self.objects.put(record.id, png)
        try:
            return await self.index.insert([record], if_absent=True) == 1
        except CommitUnknown:
            raise gallery_unavailable("its database went away while storing") from None

    async def delete(self, image_id: str, owner: str | None) -> bool:
        if not is_valid_id(image_id):
            return False
        return await asyncio.shield(self._delete(image_id, owner))

    async def _delete(self, image_id: str, owner: str | None) -> bool:
        deleted = await self.index.delete(image_id, owner)
        if deleted:
            await self._remove_objects([image_id])
        return deleted

    async def _remove_objects(self, ids: Sequence[str]) -> None:
        """Remove objects whose rows are gone (or never came); what fails is left to the sweep."""
        try:
            await self.objects.delete(ids)
        except ApiError as error:
            log.warning("shared gallery: %d object(s) left for the sweep: %s", len(ids), error.message)

    async def apply_retention(self, owner: str | None = None, added: int = 0) -> int:
        return await self._retain(owner, added, self._max_per_subject)

    async def _retain(self, owner: str | None, added: int, max_per_subject: int) -> int:
        if not (self._max_images or max_per_subject or self._max_age_s):
            return 0
        expired = await self.index.delete_expired(self._clock(), self._max_age_s, self._max_images, max_per_subject, owner, added)
        await self._remove_objects(expired)
        return len(expired)

    async def _retain_quietly(self, owner: str, added: int) -> None:
        # The images are stored by now: retention failing must not fail the add.
        try:
            await self.apply_retention(owner, added)
        except ApiError as error:
            log.warning("shared gallery retention: %s", error.message)
        except Exception:
            log.exception("shared gallery retention failed")

    # ---- reading ------------------------------------------------------------

    async def get(self, image_id: str, owner: str | None) -> ImageRecord | None:
        if not is_valid_id(image_id):
            return None
        return await self.index.get(image_id, owner)

    async def list(self, query: ListQuery) -> tuple[list[ImageRecord], int]:
        return await self.index.list(query)

    async def read_png(self, image_id: str) -> bytes | None:
        if not is_valid_id(image_id):
            return None
        return await self.objects.read(image_id)

    @contextlib.asynccontextmanager
    async def open_png(self, image_id: str) -> AsyncIterator[StoredPng | None]:
        if not is_valid_id(image_id):
            yield None
            return
        async with self.objects.stream(image_id) as png:
            yield png

    async def png_link(self, image_id: str) -> str | None:
        if not self._redirect or not is_valid_id(image_id):
            return None
        return await self.objects.presigned_url(image_id, PRESIGNED_TTL_S)

    # ---- upkeep -------------------------------------------------------------

    async def sweep(self) -> RecoveryReport:
        """Remove objects without a row (older than the grace period) and rows without an object.

        Rows and objects are walked side by side in id order, a batch at a
        time, each batch's rows read before its objects are listed: a row read
        was committed after its object's PUT, so its object is listed unless it
        is really gone. An object without a row is judged only once old, and
        its row is looked up once more just before the object is removed.
        Nothing happens while another replica sweeps.
        """
        orphans = dangling = 0
        async with self.index.sweep_lock() as mine:
            if not mine:
                return RecoveryReport()
            cutoff = self._clock() - self._orphan_grace_s
            after = ""
            while True:
                rows = await self.index.ids_after(after, SWEEP_BATCH)
                upto = rows[-1] if len(rows) == SWEEP_BATCH else None
                objects = await self.objects.ids_between(after, upto)
                missing = [image_id for image_id in rows if image_id not in objects]
                if missing:
                    dangling += await self.index.delete_ids(missing)
                old = set(objects.keys() - set(rows))
                old = {image_id for image_id in old if objects[image_id] < cutoff}
                if old:
                    orphaned = sorted(old - await self.index.existing(sorted(old)))
                    await self.objects.delete(orphaned)
                    orphans += len(orphaned)
                if upto is None:
                    break
                after = upto
        report = RecoveryReport(orphan_files=orphans, dangling_rows=dangling)
        if orphans or dangling:
            log.warning("shared gallery sweep: %s", report)
        return report

    @property
    def periodic_upkeep(self) -> bool:
        return True

    async def maintain(self) -> None:
        try:
            await self.sweep()
            # Adds keep each subject within its limit: the every-subject pass (a table scan) is for the start only.
            await self._retain(None, 0, max_per_subject=0)
        except ApiError as error:
            log.warning("shared gallery upkeep: %s", error.message)
        except Exception:
            log.exception("shared gallery upkeep failed")

    async def state(self) -> GalleryState:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                database, bucket = await asyncio.gather(self.index.ping(), self.objects.ping())
        except TimeoutError:
            return GalleryState(self.backend, False)
        return GalleryState(self.backend, database and bucket)
