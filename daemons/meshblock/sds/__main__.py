"""``meshblock-sds``: run a storage data server."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from meshblock.config import ConfigError
from meshblock.daemon import setup_logging
from meshblock.sds import device_io
from meshblock.sds.app import create_app
from meshblock.sds.config import load
from meshblock.sds.mdm_client import mdm_tls_of
from meshblock.sds.store import StoreError

log = logging.getLogger("meshblock.sds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meshblock-sds",
        description="meshblock storage data server (SDS): stores chunks on local devices, "
        "serves the data protocol on [data] and /health + /metrics on [control].",
        epilog="Example: meshblock-sds --config /etc/meshblock/sds.toml. "
        "See docs/sds.md for every configuration key.",
    )
    p.add_argument("--config", "-c", required=True, help="path of sds.toml")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration file and exit"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config)
        secret = config.secret()
        mdm_tls_of(config)  # the [tls] files, and the MDM URLs' schemes
    except ConfigError as exc:
        print(f"meshblock-sds: configuration error: {exc}", file=sys.stderr)
        return 2
    if config.test_faults and not device_io.enabled_by_env():
        print(
            "meshblock-sds: configuration error: test_faults is a test-only fault hook; "
            f"it also needs {device_io.ENV_VAR}=1 in the environment (never in production)",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.logging.level)
    if args.check_config:
        print("configuration OK")
        return 0
    log.info(
        "SDS %s starting: data %s:%d, control %s:%d",
        config.name,
        config.data.host,
        config.data.port,
        config.control.host,
        config.control.port,
    )
    try:
        web.run_app(
            create_app(config, secret),
            host=config.control.host,
            port=config.control.port,
            print=None,
            access_log=None,
            shutdown_timeout=5,
        )
    except StoreError as exc:
        log.error("%s", exc)
        print(f"meshblock-sds: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
