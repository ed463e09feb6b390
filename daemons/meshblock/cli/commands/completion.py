"""``meshctl completion bash|zsh``: a shell completion script for meshctl.

The script is generated from meshctl's own argparse parser by the ``shtab`` library,
so it knows every command, alias and option of this version and never drifts from
them. ``shtab`` is imported only here: every other command works without it.
"""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.context import Context
from meshblock.cli.errors import CliError
from meshblock.cli.parser import Subparsers, add_command

SHELLS = ("bash", "zsh")


def register(root: Subparsers) -> None:
    p = add_command(
        root,
        "completion",
        completion,
        help="print a shell completion script (bash or zsh)",
        description="""
            The script completes commands, subcommands, their aliases and options,
            generated from this meshctl's own command line. Install it once per
            version (docs/meshctl.md, "Shell completion"):
              bash: meshctl completion bash > /etc/bash_completion.d/meshctl
              zsh:  meshctl completion zsh > "${fpath[1]}/_meshctl" """,
        examples=[
            "meshctl completion bash > /etc/bash_completion.d/meshctl",
            "source <(meshctl completion bash)",
            'meshctl completion zsh > "${fpath[1]}/_meshctl"',
        ],
    )
    p.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")


def completion(ctx: Context, args: Namespace) -> None:
    try:
        import shtab
    except ImportError:
        raise CliError(
            "shell completion needs the Python package shtab, a dependency of meshblock: "
            "reinstall meshblock (pip install meshblock) or pip install 'shtab>=1.7,<2'"
        ) from None
    from meshblock.cli.commands import build_parser  # here: that module imports this one

    ctx.write(shtab.complete(build_parser(), shell=args.shell).rstrip("\n"))
