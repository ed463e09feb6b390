"""SDC configuration (``/etc/meshblock/sdc.toml``); see docs/sdc.md for every key."""

from __future__ import annotations

import grp
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from meshblock import pki
from meshblock.audit import AuditConfig
from meshblock.config import ConfigError, LoggingConfig, read_secret_file
from meshblock.files import write_atomic
from meshblock.metrics_access import MetricsConfig
from meshblock.nbd import tls as nbd_tls
from meshblock.nbd.access import ListenPolicy, parse_rules
from meshblock.tls import TlsConfig, follow_crl
from meshblock.wire.protocol import check_wire_min_version


@dataclass(frozen=True)
class SdcIdentity:
    """``[sdc]``: who this SDC is.

    ``guid`` identifies the host to the MDM across restarts; when empty, one is
    generated on first start and kept in ``<state_dir>/guid``.
    """

    guid: str = ""
    name: str = ""
    address: str = ""
    state_dir: str = "/var/lib/meshblock/sdc"


@dataclass(frozen=True)
class MdmLink:
    """``[mdm]``: how to reach the MDM(s)."""

    urls: list[str] = field(default_factory=lambda: ["https://127.0.0.1:6611"])
    cluster_secret: str = ""
    cluster_secret_file: str = ""
    heartbeat_interval_s: float = 2.0
    longpoll_timeout_s: float = 25.0
    request_timeout_s: float = 5.0

    def __repr__(self) -> str:  # never print the secret
        return f"MdmLink(urls={self.urls!r}, cluster_secret=***)"


@dataclass(frozen=True)
class NbdListen:
    """``[nbd]``: where volumes are exported, and whether to attach them locally.

    Local clients use the unix socket ``unix_socket`` (mode 0660, group
    ``socket_group``: empty, the daemon's); the TCP listener on ``host:port`` runs
    only with ``tcp = true``. ``tls``: the TCP listener offers NBD_OPT_STARTTLS with
    ``[tls] cert`` and requires it; ``tls_client_certs`` says whether a client must
    present a certificate of the cluster CA; ``tls_min_version`` whether TLS 1.2 is
    admitted besides 1.3 (:mod:`meshblock.nbd.tls`). ``tcp_allow``: the TCP clients'
    allow list, entries ``"CIDR [EXPORT-PATTERN ...]"`` (:mod:`meshblock.nbd.access`).
    """

    unix_socket: str = "/run/meshblock-sdc/nbd.sock"
    socket_group: str = ""
    tcp: bool = False
    host: str = "127.0.0.1"
    port: int = 10809
    tls: bool = False
    tls_client_certs: str = "required"
    tls_min_version: str = "1.3"
    tcp_allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    multi_conn: bool = True
    attach_nbd: bool = False
    nbd_client: str = "nbd-client"
    attach_connections: int = 1
    # The privileged attach helper's unix socket (meshblock.sdc.nbd_helper); empty:
    # the SDC runs nbd_client itself (it then needs CAP_SYS_ADMIN).
    attach_helper: str = ""


@dataclass(frozen=True)
class ControlListen:
    """``[control]``: the HTTP port with /health and /metrics."""

    host: str = "127.0.0.1"
    port: int = 7074


@dataclass(frozen=True)
class IoSettings:
    """``[io]``: how long an IO may retry (map refreshes, failovers) before EIO, and
    the lowest data protocol version spoken to SDSs."""

    timeout_s: float = 45.0
    attempt_timeout_s: float = 10.0  # the longest an attempt may take (the budgets' ceiling)
    attempt_timeout_min_s: float = 1.5  # the shortest budget of an attempt
    attempt_timeout_factor: float = 4.0  # budget: this x the SDS's p99 latency
    wire_min_version: int = 1
    # With a certificate in [tls]: dial the SDSs' data ports over TLS with it
    # (meshblock.wire.tls); false: plain TCP.
    tls: bool = True


