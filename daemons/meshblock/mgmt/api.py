"""MGMT's JSON API: the Alertmanager webhook, alerts, rules, cluster health, /metrics.

Every route but ``/healthz`` (liveness, open), the webhook (its own bearer token) and
``/metrics`` (also the read token of ``[metrics] token_file``,
meshblock.metrics_access) needs a login session or an API token; changes need the admin role,
and a session must also send its CSRF token in ``X-CSRF-Token``.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from meshblock import audit, metrics_access
from meshblock.auth import Role, bearer_token
from meshblock.json_body import read_object
from meshblock.mgmt import alertmanager, alerts, cluster, rules
from meshblock.mgmt.context import ctx
from meshblock.mgmt.errors import ApiError, BadRequest, Invalid, NotFound, Unauthorized
from meshblock.mgmt.models import AlertRule, UserRole
from meshblock.mgmt.sessions import Identity, identify, require

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_BODY_BYTES = 1 << 20
MAX_WEBHOOK_BYTES = 16 << 20
MAX_ID = 2**31 - 1
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


async def read_json(request: web.Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object body (``{}`` when empty); 400 when it is not one, or
    is nested too deep (meshblock.json_body)."""
    return await read_object(request, limit)


def path_id(request: web.Request) -> int:
    value = int(request.match_info["id"])
    if not 1 <= value <= MAX_ID:
        raise NotFound(f"no alert with id {value}")
    return value


