"""GET /openapi.json and GET /docs: the API document and Swagger UI, both without a token.

Swagger UI's files come from the swagger-ui-bundle package and are served from
here, never from a CDN, so the documentation works on a machine with no
internet access.
"""

from __future__ import annotations

import functools
import html
import json

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from imagine.security.tokens import public
from imagine.http.app_keys import openapi_key, settings_key
from imagine.http.openapi import content_response, error_response, json_response, operation

# The only files /docs/{asset} serves: what the page below loads.
ASSETS = {
    "swagger-ui.css": "text/css",
    "index.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>imagine API</title>
<link rel="stylesheet" href="{docs}/swagger-ui.css">
<link rel="stylesheet" href="{docs}/index.css">
<link rel="icon" type="image/png" href="{docs}/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{docs}/swagger-ui-bundle.js"></script>
<script src="{docs}/swagger-ui-standalone-preset.js"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{
    url: {document},
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  }});
}};
</script>
</body>
</html>
"""


@public
@operation(
    "The OpenAPI 3.1 document of this service",
    tags=["documentation"],
    responses={200: json_response("This document", {"type": "object", "required": ["openapi", "paths"]})},
)
async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[openapi_key])


@public
@operation(
    "Interactive documentation (Swagger UI)",
    tags=["documentation"],
    responses={200: content_response("The Swagger UI page", {"text/html": {"type": "string"}})},
)
async def docs_page(request: web.Request) -> web.Response:
    base = request.app[settings_key].server.base_path
    # In attributes the base path is HTML-escaped; inside <script> entities are not decoded, so there it
    # is a JSON string that cannot close the script element.
    document = json.dumps(base + "/openapi.json").replace("</", "<\\/")
    page = PAGE.format(docs=html.escape(base + "/docs"), document=document)
    return web.Response(text=page, content_type="text/html")


@functools.cache
def _asset(name: str) -> bytes:
    return (swagger_ui_path / name).read_bytes()


@public
@operation(
    "A Swagger UI file, for the /docs page",
    tags=["documentation"],
    parameters=[
        {"name": "asset", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted(ASSETS)}}
    ],
    responses={
        200: content_response(
            "The file (cacheable for a day)",
            {media: {"type": "string"} for media in sorted(set(ASSETS.values()))},
        ),
        404: error_response("Not one of the page's files"),
    },
)
async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(
        body=_asset(name), content_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
    )


def routes(base: str) -> list[web.RouteDef]:
    return [
        web.get(base + "/openapi.json", openapi_document),
        web.get(base + "/docs", docs_page),
        web.get(base + "/docs/{asset}", docs_asset),
    ]
