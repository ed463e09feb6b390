"""Version 2 of the data protocol, in memory: the headers of version 2 and their
checks, and the handshake's negotiation of version and features between releases
(a client or server of the release before version 2 is written here by hand or is
the server forced to version 1, as that release behaves), with the attacks on it
that the proofs must catch. docs/protocol.md §8."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from types import SimpleNamespace
from typing import Any

import pytest

from _wire import exchange
from meshblock.cli.commands import build_parser
from meshblock.cli.commands import verify as verify_command
from meshblock.cli.errors import CliError, ExitCode
from meshblock.config import ConfigError, from_mapping
from meshblock.sdc.config import SdcConfig
from meshblock.sds import config as sds_config
from meshblock.wire import client as wire_client
from meshblock.wire.handshake import (
    CLIENT_HELLO,
    CLIENT_PROOF,
    HELLO_EXT,
    HELLO_EXT_MAGIC,
    HELLO_MAGIC,
    PROOF_MAGIC,
    RESULT_MAGIC,
    SERVER_FEATURES,
    SERVER_HELLO,
    SERVER_HELLO_MAGIC,
    SERVER_RESULT,
    ClientHandshake,
    HandshakeError,
    HandshakeStatus,
    ServerHandshake,
    VersionUnsupported,
)
from meshblock.wire.protocol import (
    PROTOCOL_VERSION,
    REPLY,
    REPLY_MAGIC_V2,
    REPLY_V2,
    REQUEST,
    REQUEST_MAGIC_V2,
    REQUEST_V2,
    WIRE_FORMATS,
    WIRE_V1,
    WIRE_V2,
    Feature,
    Op,
    PeerRole,
    ProtocolError,
    Reply,
    Status,
    WireError,
    pack_request,
    reply_payload_length,
    request_payload_length,
)

pytestmark = pytest.mark.unit

SECRET = b"wire-v2-secret"
FIELDS = dict(  # every field of a request, all different
    pool_id=7, pg=9, epoch=2**63 + 1, volume_id=11, chunk_index=2**32 - 1, offset=4096
)


# -- headers ------------------------------------------------------------------------------


def test_v2_header_sizes_and_magics() -> None:
    assert (REQUEST_V2.size, REPLY_V2.size, HELLO_EXT.size) == (64, 40, 16)
    assert struct.pack(">II", REQUEST_MAGIC_V2, REPLY_MAGIC_V2) == b"MBR2MBP2"
    assert PROTOCOL_VERSION == 2 and sorted(WIRE_FORMATS) == [1, 2]


def test_v2_request_keeps_v1_fields_at_their_offsets() -> None:
    v1 = pack_request(Op.WRITE, 0x0102030405060708, length=512, flags=1, **FIELDS)
    v2 = pack_request(Op.WRITE, 0x0102030405060708, length=512, flags=1, version=2, **FIELDS)
    assert len(v2) == 64 and v2[:4] == b"MBR2"
    assert v2[4:56] == v1[4:56] and v2[56:] == bytes(8)  # the new fields: 0
    hdr = WIRE_V2.decode_request(v2)
    # the decoded type keeps its field names; version 1 leaves the new ones at 0
    assert hdr._replace(magic=0) == WIRE_V1.decode_request(v1)._replace(magic=0)
    assert (hdr.ext_len, hdr.csum_type, hdr.csum_shift, hdr.hdr_crc, hdr.reserved) == (0,) * 5
    assert request_payload_length(hdr) == 512
    # the unpacked tuples that connections use agree on positions 1-11
    assert REQUEST_V2.unpack(v2)[1:12] == REQUEST.unpack(v1)[1:12]


def test_v2_reply_keeps_v1_fields_at_their_offsets() -> None:
    v1 = WIRE_V1.pack_reply(Status.EPOCH_STALE, 1, 99, 12, 4096)
    v2 = WIRE_V2.pack_reply(Status.EPOCH_STALE, 1, 99, 12, 4096)
    assert len(v2) == 40 and v2[:4] == b"MBP2"
    assert v2[4:28] == v1[4:28] and v2[28:] == bytes(12)
    hdr = WIRE_V2.decode_reply(v2)
    assert hdr == Reply(REPLY_MAGIC_V2, Status.EPOCH_STALE, 1, 99, 12, 4096, 0)
    assert reply_payload_length(hdr) == 4096
    assert REPLY_V2.unpack(v2)[1:6] == REPLY.unpack(v1)[1:6]


def test_decoding_round_trips_every_field() -> None:
    raw = REQUEST_V2.pack(REQUEST_MAGIC_V2, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    hdr = WIRE_V2.decode_request(raw)
    assert (hdr.ext_len, hdr.csum_type, hdr.csum_shift, hdr.reserved, hdr.hdr_crc) == (
        3,
        12,
        13,
        14,
        15,
    )
    assert REQUEST_V2.pack(*WIRE_V2.request_fields(hdr)) == raw
    raw = REPLY_V2.pack(REPLY_MAGIC_V2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    reply = WIRE_V2.decode_reply(raw)
    assert (reply.ext_len, reply.csum_type, reply.csum_shift, reply.reserved) == (6, 7, 8, 9)
    assert REPLY_V2.pack(*WIRE_V2.reply_fields(reply)) == raw


# Offsets in the unpacked request / reply tuples of version 2, and what the error says.
REQUEST_FIELDS = {3: "extension", 12: "checksums", 13: "checksums", 14: "reserved", 15: "header"}
REPLY_FIELDS = {6: "extension", 7: "checksums", 8: "checksums", 9: "reserved", 10: "header"}


@pytest.mark.parametrize(("index", "reason"), REQUEST_FIELDS.items())
def test_unnegotiated_request_fields_are_protocol_errors(index: int, reason: str) -> None:
    """ext_len, csum_type, csum_shift, reserved, hdr_crc: until a feature that defines
    them is negotiated, a non-zero value is refused, never ignored."""
    fields = list(REQUEST_V2.unpack(pack_request(Op.WRITE, 1, length=10, version=2)))
    assert WIRE_V2.request_length(tuple(fields)) == 10
    fields[index] = 1
    with pytest.raises(ProtocolError, match=reason):
        WIRE_V2.request_length(tuple(fields))
    with pytest.raises(ProtocolError, match=reason):
        request_payload_length(WIRE_V2.decode_request(REQUEST_V2.pack(*fields)))


@pytest.mark.parametrize(("index", "reason"), REPLY_FIELDS.items())
def test_unnegotiated_reply_fields_are_protocol_errors(index: int, reason: str) -> None:
    fields = list(REPLY_V2.unpack(WIRE_V2.pack_reply(0, 0, 5, 1, 8)))
    assert WIRE_V2.reply_length(tuple(fields)) == 8
    fields[index] = 3
    with pytest.raises(ProtocolError, match=reason):
        WIRE_V2.reply_length(tuple(fields))


@pytest.mark.parametrize(("mine", "theirs"), [(1, 2), (2, 1)])
def test_each_format_refuses_the_other_versions_headers(mine: int, theirs: int) -> None:
    """A connection speaks one version: a header of the other one is a bad magic."""
    fmt, other = WIRE_FORMATS[mine], WIRE_FORMATS[theirs]
    req = other.pack_request(Op.PING, 0, 1, 0, 0, 0, 0, 0, 0, 0).ljust(64, b"\0")
    with pytest.raises(ProtocolError, match="bad request magic"):
        fmt.request_length(fmt.request.unpack(req[: fmt.request.size]))
    rep = other.pack_reply(0, 0, 1, 0, 0).ljust(40, b"\0")
    with pytest.raises(ProtocolError, match="bad reply magic"):
        fmt.reply_length(fmt.reply.unpack(rep[: fmt.reply.size]))


@pytest.mark.parametrize("version", [1, 2])
def test_the_other_framing_errors_keep_their_reasons(version: int) -> None:
    fmt = WIRE_FORMATS[version]
    good = list(fmt.request.unpack(fmt.pack_request(Op.WRITE, 0, 1, 0, 0, 0, 0, 0, 0, 10)))
    for index, value, reason in [(1, 99, "unknown opcode 99"), (11, 2**20 + 1, "exceeds")]:
        bad = list(good)
        bad[index] = value
        with pytest.raises(ProtocolError, match=reason):
            fmt.request_length(tuple(bad))
    assert fmt.request_length(tuple(good)) == 10
    good[1] = Op.READ  # no payload, whatever the length
    good[11] = 2**32 - 1
    assert fmt.request_length(tuple(good)) == 0


# -- handshake ------------------------------------------------------------------------------


def _hmac(label: bytes, fields: bytes, nc: bytes, ns: bytes) -> bytes:
    return hmac.new(SECRET, label + fields + nc + ns, hashlib.sha256).digest()


def test_v2_client_and_server_agree_on_version_2_and_shared_features() -> None:
    c = ClientHandshake(
        SECRET, PeerRole.SDS_PEER, features=Feature.CHUNK_LIST | Feature.CSUM_CRC32C
    )
    s = ServerHandshake(SECRET, Feature.CHUNK_LIST | Feature.HDR_CRC32C)
    reason, _ = exchange(c, s)
    assert reason is None and c.need == 0 and s.need == 0
    assert c.version == s.version == 2 and s.role == PeerRole.SDS_PEER
    assert c.features == s.features == Feature.CHUNK_LIST  # what both have


def test_this_release_advertises_chunk_list_and_checksums() -> None:
    c, s = ClientHandshake(SECRET, PeerRole.CLIENT), ServerHandshake(SECRET)
    wire = c.hello()
    assert len(wire) == CLIENT_HELLO.size + HELLO_EXT.size
    assert HELLO_EXT.unpack(wire[CLIENT_HELLO.size :]) == (HELLO_EXT_MAGIC, 0, 3)
    exchange(c, s)
    assert c.features == s.features == Feature.CHUNK_LIST | Feature.CSUM_CRC32C


def test_a_v1_client_written_by_hand_gets_exactly_the_v1_exchange() -> None:
    """What a client of the release before version 2 sends and checks, byte by byte:
    the v2 server answers it as that release's server did (version 1, its features
    byte, the proofs of version 1, no HelloExt)."""
    s = ServerHandshake(SECRET)
    nc = os.urandom(32)
    hello, reason = s.feed(memoryview(CLIENT_HELLO.pack(HELLO_MAGIC, 1, PeerRole.CLIENT, 0, nc)))
    assert reason is None and len(hello) == SERVER_HELLO.size  # nothing after it
    magic, version, status, features, ns, ps = SERVER_HELLO.unpack(hello)
    assert (magic, version, status, features) == (SERVER_HELLO_MAGIC, 1, 0, 1)
    assert ps == _hmac(b"meshblock-wire-v1 server", struct.pack(">HB", 1, 1), nc, ns)
    pc = _hmac(b"meshblock-wire-v1 client", struct.pack(">HB", 1, 1), nc, ns)
    result, reason = s.feed(memoryview(CLIENT_PROOF.pack(PROOF_MAGIC, pc)))
    assert reason is None and result == SERVER_RESULT.pack(RESULT_MAGIC, 0)
    assert s.need == 0 and s.version == 1 and s.role == PeerRole.CLIENT


def test_a_v2_client_falls_back_to_a_v1_server() -> None:
    """The server forced to version 1 behaves as that release: it refuses the offer of
    2 with its version, 1, without reading the HelloExt; the client then offers 1 on
    a new connection and gets the v1 exchange with the server's features byte."""
    old = ServerHandshake(SECRET, max_version=1)
    c = ClientHandshake(SECRET, PeerRole.CLIENT)
    with pytest.raises(VersionUnsupported) as ei:
        exchange(c, old)
    assert ei.value.server_version == 1 and not ei.value.retriable
    assert isinstance(ei.value, HandshakeError) and old.need == 0  # it closes
    c = ClientHandshake(SECRET, PeerRole.CLIENT, version=1)
    assert len(c.hello()) == CLIENT_HELLO.size
    reason, _ = exchange(c, ServerHandshake(SECRET, max_version=1))
    assert reason is None and c.version == 1 and c.features == Feature.CHUNK_LIST


