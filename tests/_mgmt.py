"""The real MGMT service as a subprocess, for tests.

- :class:`MgmtDaemon` writes ``mgmt.toml``, creates users with the real
  ``meshblock-mgmt user add`` / ``token add`` commands, starts
  ``python -m meshblock.mgmt`` on a free loopback port and waits for ``/login``.
- :class:`WebClient` is a browser stand-in: a cookie jar, no automatic redirects,
  form posts, and :meth:`WebClient.login` that goes through the login form.

Prometheus and Alertmanager are in ``tests/_monitoring.py``.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import secrets
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import _control
import _http
import _tls
from _ports import free_port
from _process import HttpDaemon, ProcessError

# -- MGMT ------------------------------------------------------------------------------

MGMT_IDENTITY = "mgmt:mgmt"


class MgmtDaemon(HttpDaemon):
    """``MgmtDaemon(workdir, db_url, overrides=None, tls=True)``: MGMT, its users and
    tokens. With ``tls`` (the default, as MGMT's own) it serves HTTPS with a
    certificate of the test CA for ``mgmt:mgmt`` (valid for loopback; ``[tls]``, which
    also makes it reach the MDM over HTTPS: give it an MDM with TLS); without, it
    serves plain HTTP (``[http] plain_http``) and has no ``[tls]`` unless the
    overrides give one."""

    name = "MGMT"
    module = "meshblock.mgmt"
    ready_path = "/login"

    def __init__(
        self,
        workdir: Path,
        db_url: str,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        tls: bool = True,
    ) -> None:
        self.tls = tls
        super().__init__(workdir, db_url, overrides)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def initial_settings(self) -> dict[str, dict[str, Any]]:
        self.admin_token = self.viewer_token = ""  # set by create_users()
        self.webhook_token = "whk-" + secrets.token_urlsafe(24)
        self.admin_password = "adm-" + secrets.token_urlsafe(12)
        self.viewer_password = "vw-" + secrets.token_urlsafe(12)
        scheme = "https" if self.tls else "http"
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        settings: dict[str, dict[str, Any]] = {
            "http": {"host": self.host, "port": self.port},
            "auth": {"webhook_token": self.webhook_token},
            "database": {"url": self.db_url},
            "mdm": {"url": f"{scheme}://127.0.0.1:{free_port()}", "timeout_s": 2.0},
            "prometheus": {"url": dead, "timeout_s": 2.0, "rules_sync_interval_s": 3600.0},
            "alertmanager": {"url": dead, "timeout_s": 5.0},
            "logging": {"level": "INFO"},
            "metrics": {"token_file": _control.token_file(self.workdir)},
        }
        if self.tls:
            settings["tls"] = _tls.component_identity(MGMT_IDENTITY, self.host).settings()
        else:
            settings["http"]["plain_http"] = True
        return settings

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``meshblock-mgmt --config mgmt.toml ARGS`` and return the result."""
        return subprocess.run(
            [sys.executable, "-m", "meshblock.mgmt", "--config", str(self.config_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.workdir,
        )

    def create_users(self, viewer: bool = True) -> None:
        """Users ``admin`` and ``viewer`` and an API token for each, through the CLI
        (``viewer=False``: the admin only; each command is a Python start-up)."""
        users = [("admin", "admin", self.admin_password)]
        if viewer:
            users.append(("viewer", "viewer", self.viewer_password))
        for name, role, password in users:
            r = self.cli("user", "add", name, "--role", role, stdin=password + "\n")
            assert r.returncode == 0, f"user add {name}: {r.stdout}{r.stderr}"
        self.admin_token = self.new_token("admin", "tests")
        if viewer:
            self.viewer_token = self.new_token("viewer", "tests")

    def new_token(self, user: str, name: str) -> str:
        r = self.cli("token", "add", user, name)
        assert r.returncode == 0, f"token add: {r.stdout}{r.stderr}"
        return r.stdout.strip()

    def api(self, token: str | None = None) -> _http.Api:
        return _http.Api(self.url, self.admin_token if token is None else token)

    def webhook(self, payload: Any, token: str | None = None) -> _http.Response:
        return _http.request(
            "POST",
            self.url + "/api/alerts/webhook",
            payload,
            token=self.webhook_token if token is None else token,
        )

    def assert_clean_log(self) -> None:
        log = self.log_text()
        for secret in (
            self.webhook_token,
            self.admin_password,
            self.viewer_password,
            self.admin_token,
            self.viewer_token,
        ):
            if secret and secret in log:
                raise ProcessError(f"the MGMT log at {self.log_path} contains a secret")
        if "Traceback" in log:
            raise self.fail("the MGMT log has a traceback")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebClient:
    """A browser stand-in: keeps cookies, shows redirects instead of following them."""

    def __init__(self, base_url: str, context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        # trusts the test CA unless ``context`` says otherwise (a lab's CA)
        context = _tls.context(None) if context is None else context
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=context),
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect(),
        )

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
    ) -> _http.Response:
        data = None
        hdrs = dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, headers=hdrs, method=method)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return _response(resp.status, resp.read(), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            with exc:
                return _response(exc.code, exc.read(), dict(exc.headers))

    def get(self, path: str) -> _http.Response:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str]) -> _http.Response:
        return self.request("POST", path, form=form)

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)

    def login(self, user: str, password: str, next_: str = "/health") -> _http.Response:
        page = self.get("/login?" + urllib.parse.urlencode({"next": next_}))
        assert page.status == 200, page
        token = form_value(page.body, "csrf_token")
        return self.post(
            "/login",
            {"username": user, "password": password, "csrf_token": token, "next": next_},
        )

    def csrf_token(self) -> str:
        """The session's CSRF token, as a page's forms carry it."""
        page = self.get("/alerts")
        assert page.status == 200, page
        return form_value(page.body, "csrf_token")


def _response(status: int, raw: bytes, headers: dict[str, str]) -> _http.Response:
    ctype = headers.get("Content-Type", "")
    body: Any = json.loads(raw) if "json" in ctype and raw else raw.decode(errors="replace")
    return _http.Response(status, body, headers)


def form_value(html: str, name: str) -> str:
    m = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert m is not None, f"no form field {name} in the page"
    return m.group(1)
