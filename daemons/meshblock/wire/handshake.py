"""The data protocol's handshake: mutual challenge-response with the cluster secret,
and the negotiation of the protocol version and features.

Both sides send a random 32-byte nonce; each proves that it knows the cluster secret
``K`` with an HMAC-SHA256 over what was negotiated and both nonces, with a different
label per side. The secret never crosses the wire and a proof is worth nothing on
another connection. See ``docs/protocol.md`` §2 and §8.

The client offers the highest version it speaks. Offered version 1: the exchange of
version 1, byte for byte. Offered 2 or more: a :data:`HELLO_EXT` with the client's
feature bits follows its ClientHello, the server answers version 2 and its own
HelloExt after its ServerHello, both use the features they both have, and the proofs
cover the offered and negotiated versions and both feature words (a man in the
middle cannot lower either without failing the proofs). A server of version 1 refuses
an offer of 2 (``VERSION_UNSUPPORTED``, its version in the ServerHello); the client
then connects again offering 1 (:class:`VersionUnsupported`). That fallback is not
authenticated: ``wire_min_version = 2`` closes it once every peer speaks 2.

The two classes here are transport-free state machines: the connection feeds them
fixed-size messages (``need`` bytes) and sends what they return.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from typing import Final

from meshblock.wire.protocol import (
    MIN_PROTOCOL_VERSION,
    PEER_FEATURES,
    PROTOCOL_VERSION,
    SUPPORTED_FEATURES,
    TOOL_FEATURES,
    Feature,
    PeerRole,
    ProtocolError,
    WireError,
)

HELLO_MAGIC: Final = 0x4D424843  # "MBHC"
SERVER_HELLO_MAGIC: Final = 0x4D424853  # "MBHS"
PROOF_MAGIC: Final = 0x4D424850  # "MBHP"
RESULT_MAGIC: Final = 0x4D424852  # "MBHR"
HELLO_EXT_MAGIC: Final = 0x4D424858  # "MBHX"
NONCE_SIZE: Final = 32

CLIENT_HELLO = struct.Struct(">IHBB32s")
"""ClientHello, 40 bytes: magic u32, version u16 (the highest the client speaks), role
u8, reserved u8 (0), nonce (32)."""

SERVER_HELLO = struct.Struct(">IHBB32s32s")
"""ServerHello, 72 bytes: magic u32, version u16, status u8, features u8 (version 1;
0 in version 2, whose features are in the HelloExt), nonce (32), server proof (32)."""

HELLO_EXT = struct.Struct(">IIQ")
"""HelloExt, 16 bytes (version 2 on): magic u32, reserved u32 (0), features u64. The
client's follows its ClientHello, the server's its ServerHello."""

#: Feature bits of version 1's ServerHello byte (and of version 2's u64): operations
#: added to version 1 after its first release (that release sent 0 there, and its
#: clients ignore the byte).
FEATURE_CHUNK_LIST: Final = int(Feature.CHUNK_LIST)
FEATURE_MARK_BAD: Final = int(Feature.MARK_BAD)
SERVER_FEATURES: Final = SUPPORTED_FEATURES | PEER_FEATURES
FEATURE_CHUNK_CSUMS: Final = int(Feature.CHUNK_CSUMS)
#: The bits that version 1's byte may carry: the others are features of version 2's
#: headers, which version 1 has no room for.
V1_FEATURES: Final = FEATURE_CHUNK_LIST

CLIENT_PROOF = struct.Struct(">I32s")
"""ClientProof, 36 bytes: magic u32, client proof (32)."""

SERVER_RESULT = struct.Struct(">IB3x")
"""ServerResult, 8 bytes: magic u32, status u8, 3 reserved bytes."""

_SERVER_LABEL: Final = b"meshblock-wire-v1 server"
_CLIENT_LABEL: Final = b"meshblock-wire-v1 client"
_SERVER_LABEL_V2: Final = b"meshblock-wire-v2 server"
_CLIENT_LABEL_V2: Final = b"meshblock-wire-v2 client"
_ZERO32: Final = bytes(32)


class HandshakeStatus(enum.IntEnum):
    OK = 0
    AUTH_FAILED = 1
    VERSION_UNSUPPORTED = 2
    BAD_ROLE = 3
    TLS_REQUIRED = 4  # a plain-TCP client at a data port that serves only TLS


class HandshakeError(WireError):
    """The handshake failed (wrong secret, version or role); not retriable."""

    retriable = False


class VersionUnsupported(HandshakeError):
    """The server refused the version offered; ``server_version`` is the highest it
    speaks (from its refusal). :meth:`WireClient.connect
    <meshblock.wire.client.WireClient.connect>` offers that one on a new connection
    when its ``min_version`` allows."""

    def __init__(self, message: str, server_version: int) -> None:
        super().__init__(message)
        self.server_version = server_version


def proof(secret: bytes, label: bytes, version: int, role: int, nc: bytes, ns: bytes) -> bytes:
    """Version 1: HMAC-SHA256(secret, label | version u16 | role u8 | Nc | Ns)."""
    msg = label + struct.pack(">HB", version, role) + nc + ns
    return hmac.new(secret, msg, hashlib.sha256).digest()


def proof_v2(
    secret: bytes,
    label: bytes,
    offered: int,
    version: int,
    role: int,
    client_features: int,
    server_features: int,
    nc: bytes,
    ns: bytes,
) -> bytes:
    """Version 2: HMAC-SHA256(secret, label | offered version u16 | negotiated version
    u16 | role u8 | client features u64 | server features u64 | Nc | Ns)."""
    fields = struct.pack(">HHBQQ", offered, version, role, client_features, server_features)
    return hmac.new(secret, label + fields + nc + ns, hashlib.sha256).digest()


def _check_versions(low: int, high: int) -> None:
    if not MIN_PROTOCOL_VERSION <= low <= high <= PROTOCOL_VERSION:
        raise ValueError(
            f"protocol versions {low}..{high}: this release speaks "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
        )


class ClientHandshake:
    """The client's side. Send :meth:`hello`; then, while ``need`` is non-zero, pass
    the next ``need`` bytes from the server to :meth:`feed` and send what it returns.
    When ``need`` is 0 the handshake succeeded: ``version`` is the negotiated
    version and ``features`` the feature bits in effect (version 1: the server's
    byte; version 2: what both sides have). Failures raise :class:`HandshakeError`
    (:class:`VersionUnsupported` for a refused version) or :class:`ProtocolError`.

    ``version``: the version offered (the highest this side will speak);
    ``min_version``: refuse to speak below it.
    """

    def __init__(
        self,
        secret: bytes,
        role: PeerRole,
        *,
        version: int = PROTOCOL_VERSION,
        min_version: int = MIN_PROTOCOL_VERSION,
        features: int | None = None,
    ) -> None:
        _check_versions(min_version, version)
        if features is None:  # what this release supports, for the role
            extra = {PeerRole.SDS_PEER: PEER_FEATURES, PeerRole.TOOL: TOOL_FEATURES}
            features = SUPPORTED_FEATURES | extra.get(role, 0)
        self._secret = secret
        self._role = role
        self._offered = version
        self._min = min_version
        self._client_features = features if version >= 2 else 0
        self._nc = secrets.token_bytes(NONCE_SIZE)
        self._ns = b""
        self._ps = b""
        self.version = 0
        self.features = 0
        self.need = SERVER_HELLO.size
        self._step: Callable[[memoryview], bytes] = self.on_server_hello

    def hello(self) -> bytes:
        """The ClientHello, and the HelloExt when offering version 2 or more (one
        write: a server of version 1 reads both at once before it refuses)."""
        hello = CLIENT_HELLO.pack(HELLO_MAGIC, self._offered, self._role, 0, self._nc)
        if self._offered < 2:
            return hello
        return hello + HELLO_EXT.pack(HELLO_EXT_MAGIC, 0, self._client_features)

    def feed(self, msg: memoryview) -> bytes:
        """The next message from the server (``need`` bytes); returns what to send."""
        return self._step(msg)

    def on_server_hello(self, msg: memoryview) -> bytes:
        """Version 1: check the server's proof and return the ClientProof to send.
        Version 2: nothing to send yet, the server's HelloExt comes next."""
        magic, version, status, features, ns, ps = SERVER_HELLO.unpack(msg)
        if magic != SERVER_HELLO_MAGIC:
            raise ProtocolError(f"bad server hello magic 0x{magic:08x}")
        if status == HandshakeStatus.VERSION_UNSUPPORTED:
            raise VersionUnsupported(
                f"server refused protocol version {self._offered} (it speaks up to {version})",
                version,
            )
        if status == HandshakeStatus.TLS_REQUIRED:
            raise HandshakeError(
                "server refused the handshake: TLS_REQUIRED (its data port serves only TLS: "
                "give this side a certificate in [tls], and leave its data path's tls on)"
            )
        if status != HandshakeStatus.OK:
            raise HandshakeError(f"server refused the handshake: {_status_name(status)}")
        if self._offered == 1:
            if version != 1:
                raise HandshakeError(f"server speaks protocol version {version}")
        elif version < 2:
            # A server of version 1 refuses an offer of 2, it never accepts it with 1:
            # somebody in the middle rewrote the answer.
            raise HandshakeError(
                f"server accepted an offer of protocol version {self._offered} with "
                f"version {version} (a downgrade): refused"
            )
        elif version > self._offered:
            raise HandshakeError(f"server answered protocol version {version}, not offered")
        if version < self._min:
            raise HandshakeError(f"server speaks protocol version {version}, below {self._min}")
        if version >= 2 and features:
            raise ProtocolError(f"features byte 0x{features:02x} in a server hello of version 2")
        self.version = version
        self._ns = ns
        if version == 1:
            expected = proof(self._secret, _SERVER_LABEL, version, self._role, self._nc, ns)
            if not hmac.compare_digest(expected, ps):
                raise HandshakeError("the server does not hold the cluster secret")
            self.features = features & V1_FEATURES
            pc = proof(self._secret, _CLIENT_LABEL, version, self._role, self._nc, ns)
            return self._proof_sent(pc)
        self._ps = ps
        self.need = HELLO_EXT.size
        self._step = self.on_server_ext
        return b""

    def on_server_ext(self, msg: memoryview) -> bytes:
        """Version 2: the server's HelloExt; check its proof, return the ClientProof."""
        magic, reserved, server_features = HELLO_EXT.unpack(msg)
        if magic != HELLO_EXT_MAGIC:
            raise ProtocolError(f"bad server hello extension magic 0x{magic:08x}")
        if reserved:
            raise ProtocolError("non-zero reserved field in the server's hello extension")
        fields = (self._offered, self.version, self._role, self._client_features, server_features)
        expected = proof_v2(self._secret, _SERVER_LABEL_V2, *fields, self._nc, self._ns)
        if not hmac.compare_digest(expected, self._ps):
            raise HandshakeError("the server does not hold the cluster secret")
        self.features = self._client_features & server_features
        return self._proof_sent(
            proof_v2(self._secret, _CLIENT_LABEL_V2, *fields, self._nc, self._ns)
        )

    def _proof_sent(self, pc: bytes) -> bytes:
        self.need = SERVER_RESULT.size
        self._step = self._result
        return CLIENT_PROOF.pack(PROOF_MAGIC, pc)

    def _result(self, msg: memoryview) -> bytes:
        self.on_result(msg)
        return b""

    def on_result(self, msg: memoryview) -> None:
        magic, status = SERVER_RESULT.unpack(msg)
        if magic != RESULT_MAGIC:
            raise ProtocolError(f"bad handshake result magic 0x{magic:08x}")
        if status != HandshakeStatus.OK:
            raise HandshakeError(f"server refused the handshake: {_status_name(status)}")
        self.need = 0


