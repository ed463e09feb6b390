"""The MDM's HTTP routes, declared once with everything the API needs to know.

Each API module declares its handlers on its own :class:`ApiRoutes` table with
:meth:`ApiRoutes.route`, which records the role a handler requires, the JSON schema of
its body, its query parameters and its response. The same records drive request
validation, the auth middleware and the OpenAPI document (:mod:`meshblock.mdm.openapi`),
so the three cannot drift apart. A table iterates as aiohttp route definitions,
as MGMT's ``web.RouteTableDef`` is: ``create_app`` adds each module's table with
``app.add_routes`` (``mdm/app.py`` ``ROUTE_TABLES``); importing a module registers
nothing anywhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
from aiohttp import web

from meshblock.auth import Role
from meshblock.json_body import read_object
from meshblock.mdm.errors import BadRequest, Invalid, NotFound

MAX_BODY_BYTES = 1 << 20
MAX_ID = 2**31 - 1

Handler = Callable[..., Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class QueryParam:
    name: str
    description: str
    type: str = "integer"  # integer | number | string
    minimum: int | None = 1
    maximum: int | None = MAX_ID


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str  # aiohttp path, ids as {name:\d+}
    handler: Handler  # the installed wrapper: validates, then calls the endpoint
    role: Role
    summary: str
    tag: str
    body: dict[str, Any] | None = None
    response: str | None = None  # name of a component schema
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()
    also: tuple[int, ...] = ()  # other success statuses (200 and 201 of an upsert)

    @property
    def openapi_path(self) -> str:
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", self.path)


SPEC_ATTR = "__meshblock_route__"


class ApiRoutes:
    """One module's routes: their specs, and, iterated, the route definitions that
    ``app.add_routes`` installs (in the order they were declared)."""

    def __init__(self) -> None:
        self.specs: list[RouteSpec] = []

    def __iter__(self) -> Iterator[web.RouteDef]:
        for spec in self.specs:
            # A GET answers no HEAD: the API documents none (aiohttp adds one by default).
            kwargs = {"allow_head": False} if spec.method == "GET" else {}
            yield web.RouteDef(spec.method, spec.path, spec.handler, kwargs)

    def route(
        self,
        method: str,
        path: str,
        *,
        role: Role,
        summary: str,
        tag: str,
        body: dict[str, Any] | None = None,
        response: str | None = None,
        status: int = 200,
        query: tuple[QueryParam, ...] = (),
        errors: tuple[int, ...] = (),
        also: tuple[int, ...] = (),
        decode: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Callable[[Handler], Handler]:
        """``decode``: instead of the generic pass over ``body`` (the schema, which
        still documents it), the handler gets ``decode(the JSON object)``; it raises
        :class:`Invalid` as strictly as the schema would (a hot route's typed
        decoding: mdm/heartbeats.py)."""

        def decorator(fn: Handler) -> Handler:
            validator = (
                jsonschema_rs.validator_for(body) if body is not None and decode is None else None
            )

            async def handler(request: web.Request) -> web.StreamResponse:
                if decode is not None:
                    return await fn(request, decode(await read_object(request, MAX_BODY_BYTES)))
                if validator is not None:
                    return await fn(request, await _validated_body(request, validator, body))
                return await fn(request)

            handler.__name__ = fn.__name__
            handler.__doc__ = fn.__doc__
            spec = RouteSpec(
                method,
                path,
                handler,
                role,
                summary,
                tag,
                body,
                response,
                status,
                query,
                errors,
                also,
            )
            setattr(handler, SPEC_ATTR, spec)
            self.specs.append(spec)
            return handler

        return decorator


def spec_of(request: web.Request) -> RouteSpec | None:
    handler = request.match_info.route.handler
    return getattr(handler, SPEC_ATTR, None)


async def _validated_body(request: web.Request, validator: Any, schema: Any) -> dict[str, Any]:
    data = await read_object(request, MAX_BODY_BYTES)
    errors = list(validator.iter_errors(data))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.instance_path)
        msg = _describe(err, schema)
        msg = f"{where}: {msg}" if where else msg
        raise Invalid(msg, {"field": where} if where else None)
    return data


def path_id(request: web.Request, name: str = "id") -> int:
    """An integer id from the path; ids that cannot exist are 404."""
    value = int(request.match_info[name])
    if value < 1 or value > MAX_ID:
        raise NotFound(f"no such {name.removesuffix('_id').replace('_', ' ')} id {value}")
    return value


def query_int(
    request: web.Request,
    name: str,
    default: int | None = None,
    minimum: int = 0,
    maximum: int = MAX_ID,
) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw!r}") from None
    if value < minimum or value > maximum:
        raise BadRequest(f"query parameter {name} must be between {minimum} and {maximum}")
    return value


def query_float(
    request: web.Request, name: str, default: float, minimum: float, maximum: float
) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise BadRequest(f"query parameter {name} must be between {minimum} and {maximum}")
    return value


def _describe(err: Any, schema: Any) -> str:
    """The validator's message, or the field's own description where that is clearer."""
    if err.schema_path and err.schema_path[-1] == "oneOf":
        node = schema
        for part in err.schema_path[:-1]:
            node = node[part] if isinstance(node, dict) else node[int(part)]
        if isinstance(node, dict) and "description" in node:
            return f"expected {node['description']}, got {json.dumps(err.instance)}"
    return str(err.message)
