"""Protocol versions 1 and 2 over real sockets on loopback: the SDS's data server (in
this process, on a real store file) and the asyncio client, each against a peer of
the release before version 2 (a client whose bytes are written here by hand, the
server forced to version 1) and against each other; the ``wire_min_version``
setting; non-zero fields of version 2 that nothing negotiated. docs/protocol.md §8.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from _wait import wait_until_async
from _wire import EPOCH, PG_COUNT, POOL, SECRET, sds_server
from meshblock.chunks import ChunkRef, pg_of
from meshblock.pgmap_doc import SdsEndpoint
from meshblock.sdc.datapath import DataPathError, Piece
from meshblock.sdc.wire_path import WireDataPath
from meshblock.sds.metrics import SdsCollector
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.wire import ConnectionLost, HandshakeError, PeerRole, ProtocolError, WireClient
from meshblock.wire.handshake import (
    CLIENT_HELLO,
    CLIENT_PROOF,
    FEATURE_CHUNK_LIST,
    HELLO_MAGIC,
    PROOF_MAGIC,
    SERVER_HELLO,
    SERVER_RESULT,
    ClientHandshake,
    ServerHandshake,
)
from meshblock.wire.protocol import (
    REPLY,
    REPLY_MAGIC,
    REPLY_MAGIC_V2,
    REPLY_V2,
    REQUEST,
    REQUEST_MAGIC,
    REQUEST_V2,
    Feature,
    Op,
    Status,
    pack_request,
)

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def pg(volume: int, chunk: int) -> int:
    return pg_of(volume, chunk, PG_COUNT)


def ref(volume: int, chunk: int) -> ChunkRef:
    return ChunkRef(POOL, pg(volume, chunk), EPOCH, volume, chunk)


def _v1_proof(label: bytes, nc: bytes, ns: bytes) -> bytes:
    msg = label + (1).to_bytes(2, "big") + bytes([PeerRole.CLIENT]) + nc + ns
    return hmac.new(SECRET.encode(), msg, hashlib.sha256).digest()


def test_a_v1_client_written_by_hand_does_io_with_a_v2_server(tmp_path: Path) -> None:
    """The bytes a client of the release before version 2 sends, and what it expects
    back: the v1 handshake, then v1 request headers (56 bytes) and v1 replies (32)."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            nc = os.urandom(32)
            writer.write(CLIENT_HELLO.pack(HELLO_MAGIC, 1, PeerRole.CLIENT, 0, nc))
            _, version, status, features, ns, ps = SERVER_HELLO.unpack(
                await reader.readexactly(SERVER_HELLO.size)
            )
            assert (version, status, features) == (1, 0, FEATURE_CHUNK_LIST)
            assert ps == _v1_proof(b"meshblock-wire-v1 server", nc, ns)
            pc = _v1_proof(b"meshblock-wire-v1 client", nc, ns)
            writer.write(CLIENT_PROOF.pack(PROOF_MAGIC, pc))
            assert (await reader.readexactly(SERVER_RESULT.size))[4] == 0
            data = os.urandom(4096)
            where = dict(pool_id=POOL, pg=pg(4, 2), epoch=EPOCH, volume_id=4, chunk_index=2)
            writer.write(pack_request(Op.WRITE, 1, offset=512, length=4096, **where) + data)
            assert REPLY.unpack(await reader.readexactly(REPLY.size))[:6] == (
                REPLY_MAGIC, Status.OK, 0, 1, EPOCH, 0
            )  # fmt: skip
            writer.write(pack_request(Op.READ, 2, offset=512, length=4096, **where))
            writer.write(REQUEST.pack(REQUEST_MAGIC, Op.PING, 0, 0, 3, POOL, 0, 0, 0, 0, 0, 0))
            replies = {}
            for _ in range(2):
                hdr = REPLY.unpack(await reader.readexactly(REPLY.size))
                assert hdr[0] == REPLY_MAGIC and hdr[1] == Status.OK, hdr
                replies[hdr[3]] = (hdr, await reader.readexactly(hdr[5]))
            assert replies[2][1] == data
            assert replies[3][0][4] == EPOCH  # PING answers the pool's epoch
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_a_v2_client_falls_back_to_a_v1_server(tmp_path: Path) -> None:
    """The server forced to version 1 refuses the offer of 2, as that release does;
    the client connects again with 1, and IO and CHUNK_LIST (the v1 features byte)
    work. With wire_min_version 2 the client does not fall back."""

    async def main() -> None:
        async with sds_server(tmp_path, max_version=1) as (server, service):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET, PeerRole.TOOL)
            assert cl.version == 1 and cl.features & FEATURE_CHUNK_LIST
            service.store.write(service.store.devices[0], 6, 1, 0, b"stored")
            assert await cl.list_chunks(POOL, pg(6, 1)) == [(6, 1)]
            assert bytes(await cl.read(ref(6, 1), 0, 6)) == b"stored"
            await cl.close()
            assert service.stats.handshake_failures == 1  # the refused offer of 2
            with pytest.raises(HandshakeError, match="wire_min_version"):
                await WireClient.connect("127.0.0.1", server.port, SECRET, min_version=2)

    asyncio.run(main())