def query_int(request: web.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise BadRequest(f"query parameter {name} must be between {minimum} and {maximum}")
    return value


# -- webhook ---------------------------------------------------------------------------


@routes.post("/api/alerts/webhook")
async def webhook(request: web.Request) -> web.Response:
    """Alertmanager's webhook receiver (payload version 4)."""
    c = ctx(request)
    m = c.metrics
    if c.webhook_tokens.role_of(bearer_token(request.headers.get("Authorization"))) == Role.NONE:
        m.webhook_requests.labels("unauthorized").inc()
        raise Unauthorized("the webhook needs 'Authorization: Bearer <auth.webhook_token>'")
    audit.identify(request, token="webhook")
    try:
        incoming = alerts.parse_notification(await read_json(request, MAX_WEBHOOK_BYTES))
    except ApiError:
        m.webhook_requests.labels("invalid").inc()
        raise
    for attempt in range(3):
        try:
            async with c.sessions() as s, s.begin():
                actions = await alerts.store(s, incoming)
            break
        except IntegrityError:  # a concurrent delivery of the same alert inserted it first
            if attempt == 2:
                m.webhook_requests.labels("error").inc()
                raise
    for a, action in zip(incoming, actions, strict=True):
        m.webhook_alerts.labels("resolved" if a.resolved else "firing", action).inc()
        log.info(
            "alert %s %s (%s, %s) %s",
            a.alert_name,
            "resolved" if a.resolved else "firing",
            a.component_id or "-",
            a.fingerprint,
            action,
        )
    m.webhook_requests.labels("ok").inc()
    return web.json_response(
        {
            "received": len(incoming),
            "inserted": actions.count("inserted"),
            "updated": actions.count("updated"),
        }
    )


# -- alerts ----------------------------------------------------------------------------


@routes.get("/api/alerts")
async def list_alerts(request: web.Request) -> web.Response:
    await require(request)
    f = alerts.parse_filter(request.query)
    limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = query_int(request, "offset", 0, 0, MAX_ID)
    async with ctx(request).sessions() as s:
        items, total = await alerts.list_alerts(s, f, limit, offset)
    return web.json_response(
        {"alerts": [i.alert for i in items], "total": total, "limit": limit, "offset": offset}
    )


@routes.get(r"/api/alerts/{id:\d+}")
async def get_alert(request: web.Request) -> web.Response:
    """One alert's display form (meshblock.mgmt.alerts.display)."""
    await require(request)
    async with ctx(request).sessions() as s:
        return web.json_response(await alerts.get_alert(s, path_id(request)))


@routes.get(r"/api/alerts/{id:\d+}/details")
async def get_alert_details(request: web.Request) -> web.Response:
    """What the display form leaves out: the alert's name, rule, labels, annotations,
    silence, fingerprint and who acknowledged it."""
    await require(request)
    async with ctx(request).sessions() as s:
        return web.json_response(await alerts.get_details(s, path_id(request)))


async def do_acknowledge(request: web.Request, alert_id: int, ident: Identity) -> None:
    async with ctx(request).sessions() as s, s.begin():
        await alerts.acknowledge(s, alert_id, ident.user_id)
    log.info("alert %d acknowledged by %s", alert_id, ident.name)


async def do_resolve(request: web.Request, alert_id: int, ident: Identity) -> None:
    async with ctx(request).sessions() as s, s.begin():
        await alerts.resolve(s, alert_id)
    log.info("alert %d resolved by %s", alert_id, ident.name)


def silence_args(request: web.Request, data: dict[str, Any]) -> tuple[float, str]:
    """(duration_s, comment) of a silence request, checked against the config."""
    cfg = ctx(request).config.alertmanager
    duration = data.get("duration_s", cfg.silence_duration_s)
    if isinstance(duration, str):
        try:
            duration = float(duration)
        except ValueError:
            raise Invalid("duration_s must be a number of seconds") from None
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise Invalid("duration_s must be a number of seconds")
    if not 60 <= duration <= cfg.max_silence_duration_s:
        raise Invalid(
            f"duration_s must be between 60 and {cfg.max_silence_duration_s:g} seconds",
            {"field": "duration_s"},
        )
    comment = data.get("comment", "")
    if not isinstance(comment, str) or len(comment) > 1000:
        raise Invalid("comment must be a string of at most 1000 characters", {"field": "comment"})
    return float(duration), comment.strip()


async def do_silence(
    request: web.Request, alert_id: int, ident: Identity, duration_s: float, comment: str
) -> dict[str, Any]:
    """Silence the alert in Alertmanager, then mark it suppressed; the silence record."""
    c = ctx(request)
    async with c.sessions() as s:
        row = await alerts.alert_row(s, alert_id)
        alerts.check_silenceable(row)
        labels = dict((row.details_json or {}).get("labels") or {})
    if not labels:
        raise Invalid(f"alert {alert_id} has no labels to silence it by")
    silence = await alertmanager.create_silence(
        c.http,
        c.config.alertmanager,
        labels,
        duration_s,
        ident.name,
        comment or f"silenced from meshblock MGMT (alert {alert_id})",
    )
    async with c.sessions() as s, s.begin():
        await alerts.suppress(s, alert_id, silence)
    log.info("alert %d silenced by %s (silence %s)", alert_id, ident.name, silence["id"])
    return silence


async def _alert_answer(request: web.Request, alert_id: int) -> web.Response:
    async with ctx(request).sessions() as s:
        return web.json_response(await alerts.get_alert(s, alert_id))


@routes.post(r"/api/alerts/{id:\d+}/acknowledge")
async def acknowledge(request: web.Request) -> web.Response:
    ident = await require(request, UserRole.ADMIN)
    alert_id = path_id(request)
    await do_acknowledge(request, alert_id, ident)
    return await _alert_answer(request, alert_id)


@routes.post(r"/api/alerts/{id:\d+}/resolve")
async def resolve(request: web.Request) -> web.Response:
    ident = await require(request, UserRole.ADMIN)
    alert_id = path_id(request)
    await do_resolve(request, alert_id, ident)
    return await _alert_answer(request, alert_id)


@routes.post(r"/api/alerts/{id:\d+}/silence")
async def silence(request: web.Request) -> web.Response:
    ident = await require(request, UserRole.ADMIN)
    alert_id = path_id(request)
    duration_s, comment = silence_args(request, await read_json(request))
    await do_silence(request, alert_id, ident, duration_s, comment)
    return await _alert_answer(request, alert_id)


# -- rules -----------------------------------------------------------------------------


@routes.get("/api/rules")
async def list_rules(request: web.Request) -> web.Response:
    await require(request)
    async with ctx(request).sessions() as s:
        rows = (
            await s.execute(select(AlertRule).order_by(AlertRule.group_name, AlertRule.name))
        ).scalars()
        return web.json_response({"rules": [rules.to_json(r) for r in rows]})


@routes.post("/api/rules/sync")
async def sync_rules(request: web.Request) -> web.Response:
    await require(request, UserRole.ADMIN)
    result = await rules.sync(ctx(request))
    return web.json_response(result.as_json())


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    """Who the caller is; a session also learns its CSRF token (for scripts in a page)."""
    ident = await require(request)
    body: dict[str, Any] = {"id": ident.user_id, "name": ident.name, "role": ident.role.value}
    if ident.csrf_token is not None:
        body["csrf_token"] = ident.csrf_token
    return web.json_response(body)


# -- cluster health --------------------------------------------------------------------


async def alert_counts(request: web.Request) -> dict[str, Any]:
    async with ctx(request).sessions() as s:
        return await alerts.counts(s)


def public_counts(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in counts.items() if not k.startswith("_")}


@routes.get("/health/api/summary")
async def health_summary(request: web.Request) -> web.Response:
    await require(request)
    c = ctx(request)
    view = await cluster.read(c.mdm_http, c.config.mdm)
    summary: dict[str, Any] = {**view.health, "mdm_reachable": view.reachable}
    if not view.reachable:
        summary["status"] = "unknown"
        summary["error"] = view.error
    return web.json_response(
        {
            "health_summary": summary,
            "health_metrics": view.metrics,
            "alert_counts": public_counts(await alert_counts(request)),
        }
    )


@routes.get("/health/api/components")
async def health_components(request: web.Request) -> web.Response:
    await require(request)
    c = ctx(request)
    return web.json_response(await cluster.components(c.mdm_http, c.config.mdm))


@routes.get("/healthz")
async def healthz(_request: web.Request) -> web.Response:
    """Liveness for a load balancer or an orchestrator: the process answers HTTP. No
    credential, and nothing read from the database or the MDM (the dashboard's
    ``/health/api/summary`` says how the cluster is)."""
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """MGMT's own metrics: for the read token of ``[metrics] token_file``, any user
    (session or API token), or anyone on the open listener (``[metrics] port``)."""
    try:
        request.app[metrics_access.ACCESS].check(request)
    except metrics_access.Refused as exc:
        if await identify(request) is None:  # a bad API token is a 401 there
            raise Unauthorized(exc.reason) from None
    m = ctx(request).metrics
    m.alerts.snapshot = (await alert_counts(request))["_matrix"]
    return web.Response(
        body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
