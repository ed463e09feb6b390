"""MGMT's web pages: login, the health dashboard, and the alerts page with its forms.

Pages need a login session (the error middleware sends anonymous visitors to
``/login``). The forms on ``/alerts`` post to ``/alerts/{id}/{action}`` with the
session's CSRF token and are answered with a redirect back to the page (303), so a
reload never repeats an action.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web
from sqlalchemy import func, select

import meshblock
from meshblock import audit
from meshblock.mgmt import alerts, charts, cluster, progress, prometheus
from meshblock.mgmt.accounts import authenticate
from meshblock.mgmt.api import (
    alert_counts,
    do_acknowledge,
    do_resolve,
    do_silence,
    public_counts,
    query_int,
    silence_args,
)
from meshblock.mgmt.context import ctx
from meshblock.mgmt.errors import ApiError, NotFound
from meshblock.mgmt.models import AlertRule, AlertStatus, Severity, UserRole, aware, utcnow
from meshblock.mgmt.sessions import (
    Identity,
    check_login_csrf,
    end_session,
    login_csrf,
    require,
    start_session,
)
from meshblock.mgmt.throttle import retry_after_header

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

PAGE_SIZE = 50
MAX_NAME_CHARS = 64  # a longer user name cannot exist (accounts.USER_NAME)
RECENT_WINDOW = dt.timedelta(days=7)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("meshblock.mgmt", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["bytes"] = lambda v: charts.human(float(v), "bytes") if v is not None else "\u2013"
    env.globals["version"] = meshblock.__version__
    return env


def _when(value: Any) -> str:
    """An ISO time string or datetime as ``2026-01-31 12:00:00 UTC`` (an en dash when unset)."""
    if value is None or value == "":
        return "\u2013"
    if isinstance(value, str):
        try:
            value = alerts.parse_time(value)
        except ValueError:
            return str(value)
    t = aware(value)
    assert t is not None
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def render(
    request: web.Request,
    name: str,
    ident: Identity | None,
    status: int = 200,
    **values: Any,
) -> web.Response:
    c = ctx(request)
    # Only a page that a GET answered in full fetches itself again (static/refresh.js):
    # not the page a refused POST shows, nor an error page.
    refresh = request.method == "GET" and status == 200 and ident is not None
    html = c.templates.get_template(name).render(
        user=ident, refresh_s=c.config.http.page_refresh_s if refresh else 0, **values
    )
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; style-src 'self'; "
            "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        },
    )


def error_page(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """The HTML error page (the error middleware calls it for pages)."""
    return render(
        request, "error.html", None, status, error_status=status, code=code, message=message
    )


async def form_of(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


def redirect(location: str) -> web.Response:
    """303 See Other: the browser follows with a GET."""
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def safe_next(target: str | None) -> str:
    """A local path to go to after login, never another site: it starts with one
    ``/``, and holds no backslash and no control character. Browsers drop TAB, CR and
    LF from a URL and read ``\\`` as ``/``, so ``/<TAB>/evil.example`` and
    ``/\\evil.example`` would be ``//evil.example``, another host; anything else
    goes to ``/health``."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in target)
        or urlsplit(target).netloc
    ):
        return "/health"
    return target


# -- login -----------------------------------------------------------------------------


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return redirect("/health")


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_page(request, request.query.get("next"), None, 200)


def _login_page(
    request: web.Request, next_: str | None, error: str | None, status: int
) -> web.Response:
    resp = web.Response(status=status)
    token = login_csrf(request, resp)
    page = render(
        request, "login.html", None, status, csrf_token=token, next=safe_next(next_), error=error
    )
    page.cookies.update(resp.cookies)
    return page


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    form = await form_of(request)
    check_login_csrf(request, form)
    c = ctx(request)
    name = form.get("username", "").strip()[:MAX_NAME_CHARS]
    address = request.remote or "unknown"
    wait = c.logins.retry_after(name, address)
    if wait > 0:
        c.metrics.logins.labels("throttled").inc()
        log.warning("login for %r from %s refused: too many failures", name, address)
        audit.note(request, "login_throttled", user_tried=name, reason="too many failed logins")
        return _throttled(request, form.get("next"), wait)
    async with c.sessions() as s:
        password = form.get("password", "")
        user = await authenticate(s, name, password, c.password_checks) if name else None
    if user is None:
        c.metrics.logins.labels("failed").inc()
        log.info("failed login for %r from %s", name, address)
        audit.note(request, "login_failed", user_tried=name, reason="wrong user name or password")
        wait = c.logins.failed(name, address)
        if wait > 0:
            log.warning("logins for %r or from %s locked for %.0f s", name, address, wait)
        return _login_page(request, form.get("next"), "Wrong user name or password.", 401)
    c.logins.succeeded(name, address)
    audit.note(request, "login")
    audit.identify(request, user=user.name)
    c.metrics.logins.labels("ok").inc()
    resp = redirect(safe_next(form.get("next")))
    await start_session(request, resp, user)
    log.info("user %s logged in from %s", user.name, request.remote)
    return resp