def test_the_refusal_of_a_v1_server_is_what_that_release_sends() -> None:
    reply, reason = ServerHandshake(SECRET, max_version=1).feed(
        memoryview(CLIENT_HELLO.pack(HELLO_MAGIC, 2, PeerRole.CLIENT, 0, os.urandom(32)))
    )
    assert reason and "version 2" in reason
    assert reply == SERVER_HELLO.pack(
        SERVER_HELLO_MAGIC, 1, HandshakeStatus.VERSION_UNSUPPORTED, 0, bytes(32), bytes(32)
    )


def test_a_downgrade_to_v1_is_refused() -> None:
    """Somebody in the middle rewrites the client's offer of 2 into 1 (dropping the
    HelloExt) and relays the real server's valid v1 answer: the client, which offered
    2, refuses an OK with version 1 (a server of version 1 refuses, it never accepts)."""
    c, s = ClientHandshake(SECRET, PeerRole.CLIENT), ServerHandshake(SECRET)
    magic, _, role, rsv, nc = CLIENT_HELLO.unpack(c.hello()[: CLIENT_HELLO.size])
    hello, reason = s.feed(memoryview(CLIENT_HELLO.pack(magic, 1, role, rsv, nc)))
    assert reason is None and SERVER_HELLO.unpack(hello)[1:3] == (1, 0)  # a valid v1 OK
    with pytest.raises(HandshakeError, match="downgrade"):
        c.feed(memoryview(hello))


