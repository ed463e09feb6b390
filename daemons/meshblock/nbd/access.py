"""Who may use an NBD listener, and which exports each client may open.

A listener has a :class:`ListenPolicy`: the TLS context it offers with
``NBD_OPT_STARTTLS`` (and then requires: every option but ``STARTTLS`` and ``ABORT``
before it is answered ``NBD_REP_ERR_TLS_REQD``), and an allow list of
:class:`AccessRule` (a TCP listener's): a client whose address no rule covers is
disconnected before the greeting; one that some rules cover may open the exports
those rules name, and ``NBD_OPT_LIST`` shows only those. A listener without an allow
list (a unix socket: its file mode and group decide who connects) lets every client
open every export.

A rule is written ``"CIDR [PATTERN ...]"``: ``"127.0.0.0/8"`` (every export),
``"10.1.0.0/16 db-* web1"`` (exports whose names match one of the shell patterns).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AccessRule:
    """Clients in ``network`` may open the exports matching ``exports`` (empty: all)."""

    network: IpNetwork
    exports: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AccessRule:
        """``"CIDR [PATTERN ...]"``; a ``ValueError`` that says what is wrong."""
        words = text.split()
        if not words:
            raise ValueError("an empty allow-list entry")
        try:
            network = ipaddress.ip_network(words[0], strict=True)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return cls(network, tuple(words[1:]))

    def allows(self, export: str) -> bool:
        return not self.exports or any(fnmatch.fnmatchcase(export, p) for p in self.exports)

    def __str__(self) -> str:
        return " ".join((str(self.network), *self.exports))


def parse_rules(entries: Sequence[str]) -> tuple[AccessRule, ...]:
    return tuple(AccessRule.parse(e) for e in entries)


def peer_address(host: str) -> IpAddress | None:
    """The address of a TCP peer (an IPv4-mapped IPv6 address as IPv4); None if
    ``host`` is not an address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class ListenPolicy:
    """What a listener asks of its clients (the default: nothing, as a unix socket)."""

    #: Offered with NBD_OPT_STARTTLS and then required; None: no TLS on this listener.
    tls: ssl.SSLContext | None = None
    #: The allow list; None: every client may connect and open every export.
    allow: tuple[AccessRule, ...] | None = None

    def rules_for(self, addr: IpAddress | None) -> tuple[AccessRule, ...] | None:
        """The rules covering a client at ``addr`` (None: no allow list); an empty
        tuple means the client is refused."""
        if self.allow is None:
            return None
        if addr is None:
            return ()
        return tuple(r for r in self.allow if addr in r.network)
