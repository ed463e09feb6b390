"""``meshblock-sdc``: run the storage data client."""

from __future__ import annotations

import argparse
import logging
import sys

from meshblock import daemon
from meshblock.config import ConfigError, load
from meshblock.metrics_access import ReadAccess
from meshblock.sdc.app import create_app
from meshblock.sdc.config import SdcConfig, cluster_secret, nbd_socket_gid, nbd_tcp_policy
from meshblock.sdc.mdm_client import mdm_tls_of
from meshblock.tls import control_context

log = logging.getLogger("meshblock.sdc")

EXIT_CANNOT_START = 1  # a port in use, ...


def _load(args: argparse.Namespace) -> SdcConfig:
    config = load(SdcConfig, args.config)
    cluster_secret(config)  # a missing secret file is a configuration error
    mdm_tls_of(config)  # the [tls] files, and the MDM URLs' schemes
    control_context(config.tls)
    ReadAccess.of(config.metrics)  # [metrics] token_file
    nbd_tcp_policy(config)  # [nbd] tls: the certificate's files
    nbd_socket_gid(config)
    return config


def _server(config: SdcConfig) -> daemon.Server:
    control_tls = control_context(config.tls)
    log.info(
        "SDC starting; control port %s://%s:%d",
        "https" if control_tls else "http",
        config.control.host,
        config.control.port,
    )
    return daemon.Server(create_app(config), config.control.host, config.control.port, control_tls)


SDC = daemon.Daemon(
    name="sdc",
    description="meshblock storage data client (SDC): exports the volumes mapped to "
    "this host over NBD ([nbd] host:port, 10809) and serves /health and /metrics on "
    "[control] host:port (7074).",
    epilog="Example: meshblock-sdc --config /etc/meshblock/sdc.toml. "
    "See docs/sdc.md for every configuration key.",
    load=_load,
    server=_server,
    fatal=(
        # at start (the state directory, the GUID): logged, not echoed
        daemon.Fatal(ConfigError, daemon.EXIT_CONFIG, log="configuration error: %s", echo=False),
        daemon.Fatal(OSError, EXIT_CANNOT_START, log="cannot start: %s", echo=False),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return daemon.main(SDC, argv)


if __name__ == "__main__":
    sys.exit(main())