@pytest.mark.parametrize("target", ["offered version", "client features", "server features"])
def test_the_v2_proofs_cover_the_negotiation(target: str) -> None:
    """Whatever of the negotiation is altered in flight, the proofs no longer match."""
    c, s = ClientHandshake(SECRET, PeerRole.CLIENT), ServerHandshake(SECRET)
    wire = bytearray(c.hello())
    if target == "offered version":
        struct.pack_into(">H", wire, 4, 3)  # a version 3 client: the server answers 2
    elif target == "client features":
        struct.pack_into(">Q", wire, CLIENT_HELLO.size + 8, 0)
    s.feed(memoryview(bytes(wire[: CLIENT_HELLO.size])))
    sent, reason = s.feed(memoryview(bytes(wire[CLIENT_HELLO.size :])))
    assert reason is None and s.version == 2
    answer = bytearray(sent)
    if target == "server features":
        struct.pack_into(">Q", answer, SERVER_HELLO.size + 8, 0)
    assert c.feed(memoryview(bytes(answer[: SERVER_HELLO.size]))) == b""
    with pytest.raises(HandshakeError, match="does not hold the cluster secret"):
        c.feed(memoryview(bytes(answer[SERVER_HELLO.size :])))


def test_the_v2_proofs_are_not_the_v1_proofs() -> None:
    """Version 2's proofs have labels of their own: a v1 proof is no v2 proof."""
    c, s = ClientHandshake(SECRET, PeerRole.CLIENT), ServerHandshake(SECRET)
    wire = c.hello()
    nc = CLIENT_HELLO.unpack(wire[: CLIENT_HELLO.size])[4]
    s.feed(memoryview(wire[: CLIENT_HELLO.size]))
    answer, _ = s.feed(memoryview(wire[CLIENT_HELLO.size :]))
    _, _, _, _, ns, ps = SERVER_HELLO.unpack(answer[: SERVER_HELLO.size])
    # the client's features and the server's (it announces the peer ones to everyone)
    fields = struct.pack(">HHBQQ", 2, 2, PeerRole.CLIENT, 3, SERVER_FEATURES)
    assert ps == _hmac(b"meshblock-wire-v2 server", fields, nc, ns)
    assert ps != _hmac(b"meshblock-wire-v1 server", struct.pack(">HB", 2, 1), nc, ns)
    v1_proof = _hmac(b"meshblock-wire-v1 client", struct.pack(">HB", 2, 1), nc, ns)
    result, reason = s.feed(memoryview(CLIENT_PROOF.pack(PROOF_MAGIC, v1_proof)))
    assert reason and "proof mismatch" in reason and result[4] == HandshakeStatus.AUTH_FAILED


