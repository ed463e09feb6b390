"""The state one ``meshctl`` invocation hands to a command: client, names, output."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from meshblock.cli.client import MdmClient
from meshblock.cli.errors import CliError, UsageError
from meshblock.cli.names import Names
from meshblock.cli.output import to_json
from meshblock.cli.settings import Settings


@dataclass
class Context:
    client: MdmClient
    settings: Settings
    json: bool = False
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stdin: TextIO | None = field(default_factory=lambda: sys.stdin)
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    names: Names = field(init=False)

    def __post_init__(self) -> None:
        self.names = Names(self.client)

    def emit(self, doc: Any, human: Callable[[], str]) -> None:
        """Print ``doc`` as JSON with ``--json``, else the text ``human()`` renders."""
        self.write(to_json(doc) if self.json else human())

    def done(self, message: str, doc: Any = None) -> None:
        """Report a change: ``message`` for people; with ``--json``, ``doc`` if any."""
        if self.json:
            if doc is not None:
                self.write(to_json(doc))
        else:
            self.write(message)

    def write(self, text: str) -> None:
        if text:
            print(text, file=self.stdout)

    def confirm(self, question: str, action: str) -> None:
        """Ask ``question`` on the terminal and go on only on ``y``/``yes``.

        Commands that destroy data call this unless given ``--yes``. With no
        terminal on stdin (a script, a pipe, cron, Ansible) nobody can answer: the
        command is refused (exit 2) naming ``--yes``, rather than guessed either way.
        ``action`` completes "... to <action> without asking".
        """
        if not _is_terminal(self.stdin):
            raise UsageError(
                f"not confirmed: stdin is not a terminal to ask on; add --yes (-y) to "
                f"{action} without asking"
            )
        assert self.stdin is not None
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        answer = self.stdin.readline()
        if not answer:  # end of input: no answer is no
            print(file=sys.stderr)
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError(f"not confirmed: did not {action}")


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and not stream.closed and stream.isatty()
    except (OSError, ValueError):
        return False
