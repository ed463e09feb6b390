"""nftables rules inside a test's network namespace (``tests/_netns.py``): gray failures.

A :class:`NetNs` cut (the veth link down) takes a whole SDS off the network. A gray
failure is narrower: the SDS keeps heartbeating the MDM (its own connections out to
the MDM's API work) while nothing reaches its data and control ports. :class:`Nft`
does that with one nftables table of its own inside the namespace, so that nothing
outside the namespace is touched (never run it in the root namespace: other tests
and other users share it).

>>> nft = Nft(ns)
>>> nft.drop_ports([sds.data_port, sds.control_port])  # both directions, silently
>>> ...
>>> nft.restore()                                      # the table is deleted

Other shapes go through :meth:`Nft.apply` with rules of one's own, e.g. only what the
SDS sends to its peers' data ports: ``nft.apply(outbound=[f"tcp dport {{ {a}, {b} }} drop"])``.
Every :meth:`apply` replaces the previous rules in one atomic transaction. Packets are
dropped, not rejected: connections hang as they would on a lost link, nothing is
refused. Needs root and the ``nft`` program (Debian's ``nftables``, ``make deps``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence

from _netns import NetNs

TABLE = "meshblock_test"


def nft_unavailable() -> str | None:
    """Why nftables cannot be used here (None when it can)."""
    if shutil.which("nft") is None:
        return "the nft program is not installed (apt-get install nftables: make deps)"
    return None


def _ports(ports: Iterable[int]) -> str:
    listed = sorted({int(p) for p in ports})
    assert listed, "no port given"
    return "{ " + ", ".join(str(p) for p in listed) + " }"


class Nft:
    """The rules of one table (``inet meshblock_test``) inside ``ns``."""

    def __init__(self, ns: NetNs) -> None:
        self.ns = ns
        self.active = False

    def _run(self, script: str) -> None:
        cmd = [*self.ns.exec_prefix(), "nft", "-f", "-"]
        proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(
                f"nft in {self.ns.name} failed ({proc.returncode}): {proc.stderr.strip()}\n{script}"
            )

    def apply(self, *, inbound: Sequence[str] = (), outbound: Sequence[str] = ()) -> None:
        """Replace the table's rules: ``inbound`` for packets the namespace receives,
        ``outbound`` for those it sends (nft rule statements, e.g. ``tcp dport 7072
        drop``)."""
        lines = [
            f"table inet {TABLE}",  # so that the delete below finds one
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            "  chain input {",
            "    type filter hook input priority -10; policy accept;",
            *(f"    {rule}" for rule in inbound),
            "  }",
            "  chain output {",
            "    type filter hook output priority -10; policy accept;",
            *(f"    {rule}" for rule in outbound),
            "  }",
            "}",
        ]
        self._run("\n".join(lines) + "\n")
        self.active = True

    def drop_ports(self, ports: Iterable[int]) -> None:
        """Drop every TCP packet to or from these local ports of the namespace (its
        listeners'): new connections hang in SYN, open ones get nothing more."""
        listed = _ports(ports)
        self.apply(inbound=[f"tcp dport {listed} drop"], outbound=[f"tcp sport {listed} drop"])

    def restore(self) -> None:
        """Delete the table: every packet flows again. Idempotent."""
        if not self.ns.created:
            self.active = False
            return
        self._run(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
        self.active = False

    def rules(self) -> str:
        """The namespace's ruleset as ``nft list ruleset`` prints it (for messages)."""
        proc = subprocess.run(
            [*self.ns.exec_prefix(), "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.stdout + proc.stderr
