"""``meshblock-mdm``: run the metadata manager."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

from aiohttp import web

from meshblock import pki
from meshblock.config import ConfigError, load
from meshblock.daemon import setup_logging
from meshblock.mdm import backup, db
from meshblock.mdm.app import create_app
from meshblock.mdm.config import MdmConfig, TlsConfig

log = logging.getLogger("meshblock.mdm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meshblock-mdm",
        description="meshblock metadata manager (MDM): the cluster's control plane. Serves "
        "the REST API, /health and /metrics on [api] host:port of the config file.",
        epilog="Example: meshblock-mdm --config /etc/meshblock/mdm.toml. "
        "Backup: meshblock-mdm -c mdm.toml backup /var/backups/mdm-$(date +%F).db; "
        "restore (MDM stopped): meshblock-mdm -c mdm.toml restore FILE. "
        "See docs/mdm.md for every configuration key and the order of operations.",
    )
    p.add_argument("--config", "-c", required=True, help="path of mdm.toml")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration file and exit"
    )
    p.add_argument(
        "--migrate-only", action="store_true", help="bring the database schema up to date and exit"
    )
    backup.add_subcommands(p.add_subparsers(dest="command", metavar="{backup,restore}"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(MdmConfig, args.config)
    except ConfigError as exc:
        print(f"meshblock-mdm: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level)
    ssl_context = None
    if args.command is None:  # backup and restore serve nothing
        try:
            ssl_context = _ssl_context(config.tls)
        except pki.PkiError as exc:
            print(f"meshblock-mdm: configuration error: [tls] {exc}", file=sys.stderr)
            return 2
    if args.check_config:
        print("configuration OK")
        return 0
    if args.command is not None:
        try:
            print(backup.run(args.command, args.path, config))
        except (backup.BackupError, OSError) as exc:
            print(f"meshblock-mdm {args.command}: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        if args.migrate_only:
            asyncio.run(_migrate(config))
            return 0
        log.info(
            "MDM starting on %s://%s:%d%s",
            "https" if ssl_context else "http",
            config.api.host,
            config.api.port,
            f" (client certificates {config.tls.client_certs})" if ssl_context else "",
        )
        web.run_app(
            create_app(config),
            host=config.api.host,
            port=config.api.port,
            ssl_context=ssl_context,
            print=None,
            access_log=None,
            shutdown_timeout=5,
        )
    except db.SchemaError as exc:
        log.error("%s", exc)
        print(f"meshblock-mdm: {exc}", file=sys.stderr)
        return 3
    return 0


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The API's TLS context from ``[tls]``, or ``None`` when TLS is off."""
    if not tls.enabled:
        return None
    return pki.server_context(
        Path(tls.cert),
        Path(tls.key),
        Path(tls.ca),
        crl=Path(tls.crl) if tls.crl else None,
        client_certs=pki.ClientCerts(tls.client_certs),
    )


async def _migrate(config: MdmConfig) -> None:
    engine = db.create_engine(config.database.url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