def test_wire_min_version_2_refuses_v1_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with sds_server(tmp_path, min_version=2) as (server, service):
            with pytest.raises(HandshakeError, match="refused protocol version 1"):
                await WireClient.connect("127.0.0.1", server.port, SECRET, max_version=1)
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET, min_version=2)
            assert cl.version == 2 and await cl.ping(POOL) == EPOCH
            await cl.close()
            assert service.stats.handshake_failures == 1

    with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
        asyncio.run(main())
    assert "below wire_min_version 2" in caplog.text


def test_v2_between_two_current_peers_and_its_unnegotiated_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two peers of this release speak version 2. A v2 request with a field that no
    negotiated feature defines (here csum_type) is a protocol error: that connection
    is dropped with the reason logged, nothing of it applied; others carry on."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, service):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            assert cl.version == 2 and cl.features == FEATURE_CHUNK_LIST | Feature.CSUM_CRC32C
            data = os.urandom(65536)
            await cl.write(ref(8, 0), 0, data, fua=True)
            assert bytes(await cl.read(ref(8, 0), 0, 65536)) == data
            await cl.flush()
            # a hand-made v2 session
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # (without CSUM_CRC32C: the checksum fields are not negotiated)
            hs = ClientHandshake(SECRET.encode(), PeerRole.CLIENT, features=FEATURE_CHUNK_LIST)
            writer.write(hs.hello())
            while hs.need:
                writer.write(hs.feed(memoryview(await reader.readexactly(hs.need))))
            assert hs.version == 2 and hs.features == FEATURE_CHUNK_LIST
            hdr = list(REQUEST_V2.unpack(pack_request(Op.WRITE, 1, length=8, version=2)))
            hdr[4:11] = [1, POOL, pg(8, 1), EPOCH, 8, 1, 0]
            good = REQUEST_V2.pack(*hdr) + b"applied!"
            writer.write(good)
            reply = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
            assert reply[0] == REPLY_MAGIC_V2 and reply[1] == Status.OK and reply[6:] == (0,) * 5
            hdr[3], hdr[6], hdr[12] = 0, pg(8, 2), 1  # csum_type 1: not negotiated
            hdr[9] = 2
            writer.write(REQUEST_V2.pack(*hdr) + b"never!!!")
            assert await reader.read() == b""  # dropped
            writer.close()
            assert service.store.location(8, 1) is not None
            assert service.store.location(8, 2) is None
            assert service.stats.protocol_errors == 1
            assert await cl.ping(POOL) == EPOCH  # the other connection lives on
            await cl.close()

    with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
        asyncio.run(main())
    assert "checksums (type 1, shift 0) without the feature negotiated" in caplog.text


