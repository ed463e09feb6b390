"""``meshblock-mdm``: run the metadata manager."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from meshblock import daemon, pki
from meshblock.config import ConfigError, load
from meshblock.mdm import backup, db, leader
from meshblock.mdm.app import create_app
from meshblock.mdm.config import MdmConfig, TlsConfig
from meshblock.mdm.context import CTX, ON_DEPOSED, SERVER_TLS
from meshblock.mdm.health import REGISTRY
from meshblock.tls import ServerTls

log = logging.getLogger("meshblock.mdm")

EXIT_SCHEMA = 3  # the database schema is newer than this release
EXIT_HELD = 4  # another MDM runs on the SQLite database
EXIT_DEPOSED = 5  # this MDM lost its leadership (leader.py): it starts again as a candidate


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


def _ssl_context(tls: TlsConfig) -> ServerTls | None:
    """The API's TLS context from ``[tls]``, or ``None`` when TLS is off."""
    if not tls.enabled:
        return None
    return ServerTls(
        Path(tls.cert),
        Path(tls.key),
        Path(tls.ca),
        Path(tls.crl) if tls.crl else None,
        pki.ClientCerts(tls.client_certs),
        log=log,
    )


def _reload_crl(
    server_tls: ServerTls, interval_s: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup context that reloads the CRL: every ``interval_s`` if the file
    changed, and at once on SIGHUP; and its metrics."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        app[REGISTRY].register(server_tls.collector("meshblock_mdm_tls"))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, server_tls.reload, "SIGHUP")
        task = asyncio.create_task(server_tls.watch(interval_s), name="crl-reload")
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


GC_THRESHOLD = (10_000, 10, 10)
"""The MDM's garbage collector thresholds (Python's default: 700, 10, 10)."""


async def _tune_gc(app: web.Application) -> AsyncIterator[None]:
    """Once the MDM is up: its startup objects (modules, the ORM's mappers, the
    OpenAPI document, ...) frozen out of the garbage collector's full passes, and a
    collection of the youngest generation every 10,000 allocations instead of 700.

    A change of a pool's membership builds and drops a few tens of thousands of objects
    (a row, a change and their tuples per PG of the pool): with Python's defaults they
    outlived the young collections and set off a full pass over the whole heap about
    every other SDS registration: the collector took 42 of the ~175 ms of CPU of a
    registration (100 SDSs, 4,096 PGs), 3.5 ms with these (docs/performance.md, "MDM")."""
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    log.debug(
        "garbage collector: %d objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLD
    )
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


async def _migrate(config: MdmConfig) -> None:
    engine = db.create_engine(config.database.url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()


def _server(config: MdmConfig) -> daemon.Server:
    server_tls = _ssl_context(config.tls)  # checked by _load: a PkiError here is a bug
    log.info(
        "MDM starting on %s://%s:%d%s",
        "https" if server_tls else "http",
        config.api.host,
        config.api.port,
        f" (client certificates {config.tls.client_certs})" if server_tls else "",
    )
    app = create_app(config)
    app[ON_DEPOSED] = lambda: signal.raise_signal(signal.SIGTERM)  # a graceful stop
    app.cleanup_ctx.append(_tune_gc)  # after the store and the loops: they are up

    def exit_code() -> int:
        return EXIT_DEPOSED if CTX in app and app[CTX].deposed else 0

    if server_tls is None:
        return daemon.Server(app, config.api.host, config.api.port, exit_code=exit_code)
    app[SERVER_TLS] = server_tls
    if config.tls.crl:
        app.cleanup_ctx.append(_reload_crl(server_tls, config.tls.crl_reload_s))
    return daemon.Server(
        app, config.api.host, config.api.port, server_tls.context, exit_code=exit_code
    )


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
    fatal=(
        daemon.Fatal(db.SchemaError, EXIT_SCHEMA),
        daemon.Fatal(leader.LeaderError, EXIT_HELD),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return daemon.main(MDM, argv)


if __name__ == "__main__":
    sys.exit(main())
