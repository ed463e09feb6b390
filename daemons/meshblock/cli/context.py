"""The state one ``meshctl`` invocation hands to a command: client, names, output."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from meshblock.cli.client import MdmClient
from meshblock.cli.names import Names
from meshblock.cli.output import to_json
from meshblock.cli.settings import Settings


@dataclass
class Context:
    client: MdmClient
    settings: Settings
    json: bool = False
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
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
