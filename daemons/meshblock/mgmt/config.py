"""MGMT configuration (``/etc/meshblock/mgmt.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from meshblock.audit import AuditConfig
from meshblock.config import LoggingConfig
from meshblock.metrics_access import MetricsConfig
from meshblock.tls import TlsConfig


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: where the dashboard, the API and the webhook listen.

    MGMT serves HTTPS with the certificate of ``[tls]``; ``plain_http = true`` serves
    plain HTTP instead, for a reverse proxy on the same host that terminates TLS.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    plain_http: bool = False
    # How often an open page fetches itself again and updates its figures in place
    # (static/refresh.js); 0: never.
    page_refresh_s: float = 10.0


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: the webhook credential and the web sessions.

    ``webhook_token`` is the bearer token Alertmanager presents on
    ``POST /api/alerts/webhook``; empty refuses every webhook call.
    ``secure_cookies`` marks the cookies ``Secure`` with ``[http] plain_http`` (set it
    behind a proxy that serves HTTPS); MGMT's own HTTPS always does. ``login_*``: the login throttle
    (meshblock.mgmt.throttle), per account and per client address.
    """

    webhook_token: str = ""
    session_ttl_s: float = 12 * 3600.0
    secure_cookies: bool = False
    login_max_failures: int = 5
    login_window_s: float = 300.0
    login_backoff_s: float = 60.0
    login_max_backoff_s: float = 3600.0
    # argon2id password checks (64 MiB each) that run at once; more logins wait.
    max_password_checks: int = 2

    def __repr__(self) -> str:  # never print secrets, even in a traceback
        return (
            f"AuthConfig(webhook_token=***, session_ttl_s={self.session_ttl_s}, "
            f"secure_cookies={self.secure_cookies}, "
            f"login_max_failures={self.login_max_failures}, "
            f"login_window_s={self.login_window_s}, login_backoff_s={self.login_backoff_s}, "
            f"login_max_backoff_s={self.login_max_backoff_s}, "
            f"max_password_checks={self.max_password_checks})"
        )


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: the alert history and the users.

    ``url`` is an SQLAlchemy async URL: ``sqlite+aiosqlite:///path/mgmt.db`` (default,
    embedded, WAL mode) or ``postgresql+asyncpg://user:password@host/db``.
    """

    url: str = "sqlite+aiosqlite:///var/lib/meshblock/mgmt.db"
    echo: bool = False

    def __repr__(self) -> str:  # the URL may carry a password
        from meshblock.mgmt.db import redact_url

        return f"DatabaseConfig(url={redact_url(self.url)!r}, echo={self.echo})"


@dataclass(frozen=True)
class MdmConfig:
    """``[mdm]``: where the MDM's ``/health`` endpoints are (empty: not shown);
    ``https://`` with ``[tls]`` (meshblock.tls). MGMT reads them with its certificate,
    or with the read-only token of ``token_file``; it changes the cluster (the cluster
    pages' actions) only with ``admin_cert``/``admin_key`` or ``admin_token_file``."""

    url: str = "https://127.0.0.1:6611"
    timeout_s: float = 3.0
    # A file holding the MDM's read-only token, sent when MGMT has no certificate
    # ([tls] cert): /health/components and /health/metrics need a read credential.
    token_file: str = ""
    # The admin credential of the cluster pages' actions (meshblock.mgmt.inventory):
    # an admin: certificate and its key (checked against [tls] ca), or a file holding
    # the MDM's admin token. Neither (the default): MGMT changes nothing on the MDM.
    admin_cert: str = ""
    admin_key: str = ""
    admin_token_file: str = ""


@dataclass(frozen=True)
class PrometheusConfig:
    """``[prometheus]``: rules API (rule sync) and query API (dashboard charts)."""

    url: str = "http://127.0.0.1:9090"
    timeout_s: float = 5.0
    rules_sync_interval_s: float = 300.0
    chart_range_s: float = 3600.0
    chart_step_s: float = 60.0


@dataclass(frozen=True)
class AlertmanagerConfig:
    """``[alertmanager]``: where silences are created, and their default length."""

    url: str = "http://127.0.0.1:9093"
    timeout_s: float = 5.0
    silence_duration_s: float = 3600.0
    max_silence_duration_s: float = 30 * 86400.0


def _check_url(key: str, url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{key} must be an http:// or https:// URL, got {url!r}")


@dataclass(frozen=True)
class MgmtConfig:
    http: HttpConfig = field(default_factory=HttpConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    mdm: MdmConfig = field(default_factory=MdmConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    alertmanager: AlertmanagerConfig = field(default_factory=AlertmanagerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)  # served HTTPS, and HTTPS to the MDM
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # meshblock.metrics_access

    @property
    def secure_cookies(self) -> bool:
        """Whether cookies are ``Secure``: always over HTTPS, behind a proxy if set."""
        return not self.http.plain_http or self.auth.secure_cookies

    def __post_init__(self) -> None:
        if not 0 < self.http.port < 65536:
            raise ValueError("http.port must be between 1 and 65535")
        if self.metrics.port == self.http.port:
            raise ValueError("metrics.port must differ from http.port")
        _check_url("mdm.url", self.mdm.url)
        _check_url("prometheus.url", self.prometheus.url)
        _check_url("alertmanager.url", self.alertmanager.url)
        for key, value in (
            ("auth.session_ttl_s", self.auth.session_ttl_s),
            ("auth.login_max_failures", self.auth.login_max_failures),
            ("auth.login_window_s", self.auth.login_window_s),
            ("auth.login_backoff_s", self.auth.login_backoff_s),
            ("auth.login_max_backoff_s", self.auth.login_max_backoff_s),
            ("auth.max_password_checks", self.auth.max_password_checks),
            ("mdm.timeout_s", self.mdm.timeout_s),
            ("prometheus.timeout_s", self.prometheus.timeout_s),
            ("prometheus.rules_sync_interval_s", self.prometheus.rules_sync_interval_s),
            ("prometheus.chart_range_s", self.prometheus.chart_range_s),
            ("prometheus.chart_step_s", self.prometheus.chart_step_s),
            ("alertmanager.timeout_s", self.alertmanager.timeout_s),
            ("alertmanager.silence_duration_s", self.alertmanager.silence_duration_s),
            ("alertmanager.max_silence_duration_s", self.alertmanager.max_silence_duration_s),
        ):
            if value <= 0:
                raise ValueError(f"{key} must be positive")
        if self.http.page_refresh_s != 0 and not 1 <= self.http.page_refresh_s <= 86400:
            raise ValueError("http.page_refresh_s must be 0 (never) or 1 to 86400 seconds")
        if self.auth.login_backoff_s > self.auth.login_max_backoff_s:
            raise ValueError("auth.login_backoff_s must not exceed auth.login_max_backoff_s")
        if self.prometheus.chart_range_s / self.prometheus.chart_step_s > 11000:
            raise ValueError(
                "prometheus.chart_range_s / chart_step_s must be at most 11000 points "
                "(Prometheus's limit)"
            )
        if self.alertmanager.silence_duration_s > self.alertmanager.max_silence_duration_s:
            raise ValueError(
                "alertmanager.silence_duration_s must not exceed max_silence_duration_s"
            )
