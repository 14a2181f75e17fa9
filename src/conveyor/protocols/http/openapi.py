"""The OpenAPI 3.1 document of the native API, generated from the route table."""

from __future__ import annotations

from typing import Any

import msgspec

from conveyor.protocols.http import wire
from conveyor.protocols.http.routes import ROUTES, Route

_REF = "#/components/schemas/{name}"


def openapi_document(version: str) -> dict[str, Any]:
    types: list[Any] = [wire.ErrorOut]
    for r in ROUTES:
        types += [t for t in (r.request, r.response) if t is not None]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "conveyor native API",
            "version": version,
            "description": (
                "JSON over HTTP/1.1. Bodies that are valid UTF-8 travel as text; others "
                'travel base64 with "body_encoding": "base64". Header values that are '
                'bytes travel as {"$base64": "..."}. The default exchange is written '
                "`amq.default` in paths."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def _operation(r: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    for name in ("queue", "exchange"):
        if "{" + name + "}" in r.path:
            params.append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )
    for p in r.query:
        params.append(
            {
                "name": p.name,
                "in": "query",
                "required": False,
                "description": p.description,
                "schema": {"type": p.type},
            }
        )
    op: dict[str, Any] = {
        "operationId": r.operation,
        "summary": r.summary,
        "tags": [r.tag],
        "responses": {
            "default": {"description": "error", "content": _json(wire.ErrorOut)},
        },
    }
    if params:
        op["parameters"] = params
    if r.request is not None:
        op["requestBody"] = {"required": False, "content": _json(r.request)}
    if r.response is not None:
        op["responses"]["200"] = {"description": "OK", "content": _json(r.response)}
    else:
        op["responses"]["204"] = {"description": "done"}
    return op


def _json(t: type) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=t.__name__)}}}
