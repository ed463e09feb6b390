"""MDM configuration (``/etc/meshblock/mdm.toml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshblock.audit import AuditConfig
from meshblock.config import LoggingConfig
from meshblock.mdm.holddown import Knobs
from meshblock.timeouts import MAX_HEARTBEAT_INTERVAL_S, MIN_HEARTBEAT_INTERVAL_S


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: where the REST API listens."""

    host: str = "127.0.0.1"
    port: int = 6611
    # An open listener for /health, /health/components, /health/metrics and /metrics
    # only (plain HTTP, no credential); 0: none, those need a read credential.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: bearer tokens and the cluster secret.

    ``admin_token`` may change anything, ``readonly_token`` may only read, and
    ``cluster_secret`` is what SDSs and SDCs present to register and heartbeat.
    An empty value disables that credential.
    """

    admin_token: str = ""
    readonly_token: str = ""
    cluster_secret: str = ""

    def __repr__(self) -> str:  # never print secrets, even in a traceback
        return "AuthConfig(admin_token=***, readonly_token=***, cluster_secret=***)"


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: the metadata store.

    ``url`` is an SQLAlchemy async URL: ``sqlite+aiosqlite:///path/mdm.db`` (default,
    embedded, WAL mode) or ``postgresql+asyncpg://user:password@host/db``.
    """

    url: str = "sqlite+aiosqlite:///var/lib/meshblock/mdm.db"
    echo: bool = False

    def __repr__(self) -> str:  # the URL may carry a password
        from meshblock.mdm.db import redact_url

        return f"DatabaseConfig(url={redact_url(self.url)!r}, echo={self.echo})"


