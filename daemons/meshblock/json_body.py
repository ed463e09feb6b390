"""Request bodies that are JSON objects, for the MDM's API and MGMT's.

A body is read to its end but at most ``limit`` bytes (a longer one is refused
before it is decoded), and its nesting is limited to :data:`MAX_DEPTH` arrays and
objects: a body nested deeper is a 400 ``bad_request`` that says so. The decoder
itself recurses once per level and gives up at the interpreter's recursion limit
(a ``RecursionError``, which would otherwise be a 500); that is caught and answered
the same way, and every body it does decode is then checked against the limit.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from meshblock.http_errors import BadRequest

MAX_DEPTH = 64  # no request of either API nests deeper than 5


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (decoded JSON) nests more than ``limit`` arrays and objects."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _deep() -> BadRequest:
    return BadRequest(f"request body is not valid JSON: nested deeper than {MAX_DEPTH} levels")


def parse_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object (``{}`` when blank); :class:`BadRequest` otherwise."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if too_deep(data):
        raise _deep()
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


async def read_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's body (at most ``limit`` bytes) as a JSON object, by :func:`parse_object`."""
    too_long = BadRequest(f"request body larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_long
    chunks: list[bytes] = []
    size = 0
    while size <= limit:  # read() returns what has arrived, not always the whole body
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise too_long
    return parse_object(b"".join(chunks))
