"""The data protocol's handshake: mutual challenge-response with the cluster secret.

Both sides send a random 32-byte nonce; each proves that it knows the cluster secret
``K`` with an HMAC-SHA256 over the protocol version, the client's role and both
nonces, with a different label per side. The secret never crosses the wire and a
proof is worth nothing on another connection. See ``docs/protocol.md`` §2.

The two classes here are transport-free state machines: the connection feeds them
fixed-size messages (``need`` bytes) and sends what they return.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from typing import Final

from meshblock.wire.protocol import PROTOCOL_VERSION, PeerRole, ProtocolError

HELLO_MAGIC: Final = 0x4D424843  # "MBHC"
SERVER_HELLO_MAGIC: Final = 0x4D424853  # "MBHS"
PROOF_MAGIC: Final = 0x4D424850  # "MBHP"
RESULT_MAGIC: Final = 0x4D424852  # "MBHR"
NONCE_SIZE: Final = 32

CLIENT_HELLO = struct.Struct(">IHBB32s")
"""ClientHello, 40 bytes: magic u32, version u16, role u8, reserved u8, nonce (32)."""

SERVER_HELLO = struct.Struct(">IHBB32s32s")
"""ServerHello, 72 bytes: magic u32, version u16, status u8, features u8, nonce (32),
server proof (32)."""

#: ServerHello ``features`` bits: operations added to version 1 after its first release
#: (that release sent 0 there, and its clients ignore the byte).
FEATURE_CHUNK_LIST: Final = 1
SERVER_FEATURES: Final = FEATURE_CHUNK_LIST

CLIENT_PROOF = struct.Struct(">I32s")
"""ClientProof, 36 bytes: magic u32, client proof (32)."""

SERVER_RESULT = struct.Struct(">IB3x")
"""ServerResult, 8 bytes: magic u32, status u8, 3 reserved bytes."""

_SERVER_LABEL: Final = b"meshblock-wire-v1 server"
_CLIENT_LABEL: Final = b"meshblock-wire-v1 client"
_ZERO32: Final = bytes(32)


class HandshakeStatus(enum.IntEnum):
    OK = 0
    AUTH_FAILED = 1
    VERSION_UNSUPPORTED = 2
    BAD_ROLE = 3


class HandshakeError(Exception):
    """The handshake failed (wrong secret, version or role); not retriable."""

    retriable = False


def proof(secret: bytes, label: bytes, version: int, role: int, nc: bytes, ns: bytes) -> bytes:
    """HMAC-SHA256(secret, label | version u16 | role u8 | Nc | Ns)."""
    msg = label + struct.pack(">HB", version, role) + nc + ns
    return hmac.new(secret, msg, hashlib.sha256).digest()


class ClientHandshake:
    """The client's side: ``hello()``, then ``on_server_hello``, then ``on_result``."""

    def __init__(self, secret: bytes, role: PeerRole) -> None:
        self._secret = secret
        self._role = role
        self._nc = secrets.token_bytes(NONCE_SIZE)
        self._ns = b""
        self.features = 0  # the server's, from its ServerHello

    def hello(self) -> bytes:
        return CLIENT_HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, self._role, 0, self._nc)

    def on_server_hello(self, msg: memoryview) -> bytes:
        """Check the server's proof; return the ClientProof to send."""
        magic, version, status, features, ns, ps = SERVER_HELLO.unpack(msg)
        if magic != SERVER_HELLO_MAGIC:
            raise ProtocolError(f"bad server hello magic 0x{magic:08x}")
        if status != HandshakeStatus.OK:
            raise HandshakeError(f"server refused the handshake: {_status_name(status)}")
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"server speaks protocol version {version}")
        expected = proof(self._secret, _SERVER_LABEL, version, self._role, self._nc, ns)
        if not hmac.compare_digest(expected, ps):
            raise HandshakeError("the server does not hold the cluster secret")
        self._ns = ns
        self.features = features
        pc = proof(self._secret, _CLIENT_LABEL, version, self._role, self._nc, ns)
        return CLIENT_PROOF.pack(PROOF_MAGIC, pc)

    def on_result(self, msg: memoryview) -> None:
        magic, status = SERVER_RESULT.unpack(msg)
        if magic != RESULT_MAGIC:
            raise ProtocolError(f"bad handshake result magic 0x{magic:08x}")
        if status != HandshakeStatus.OK:
            raise HandshakeError(f"server refused the handshake: {_status_name(status)}")


class ServerHandshake:
    """The server's side: ``on_hello`` then ``on_proof``.

    ``on_hello`` returns the ServerHello to send and whether to go on;
    ``on_proof`` returns the ServerResult and whether the client is authenticated.
    """

    def __init__(self, secret: bytes, features: int = SERVER_FEATURES) -> None:
        self._secret = secret
        self._features = features  # sent in the ServerHello
        self._nc = b""
        self._ns = secrets.token_bytes(NONCE_SIZE)
        self.role: PeerRole | None = None

    def on_hello(self, msg: memoryview) -> tuple[bytes, str | None]:
        """The ServerHello to send, and the reason to close after it (None: go on)."""
        magic, version, role, _, nc = CLIENT_HELLO.unpack(msg)
        if magic != HELLO_MAGIC:
            raise ProtocolError(f"bad client hello magic 0x{magic:08x}")
        if version != PROTOCOL_VERSION:
            return self._refuse(HandshakeStatus.VERSION_UNSUPPORTED), (
                f"client speaks protocol version {version}"
            )
        try:
            self.role = PeerRole(role)
        except ValueError:
            return self._refuse(HandshakeStatus.BAD_ROLE), f"unknown role {role}"
        self._nc = nc
        ps = proof(self._secret, _SERVER_LABEL, version, role, nc, self._ns)
        hello = SERVER_HELLO.pack(
            SERVER_HELLO_MAGIC, PROTOCOL_VERSION, HandshakeStatus.OK, self._features, self._ns, ps
        )
        return hello, None

    def on_proof(self, msg: memoryview) -> tuple[bytes, bool]:
        magic, pc = CLIENT_PROOF.unpack(msg)
        if magic != PROOF_MAGIC:
            raise ProtocolError(f"bad client proof magic 0x{magic:08x}")
        assert self.role is not None
        expected = proof(
            self._secret, _CLIENT_LABEL, PROTOCOL_VERSION, self.role, self._nc, self._ns
        )
        ok = hmac.compare_digest(expected, pc)
        status = HandshakeStatus.OK if ok else HandshakeStatus.AUTH_FAILED
        return SERVER_RESULT.pack(RESULT_MAGIC, status), ok

    @staticmethod
    def _refuse(status: HandshakeStatus) -> bytes:
        return SERVER_HELLO.pack(SERVER_HELLO_MAGIC, PROTOCOL_VERSION, status, 0, _ZERO32, _ZERO32)


def _status_name(status: int) -> str:
    try:
        return HandshakeStatus(status).name
    except ValueError:
        return f"status {status}"
