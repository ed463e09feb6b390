"""The ``meshctl`` command tree's building blocks: global options, the helpers that add
a noun and a command (the tree itself is :func:`meshblock.cli.commands.build_parser`).

Global options (``--json``, ``--mdm``, ``--token``, ``--config``, ``--timeout``) are
accepted before the first word and after any subcommand: every parser gets them
from :func:`global_options`, with ``SUPPRESS`` defaults below the top so that an
option given early is not reset by a subparser that did not see it.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from meshblock import __version__
from meshblock.cli import values
from meshblock.cli.errors import EXIT_CODES_HELP

Handler = Callable[[Any, argparse.Namespace], int | None]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

PROG = "meshctl"

_DESCRIPTION = """\
Operate a meshblock cluster through its MDM: protection domains, fault sets,
storage pools, SDSs and their devices, SDCs, volumes and their mappings.
Objects are named by name; ids are accepted where no object has that name."""

_CONNECTION_HELP = """\
connection (first found wins):
  --mdm URL / --token T or --token-file PATH  on the command line
  MESHCTL_MDM / MESHCTL_TOKEN                 in the environment
  mdm = "..." / token = "..."                 in --config PATH, else
      $XDG_CONFIG_HOME/meshblock/meshctl.toml (~/.config/meshblock/meshctl.toml)
  http://127.0.0.1:6611                       the default address (no default token)
  https by the cluster's CA: MESHCTL_TLS_CA (the CA to trust), MESHCTL_TLS_CERT and
      MESHCTL_TLS_KEY (an admin certificate), or tls_ca, tls_cert, tls_key in the file"""


def global_options(top: bool) -> argparse.ArgumentParser:
    """The options every (sub)command accepts; real defaults only at the top."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the API's JSON documents instead of tables",
    )
    group.add_argument(
        "--mdm",
        metavar="URL",
        default=default(None),
        help="MDM address(es), comma-separated (env MESHCTL_MDM; default http://127.0.0.1:6611)",
    )
    group.add_argument(
        "--token",
        metavar="T",
        default=default(None),
        help="API bearer token; other users see it in the process list: prefer "
        "MESHCTL_TOKEN or --token-file",
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        default=default(None),
        help="read the API bearer token from this file (chmod 600)",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="config file (default $XDG_CONFIG_HOME/meshblock/meshctl.toml)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=default(30.0),
        help="how long to wait for the MDM (default 30)",
    )
    return parent


_SUB_OPTIONS = global_options(top=False)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def root_parser() -> argparse.ArgumentParser:
    """The top of the tree, without its nouns (the commands package adds them)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=f"{_CONNECTION_HELP}\n\n{EXIT_CODES_HELP}\n\n"
        "Run 'meshctl COMMAND --help' for a command's options and examples.",
        formatter_class=_Formatter,
        parents=[global_options(top=True)],
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__}", help="print the version"
    )
    return parser


def add_noun(sub: Subparsers, name: str, help: str, aliases: Sequence[str] = ()) -> Subparsers:
    """A group of commands (``meshctl volume ...``); returns its subparsers."""
    parser = sub.add_parser(
        name,
        aliases=list(aliases),
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=EXIT_CODES_HELP,
        formatter_class=_Formatter,
        parents=[_SUB_OPTIONS],
    )
    return parser.add_subparsers(dest="verb", metavar="SUBCOMMAND", required=True)


def add_command(
    sub: Subparsers,
    name: str,
    handler: Handler,
    *,
    help: str,
    examples: Sequence[str],
    description: str = "",
    aliases: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A leaf command whose ``--help`` shows ``description`` and ``examples``."""
    text = help[0].upper() + help[1:] + "."
    if description:
        text += "\n\n" + textwrap.dedent(description).strip()
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    parser = sub.add_parser(
        name,
        aliases=list(aliases),
        help=help,
        description=text,
        epilog=epilog,
        formatter_class=_Formatter,
        parents=[_SUB_OPTIONS],
    )
    parser.set_defaults(handler=handler)
    return parser


def add_watch_options(parser: argparse.ArgumentParser, watch_help: str) -> None:
    """``--watch`` (help ``watch_help``), ``--interval`` and ``--max-wait``: a status
    command that can poll until its work is done."""
    parser.add_argument("--watch", action="store_true", help=watch_help)
    parser.add_argument(
        "--interval", type=values.positive_float, default=2.0, help="seconds between polls"
    )
    parser.add_argument(
        "--max-wait",
        type=values.positive_float,
        default=None,
        help="with --watch: give up after this many seconds (exit 1)",
    )