@asynccontextmanager
async def loopback_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A server on a free loopback port running ``handle`` per connection; its port."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@asynccontextmanager
async def v2_server(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A hand-written server that does the real handshake of version 2 (announcing
    CHUNK_LIST only, as the release before CSUM_CRC32C), then ``behaviour``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = ServerHandshake(SECRET.encode(), FEATURE_CHUNK_LIST)
        try:
            while hs.need:
                out, _ = hs.feed(memoryview(await reader.readexactly(hs.need)))
                writer.write(out)
            assert hs.version == 2
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with loopback_server(handle) as port:
        yield port


@pytest.mark.parametrize(("index", "value"), [(6, 4), (7, 1), (9, 1), (10, 0xDEAD)])
def test_a_v2_reply_with_unnegotiated_fields_drops_the_connection(index: int, value: int) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rid = REQUEST_V2.unpack(await reader.readexactly(REQUEST_V2.size))[4]
        fields = list(REPLY_V2.unpack(REPLY_V2.pack(REPLY_MAGIC_V2, 0, 0, rid, 1, 0, *[0] * 5)))
        fields[index] = value
        writer.write(REPLY_V2.pack(*fields))
        await reader.read()

    async def main() -> None:
        async with v2_server(answer) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            with pytest.raises(ConnectionLost) as ei:
                await cl.ping()
            assert isinstance(ei.value.__cause__, ProtocolError)
            assert "without" in str(ei.value.__cause__) or "reserved" in str(ei.value.__cause__)
            await cl.close()

    asyncio.run(main())


@asynccontextmanager
async def tampered_server(offset: int, value: bytes) -> AsyncIterator[int]:
    """A server whose answer to the ClientHello of version 2 (its ServerHello and
    HelloExt, 88 bytes) has ``value`` written at ``offset``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = ServerHandshake(SECRET.encode())
        try:
            hs.feed(memoryview(await reader.readexactly(hs.need)))
            answer = bytearray(hs.feed(memoryview(await reader.readexactly(hs.need)))[0])
            answer[offset : offset + len(value)] = value
            writer.write(answer)
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with loopback_server(handle) as port:
        yield port


EXT = SERVER_HELLO.size  # where the server's HelloExt starts in its answer


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(EXT, b"XXXX", "extension magic"), (EXT + 4, b"\0\0\0\1", "reserved")],
)
def test_a_server_breaking_the_v2_handshake_is_a_handshake_error_for_every_caller(
    offset: int, value: bytes, reason: str
) -> None:
    """A server (or whoever sits in the middle) whose HelloExt breaks the protocol:
    the client refuses it, and the connect fails with a HandshakeError (a WireError,
    what the SDC, the SDS's peer connections and resyncs catch), its cause the
    ProtocolError, not with a ProtocolError that escapes them all."""

    async def main() -> None:
        async with tampered_server(offset, value) as port:
            with pytest.raises(HandshakeError, match=reason) as ei:
                await WireClient.connect("127.0.0.1", port, SECRET)
            assert isinstance(ei.value.__cause__, ProtocolError) and not ei.value.retriable
            with pytest.raises(HandshakeError):
                await Peers(SECRET, 5.0).get(2, ("127.0.0.1", port))
            path = WireDataPath(SECRET)
            with pytest.raises(DataPathError) as dp:
                await path.call(
                    SdsEndpoint(2, "127.0.0.1", port), Piece(Op.READ, 0, ref(1, 0), 0, 512)
                )
            assert dp.value.reason == "handshake" and not dp.value.retriable

    asyncio.run(main())


def test_data_connections_and_handshakes_are_counted_by_protocol_version(
    tmp_path: Path,
) -> None:
    """What an operator checks before setting wire_min_version = 2:
    meshblock_sds_data_connections{version, role} (authenticated connections open now,
    every series present, 0 included) and meshblock_sds_handshakes_total{version,
    role} (for the short-lived connections of tools). A refused handshake counts in
    neither."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            registry = CollectorRegistry()
            registry.register(SdsCollector(state, Resync(state)))

            def value(name: str, version: int, role: str) -> float | None:
                labels = {"version": str(version), "role": role}
                return registry.get_sample_value(f"meshblock_sds_{name}", labels)

            port = server.port
            v2 = await WireClient.connect("127.0.0.1", port, SECRET, PeerRole.CLIENT)
            tools = [
                await WireClient.connect("127.0.0.1", port, SECRET, PeerRole.TOOL, max_version=1)
                for _ in range(2)
            ]
            with pytest.raises(HandshakeError):
                await WireClient.connect("127.0.0.1", port, "another secret", PeerRole.TOOL)
            await wait_until_async(
                lambda: state.stats.handshake_failures == 1, 5, "the refusal counted"
            )
            assert value("data_connections", 2, "client") == 1
            assert value("data_connections", 1, "tool") == 2
            assert value("data_connections", 2, "tool") == 0
            assert value("data_connections", 1, "sds_peer") == 0
            assert value("handshakes_total", 1, "tool") == 2
            assert value("handshakes_total", 2, "client") == 1
            assert value("handshakes_total", 2, "tool") == 0  # the refused one
            for cl in tools:
                await cl.close()
            await wait_until_async(
                lambda: value("data_connections", 1, "tool") == 0, 5, "the v1 tools gone"
            )
            assert value("handshakes_total", 1, "tool") == 2  # a counter stays
            assert value("data_connections", 2, "client") == 1
            await v2.close()
            await wait_until_async(
                lambda: value("data_connections", 2, "client") == 0, 5, "the v2 client gone"
            )

    asyncio.run(main())


def test_a_request_pipelined_with_the_client_proof_is_framed_in_version_2(
    tmp_path: Path,
) -> None:
    """A client may send its first requests in the same write as its ClientProof,
    without waiting for the ServerResult: they arrive in one read with the end of the
    handshake, and the server frames them in the version just negotiated (64-byte
    headers), not in the one it used until then."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                hs = ClientHandshake(SECRET.encode(), PeerRole.CLIENT)
                writer.write(hs.hello())
                proof = hs.feed(memoryview(await reader.readexactly(SERVER_HELLO.size)))
                proof += hs.feed(memoryview(await reader.readexactly(hs.need)))
                pings = [pack_request(Op.PING, rid, pool_id=POOL, version=2) for rid in (7, 8)]
                writer.write(b"".join([proof, *pings]))  # one write: one read on loopback
                hs.feed(memoryview(await reader.readexactly(SERVER_RESULT.size)))
                assert hs.need == 0 and hs.version == 2
                for rid in (7, 8):
                    reply = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
                    assert reply[:5] == (REPLY_MAGIC_V2, Status.OK, 0, rid, EPOCH)
            finally:
                writer.close()
            assert state.stats.protocol_errors == 0

    asyncio.run(main())
