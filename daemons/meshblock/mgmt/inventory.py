"""MGMT's cluster pages: pools, volumes, SDSs with their devices, SDCs with their
mappings, each with a detail page, and the actions on volumes and SDSs.

Every figure comes from the MDM's REST API (``/api/v1/...``), read with MGMT's own
read credential (its ``mgmt:`` certificate, or ``[mdm] token_file``), never from
MGMT's database. The actions (create, resize, delete, map and unmap a volume; an SDS
entering or leaving maintenance) are calls to the MDM's API too, made with a separate
admin credential, ``[mdm] admin_cert`` and ``admin_key`` (an ``admin:NAME``
certificate) or ``[mdm] admin_token_file``; without one, MGMT makes no change and
shows no action. An action needs the MGMT role ``admin`` and the session's CSRF token
(a viewer sees no button, and a POST of theirs is a 403 before the MDM is called).

A successful action is answered 303 with the page to go to (``?done=<what>``, a fixed
message); a refused one shows the page again with the MDM's own error message in
``#action-error``, under the MDM's status (409, 422, ...; 502 when the MDM cannot be
reached).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from meshblock import pki
from meshblock.config import ConfigError, read_secret_file
from meshblock.mgmt import charts, progress, prometheus
from meshblock.mgmt.config import MgmtConfig
from meshblock.mgmt.context import CTX, ctx
from meshblock.mgmt.errors import ApiError, Invalid, NotFound, Upstream
from meshblock.mgmt.models import UserRole
from meshblock.mgmt.pages import render
from meshblock.mgmt.sessions import Identity, require
from meshblock.sizes import SizeError, parse_size
from meshblock.tls import MdmTls, TlsConfig, mdm_tls

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_ID = 2**63 - 1
MAX_RESPONSE_BYTES = 32 << 20
MAX_NAME_CHARS = 255
BARE_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")  # fullmatch: GiB
ID_TEXT = re.compile(r"[0-9]{1,19}")  # fullmatch
MAX_SIZE_CHARS = 40

#: The messages of ``?done=``: fixed texts, so that a link cannot make a page say
#: anything else.
DONE = {
    "created": "Volume created.",
    "resized": "Volume resized.",
    "mapped": "Volume mapped.",
    "unmapped": "Volume unmapped.",
    "deleted": "Volume deleted: the SDSs free its space.",
    "maintenance_enter": "The SDS is in maintenance.",
    "maintenance_exit": "The SDS left maintenance.",
}


# -- the admin credential for actions --------------------------------------------------


class ActionsOff(ApiError):
    """MGMT has no admin credential for the MDM: it changes nothing."""

    status = 503
    code = "actions_off"


class MdmRefused(ApiError):
    """The MDM refused an action (or could not be reached): its status and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Actions:
    """The session MGMT makes its changes to the MDM with (``None``: no admin
    credential configured) and the identity that makes them, for the pages."""

    http: aiohttp.ClientSession | None
    acting_as: str


ACTIONS = web.AppKey("meshblock_mgmt_actions", Actions)
ACTIONS_OFF = (
    "MGMT has no admin credential for the MDM, so it makes no change: set [mdm] admin_cert "
    "and admin_key (an admin: certificate), or admin_token_file (docs/mgmt.md)"
)


def actions_link(config: MgmtConfig) -> tuple[MdmTls, dict[str, str], str] | None:
    """How MGMT makes changes on the MDM: the TLS of an ``admin:`` certificate, or the
    admin token of ``[mdm] admin_token_file``; the headers; who it acts as. ``None``
    when neither is set (or there is no MDM). :class:`ConfigError` for a bad setting
    (checked at start and by ``--check-config``)."""
    m = config.mdm
    if bool(m.admin_cert) != bool(m.admin_key):
        raise ConfigError("[mdm] admin_cert and admin_key go together: set both or neither")
    if m.admin_cert and m.admin_token_file:
        raise ConfigError("[mdm] admin_cert and admin_token_file exclude each other: set one")
    if not m.url or not (m.admin_cert or m.admin_token_file):
        return None
    t = config.tls
    if m.admin_cert:
        if not t.ca:
            raise ConfigError("[mdm] admin_cert needs [tls] ca, the cluster CA's certificate")
        tls = TlsConfig(cert=m.admin_cert, key=m.admin_key, ca=t.ca, crl=t.crl)
        try:
            link = mdm_tls(tls, [m.url], pki.Kind.ADMIN, key="mdm.url")
        except ConfigError as exc:  # its messages name [tls] cert: this is admin_cert
            raise ConfigError(f"[mdm] admin_cert {m.admin_cert}: {exc}") from None
        return link, {}, str(link.identity)
    token = read_secret_file(m.admin_token_file, "mdm.admin_token_file")
    link = mdm_tls(TlsConfig(ca=t.ca, crl=t.crl), [m.url], pki.Kind.ADMIN, key="mdm.url")
    return link, {"Authorization": f"Bearer {token}"}, "the MDM's admin token"


