"""The data protocol over mutually authenticated TLS (``docs/protocol.md`` §2.1).

With a certificate in its ``[tls]`` (and ``[data] tls``, on by default), an SDS's
data port speaks TLS 1.3 only: every client presents a certificate of the cluster CA,
not revoked by its CRL, before a byte of the data protocol is read; the handshake of
the data protocol (the cluster secret's proofs, the version and features) then runs
inside the TLS connection unchanged. The SDC (``[io] tls``), an SDS dialling its
peers, the MDM's probe and ``meshctl volume verify`` connect with their own
certificates and check that the server's names an ``sds:`` identity.

The host name the client dialled is not checked against the server's certificate:
maps name SDSs by address, and an SDS's certificate need not list every address it
is reached on; the identity in it is what says the server is an SDS of the cluster.

A pair that disagrees fails at once with a clear error, never a hang:

- a plain client at a TLS port: the SDS sees the data protocol's ClientHello where a
  TLS record should be, answers it with the ServerHello status ``TLS_REQUIRED`` and
  closes (:func:`is_wire_hello`); the client raises a
  :class:`~meshblock.wire.handshake.HandshakeError` saying so;
- a TLS client at a plain port: the SDS sees a TLS record where the ClientHello
  should be, logs that the client speaks TLS and closes (:func:`is_tls_record`); the
  client's TLS handshake fails and it raises a ``HandshakeError`` saying the port may
  be plain TCP.
"""

from __future__ import annotations

import functools
import ssl
import struct
from pathlib import Path
from typing import Final, Protocol

from meshblock import pki
from meshblock.config import ConfigError
from meshblock.tls import TlsConfig, follow_crl
from meshblock.wire.protocol import ROLE_OPS, Op, PeerRole

_PING: Final = frozenset({int(Op.PING)})
#: What each kind of identity may send on a data port, whatever role it claims in the
#: data protocol's handshake: client IO only from an SDC; replica writes, copies,
#: raw reads, chunk lists and checksums only from an SDS or (reading) an admin; the
#: MDM only pings (its probes). Intersected with the role's operations.
KIND_OPS: Final[dict[pki.Kind, frozenset[int]]] = {
    pki.Kind.SDC: ROLE_OPS[PeerRole.CLIENT],
    pki.Kind.SDS: ROLE_OPS[PeerRole.SDS_PEER],
    pki.Kind.ADMIN: ROLE_OPS[PeerRole.TOOL] - {int(Op.READ)},
    pki.Kind.MDM: _PING,
    pki.Kind.MGMT: _PING,
}


def allowed_ops(identity: pki.Identity | None, role: PeerRole) -> frozenset[int]:
    """The opcodes a connection may send: its role's, and, over TLS, its identity's
    kind's (:data:`KIND_OPS`); ``None``: a plain-TCP connection (the role alone)."""
    ops = ROLE_OPS[role]
    return ops if identity is None else ops & KIND_OPS.get(identity.kind, _PING)


#: The first byte of a TLS handshake record (a ClientHello).
TLS_HANDSHAKE_RECORD: Final = 0x16
_HELLO_MAGIC: Final = struct.pack(">I", 0x4D424843)  # "MBHC", handshake.HELLO_MAGIC


def is_tls_record(head: bytes | memoryview) -> bool:
    """Whether the first bytes a server read start a TLS handshake record (type 0x16,
    protocol version 3.x): a TLS client at a plain data port."""
    return len(head) >= 2 and head[0] == TLS_HANDSHAKE_RECORD and head[1] == 3


def is_wire_hello(head: bytes | memoryview) -> bool:
    """Whether the first bytes start the data protocol's ClientHello in clear text: a
    plain client at a TLS data port."""
    return bytes(head[:4]) == _HELLO_MAGIC


class Files(Protocol):
    """A ``[tls]`` table: the component's certificate and key, the CA and its CRL
    (``meshblock.tls.TlsConfig``, the MDM's own ``[tls]``)."""

    @property
    def cert(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def ca(self) -> str: ...
    @property
    def crl(self) -> str: ...


def dial_context(
    ca: str | Path, cert: str | Path, key: str | Path, crl: str | Path | None = None
) -> ssl.SSLContext:
    """A context for dialling data ports with the certificate ``cert`` (a
    :class:`pki.PkiError` if the files cannot be used)."""
    ctx = pki.client_context(
        Path(ca), cert=Path(cert), key=Path(key), crl=Path(crl) if crl else None
    )
    ctx.check_hostname = False  # the peer's identity is checked instead (check_server)
    return ctx


def client_context(tls: Files, enabled: bool = True) -> ssl.SSLContext | None:
    """The context for dialling data ports with this component's certificate, or
    ``None`` (plain TCP) without a certificate in ``[tls]`` or with ``enabled`` false
    (the ``tls`` setting of ``[data]`` or ``[io]``). A :class:`ConfigError` if the
    files cannot be used."""
    if not enabled or not tls.cert:
        return None
    try:
        ctx = dial_context(tls.ca, tls.cert, tls.key, tls.crl or None)
    except pki.PkiError as exc:
        raise ConfigError(f"[tls] {exc}") from None
    # an SDS's or SDC's [tls]: its CRL is read again with the others of the process
    return follow_crl(ctx, tls) if isinstance(tls, TlsConfig) else ctx


@functools.lru_cache(maxsize=4)
def cached_client_context(tls: Files) -> ssl.SSLContext | None:
    """:func:`client_context`, made once per ``[tls]`` (a frozen, hashable table): for
    a caller that dials now and then (the MDM confirming a failure report)."""
    return client_context(tls)


def server_context(tls: TlsConfig, enabled: bool = True) -> ssl.SSLContext | None:
    """The data port's TLS context (client certificates required; its CRL read again
    without a restart, ``meshblock.tls.follow_crl``), or ``None`` (plain TCP) as for
    :func:`client_context`."""
    if not enabled or not tls.cert:
        return None
    try:
        ctx = pki.server_context(
            Path(tls.cert),
            Path(tls.key),
            Path(tls.ca),
            crl=Path(tls.crl) if tls.crl else None,
            client_certs=pki.ClientCerts.REQUIRED,
        )
    except pki.PkiError as exc:
        raise ConfigError(f"[tls] {exc}") from None
    return follow_crl(ctx, tls)


def check_server(tls: ssl.SSLObject | None) -> pki.Identity:
    """The identity of the SDS a client reached over TLS; :class:`pki.PkiError` unless
    its certificate names an ``sds:`` identity."""
    if tls is None:
        raise pki.PkiError("no TLS connection")
    return pki.expect_peer(tls, pki.Kind.SDS)