HEARTBEAT_INTERVAL_S = 2.0  # [cluster] heartbeat_interval_s unless set
HEARTBEAT_MISSES = 5  # heartbeat_timeout_s unless set: this many intervals
# heartbeat_timeout_s is at least this many intervals: a heartbeat's period is the
# interval plus its round trip, so a timeout barely above it flaps at one hiccup.
HEARTBEAT_MIN_MISSES = 3


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: failure detection and long-poll settings."""

    name: str = "meshblock"
    # How often SDSs and SDCs heartbeat (the MDM tells them in its replies). Unset:
    # 2 s, or a fifth of heartbeat_timeout_s when only that is set and it is shorter.
    heartbeat_interval_s: float | None = None
    # A component silent this long is down. Unset: HEARTBEAT_MISSES intervals.
    heartbeat_timeout_s: float | None = None
    longpoll_max_s: float = 30.0
    # A returning SDS must heartbeat this long before its stale copies are resynced.
    resync_delay_s: float = 0.0
    # A down SDS's copies are rebuilt on other SDSs once it has been down this long
    # (a short reboot then costs a delta resync, not a full rebuild). 0: at once.
    rebuild_delay_s: float = 30.0
    # How often the rebalancer looks for PG copies to move (after an SDS or a device
    # is added, or while an SDS drains).
    rebalance_interval_s: float = 2.0
    # An SDS declared down on a failure report returns only once the MDM and a peer
    # have reached its data port (a PING over the data protocol) for this long.
    hold_down_s: float = 5.0
    # An SDS that goes down more than flap_count times within flap_window_s is
    # flapping: kept out until `meshctl sds clear-flapping`.
    flap_count: int = 3
    flap_window_s: float = 600.0

    def __post_init__(self) -> None:
        interval, timeout = self.heartbeat_interval_s, self.heartbeat_timeout_s
        if timeout is not None and not timeout > 0:
            raise ValueError("cluster.heartbeat_timeout_s must be positive")
        if interval is not None and not interval > 0:
            raise ValueError("cluster.heartbeat_interval_s must be positive")
        if interval is None:
            interval = HEARTBEAT_INTERVAL_S
            if timeout is not None:
                interval = min(interval, timeout / HEARTBEAT_MISSES)
        if timeout is None:
            timeout = interval * HEARTBEAT_MISSES
        if not MIN_HEARTBEAT_INTERVAL_S <= interval <= MAX_HEARTBEAT_INTERVAL_S:
            # the SDSs and SDCs ignore any other interval and keep their own: the MDM
            # would declare every one of them down
            how = (
                "set"
                if self.heartbeat_interval_s is not None
                else "derived from heartbeat_timeout_s"
            )
            raise ValueError(
                f"cluster.heartbeat_interval_s ({how}: {interval:g} s) must be between "
                f"{MIN_HEARTBEAT_INTERVAL_S:g} and {MAX_HEARTBEAT_INTERVAL_S:g} s, "
                "the range the SDSs and SDCs follow"
            )
        if timeout < interval * HEARTBEAT_MIN_MISSES * (1 - 1e-9):  # 0.1 * 3 > 0.3
            least = interval * HEARTBEAT_MIN_MISSES
            raise ValueError(
                f"cluster.heartbeat_timeout_s ({timeout:g} s) must be at least "
                f"{HEARTBEAT_MIN_MISSES} heartbeat intervals ({least:g} s)"
            )
        object.__setattr__(self, "heartbeat_interval_s", float(interval))
        object.__setattr__(self, "heartbeat_timeout_s", float(timeout))

    @property
    def interval_s(self) -> float:
        """``heartbeat_interval_s``, as set or derived."""
        assert self.heartbeat_interval_s is not None
        return self.heartbeat_interval_s

    @property
    def timeout_s(self) -> float:
        """``heartbeat_timeout_s``, as set or derived."""
        assert self.heartbeat_timeout_s is not None
        return self.heartbeat_timeout_s

    def knobs(self) -> Knobs:
        return Knobs(self.hold_down_s, self.flap_count, self.flap_window_s)


@dataclass(frozen=True)
class ScrubConfig:
    """``[scrub]``: the background scrub of every pool (docs/mdm.md, "Scrub").

    A pool's pass starts ``period_s`` after the previous one started (every chunk
    checked once a week by default), the first one ``start_delay_s`` after the MDM
    starts; the SDSs scrub at most ``bandwidth_mibps`` MiB/s per source device
    (0: unlimited), as ``rebuild_bandwidth_mibps`` paces rebuilds.
    """

    period_s: float = 7 * 24 * 3600.0
    bandwidth_mibps: int = 20
    start_delay_s: float = 600.0


@dataclass(frozen=True)
class HaConfig:
    """``[ha]``: the leader lease of the MDMs sharing one database (docs/mdm.md, "High
    availability (in progress)").

    ``name``: this MDM's name in the lease (empty: the host name), one process per
    name; a leader that cannot renew its lease within ``lease_s`` (on PostgreSQL)
    stops leading; it renews every ``renew_interval_s``, at most half the lease.
    """

    name: str = ""
    lease_s: float = 10.0
    renew_interval_s: float = 2.0


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: serve the API over HTTPS (docs/security.md). Off while ``cert`` is empty.

    ``cert`` and ``key`` are the MDM's own (``meshctl ca issue mdm:NAME``), ``ca`` the
    cluster CA's certificate that client certificates are checked against, ``crl`` its
    revocation list (optional). ``client_certs``: ``required`` refuses a client
    without a CA-signed certificate in the handshake; ``optional`` verifies one if
    sent and lets operators in with a bearer token alone.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    crl: str = ""
    client_certs: str = "required"
    # How often the CRL file is looked at; read again when it changed (and on SIGHUP).
    crl_reload_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class MdmConfig:
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    ha: HaConfig = field(default_factory=HaConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.api.metrics_port < 65536:
            raise ValueError("api.metrics_port must be between 0 (off) and 65535")
        if self.api.metrics_port and self.api.metrics_port == self.api.port:
            raise ValueError("api.metrics_port must differ from api.port")
        t = self.tls
        if (t.key or t.ca or t.crl) and not t.cert:
            raise ValueError("tls.key, tls.ca and tls.crl need tls.cert (empty: no TLS)")
        if t.cert and not (t.key and t.ca):
            raise ValueError("tls.cert needs tls.key and tls.ca")
        if not t.crl_reload_s > 0:
            raise ValueError("tls.crl_reload_s must be > 0")
        if t.client_certs not in ("required", "optional"):
            raise ValueError("tls.client_certs must be required or optional")
        a = self.auth
        if not a.admin_token:
            raise ValueError("auth.admin_token must be set")
        if len({t for t in (a.admin_token, a.readonly_token, a.cluster_secret) if t}) != len(
            [t for t in (a.admin_token, a.readonly_token, a.cluster_secret) if t]
        ):
            raise ValueError("auth.admin_token, readonly_token and cluster_secret must differ")
        if self.cluster.longpoll_max_s <= 0:
            raise ValueError("cluster.longpoll_max_s must be positive")
        if self.cluster.resync_delay_s < 0:
            raise ValueError("cluster.resync_delay_s must not be negative")
        if self.cluster.rebuild_delay_s < 0:
            raise ValueError("cluster.rebuild_delay_s must not be negative")
        if self.cluster.rebalance_interval_s <= 0:
            raise ValueError("cluster.rebalance_interval_s must be positive")
        if self.cluster.hold_down_s < 0:
            raise ValueError("cluster.hold_down_s must not be negative")
        if self.cluster.flap_count < 1:
            raise ValueError("cluster.flap_count must be at least 1")
        if self.cluster.flap_window_s <= 0:
            raise ValueError("cluster.flap_window_s must be positive")
        if self.scrub.period_s <= 0 or self.scrub.start_delay_s < 0:
            raise ValueError("scrub.period_s must be positive, scrub.start_delay_s not negative")
        if not 0 <= self.scrub.bandwidth_mibps <= 100_000:
            raise ValueError("scrub.bandwidth_mibps must be 0..100000")
        ha = self.ha
        if not 1.0 <= ha.lease_s <= 600.0:
            raise ValueError("ha.lease_s must be between 1 and 600 s")
        if not 0.1 <= ha.renew_interval_s <= ha.lease_s / 2:
            raise ValueError(
                "ha.renew_interval_s must be at least 0.1 s and at most half of ha.lease_s "
                "(a leader gets two tries to renew before its lease expires)"
            )
        if len(ha.name) > 255:
            raise ValueError("ha.name must be at most 255 characters")
