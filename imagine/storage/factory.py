"""Which gallery store the settings ask for: the embedded one, or (gallery.database + gallery.objects) the shared one."""

from __future__ import annotations

from imagine.settings import Settings, SettingsError
from imagine.storage.gallery import GalleryStore, storage_folder
from imagine.storage.interface import Gallery

SHARED_EXTRA = "shared-gallery"


def build_gallery(settings: Settings) -> Gallery:
    gallery = settings.gallery
    if not gallery.shared:
        return GalleryStore(
            storage_folder(settings),
            max_images=gallery.max_images,
            max_per_subject=gallery.max_images_per_subject,
            max_age_s=gallery.max_age_days * 86400,
        )
    try:
        # Only deployments that share a gallery need its drivers (the `shared-gallery` extra).
        from imagine.storage.shared_gallery import SharedGallery
    except ImportError as error:
        raise SettingsError(
            f"a shared gallery needs {error.name}: pip install 'imagine[{SHARED_EXTRA}]'"
        ) from None
    return SharedGallery(gallery)
