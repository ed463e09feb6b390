"""What every API module needs: sessions that bump the epoch, lookups that 404."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.context import ctx
from meshblock.mdm.epochs import bump, current
from meshblock.mdm.errors import BadRequest, Conflict, Invalid, NotFound
from meshblock.mdm.leader import writing
from meshblock.mdm.routing import QueryParam, query_float, query_int
from meshblock.sizes import SizeError, parse_size

WAIT_PARAMS = (
    QueryParam(
        "wait_epoch",
        "return once the epoch is greater than this (long-poll)",
        minimum=0,
        maximum=2**62,
    ),
    QueryParam(
        "timeout",
        "seconds to wait at most (default 25, capped by the MDM's cluster.longpoll_max_s)",
        type="number",
        minimum=0,
        maximum=300,
    ),
)

M = TypeVar("M")


@asynccontextmanager
async def change(request: web.Request) -> AsyncIterator[AsyncSession]:
    """A transaction that bumps the cluster epoch and wakes long-polls on commit."""
    c = ctx(request)
    async with writing(c.write_gate, c.sessions) as session:
        yield session
        epoch = await bump(session)
    c.notifier.publish(epoch)


@asynccontextmanager
async def reading(request: web.Request) -> AsyncIterator[AsyncSession]:
    async with ctx(request).sessions() as session, session.begin():
        yield session


async def get_or_404(
    session: AsyncSession, model: type[M], id_: int, what: str, options: tuple[Any, ...] = ()
) -> M:
    obj = (
        await session.execute(
            select(model).where(model.id == id_).options(*options)  # type: ignore[attr-defined]
        )
    ).scalar_one_or_none()
    if obj is None:
        raise NotFound(f"no {what} with id {id_}")
    return obj


async def must_exist(session: AsyncSession, model: Any, id_: int, what: str, field: str) -> None:
    """A referenced object must exist: a missing one is a 404 naming the field."""
    found = (await session.execute(select(model.id).where(model.id == id_))).scalar()
    if found is None:
        raise NotFound(f"no {what} with id {id_}", {"field": field})


async def name_free(
    session: AsyncSession,
    model: Any,
    name: str,
    what: str,
    exclude_id: int | None = None,
    **scope: Any,
) -> None:
    q = select(func.count()).select_from(model).where(model.name == name)
    for k, v in scope.items():
        q = q.where(getattr(model, k) == v)
    if exclude_id is not None:
        q = q.where(model.id != exclude_id)
    if (await session.execute(q)).scalar_one():
        raise Conflict(f"a {what} named {name!r} already exists", {"field": "name"})


def size_field(value: Any, field: str, maximum: int) -> int:
    try:
        n = parse_size(value)
    except SizeError as exc:
        raise Invalid(f"{field}: {exc}", {"field": field}) from None
    if n <= 0:
        raise Invalid(f"{field}: must be positive", {"field": field})
    if n > maximum:
        raise Invalid(f"{field}: {n} bytes is more than the maximum of {maximum}", {"field": field})
    return n


def ts(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.isoformat()


def json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def encoded_json(
    request: web.Request, body: bytes, gzipped: Callable[[], Awaitable[bytes]] | None = None
) -> web.Response:
    """A JSON document encoded already (a cached PG map); with ``gzipped``, its gzip,
    sent as such to a client that accepts gzip (the compression middleware leaves a
    response with a ``Content-Encoding`` alone)."""
    if gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(
            body=await gzipped(),
            content_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )
    return web.Response(body=body, content_type="application/json")


async def long_poll(
    request: web.Request, read_epoch: Callable[[AsyncSession], Awaitable[int]]
) -> None:
    """With ``?wait_epoch=N``, return once ``read_epoch`` exceeds N or on timeout."""
    after = query_int(request, "wait_epoch", minimum=0, maximum=2**62)
    c = ctx(request)
    limit = c.config.cluster.longpoll_max_s
    timeout = min(query_float(request, "timeout", 25.0, 0, 300), limit)
    if after is None:
        return
    deadline = time.monotonic() + timeout

    async def reload() -> int:
        async with reading(request) as s:
            return await current(s)

    while True:
        seen = c.notifier.epoch
        async with reading(request) as s:
            if await read_epoch(s) > after:
                return
        remaining = deadline - time.monotonic()
        if remaining <= 0 or c.notifier.closing:
            return
        await c.notifier.wait_beyond(seen, remaining, reload)


DRY_RUN = QueryParam(
    "dry_run",
    "true: check and answer what the change would do (a DryRun document) without changing anything",
    type="boolean",
    minimum=None,
    maximum=None,
)


def dry_run(request: web.Request) -> bool:
    """The ``dry_run`` query parameter: ``true``/``1`` or ``false``/``0`` (absent)."""
    raw = request.query.get("dry_run")
    if raw is None or raw in ("false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise BadRequest(f"query parameter dry_run must be true or false, got {raw!r}")


class DryRunDone(Exception):
    """Raised inside a :func:`change` with the dry run's answer: the transaction rolls
    back whole (nothing the request's own code did is committed, the epoch does not
    move) and the handler answers ``doc``."""

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__("dry run")
        self.doc = doc
