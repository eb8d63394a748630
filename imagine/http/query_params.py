"""Query strings as the routes take them: each parameter at most once, and only those the route knows.

A repeated parameter (`?sub=a&sub=b`) has no one meaning, and an unknown one is
most often a typo that would otherwise fall back to a default without a word:
both are a 400 naming the parameter, as unknown body fields are.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import web

from imagine.errors import validation_error


def query_values(request: web.Request, known: Collection[str]) -> dict[str, str]:
    """The query's parameters, each given once and each one of `known`; 400 naming every other."""
    query = request.query
    repeated = sorted({name for name in query if len(query.getall(name)) > 1})
    unknown = sorted(set(query) - set(known))
    errors = [{"loc": ["query", name], "msg": "given more than once"} for name in repeated]
    errors += [{"loc": ["query", name], "msg": "unknown parameter"} for name in unknown]
    if errors:
        raise validation_error(errors)
    return dict(query)