def test_wire_min_version_2_refuses_v1_peers() -> None:
    strict = ServerHandshake(SECRET, min_version=2)
    with pytest.raises(VersionUnsupported):
        exchange(ClientHandshake(SECRET, PeerRole.CLIENT, version=1), strict)
    v1_hello = ClientHandshake(SECRET, PeerRole.CLIENT, version=1).hello()
    reply, reason = ServerHandshake(SECRET, min_version=2).feed(memoryview(v1_hello))
    assert reason and "below wire_min_version 2" in reason
    assert SERVER_HELLO.unpack(reply)[1:3] == (2, HandshakeStatus.VERSION_UNSUPPORTED)
    # a v2 client with min_version 2 gets v2 from a v2 server, nothing from a v1 one
    c = ClientHandshake(SECRET, PeerRole.CLIENT, min_version=2)
    assert exchange(c, ServerHandshake(SECRET, min_version=2))[0] is None and c.version == 2
    with pytest.raises(ValueError):
        ClientHandshake(SECRET, PeerRole.CLIENT, version=1, min_version=2)
    with pytest.raises(ValueError):
        ServerHandshake(SECRET, max_version=3)


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(0, 0x12345678, "extension magic"), (4, 1, "reserved")],
)
def test_a_bad_client_hello_ext_is_a_protocol_error(offset: int, value: int, reason: str) -> None:
    wire = bytearray(ClientHandshake(SECRET, PeerRole.CLIENT).hello())
    struct.pack_into(">I", wire, CLIENT_HELLO.size + offset, value)
    s = ServerHandshake(SECRET)
    assert s.feed(memoryview(bytes(wire[: CLIENT_HELLO.size]))) == (b"", None)
    assert s.need == HELLO_EXT.size
    with pytest.raises(ProtocolError, match=reason):
        s.feed(memoryview(bytes(wire[CLIENT_HELLO.size :])))