def mdm_actions(user_agent: str) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context that opens the admin session (after MGMT's context)."""

    async def cleanup_ctx(app: web.Application) -> AsyncIterator[None]:
        found = actions_link(app[CTX].config)
        if found is None:
            log.info("no [mdm] admin_cert or admin_token_file: the cluster pages only read")
            app[ACTIONS] = Actions(None, "")
            yield
            return
        link, headers, who = found
        async with aiohttp.ClientSession(
            headers={"User-Agent": user_agent, **headers},
            trust_env=False,
            connector=link.connector(),
        ) as http:
            app[ACTIONS] = Actions(http, who)
            log.info("cluster pages: actions are made on the MDM as %s", who)
            yield

    return cleanup_ctx


# -- calls to the MDM ------------------------------------------------------------------


def _error_of(raw: bytes, status: int) -> tuple[str, str]:
    """The MDM's error code and message out of its JSON error body."""
    try:
        doc = json.loads(raw)
        err = doc["error"]
        return str(err.get("code", "upstream")), str(err["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "upstream", f"HTTP {status}: {raw[:300].decode(errors='replace').strip()}"


async def mdm_call(
    request: web.Request,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
) -> Any:
    """The MDM's JSON answer to ``method path``; :class:`MdmRefused` with the MDM's
    status and message when it refuses, 502 when it cannot be reached."""
    cfg = ctx(request).config.mdm
    if not cfg.url:
        raise MdmRefused(502, "upstream", "no MDM is configured ([mdm] url)")
    url = cfg.url.rstrip("/") + path
    try:
        async with http.request(
            method, url, json=body, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)
        ) as resp:
            raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise MdmRefused(502, "upstream", "the MDM's answer is too large")
            if resp.status >= 300:
                code, message = _error_of(raw, resp.status)
                raise MdmRefused(resp.status, code, f"The MDM refused: {message}")
            return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise MdmRefused(502, "upstream", f"the MDM answered {path} with non-JSON") from None
    except TimeoutError:  # before OSError, of which it is a subclass
        raise MdmRefused(
            502,
            "upstream",
            f"the MDM did not answer within {cfg.timeout_s:g} s ([mdm] timeout_s); "
            "a change may still have been made: reload the page to see",
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise MdmRefused(
            502, "upstream", f"the MDM is unreachable at {url}: {str(exc) or type(exc).__name__}"
        ) from None


async def read(request: web.Request, path: str) -> Any:
    """A read with MGMT's read credential; the MDM's 404 is this page's 404, any
    other failure a 502 page."""
    try:
        return await mdm_call(request, ctx(request).mdm_http, "GET", path)
    except MdmRefused as exc:
        if exc.status == 404:
            raise NotFound(exc.message) from None
        raise Upstream(exc.message) from None


async def read_all(request: web.Request, *paths: str) -> list[Any]:
    return list(await asyncio.gather(*(read(request, p) for p in paths)))


async def act(
    request: web.Request, ident: Identity, method: str, path: str, body: Any = None
) -> Any:
    """A change, with the admin credential; :class:`ActionsOff` without one."""
    actions = request.app[ACTIONS]
    if actions.http is None:
        raise ActionsOff(ACTIONS_OFF)
    try:
        result = await mdm_call(request, actions.http, method, path, body)
    except MdmRefused as exc:
        log.info("%s %s for MGMT user %s refused: %s", method, path, ident.name, exc.message)
        raise
    log.info("%s %s done on the MDM for MGMT user %s", method, path, ident.name)
    return result


# -- helpers for pages ------------------------------------------------------------------


def _int(text: str) -> int | None:
    """A decimal id of ASCII digits in the MDM's range, else None."""
    if not ID_TEXT.fullmatch(text):
        return None
    value = int(text)
    return value if 1 <= value <= MAX_ID else None


def _id(request: web.Request, key: str = "id") -> int:
    value = _int(request.match_info[key])
    if value is None:
        raise NotFound(f"no such id {request.match_info[key][:30]}")
    return value


def _form_id(form: dict[str, str], key: str, what: str) -> int:
    value = _int(form.get(key, "").strip())
    if value is None:
        raise Invalid(f"choose {what}")
    return value


def size_of(text: str) -> int:
    """Bytes of a size typed in a form: a bare number is GiB, else any unit the MDM
    takes (``512MiB``, ``2TB``); :class:`Invalid` otherwise."""
    text = text.strip()
    if not text or len(text) > MAX_SIZE_CHARS:
        raise Invalid("size: a number of GiB, or a number and a unit such as 512MiB")
    if BARE_NUMBER.fullmatch(text):
        text += "GiB"
    try:
        n = parse_size(text)
    except (SizeError, ValueError) as exc:
        raise Invalid(f"size: {exc}") from None
    if n <= 0:
        raise Invalid("size: must be positive")
    return n


def _by_id(items: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(x["id"]): x for x in items if isinstance(x, dict) and "id" in x}


async def io_charts(request: web.Request, kind: str, name: str) -> dict[str, Any]:
    """The detail page's IO charts of ``kind`` ``name`` over the range the page asked
    for (``?range=15m|1h|6h|24h``), from Prometheus's recorded rates; each chart that
    cannot be drawn carries the reason instead."""
    c = ctx(request)
    cfg = c.config.prometheus
    key = charts.range_of(request.query.get("range"))
    end = time.time()
    start = end - charts.RANGES[key]
    step = charts.step_of(charts.RANGES[key])

    async def one(spec: charts.ChartSpec) -> dict[str, Any]:
        if not cfg.url:
            return {"spec": spec, "svg": None, "error": "no Prometheus is configured"}
        try:
            series = await prometheus.query_range(c.http, cfg, spec.query, start, end, step)
        except ApiError as exc:
            return {"spec": spec, "svg": None, "error": exc.message}
        return {"spec": spec, "svg": charts.svg(spec, series, start, end), "error": None}

    drawn = await asyncio.gather(*(one(s) for s in charts.object_charts(kind, name)))
    return {
        "chart_range": key,
        "chart_ranges": list(charts.RANGES),
        "io_charts": list(drawn),
        "chart_latency": bool(charts.OBJECT_SERIES[kind][3]),
    }


def can_act(request: web.Request, ident: Identity) -> bool:
    """Whether the page shows action buttons: an admin, with actions configured."""
    return ident.is_admin and request.app[ACTIONS].http is not None


def _page(
    request: web.Request,
    name: str,
    ident: Identity,
    status: int = 200,
    error: str | None = None,
    **values: Any,
) -> web.Response:
    done = DONE.get(request.query.get("done", ""))
    return render(
        request,
        name,
        ident,
        status,
        can_act=can_act(request, ident),
        actions_off=ident.is_admin and request.app[ACTIONS].http is None,
        actions_off_text=ACTIONS_OFF,
        acting_as=request.app[ACTIONS].acting_as,
        done=done,
        error=error,
        **values,
    )


def _redirect(location: str, done: str) -> web.Response:
    target = f"{location}?{urlencode({'done': done})}"
    return web.Response(status=303, headers={"Location": target, "Cache-Control": "no-store"})


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


async def _admin(request: web.Request) -> tuple[Identity, dict[str, str]]:
    """The form of an action, from an admin with the session's CSRF token (else 403)."""
    form = await _form(request)
    return await require(request, UserRole.ADMIN, form), form


# -- pools -----------------------------------------------------------------------------


@routes.get("/pools")
async def pools_page(request: web.Request) -> web.Response:
    ident = await require(request)
    pools, pds, volumes, rebuild, scrub = await read_all(
        request,
        "/api/v1/pools",
        "/api/v1/protection-domains",
        "/api/v1/volumes",
        "/api/v1/rebuild",
        "/api/v1/scrub",
    )
    counts: dict[int, int] = {}
    for v in volumes["volumes"]:
        if v.get("state") == "active":
            counts[v["pool_id"]] = counts.get(v["pool_id"], 0) + 1
    return _page(
        request,
        "pools.html",
        ident,
        page="pools",
        pools=pools["pools"],
        pds=_by_id(pds["protection_domains"]),
        volume_counts=counts,
        work=progress.by_pool(rebuild, scrub),
    )


@routes.get(r"/pools/{id:\d+}")
async def pool_page(request: web.Request) -> web.Response:
    ident = await require(request)
    pool_id = _id(request)
    pool, volumes, sds, pds, rebuild, scrub = await read_all(
        request,
        f"/api/v1/pools/{pool_id}",
        f"/api/v1/volumes?pool_id={pool_id}",
        "/api/v1/sds",
        "/api/v1/protection-domains",
        "/api/v1/rebuild",
        f"/api/v1/pools/{pool_id}/scrub",
    )
    copies = next((p for p in rebuild["pools"] if p.get("pool_id") == pool_id), None)
    devices = [
        (s, d) for s in sds["sds"] for d in s.get("devices", []) if d.get("pool_id") == pool_id
    ]
    return _page(
        request,
        "pool.html",
        ident,
        page="pools",
        pool=pool,
        volumes=volumes["volumes"],
        devices=devices,
        pds=_by_id(pds["protection_domains"]),
        work=progress.of_pool(copies, scrub),
        **await io_charts(request, "pool", pool["name"]),
    )


# -- volumes ---------------------------------------------------------------------------


async def _volumes_page(
    request: web.Request,
    ident: Identity,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> web.Response:
    volumes, pools = await read_all(request, "/api/v1/volumes", "/api/v1/pools")
    return _page(
        request,
        "volumes.html",
        ident,
        status,
        error,
        page="volumes",
        volumes=volumes["volumes"],
        pools=_by_id(pools["pools"]),
        form=form or {},
    )


@routes.get("/volumes")
async def volumes_page(request: web.Request) -> web.Response:
    return await _volumes_page(request, await require(request))


@routes.post("/volumes")
async def create_volume(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    try:
        name = form.get("name", "").strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise Invalid(f"a volume needs a name of 1 to {MAX_NAME_CHARS} characters")
        body = {
            "name": name,
            "pool_id": _form_id(form, "pool_id", "a storage pool"),
            "size": size_of(form.get("size", "")),
            "type": "thick" if form.get("type") == "thick" else "thin",
        }
        created = await act(request, ident, "POST", "/api/v1/volumes", body)
    except ApiError as exc:
        return await _volumes_page(request, ident, exc.status, exc.message, form)
    return _redirect(f"/volumes/{int(created['id'])}", "created")


async def _volume_page(
    request: web.Request, ident: Identity, status: int = 200, error: str | None = None
) -> web.Response:
    vid = _id(request)
    volume, mappings, sdcs = await read_all(
        request,
        f"/api/v1/volumes/{vid}",
        f"/api/v1/mappings?volume_id={vid}",
        "/api/v1/sdc",
    )
    pool, drawn = await asyncio.gather(
        read(request, f"/api/v1/pools/{int(volume['pool_id'])}"),
        io_charts(request, "volume", volume["name"]),
    )
    return _page(
        request,
        "volume.html",
        ident,
        status,
        error,
        page="volumes",
        volume=volume,
        pool=pool,
        mappings=mappings["mappings"],
        sdcs=_by_id(sdcs["sdc"]),
        **drawn,
    )


@routes.get(r"/volumes/{id:\d+}")
async def volume_page(request: web.Request) -> web.Response:
    return await _volume_page(request, await require(request))


@routes.post(r"/volumes/{id:\d+}/resize")
async def resize_volume(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    vid = _id(request)
    try:
        body = {"size": size_of(form.get("size", ""))}
        await act(request, ident, "PATCH", f"/api/v1/volumes/{vid}", body)
    except ApiError as exc:
        return await _volume_page(request, ident, exc.status, exc.message)
    return _redirect(f"/volumes/{vid}", "resized")


@routes.post(r"/volumes/{id:\d+}/map")
async def map_volume(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    vid = _id(request)
    try:
        body = {
            "volume_id": vid,
            "sdc_id": _form_id(form, "sdc_id", "an SDC"),
            "access_mode": "read_only" if form.get("access_mode") == "read_only" else "read_write",
        }
        await act(request, ident, "POST", "/api/v1/mappings", body)
    except ApiError as exc:
        return await _volume_page(request, ident, exc.status, exc.message)
    return _redirect(f"/volumes/{vid}", "mapped")


@routes.post(r"/volumes/{id:\d+}/unmap")
async def unmap_volume(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    vid = _id(request)
    try:
        mid = _form_id(form, "mapping_id", "a mapping")
        # Only a mapping of this volume: the page's form names one of its own.
        mapping = await mdm_call(request, ctx(request).mdm_http, "GET", f"/api/v1/mappings/{mid}")
        if int(mapping["volume_id"]) != vid:
            raise Invalid(f"mapping {mid} is not one of volume {vid}'s")
        await act(request, ident, "DELETE", f"/api/v1/mappings/{mid}")
    except ApiError as exc:
        return await _volume_page(request, ident, exc.status, exc.message)
    return _redirect(f"/volumes/{vid}", "unmapped")


async def _delete_page(
    request: web.Request, ident: Identity, status: int = 200, error: str | None = None
) -> web.Response:
    vid = _id(request)
    volume, mappings = await read_all(
        request, f"/api/v1/volumes/{vid}", f"/api/v1/mappings?volume_id={vid}"
    )
    return _page(
        request,
        "volume_delete.html",
        ident,
        status,
        error,
        page="volumes",
        volume=volume,
        mappings=mappings["mappings"],
    )


@routes.get(r"/volumes/{id:\d+}/delete")
async def delete_confirmation(request: web.Request) -> web.Response:
    """The confirmation step: the volume's name must be typed to delete it."""
    return await _delete_page(request, await require(request))


@routes.post(r"/volumes/{id:\d+}/delete")
async def delete_volume(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    vid = _id(request)
    try:
        volume = await read(request, f"/api/v1/volumes/{vid}")
        if form.get("confirm_name", "").strip() != volume["name"]:
            raise Invalid(
                f"type the volume's name, {volume['name']}, to confirm that it is to be deleted"
            )
        await act(request, ident, "DELETE", f"/api/v1/volumes/{vid}")
    except ApiError as exc:
        if exc.status == 404:
            raise
        return await _delete_page(request, ident, exc.status, exc.message)
    return _redirect("/volumes", "deleted")


# -- SDSs ------------------------------------------------------------------------------


@routes.get("/sds")
async def sds_list_page(request: web.Request) -> web.Response:
    ident = await require(request)
    sds, pools, pds = await read_all(
        request, "/api/v1/sds", "/api/v1/pools", "/api/v1/protection-domains"
    )
    return _page(
        request,
        "sds_list.html",
        ident,
        page="sds",
        sds=sds["sds"],
        pools=_by_id(pools["pools"]),
        pds=_by_id(pds["protection_domains"]),
    )


async def _sds_page(
    request: web.Request, ident: Identity, status: int = 200, error: str | None = None
) -> web.Response:
    sid = _id(request)
    sds, pools, pds = await read_all(
        request, f"/api/v1/sds/{sid}", "/api/v1/pools", "/api/v1/protection-domains"
    )
    return _page(
        request,
        "sds.html",
        ident,
        status,
        error,
        page="sds",
        sds=sds,
        pools=_by_id(pools["pools"]),
        pds=_by_id(pds["protection_domains"]),
        **await io_charts(request, "sds", sds["name"]),
    )


@routes.get(r"/sds/{id:\d+}")
async def sds_page(request: web.Request) -> web.Response:
    return await _sds_page(request, await require(request))


@routes.post(r"/sds/{id:\d+}/maintenance")
async def sds_maintenance(request: web.Request) -> web.Response:
    ident, form = await _admin(request)
    sid = _id(request)
    mode = form.get("mode", "")
    try:
        if mode not in ("enter", "exit"):
            raise Invalid("mode: enter or exit")
        await act(request, ident, "POST", f"/api/v1/sds/{sid}/maintenance", {"mode": mode})
    except ApiError as exc:
        return await _sds_page(request, ident, exc.status, exc.message)
    return _redirect(f"/sds/{sid}", f"maintenance_{mode}")


# -- SDCs ------------------------------------------------------------------------------


def _mapped(
    mappings: list[dict[str, Any]], sdc_id: int | None = None
) -> dict[int, list[dict[str, Any]]]:
    by_sdc: dict[int, list[dict[str, Any]]] = {}
    for m in mappings:
        if sdc_id is None or m["sdc_id"] == sdc_id:
            by_sdc.setdefault(int(m["sdc_id"]), []).append(m)
    return by_sdc


@routes.get("/sdc")
async def sdc_list_page(request: web.Request) -> web.Response:
    ident = await require(request)
    sdcs, mappings, volumes = await read_all(
        request, "/api/v1/sdc", "/api/v1/mappings", "/api/v1/volumes"
    )
    return _page(
        request,
        "sdc_list.html",
        ident,
        page="sdc",
        sdcs=sdcs["sdc"],
        mappings=_mapped(mappings["mappings"]),
        volumes=_by_id(volumes["volumes"]),
    )


@routes.get(r"/sdc/{id:\d+}")
async def sdc_page(request: web.Request) -> web.Response:
    ident = await require(request)
    cid = _id(request)
    sdc, mappings, volumes = await read_all(
        request, f"/api/v1/sdc/{cid}", f"/api/v1/mappings?sdc_id={cid}", "/api/v1/volumes"
    )
    return _page(
        request,
        "sdc.html",
        ident,
        page="sdc",
        sdc=sdc,
        mappings=mappings["mappings"],
        volumes=_by_id(volumes["volumes"]),
        **await io_charts(request, "sdc", str(sdc.get("name") or sdc.get("guid", ""))),
    )
