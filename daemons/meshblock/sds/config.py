"""SDS configuration (``/etc/meshblock/sds.toml``); every key is in ``docs/sds.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshblock.audit import AuditConfig
from meshblock.config import ConfigError, LoggingConfig, from_mapping, read_secret_file, read_toml
from meshblock.metrics_access import MetricsConfig
from meshblock.sizes import SizeError, parse_size
from meshblock.tls import TlsConfig
from meshblock.wire.protocol import check_wire_min_version


@dataclass(frozen=True)
class DataListen:
    """``[data]``: where the data protocol listens."""

    host: str = "0.0.0.0"
    port: int = 7072
    # With a certificate in [tls]: the port serves only TLS with client certificates,
    # and peers are dialled over TLS (meshblock.wire.tls); false: plain TCP.
    tls: bool = True


@dataclass(frozen=True)
class ControlListen:
    """``[control]``: where the HTTP control port (/health, /metrics) listens."""

    host: str = "0.0.0.0"
    port: int = 7073


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: how the chunk store keeps its devices (docs/sds.md)."""

    # A CRC32C of every 4 KiB block, kept and checked on every read (docs/sds.md,
    # "Checksums"); false only to measure what they cost.
    checksums: bool = True


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[devices]]`` entry: a file (created sparse if absent) or a block device."""

    path: str
    capacity: int | str
    pool: str
    name: str | None = None

    @property
    def capacity_bytes(self) -> int:
        return parse_size(self.capacity)

    def __post_init__(self) -> None:
        try:
            size = parse_size(self.capacity)
        except SizeError as exc:
            raise ValueError(f"capacity: {exc}") from None
        if size < 2 * 1024 * 1024:
            raise ValueError(f"capacity of {self.path} must be at least 2MiB")


@dataclass(frozen=True)
class SdsConfig:
    name: str
    protection_domain: str
    address: str
    fault_set: str | None = None
    mdm_urls: tuple[str, ...] = ("https://127.0.0.1:6611",)
    cluster_secret: str = ""
    cluster_secret_file: str | None = None
    # The join token a new SDS registers with (docs/security.md,
    # "Joining the cluster"); not needed once it is registered, nor with a
    # certificate of its name.
    join_token: str = ""
    join_token_file: str | None = None
    state_dir: str = "/var/lib/meshblock/sds"
    heartbeat_interval_s: float = 2.0
    map_poll_timeout_s: float = 25.0
    peer_timeout_s: float = 10.0  # the longest a peer may answer nothing (the ceiling)
    peer_timeout_min_s: float = 1.5  # the shortest: budget max(this, factor x p99)
    peer_timeout_factor: float = 4.0
    # Refuse writes we would have to mirror once no peer has answered (and no MDM
    # probe reached us) for this long (0: never); docs/sds.md "Self-fencing".
    self_fence_after_s: float = 6.0
    # Chunks of deleted volumes freed per second at most (0: unlimited).
    delete_free_rate: int = 20000
    # The lowest data protocol version accepted from clients and peers and spoken to
    # peers (docs/protocol.md §8).
    wire_min_version: int = 1
    data: DataListen = field(default_factory=DataListen)
    control: ControlListen = field(default_factory=ControlListen)
    store: StoreConfig = field(default_factory=StoreConfig)
    devices: tuple[DeviceConfig, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)  # meshblock.tls: HTTPS to the MDM
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # meshblock.metrics_access
    audit: AuditConfig = field(default_factory=AuditConfig)  # refused reads, /test/faults
    # Test-only fault hook (meshblock.sds.device_io); also needs MESHBLOCK_SDS_TEST_FAULTS=1.
    test_faults: bool = False

    def __repr__(self) -> str:  # never print the secret
        return f"SdsConfig(name={self.name!r}, address={self.address!r}, cluster_secret=***)"

    def __post_init__(self) -> None:
        if not self.mdm_urls:
            raise ValueError("mdm_urls must name at least one MDM")
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if min(self.peer_timeout_s, self.peer_timeout_min_s, self.peer_timeout_factor) <= 0:
            raise ValueError(
                "peer_timeout_s, peer_timeout_min_s and peer_timeout_factor must be positive"
            )
        if self.self_fence_after_s < 0:
            raise ValueError("self_fence_after_s must be 0 (never) or positive")
        if self.delete_free_rate < 0:
            raise ValueError("delete_free_rate must be 0 (unlimited) or positive")
        check_wire_min_version(self.wire_min_version, "wire_min_version")
        if not self.devices:
            raise ValueError("at least one [[devices]] entry is required")
        paths = [d.path for d in self.devices]
        if len(set(paths)) != len(paths):
            raise ValueError("a device path appears twice")
        if bool(self.cluster_secret) == bool(self.cluster_secret_file):
            raise ValueError("set exactly one of cluster_secret and cluster_secret_file")
        if self.join_token and self.join_token_file:
            raise ValueError("set at most one of join_token and join_token_file")
        if self.metrics.port and self.metrics.port in (self.control.port, self.data.port):
            raise ValueError("metrics.port must differ from control.port and data.port")

    def secret(self) -> str:
        """The cluster secret, read from ``cluster_secret_file`` when that is set."""
        if self.cluster_secret:
            return self.cluster_secret
        assert self.cluster_secret_file is not None
        return read_secret_file(self.cluster_secret_file, "cluster_secret_file")

    def token(self) -> str | None:
        """The join token, read from ``join_token_file`` when that is set; None: none
        (a ``join_token_file`` that does not exist is none: an SDS registered already
        needs no token, and the file may go once it has joined)."""
        if self.join_token_file:
            if not Path(self.join_token_file).exists():
                return None
            return read_secret_file(self.join_token_file, "join_token_file")
        return self.join_token or None


def from_dict(data: dict[str, Any]) -> SdsConfig:
    """Build an :class:`SdsConfig` from a parsed TOML document."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a table")
    data = dict(data)
    raw_devices = data.pop("devices", [])
    if not isinstance(raw_devices, list):
        raise ConfigError("devices: expected an array of tables ([[devices]])")
    devices = tuple(
        from_mapping(DeviceConfig, d, f"devices[{i}]") for i, d in enumerate(raw_devices)
    )
    # from_mapping accepts ready DeviceConfig objects for the tuple[DeviceConfig, ...]
    return from_mapping(SdsConfig, {**data, "devices": list(devices)})


def load(path: str | Path) -> SdsConfig:
    return from_dict(read_toml(path))