class ServerHandshake:
    """The server's side: while ``need`` is non-zero, pass the next ``need`` bytes
    from the client to :meth:`feed` and send what it returns; close the connection
    when it also returns a reason. When ``need`` is 0 and no reason came, the client
    is authenticated as ``role`` and the connection speaks ``version`` with
    ``features``.

    It speaks versions ``min_version`` to ``max_version`` (``max_version=1``: what a
    server of the release before version 2 does, refusing an offer of 2).
    ``features``: the bits it supports (:class:`~meshblock.wire.protocol.Feature`).
    """

    def __init__(
        self,
        secret: bytes,
        features: int = SERVER_FEATURES,
        *,
        max_version: int = PROTOCOL_VERSION,
        min_version: int = MIN_PROTOCOL_VERSION,
    ) -> None:
        _check_versions(min_version, max_version)
        self._secret = secret
        self._features = features
        self._max = max_version
        self._min = min_version
        self._nc = b""
        self._ns = secrets.token_bytes(NONCE_SIZE)
        self._offered = 0
        self._client_features = 0
        self.role: PeerRole | None = None
        self.version = 0
        self.features = 0
        self.need = CLIENT_HELLO.size
        self._step: Callable[[memoryview], tuple[bytes, str | None]] = self.on_hello

    def feed(self, msg: memoryview) -> tuple[bytes, str | None]:
        """The next message from the client: what to send, and the reason to close
        after sending it (None: go on)."""
        return self._step(msg)

    def on_hello(self, msg: memoryview) -> tuple[bytes, str | None]:
        """The ServerHello to send (nothing yet when a HelloExt follows), and the
        reason to close after it (None: go on)."""
        magic, version, role, reserved, nc = CLIENT_HELLO.unpack(msg)
        if magic != HELLO_MAGIC:
            raise ProtocolError(f"bad client hello magic 0x{magic:08x}")
        if version < 1 or (version >= 2 and self._max < 2):
            return self._refuse(HandshakeStatus.VERSION_UNSUPPORTED), (
                f"client speaks protocol version {version}"
            )
        if version < self._min:
            return self._refuse(HandshakeStatus.VERSION_UNSUPPORTED), (
                f"client speaks protocol version {version}, below wire_min_version {self._min}"
            )
        if version >= 2 and reserved:
            raise ProtocolError("non-zero reserved field in a client hello")
        try:
            self.role = PeerRole(role)
        except ValueError:
            return self._refuse(HandshakeStatus.BAD_ROLE), f"unknown role {role}"
        self._nc = nc
        self._offered = version
        if version >= 2:
            self.need = HELLO_EXT.size
            self._step = self.on_hello_ext
            return b"", None
        self.version = 1
        self.features = self._features & V1_FEATURES
        ps = proof(self._secret, _SERVER_LABEL, 1, role, nc, self._ns)
        return self._hello(self.features, ps), None

    def on_hello_ext(self, msg: memoryview) -> tuple[bytes, str | None]:
        """Version 2: the client's HelloExt; the ServerHello and the server's
        HelloExt to send."""
        magic, reserved, client_features = HELLO_EXT.unpack(msg)
        if magic != HELLO_EXT_MAGIC:
            raise ProtocolError(f"bad client hello extension magic 0x{magic:08x}")
        if reserved:
            raise ProtocolError("non-zero reserved field in the client's hello extension")
        assert self.role is not None
        self.version = min(self._offered, self._max)
        self._client_features = client_features
        self.features = client_features & self._features
        ps = proof_v2(self._secret, _SERVER_LABEL_V2, *self._v2_fields(), self._nc, self._ns)
        ext = HELLO_EXT.pack(HELLO_EXT_MAGIC, 0, self._features)
        return self._hello(0, ps) + ext, None

    def _hello(self, features: int, ps: bytes) -> bytes:
        self.need = CLIENT_PROOF.size
        self._step = self._proof
        ok = HandshakeStatus.OK
        return SERVER_HELLO.pack(SERVER_HELLO_MAGIC, self.version, ok, features, self._ns, ps)

    def _v2_fields(self) -> tuple[int, int, int, int, int]:
        assert self.role is not None
        return self._offered, self.version, self.role, self._client_features, self._features

    def _proof(self, msg: memoryview) -> tuple[bytes, str | None]:
        result, ok = self.on_proof(msg)
        return result, None if ok else "wrong cluster secret (proof mismatch)"

    def on_proof(self, msg: memoryview) -> tuple[bytes, bool]:
        """The ServerResult to send, and whether the client is authenticated."""
        magic, pc = CLIENT_PROOF.unpack(msg)
        if magic != PROOF_MAGIC:
            raise ProtocolError(f"bad client proof magic 0x{magic:08x}")
        assert self.role is not None
        if self.version == 1:
            expected = proof(self._secret, _CLIENT_LABEL, 1, self.role, self._nc, self._ns)
        else:
            fields = self._v2_fields()
            expected = proof_v2(self._secret, _CLIENT_LABEL_V2, *fields, self._nc, self._ns)
        ok = hmac.compare_digest(expected, pc)
        status = HandshakeStatus.OK if ok else HandshakeStatus.AUTH_FAILED
        self.need = 0
        return SERVER_RESULT.pack(RESULT_MAGIC, status), ok

    def _refuse(self, status: HandshakeStatus) -> bytes:
        # The version field of a refusal is the highest version this server speaks.
        self.need = 0
        return SERVER_HELLO.pack(SERVER_HELLO_MAGIC, self._max, status, 0, _ZERO32, _ZERO32)


def tls_required(max_version: int = PROTOCOL_VERSION) -> bytes:
    """The ServerHello of a TLS data port to a client that sent its ClientHello in
    clear text: status ``TLS_REQUIRED`` (``meshblock.wire.tls``)."""
    status = HandshakeStatus.TLS_REQUIRED
    return SERVER_HELLO.pack(SERVER_HELLO_MAGIC, max_version, status, 0, _ZERO32, _ZERO32)


def _status_name(status: int) -> str:
    try:
        return HandshakeStatus(status).name
    except ValueError:
        return f"status {status}"
