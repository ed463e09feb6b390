"""``meshblock-sdc``: run the storage data client."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from meshblock.config import ConfigError, load
from meshblock.daemon import setup_logging
from meshblock.sdc.app import create_app
from meshblock.sdc.config import SdcConfig, cluster_secret
from meshblock.sdc.mdm_client import mdm_tls_of

log = logging.getLogger("meshblock.sdc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meshblock-sdc",
        description="meshblock storage data client (SDC): exports the volumes mapped to "
        "this host over NBD ([nbd] host:port, 10809) and serves /health and /metrics on "
        "[control] host:port (7074).",
        epilog="Example: meshblock-sdc --config /etc/meshblock/sdc.toml. "
        "See docs/sdc.md for every configuration key.",
    )
    p.add_argument("--config", "-c", required=True, help="path of sdc.toml")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration file and exit"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(SdcConfig, args.config)
        cluster_secret(config)  # a missing secret file is a configuration error
        mdm_tls_of(config)  # the [tls] files, and the MDM URLs' schemes
    except ConfigError as exc:
        print(f"meshblock-sdc: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level)
    if args.check_config:
        print("configuration OK")
        return 0
    try:
        log.info("SDC starting; control port %s:%d", config.control.host, config.control.port)
        web.run_app(
            create_app(config),
            host=config.control.host,
            port=config.control.port,
            print=None,
            access_log=None,
            shutdown_timeout=5,
        )
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
