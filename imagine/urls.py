"""URLs of the service's resources."""

from __future__ import annotations


def gallery_path(base: str, image_id: str) -> str:
    return f"{base}/gallery/{image_id}.png"
