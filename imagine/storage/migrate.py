"""`imagine gallery migrate`: copy the embedded gallery into a shared one, keeping ids, owners and times.

Idempotent: an image whose id the shared gallery has already is skipped, so a
migration run twice (or resumed after an interruption) copies nothing twice.
Each image is copied as the shared store adds one, object before row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from imagine.settings import Settings
from imagine.storage.gallery import GalleryStore, storage_folder


@dataclass(frozen=True)
class MigrationReport:
    copied: int
    already_there: int
    missing_png: int  # a row whose file went meanwhile: nothing to copy


async def migrate_to_shared(settings: Settings, *, database: str, objects: str) -> MigrationReport:
    """Copy every image of the embedded gallery `settings` name into the shared one at `database` + `objects`."""
    from imagine.storage.shared_gallery import SharedGallery

    target_settings = dataclasses.replace(settings.gallery, database=database, objects=objects, max_images=0, max_age_days=0)
    source = GalleryStore(storage_folder(settings))
    target = SharedGallery(target_settings)
    copied = already = missing = 0
    await source.open()
    try:
        await target.open()
        try:
            async for records in source.all_records():
                for record in records:
                    png = await source.read_png(record.id)
                    if png is None:
                        missing += 1
                    elif await target.copy_in(record, png):
                        copied += 1
                    else:
                        already += 1
        finally:
            await target.close()
    finally:
        await source.close()
    return MigrationReport(copied, already, missing)
