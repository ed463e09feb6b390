"""What every meshblock daemon does the same way: :func:`main` runs it.

Each daemon's ``__main__`` describes itself in a :class:`Daemon`: its name and help
text, how it loads and checks its configuration, its own arguments and commands, how
it brings its database schema up to date, what it serves, and the errors that stop it
with an exit code of their own. :func:`main` does the rest, the same for all four:

- the command line: ``--config``/``-c`` (required), ``--check-config``, and
  ``--migrate-only`` for a daemon with a database;
- the configuration: a :class:`~meshblock.config.ConfigError` while it is loaded and
  checked is ``<prog>: configuration error: ...`` on stderr and exit code 2;
- logging to stderr at ``[logging] level`` (:func:`setup_logging`);
- ``--check-config``: ``configuration OK`` and exit code 0;
- then a command (``meshblock-mdm backup``, ``meshblock-mgmt user add``), or
  ``--migrate-only``, or serving the daemon's aiohttp application until SIGTERM or
  SIGINT (``web.run_app``: the event loop, the signal handlers, a graceful stop of at
  most 5 s; exit code 0);
- an error the daemon declares :class:`Fatal` on the way: logged and/or printed, and
  its exit code. Any other exception is a bug: a traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web

from meshblock.config import ConfigError, LoggingConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

EXIT_OK = 0
EXIT_CONFIG = 2  # the configuration, or a file it names, cannot be used


def setup_logging(level: str) -> None:
    """Log to stderr (journald keeps it) at ``level``.

    DEBUG applies to meshblock's own loggers only: the libraries' debug output (a line
    per SQL call, per HTTP request) would drown it. aiohttp's access log stays quiet.
    """
    level = level.upper()
    logging.basicConfig(level="INFO" if level == "DEBUG" else level, format=LOG_FORMAT)
    logging.getLogger("meshblock").setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Configured(Protocol):
    """A daemon's configuration: it has a ``[logging]`` table."""

    @property
    def logging(self) -> LoggingConfig: ...


C = TypeVar("C", bound=Configured)


@dataclass(frozen=True)
class Fatal:
    """An error that stops the daemon, once configured, with exit ``code``."""

    error: type[Exception]
    code: int
    log: str | None = "%s"  # logged at ERROR in this format (None: not logged)
    echo: bool = True  # printed on stderr as ``<prog>: <error>``


@dataclass(frozen=True)
class Server:
    """The application a daemon serves, and where."""

    app: web.Application
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    # The exit code once the server has stopped (None: 0); a daemon that stops itself
    # on an error (an MDM that lost its leadership) says so here.
    exit_code: Callable[[], int] | None = None


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    return None


@dataclass(frozen=True)
class Daemon(Generic[C]):
    """One daemon, for :func:`main`."""

    name: str  # "mdm": the program meshblock-mdm, the logger meshblock.mdm, mdm.toml
    description: str
    epilog: str
    # The configuration from the command line (``args.config``), checked as far as it
    # can be before the daemon starts (files it names): ConfigError is exit code 2.
    load: Callable[[argparse.Namespace], C]
    # Logs that it starts and builds the application (after --check-config).
    server: Callable[[C], Server]
    # Adds the daemon's own arguments; subcommands go to ``dest="command"``.
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    # Runs the subcommand given (``args.command``) instead of serving: its exit code.
    command: Callable[[argparse.Namespace, C], int] | None = None
    # Brings the database schema up to date; set, the daemon has --migrate-only.
    migrate: Callable[[C], Coroutine[Any, Any, None]] | None = None
    fatal: tuple[Fatal, ...] = ()
    check_config_help: str = "validate the configuration file and exit"

    @property
    def prog(self) -> str:
        return f"meshblock-{self.name}"

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=self.prog, description=self.description, epilog=self.epilog
        )
        p.add_argument("--config", "-c", required=True, help=f"path of {self.name}.toml")
        p.add_argument("--check-config", action="store_true", help=self.check_config_help)
        if self.migrate is not None:
            p.add_argument(
                "--migrate-only",
                action="store_true",
                help="bring the database schema up to date and exit",
            )
        self.arguments(p)
        return p


def main(daemon: Daemon[C], argv: list[str] | None = None) -> int:
    """Run ``daemon`` with the command line ``argv`` (``sys.argv[1:]`` when None);
    returns the exit code."""
    args = daemon.parser().parse_args(argv)
    try:
        config = daemon.load(args)
    except ConfigError as exc:
        print(f"{daemon.prog}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.logging.level)
    if args.check_config:
        print("configuration OK")
        return EXIT_OK
    try:
        return _run(daemon, args, config)
    except Exception as exc:
        fatal = next((f for f in daemon.fatal if isinstance(exc, f.error)), None)
        if fatal is None:
            raise
        if fatal.log is not None:
            logging.getLogger(f"meshblock.{daemon.name}").error(fatal.log, exc)
        if fatal.echo:
            print(f"{daemon.prog}: {exc}", file=sys.stderr)
        return fatal.code


def _run(daemon: Daemon[C], args: argparse.Namespace, config: C) -> int:
    if daemon.command is not None and args.command is not None:
        return daemon.command(args, config)
    if daemon.migrate is not None and args.migrate_only:
        asyncio.run(daemon.migrate(config))
        return EXIT_OK
    server = daemon.server(config)
    web.run_app(
        server.app,
        host=server.host,
        port=server.port,
        ssl_context=server.ssl_context,
        print=None,
        access_log=None,
        shutdown_timeout=5,
    )
    return EXIT_OK if server.exit_code is None else server.exit_code()