def test_a_v2_hello_with_a_reserved_byte_is_a_protocol_error() -> None:
    wire = bytearray(ClientHandshake(SECRET, PeerRole.CLIENT).hello())
    wire[7] = 1
    with pytest.raises(ProtocolError, match="reserved"):
        ServerHandshake(SECRET).feed(memoryview(bytes(wire[: CLIENT_HELLO.size])))


def test_a_server_answering_a_version_not_offered_is_refused() -> None:
    c = ClientHandshake(SECRET, PeerRole.CLIENT)
    c.hello()
    hello = SERVER_HELLO.pack(SERVER_HELLO_MAGIC, 3, 0, 0, bytes(32), bytes(32))
    with pytest.raises(HandshakeError, match="not offered"):
        c.feed(memoryview(hello))


def test_handshake_errors_are_wire_errors() -> None:
    """Callers catch one type: HandshakeError is a WireError (the client's base)."""
    assert issubclass(HandshakeError, WireError) and wire_client.WireError is WireError
    assert issubclass(wire_client.ConnectionLost, WireError)
    assert not HandshakeError("x").retriable
    assert not issubclass(ProtocolError, WireError)  # unchanged: raised as before


# -- the settings ----------------------------------------------------------------------


def test_wire_min_version_settings_name_a_version_spoken() -> None:
    sds = {
        "name": "s1",
        "protection_domain": "pd",
        "address": "127.0.0.1",
        "cluster_secret": "k",
        "devices": [{"path": "/tmp/d.img", "capacity": "1GiB", "pool": "p"}],
    }
    assert sds_config.from_dict(sds).wire_min_version == 1
    assert sds_config.from_dict({**sds, "wire_min_version": 2}).wire_min_version == 2
    sdc: dict[str, Any] = {"mdm": {"cluster_secret": "k"}}
    assert from_mapping(SdcConfig, sdc).io.wire_min_version == 1
    assert from_mapping(SdcConfig, {**sdc, "io": {"wire_min_version": 2}}).io.wire_min_version == 2
    for bad in (0, 3):
        with pytest.raises(ConfigError, match="wire_min_version must be between 1 and 2"):
            sds_config.from_dict({**sds, "wire_min_version": bad})
        with pytest.raises(ConfigError, match=r"io\.wire_min_version must be between 1 and 2"):
            from_mapping(SdcConfig, {**sdc, "io": {"wire_min_version": bad}})


