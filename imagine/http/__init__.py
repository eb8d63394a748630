"""The HTTP layer: app factory, middlewares, views, negotiation, the OpenAPI document, the server."""
