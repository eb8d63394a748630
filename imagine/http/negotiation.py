"""PNG or JSON: the body's `response_format` wins, else the Accept header."""

from __future__ import annotations

from typing import Literal

from imagine.errors import ApiError

ResponseFormat = Literal["png", "json"]

_FORMATS: dict[str, ResponseFormat] = {
    "image/png": "png",
    "image/*": "png",
    "*/*": "png",
    "application/json": "json",
    "application/*": "json",
}


def _media_ranges(accept: str) -> list[tuple[float, int, str]]:
    ranges = []
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges.append((quality, position, media.lower()))
    return ranges


def choose_format(requested: ResponseFormat | None, accept: str | None) -> ResponseFormat:
    """No Accept (curl's default is */*) means PNG, so `curl --output image.png` just works."""
    if requested is not None:
        return requested
    if not accept or not accept.strip():
        return "png"
    # Highest quality first; among equals, the order the client wrote them.
    for quality, _, media in sorted(_media_ranges(accept), key=lambda item: (-item[0], item[1])):
        if quality > 0 and media in _FORMATS:
            return _FORMATS[media]
    raise ApiError(
        406, "NOT_ACCEPTABLE", "Cannot answer with that Accept header: ask for image/png or application/json"
    )


def preferred(accept: str | None, offered: tuple[str, ...]) -> str | None:
    """The offered media type the Accept header ranks highest, or None; `*/*` and `type/*` pick the first that fits."""
    if not accept or not accept.strip():
        return None
    for quality, _, media in sorted(_media_ranges(accept), key=lambda item: (-item[0], item[1])):
        if quality <= 0:
            continue
        for candidate in offered:
            if media in (candidate, "*/*") or (media.endswith("/*") and candidate.startswith(media[:-1])):
                return candidate
    return None