@dataclass(frozen=True)
class SdcConfig:
    sdc: SdcIdentity = field(default_factory=SdcIdentity)
    mdm: MdmLink = field(default_factory=MdmLink)
    nbd: NbdListen = field(default_factory=NbdListen)
    control: ControlListen = field(default_factory=ControlListen)
    io: IoSettings = field(default_factory=IoSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)  # meshblock.tls: HTTPS to the MDM
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # meshblock.metrics_access
    audit: AuditConfig = field(default_factory=AuditConfig)  # refused reads

    def __post_init__(self) -> None:
        if not self.mdm.urls:
            raise ValueError("mdm.urls must list at least one MDM")
        if self.mdm.cluster_secret and self.mdm.cluster_secret_file:
            raise ValueError("set mdm.cluster_secret or mdm.cluster_secret_file, not both")
        if not self.mdm.cluster_secret and not self.mdm.cluster_secret_file:
            raise ValueError("mdm.cluster_secret or mdm.cluster_secret_file must be set")
        io = self.io
        if min(io.timeout_s, io.attempt_timeout_s, io.attempt_timeout_min_s) <= 0:
            raise ValueError(
                "io.timeout_s, io.attempt_timeout_s and io.attempt_timeout_min_s must be positive"
            )
        if io.attempt_timeout_factor <= 0:
            raise ValueError("io.attempt_timeout_factor must be positive")
        check_wire_min_version(self.io.wire_min_version, "io.wire_min_version")
        if self.mdm.heartbeat_interval_s <= 0 or self.mdm.longpoll_timeout_s <= 0:
            raise ValueError("mdm intervals must be positive")
        if self.metrics.port and self.metrics.port == self.control.port:
            raise ValueError("metrics.port must differ from control.port")
        if not 1 <= self.nbd.attach_connections <= 16:
            raise ValueError("nbd.attach_connections must be between 1 and 16")
        if not self.nbd.tcp and not self.nbd.unix_socket:
            raise ValueError("nbd: no listener: set nbd.unix_socket, or nbd.tcp = true")
        if self.nbd.attach_nbd and not self.nbd.unix_socket:
            raise ValueError("nbd.attach_nbd needs nbd.unix_socket: nbd-client attaches by it")
        if self.nbd.attach_helper and not self.nbd.attach_helper.startswith("/"):
            raise ValueError("nbd.attach_helper must be an absolute path (or empty)")
        if self.nbd.tls_client_certs not in tuple(pki.ClientCerts):
            raise ValueError("nbd.tls_client_certs must be 'required' or 'optional'")
        if self.nbd.tls_min_version not in nbd_tls.TLS_MIN_VERSIONS:
            raise ValueError(
                'nbd.tls_min_version must be "1.3" (the default) or "1.2" (TLS 1.2 admitted '
                f"too, for nbd-client), not {self.nbd.tls_min_version!r}"
            )
        if self.nbd.tls and not self.tls.cert:
            raise ValueError("nbd.tls needs [tls] cert and key: the SDC's certificate")
        try:
            parse_rules(self.nbd.tcp_allow)
        except ValueError as exc:
            raise ValueError(f"nbd.tcp_allow: {exc}") from None


def nbd_tcp_policy(config: SdcConfig) -> ListenPolicy:
    """What the NBD TCP listener asks of its clients: TLS with the SDC's certificate
    (``[nbd] tls``, from ``tls_min_version`` on) and the allow list. A
    :class:`ConfigError` if the files cannot be used."""
    context = None
    if config.nbd.tls:
        tls = config.tls
        try:
            context = nbd_tls.server_context(
                Path(tls.cert),
                Path(tls.key),
                Path(tls.ca),
                crl=Path(tls.crl) if tls.crl else None,
                client_certs=pki.ClientCerts(config.nbd.tls_client_certs),
                min_version=config.nbd.tls_min_version,
            )
        except pki.PkiError as exc:
            raise ConfigError(f"[tls] for [nbd] tls: {exc}") from None
        follow_crl(context, tls)  # a revoked NBD client is refused after a reload
    return ListenPolicy(tls=context, allow=parse_rules(config.nbd.tcp_allow))


def nbd_socket_gid(config: SdcConfig) -> int | None:
    """The group of the NBD unix socket (``[nbd] socket_group``, a name or a number;
    None: the daemon's own); a :class:`ConfigError` for a group that does not exist."""
    group = config.nbd.socket_group
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"nbd.socket_group: no group named {group!r}") from None


def cluster_secret(config: SdcConfig) -> str:
    """The cluster secret, from the config or from the file it names."""
    if config.mdm.cluster_secret:
        return config.mdm.cluster_secret
    return read_secret_file(config.mdm.cluster_secret_file, "mdm.cluster_secret_file")


def sdc_name(config: SdcConfig) -> str:
    return config.sdc.name or socket.gethostname()


def sdc_guid(config: SdcConfig, certified: str | None = None) -> str:
    """The configured GUID, or the one kept in the state directory (made on first use).

    With a certificate, ``certified`` is the GUID it names (``sdc:<guid>``): that is
    the GUID, and neither ``[sdc] guid`` nor the state directory may name another
    (the SDC would register as a new one, without its mappings).
    """
    if config.sdc.guid:
        if certified is not None and certified != config.sdc.guid:
            raise ConfigError(
                f"[tls] cert names sdc:{certified}, but [sdc] guid is {config.sdc.guid}"
            )
        return config.sdc.guid
    state = Path(config.sdc.state_dir)
    path = state / "guid"
    try:
        guid = path.read_text().strip()
        if guid:
            if certified is not None and certified != guid:
                raise ConfigError(
                    f"[tls] cert names sdc:{certified}, but this SDC is {guid} ({path}): "
                    f"issue it a certificate for sdc:{guid}"
                )
            return guid
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    guid = certified or str(uuid.uuid4())
    try:
        state.mkdir(parents=True, exist_ok=True)
        write_atomic(path, guid + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return guid
