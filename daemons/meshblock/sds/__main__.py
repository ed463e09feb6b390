"""``meshblock-sds``: run a storage data server."""

from __future__ import annotations

import argparse
import logging
import sys

from meshblock import daemon
from meshblock.config import ConfigError
from meshblock.metrics_access import ReadAccess
from meshblock.sds import device_io
from meshblock.sds.app import create_app
from meshblock.sds.config import SdsConfig, load
from meshblock.sds.mdm_client import mdm_tls_of
from meshblock.sds.store import StoreError
from meshblock.tls import control_context

log = logging.getLogger("meshblock.sds")

EXIT_DEVICE = 3  # a device cannot be used (not ours, wrong size, a newer format, ...)


def _load(args: argparse.Namespace) -> SdsConfig:
    config = load(args.config)
    config.secret()  # a secret file that cannot be read is a configuration error
    config.token()
    mdm_tls_of(config)  # the [tls] files, and the MDM URLs' schemes
    control_context(config.tls)
    ReadAccess.of(config.metrics)  # [metrics] token_file
    if config.test_faults and not device_io.enabled_by_env():
        raise ConfigError(
            "test_faults is a test-only fault hook; "
            f"it also needs {device_io.ENV_VAR}=1 in the environment (never in production)"
        )
    return config


def _server(config: SdsConfig) -> daemon.Server:
    control_tls = control_context(config.tls)
    log.info(
        "SDS %s starting: data %s:%d, control %s://%s:%d",
        config.name,
        config.data.host,
        config.data.port,
        "https" if control_tls else "http",
        config.control.host,
        config.control.port,
    )
    app = create_app(config, config.secret())
    return daemon.Server(app, config.control.host, config.control.port, control_tls)


SDS = daemon.Daemon(
    name="sds",
    description="meshblock storage data server (SDS): stores chunks on local devices, "
    "serves the data protocol on [data] and /health + /metrics on [control].",
    epilog="Example: meshblock-sds --config /etc/meshblock/sds.toml. "
    "See docs/sds.md for every configuration key.",
    load=_load,
    server=_server,
    fatal=(daemon.Fatal(StoreError, EXIT_DEVICE),),
)


def main(argv: list[str] | None = None) -> int:
    return daemon.main(SDS, argv)


if __name__ == "__main__":
    sys.exit(main())