def test_the_v1_features_byte_carries_only_the_bits_of_version_1() -> None:
    """The bits of version 2's feature word beyond CHUNK_LIST (checksums, header CRC,
    sessions) mean nothing on a connection of version 1, whose headers have no room
    for them: a server that supports them does not announce them in the v1 byte, and
    a client speaking version 1 does not take them from it."""
    every = Feature.CHUNK_LIST | Feature.CSUM_CRC32C | Feature.HDR_CRC32C | Feature.SESSION_BOUND
    s = ServerHandshake(SECRET, every)
    c = ClientHandshake(SECRET, PeerRole.CLIENT, version=1)
    reason, wire = exchange(c, s)
    assert reason is None and c.version == s.version == 1
    assert SERVER_HELLO.unpack(wire[CLIENT_HELLO.size : CLIENT_HELLO.size + 72])[3] == 1
    assert c.features == s.features == Feature.CHUNK_LIST
    # a server announcing more in the byte (0xFF): the client keeps bit 0 only
    c = ClientHandshake(SECRET, PeerRole.TOOL, version=1)
    nc = CLIENT_HELLO.unpack(c.hello())[4]
    ns = os.urandom(32)
    ps = _hmac(b"meshblock-wire-v1 server", struct.pack(">HB", 1, PeerRole.TOOL), nc, ns)
    c.feed(memoryview(SERVER_HELLO.pack(SERVER_HELLO_MAGIC, 1, 0, 0xFF, ns, ps)))
    assert c.features == Feature.CHUNK_LIST


def test_a_v2_server_hello_with_a_features_byte_is_a_protocol_error() -> None:
    """In version 2 the features are in the HelloExt and the ServerHello's byte is 0;
    like every field no feature defines, a non-zero one is refused, never ignored."""
    c, s = ClientHandshake(SECRET, PeerRole.CLIENT), ServerHandshake(SECRET)
    wire = c.hello()
    s.feed(memoryview(wire[: CLIENT_HELLO.size]))
    answer = bytearray(s.feed(memoryview(wire[CLIENT_HELLO.size :]))[0])
    assert answer[7] == 0
    answer[7] = 1
    with pytest.raises(ProtocolError, match="features byte"):
        c.feed(memoryview(bytes(answer[: SERVER_HELLO.size])))


def test_meshctl_verify_reports_a_refused_handshake_as_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``meshctl volume verify --wire-min-version 2`` against an SDS that speaks only 1
    (or with a wrong secret): one error line and exit 1, not a traceback."""

    async def refused(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["wire_min_version"] == 2
        raise HandshakeError("SDS at 10.0.0.5:7072 speaks protocol version 1, below 2")

    class Names:
        def volume(self, name: str) -> dict[str, Any]:
            return {"id": 1, "name": name, "pool_id": 1}

        def sds_list(self) -> list[dict[str, Any]]:
            return []

    class Client:
        def get(self, path: str) -> dict[str, Any]:
            return {}

    no_tls = SimpleNamespace(tls_ca=None, tls_cert=None, tls_key=None)
    ctx = SimpleNamespace(names=Names(), client=Client(), settings=no_tls)
    monkeypatch.setattr(verify_command, "check_volume", refused)
    monkeypatch.setenv(verify_command.SECRET_ENV, "k")
    args = build_parser().parse_args(["volume", "verify", "v1", "--wire-min-version", "2"])
    with pytest.raises(CliError, match="below 2") as ei:
        verify_command.verify(ctx, args)  # type: ignore[arg-type]
    assert ei.value.exit_code == ExitCode.ERROR
