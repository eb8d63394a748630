"""GET /ui and GET /ui/{asset}: the web page, from the package's own files, without a token.

The page is a static shell: it asks its user for a token and then calls the
public API with it, like any other client. Its files are plain HTML, CSS and
JavaScript modules in `imagine/http/ui`, served from here (no CDN, no build),
under a Content-Security-Policy that allows only those files to run: no
inline script, no eval, no other origin.
"""

from __future__ import annotations

import functools
from importlib.resources import files

from aiohttp import web

from imagine.http.openapi import content_response, error_response, operation
from imagine.security.tokens import public

FOLDER = files("imagine.http") / "ui"
PAGE = "index.html"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The only files /ui/{asset} serves: the page's own.
ASSETS = {
    entry.name: MEDIA_TYPES[suffix]
    for entry in FOLDER.iterdir()
    if entry.is_file() and (suffix := "." + entry.name.rpartition(".")[2]) in MEDIA_TYPES
}

# blob: images are the PNGs the page fetched with its token; nothing else is allowed anywhere.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # After an upgrade the modules change together: the browser asks again rather than mix versions.
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (FOLDER / name).read_bytes()


@public
@operation(
    "The web page: generate, watch progress, browse the gallery (it asks for a token)",
    tags=["documentation"],
    description="A static shell under a strict Content-Security-Policy; everything it shows comes from the "
    "public API, called with the token its user pastes (kept for the browser tab only).",
    responses={200: content_response("The page", {"text/html": {"type": "string"}})},
)
async def ui_page(request: web.Request) -> web.Response:
    return web.Response(body=_read(PAGE), content_type="text/html", charset="utf-8", headers=HEADERS)


@public
@operation(
    "A file of the /ui page (its scripts, styles and icon)",
    tags=["documentation"],
    parameters=[{"name": "asset", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted(ASSETS)}}],
    responses={
        200: content_response("The file", {media: {"type": "string"} for media in sorted(set(ASSETS.values()))}),
        404: error_response("Not one of the page's files"),
    },
)
async def ui_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=_read(name), content_type=ASSETS[name], charset="utf-8", headers=HEADERS)


def routes(base: str) -> list[web.RouteDef]:
    return [web.get(base + "/ui", ui_page), web.get(base + "/ui/{asset}", ui_asset)]
