"""``meshblock-mdm``: run the metadata manager."""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path

from meshblock import daemon, pki
from meshblock.config import ConfigError, load
from meshblock.mdm import backup, db
from meshblock.mdm.app import create_app
from meshblock.mdm.config import MdmConfig, TlsConfig

log = logging.getLogger("meshblock.mdm")

EXIT_SCHEMA = 3  # the database schema is newer than this release


def _arguments(p: argparse.ArgumentParser) -> None:
    backup.add_subcommands(p.add_subparsers(dest="command", metavar="{backup,restore}"))


def _load(args: argparse.Namespace) -> MdmConfig:
    config = load(MdmConfig, args.config)
    if args.command is None:  # backup and restore serve nothing
        try:
            _ssl_context(config.tls)
        except pki.PkiError as exc:
            raise ConfigError(f"[tls] {exc}") from None
    return config


def _backup_or_restore(args: argparse.Namespace, config: MdmConfig) -> int:
    try:
        print(backup.run(args.command, args.path, config))
    except (backup.BackupError, OSError) as exc:
        print(f"meshblock-mdm {args.command}: {exc}", file=sys.stderr)
        return 1
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


def _server(config: MdmConfig) -> daemon.Server:
    ssl_context = _ssl_context(config.tls)  # checked by _load: a PkiError here is a bug
    log.info(
        "MDM starting on %s://%s:%d%s",
        "https" if ssl_context else "http",
        config.api.host,
        config.api.port,
        f" (client certificates {config.tls.client_certs})" if ssl_context else "",
    )
    return daemon.Server(create_app(config), config.api.host, config.api.port, ssl_context)


MDM = daemon.Daemon(
    name="mdm",
    description="meshblock metadata manager (MDM): the cluster's control plane. Serves "
    "the REST API, /health and /metrics on [api] host:port of the config file.",
    epilog="Example: meshblock-mdm --config /etc/meshblock/mdm.toml. "
    "Backup: meshblock-mdm -c mdm.toml backup /var/backups/mdm-$(date +%F).db; "
    "restore (MDM stopped): meshblock-mdm -c mdm.toml restore FILE. "
    "See docs/mdm.md for every configuration key and the order of operations.",
    load=_load,
    server=_server,
    arguments=_arguments,
    command=_backup_or_restore,
    migrate=_migrate,
    fatal=(daemon.Fatal(db.SchemaError, EXIT_SCHEMA),),
)


def main(argv: list[str] | None = None) -> int:
    return daemon.main(MDM, argv)


if __name__ == "__main__":
    sys.exit(main())
