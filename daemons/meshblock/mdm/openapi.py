"""The OpenAPI 3.1 document of the MDM API, generated from the route specs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

import meshblock
from meshblock.auth import Role
from meshblock.mdm.routing import RouteSpec
from meshblock.mdm.schemas import COMPONENTS

_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or unknown bearer token",
    403: "The token may not do this",
    404: "Unknown id",
    409: "Conflicts with the current state (duplicate name, dependents, capacity)",
    422: "Invalid field",
}


def _operation(spec: RouteSpec) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": spec.handler.__name__,
        "summary": spec.summary,
        "tags": [spec.tag],
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
        for name in _path_params(spec.openapi_path)
    ]
    for q in spec.query:
        schema: dict[str, Any] = {"type": q.type}
        if q.minimum is not None:
            schema["minimum"] = q.minimum
        if q.maximum is not None:
            schema["maximum"] = q.maximum
        params.append(
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": schema,
            }
        )
    if params:
        op["parameters"] = params
    if spec.body is not None:
        op["requestBody"] = {
            "required": bool(spec.body.get("required")),
            "content": {"application/json": {"schema": spec.body}},
        }
    ok: dict[str, Any] = {"description": "OK" if spec.status != 201 else "Created"}
    if spec.response:
        ok["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{spec.response}"}}
        }
    elif spec.path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    with_content = ok
    if spec.status == 204:  # its response schema is that of the other statuses (a dry run)
        ok = {"description": "Done, no content"}
    responses: dict[str, Any] = {str(spec.status): ok}
    for extra in spec.also:
        responses[str(extra)] = dict(with_content, description="Created" if extra == 201 else "OK")
    if 202 in spec.also:  # a new SDS's registration, held pending an admin's approval
        responses["202"] = {
            "description": "Accepted: held as a request to join, pending an admin's approval",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/SdsJoinRequest"}}
            },
        }
    codes = set(spec.errors)
    if spec.body is not None:
        codes |= {400, 422}
    if spec.query:
        codes.add(400)
    if spec.role != Role.NONE:
        codes |= {401, 403}
        op["security"] = [{"bearer": []}]
        op["x-meshblock-role"] = spec.role.name.lower()
    else:
        op["security"] = []
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _ERROR_TEXT.get(code, "Error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op["responses"] = responses
    return op


def _path_params(path: str) -> list[str]:
    import re

    return re.findall(r"\{(\w+)\}", path)


def build(specs: list[RouteSpec]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        paths.setdefault(spec.openapi_path, {})[spec.method.lower()] = _operation(spec)
    paths["/api/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["meta"],
            "security": [],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshblock MDM API",
            "version": meshblock.__version__,
            "description": "Control plane of a meshblock cluster. See docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": COMPONENTS,
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


OPENAPI = web.AppKey("meshblock_mdm_openapi", dict)


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