def _throttled(request: web.Request, next_: str | None, wait_s: float) -> web.Response:
    retry = retry_after_header(wait_s)
    page = _login_page(
        request,
        next_,
        f"Too many failed logins for this user or from this address; try again in {retry} s.",
        429,
    )
    page.headers["Retry-After"] = retry
    return page


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    ident = await require(request, form=await form_of(request))
    resp = redirect("/login")
    await end_session(request, resp, ident)
    return resp


# -- dashboard -------------------------------------------------------------------------


async def _charts(request: web.Request) -> list[dict[str, Any]]:
    c = ctx(request)
    cfg = c.config.prometheus
    end = time.time()
    start = end - cfg.chart_range_s

    async def one(spec: charts.ChartSpec) -> dict[str, Any]:
        try:
            series = await prometheus.query_range(
                c.http, cfg, spec.query, start, end, cfg.chart_step_s
            )
        except ApiError as exc:
            return {"spec": spec, "svg": None, "error": exc.message}
        return {"spec": spec, "svg": charts.svg(spec, series, start, end), "error": None}

    return list(await asyncio.gather(*(one(s) for s in charts.CHARTS)))


@routes.get("/health")
async def dashboard(request: web.Request) -> web.Response:
    ident = await require(request)
    c = ctx(request)
    view, counts, chart_list = await asyncio.gather(
        cluster.read(c.mdm_http, c.config.mdm), alert_counts(request), _charts(request)
    )
    return render(
        request,
        "health.html",
        ident,
        page="health",
        cluster=view,
        copies=[
            (p, w)
            for p in view.rebuild
            for w in progress.of_pool(p, None)[:2]  # rebuild, rebalance (scrub: below)
            if w.busy
        ],
        counts=public_counts(counts),
        charts=chart_list,
        prometheus_url=c.config.prometheus.url,
    )


# -- alerts ----------------------------------------------------------------------------


@routes.get("/alerts")
async def alerts_page(request: web.Request) -> web.Response:
    ident = await require(request)
    f = alerts.parse_filter(request.query)
    offset = query_int(request, "offset", 0, 0, 2**31 - 1)
    c = ctx(request)
    async with c.sessions() as s:
        open_alerts, open_total = await alerts.list_alerts(
            s, alerts.AlertFilter(statuses=alerts.OPEN_STATUSES), 500, 0
        )
        history, history_total = await alerts.list_alerts(s, f, PAGE_SIZE, offset)
        counts = public_counts(await alerts.counts(s))
        top = await alerts.top_rules(s, utcnow() - RECENT_WINDOW)
        synced = AlertRule.last_synced.is_not(None)  # not the rules made from alerts
        rule_count = (
            await s.execute(select(func.count()).select_from(AlertRule).where(synced))
        ).scalar_one()
    query = {k: v for k, v in request.query.items() if k != "offset"}
    return render(
        request,
        "alerts.html",
        ident,
        page="alerts",
        open_alerts=open_alerts,
        open_total=open_total,
        history=history,
        history_total=history_total,
        offset=offset,
        page_size=PAGE_SIZE,
        filters=query,
        prev_qs=urlencode({**query, "offset": max(offset - PAGE_SIZE, 0)}),
        next_qs=urlencode({**query, "offset": offset + PAGE_SIZE}),
        counts=counts,
        top_rules=top,
        rule_count=rule_count,
        notice=request.query.get("notice"),
        default_silence_s=c.config.alertmanager.silence_duration_s,
        statuses=[s.value for s in AlertStatus],
        severities=[s.value for s in Severity],
    )


def _alert_id(request: web.Request) -> int:
    value = int(request.match_info["id"])
    if not 1 <= value <= 2**31 - 1:
        raise NotFound(f"no alert with id {value}")
    return value


def _back(alert_id: int, notice: str) -> web.Response:
    return redirect(f"/alerts?{urlencode({'notice': notice})}#alert-{alert_id}")


@routes.post(r"/alerts/{id:\d+}/acknowledge")
async def acknowledge_form(request: web.Request) -> web.Response:
    ident = await require(request, UserRole.ADMIN, await form_of(request))
    alert_id = _alert_id(request)
    await do_acknowledge(request, alert_id, ident)
    return _back(alert_id, f"Alert {alert_id} acknowledged.")


@routes.post(r"/alerts/{id:\d+}/resolve")
async def resolve_form(request: web.Request) -> web.Response:
    ident = await require(request, UserRole.ADMIN, await form_of(request))
    alert_id = _alert_id(request)
    await do_resolve(request, alert_id, ident)
    return _back(alert_id, f"Alert {alert_id} resolved.")


@routes.post(r"/alerts/{id:\d+}/silence")
async def silence_form(request: web.Request) -> web.Response:
    form = await form_of(request)
    ident = await require(request, UserRole.ADMIN, form)
    alert_id = _alert_id(request)
    args: dict[str, Any] = {"comment": form.get("comment", "")}
    if form.get("duration_s"):
        args["duration_s"] = form["duration_s"]
    duration_s, comment = silence_args(request, args)
    silence = await do_silence(request, alert_id, ident, duration_s, comment)
    return _back(alert_id, f"Alert {alert_id} silenced until {_when(silence['ends_at'])}.")
