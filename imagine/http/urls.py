"""Absolute URLs as clients see them, also behind a reverse proxy."""

from __future__ import annotations

import re
import urllib.parse

from aiohttp import web

from imagine.errors import validation_error
from imagine.http.app_keys import settings_key, trusted_networks_key, url_signer_key
from imagine.security.ratelimit import is_trusted_proxy

# host (letters, digits, '-', '_', dots, a trailing dot allowed), host:port, or [IPv6]:port (a zone as %25...):
# nothing that would move a link elsewhere ('/', '?', '#', '@', '\\', spaces). Anything else is no host.
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\])(?::\d{1,5})?")


def _nearest(header: str | None) -> str:
    # With several proxies the right-most value is the one our own (trusted) proxy set.
    return header.split(",")[-1].strip() if header else ""


def public_origin(request: web.Request) -> str:
    """server.public_url, else the request's scheme and host (forwarded ones from a trusted proxy only)."""
    server = request.app[settings_key].server
    if server.public_url:
        return server.public_url.rstrip("/")
    scheme, host = request.scheme, request.host
    if is_trusted_proxy(request.remote, request.app[trusted_networks_key]):
        proto = _nearest(request.headers.get("X-Forwarded-Proto")).lower()
        forwarded_host = _nearest(request.headers.get("X-Forwarded-Host"))
        if proto in ("http", "https"):
            scheme = proto
        if _HOST.fullmatch(forwarded_host):
            host = forwarded_host
    if not _HOST.fullmatch(host):
        # A Host that is no host ("evil.example/#") would make a link to somewhere else (RFC 9112: a 400).
        raise validation_error([{"loc": ["header", "Host"], "msg": "must be a host name or address, with an optional port"}])
    return f"{scheme}://{host}"


def gallery_path(base: str, image_id: str) -> str:
    return f"{base}/gallery/{image_id}.png"


def signed_image_url(request: web.Request, origin: str, image_id: str) -> str:
    """An absolute link (at `origin`, the request's `public_origin`) to a gallery image that works without
    a token until it expires."""
    base = request.app[settings_key].server.base_path
    query = urllib.parse.urlencode(request.app[url_signer_key].sign(image_id))
    return f"{origin}{gallery_path(base, image_id)}?{query}"
