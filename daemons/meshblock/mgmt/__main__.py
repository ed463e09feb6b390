"""``meshblock-mgmt``: run the management service, or manage its users and tokens.

meshblock-mgmt --config mgmt.toml                      # serve
meshblock-mgmt --config mgmt.toml user add NAME --role admin [--password-file F]
meshblock-mgmt --config mgmt.toml user list
meshblock-mgmt --config mgmt.toml token add USER TOKEN_NAME   # prints the token once
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock import daemon
from meshblock.config import load
from meshblock.metrics_access import ReadAccess
from meshblock.mgmt import accounts, db
from meshblock.mgmt.app import create_app, mdm_headers, mdm_tls_of, server_tls
from meshblock.mgmt.config import MgmtConfig
from meshblock.mgmt.errors import ApiError, Conflict
from meshblock.mgmt.inventory import actions_link
from meshblock.mgmt.models import User, UserRole

log = logging.getLogger("meshblock.mgmt")

T = TypeVar("T")

EXIT_SCHEMA = 3
EXIT_REFUSED = 4  # a user or token command was refused (exists, bad name, ...)


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = user.add_parser(
        "add",
        help="create a user; the password is read from --password-file or the first "
        "line of standard input",
    )
    add.add_argument("name")
    add.add_argument("--role", choices=[r.value for r in UserRole], default="viewer")
    add.add_argument("--password-file", help="file whose first line is the password")
    add.add_argument(
        "--exist-ok",
        action="store_true",
        help="exit 0 without change when the user exists (for configuration management)",
    )
    user.add_parser("list", help="list users and their roles")

    token = sub.add_parser("token", help="manage API tokens").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    tadd = token.add_parser("add", help="create an API token for a user and print it once")
    tadd.add_argument("user")
    tadd.add_argument("name", help="a name for the token, e.g. the script that uses it")


def read_password(path: str | None) -> str:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return sys.stdin.readline().rstrip("\r\n")


async def _with_session(config: MgmtConfig, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
    engine = db.create_engine(config.database.url)
    try:
        await db.migrate(engine)
        async with db.session_factory(engine)() as s, s.begin():
            return await fn(s)
    finally:
        await engine.dispose()


def run_command(args: argparse.Namespace, config: MgmtConfig) -> int:
    if args.command == "user" and args.action == "add":
        try:
            password = read_password(args.password_file)
        except OSError as exc:
            print(f"meshblock-mgmt: cannot read the password: {exc}", file=sys.stderr)
            return EXIT_REFUSED

        async def add(s: AsyncSession) -> str:
            user = await accounts.create_user(s, args.name, password, UserRole(args.role))
            return f"user {user.name} created (role {user.role.value})"

        try:
            print(asyncio.run(_with_session(config, add)))
        except Conflict as exc:
            if args.exist_ok:
                print(f"{exc.message}; unchanged")
                return 0
            print(f"meshblock-mgmt: {exc.message}", file=sys.stderr)
            return EXIT_REFUSED
        return 0
    if args.command == "user" and args.action == "list":

        async def listing(s: AsyncSession) -> list[tuple[str, str]]:
            rows = await s.execute(select(User.name, User.role).order_by(User.name))
            return [(n, r.value) for n, r in rows]

        for name, role in asyncio.run(_with_session(config, listing)):
            print(f"{name}\t{role}")
        return 0
    if args.command == "token" and args.action == "add":

        async def new_token(s: AsyncSession) -> str:
            return (await accounts.create_token(s, args.user, args.name)).token

        print(asyncio.run(_with_session(config, new_token)))
        return 0
    raise AssertionError(f"unhandled command {args.command} {args.action}")


def _server(config: MgmtConfig) -> daemon.Server:
    if not config.auth.webhook_token:
        log.warning("auth.webhook_token is empty: every webhook call will be refused")
    context = server_tls(config)  # checked by _load
    scheme = "https" if context is not None else "http"
    log.info("MGMT starting on %s://%s:%d", scheme, config.http.host, config.http.port)
    if context is None and not _loopback(config.http.host):
        log.warning(
            "[http] plain_http on %s, not a loopback address: passwords and session "
            "cookies cross the network in clear text",
            config.http.host,
        )
    return daemon.Server(create_app(config), config.http.host, config.http.port, context)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _load(args: argparse.Namespace) -> MgmtConfig:
    config = load(MgmtConfig, args.config)
    mdm_headers(config, mdm_tls_of(config))  # the [tls] files, the URL, the token file
    actions_link(config)  # [mdm] admin_cert / admin_token_file, for the cluster pages
    server_tls(config)  # HTTPS unless [http] plain_http
    ReadAccess.of(config.metrics)  # [metrics] token_file
    return config


async def _migrate(config: MgmtConfig) -> None:
    await _with_session(config, _nothing)


async def _nothing(_s: AsyncSession) -> None:
    return None


MGMT = daemon.Daemon(
    name="mgmt",
    description="meshblock management service (MGMT): the web dashboard, the alert "
    "history and Alertmanager's webhook, on [http] host:port of the config file. "
    "With a command, manage its users and API tokens instead.",
    epilog="See docs/mgmt.md for every configuration key.",
    check_config_help="validate the configuration",
    load=_load,
    server=_server,
    arguments=_arguments,
    command=run_command,
    migrate=_migrate,
    fatal=(
        daemon.Fatal(ApiError, EXIT_REFUSED, log=None),
        daemon.Fatal(db.SchemaError, EXIT_SCHEMA),
    ),
)


def main(argv: list[str] | None = None) -> int:
    return daemon.main(MGMT, argv)


if __name__ == "__main__":
    sys.exit(main())
