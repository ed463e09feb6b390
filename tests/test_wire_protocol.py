"""The data protocol: header structs, the handshake, and the asyncio client against
the real SDS data server (in this process, on a real store file) and against a
hand-written server that answers out of order or breaks the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from _wire import EPOCH, PG_COUNT, POOL, SECRET, exchange, sds_server
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.sds.maps import PgMap
from meshblock.sds.replication import Peers
from meshblock.wire import (
    MAX_IN_FLIGHT,
    ConnectionLost,
    HandshakeError,
    PeerRole,
    ProtocolError,
    RequestError,
    Status,
    WireClient,
)
from meshblock.wire.client import Reply as ClientReply
from meshblock.wire.handshake import (
    CLIENT_HELLO,
    CLIENT_PROOF,
    FEATURE_CHUNK_LIST,
    SERVER_FEATURES,
    SERVER_HELLO,
    SERVER_RESULT,
    ClientHandshake,
    ServerHandshake,
)
from meshblock.wire.protocol import (
    CHUNK_ENTRY,
    MAX_PAYLOAD,
    REPLY,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    RETRIABLE,
    Op,
    Reply,
    ReqFlag,
    Request,
    pack_request,
    reply_payload_length,
    request_payload_length,
)

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


# -- structs ---------------------------------------------------------------------------


def test_header_sizes_are_fixed() -> None:
    assert REQUEST.size == 56
    assert REPLY.size == 32
    assert (CLIENT_HELLO.size, SERVER_HELLO.size, CLIENT_PROOF.size, SERVER_RESULT.size) == (
        40,
        72,
        36,
        8,
    )


def test_request_round_trip_and_byte_order() -> None:
    raw = pack_request(
        Op.WRITE,
        0x0102030405060708,
        pool_id=7,
        pg=9,
        epoch=2**63 + 1,
        volume_id=11,
        chunk_index=2**32 - 1,
        offset=4096,
        length=512,
        flags=1,
    )
    hdr = Request(*REQUEST.unpack(raw))
    assert raw[:4] == b"MBRQ" and raw[8:16] == bytes(range(1, 9))
    assert hdr == Request(REQUEST_MAGIC, Op.WRITE, 1, 0, 0x0102030405060708, 7, 9, 2**63 + 1,
                          11, 2**32 - 1, 4096, 512)  # fmt: skip
    assert request_payload_length(hdr) == 512
    assert request_payload_length(hdr._replace(opcode=Op.READ, length=MAX_PAYLOAD)) == 0


def test_reply_round_trip() -> None:
    raw = REPLY.pack(REPLY_MAGIC, Status.EPOCH_STALE, 1, 99, 12, 0, 0)
    hdr = Reply(*REPLY.unpack(raw))
    assert raw[:4] == b"MBRP" and hdr.status == Status.EPOCH_STALE and hdr.epoch == 12
    assert reply_payload_length(hdr) == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"magic": 0x12345678}, "bad request magic"),
        ({"opcode": 99}, "unknown opcode"),
        ({"reserved": 1}, "reserved"),
        ({"length": MAX_PAYLOAD + 1}, "exceeds"),
    ],
)
def test_bad_request_headers_are_protocol_errors(change: dict[str, int], reason: str) -> None:
    hdr = Request(*REQUEST.unpack(pack_request(Op.WRITE, 1, length=10)))._replace(**change)
    with pytest.raises(ProtocolError, match=reason):
        request_payload_length(hdr)


def test_retriable_statuses() -> None:
    assert Status.EPOCH_STALE.retriable and Status.REPLICA_FAILED.retriable
    assert not Status.INVALID.retriable and not Status.NO_SPACE.retriable
    assert Status.OK not in RETRIABLE


# -- handshake ---------------------------------------------------------------------------


def _run_handshake(client_secret: str, server_secret: str) -> tuple[bool, str | None]:
    client = ClientHandshake(client_secret.encode(), PeerRole.SDS_PEER)
    server = ServerHandshake(server_secret.encode())
    reason, _ = exchange(client, server)
    assert client.need == 0
    return reason is None, server.role.name if server.role else None


def test_handshake_with_the_same_secret() -> None:
    assert _run_handshake("k", "k") == (True, "SDS_PEER")


def test_handshake_client_detects_a_server_without_the_secret() -> None:
    with pytest.raises(HandshakeError, match="does not hold the cluster secret"):
        _run_handshake("k", "other")


@pytest.mark.parametrize("version", [1, 2])
def test_handshake_server_detects_a_client_without_the_secret(version: int) -> None:
    server = ServerHandshake(b"k")
    client = ClientHandshake(b"other", PeerRole.CLIENT, version=version)
    wire = client.hello()
    hello, _ = server.feed(memoryview(wire[: CLIENT_HELLO.size]))
    if version > 1:  # the HelloExt follows
        hello, _ = server.feed(memoryview(wire[CLIENT_HELLO.size :]))
    assert SERVER_HELLO.unpack(hello[: SERVER_HELLO.size])[2] == 0  # goes on to the proof
    forged = CLIENT_PROOF.pack(0x4D424850, os.urandom(32))  # cannot compute a proof
    result, ok = server.on_proof(memoryview(forged))
    assert not ok and result[4] == 1
    with pytest.raises(HandshakeError, match="AUTH_FAILED"):
        client.on_result(memoryview(result))


def test_handshake_refuses_other_versions_and_roles() -> None:
    server = ServerHandshake(b"k", max_version=1)  # as the release before version 2
    hello = CLIENT_HELLO.pack(0x4D424843, 2, 1, 0, os.urandom(32))
    reply, reason = server.on_hello(memoryview(hello))
    assert reason and "version 2" in reason and reply[6] == 2
    reply, reason = ServerHandshake(b"k").on_hello(
        memoryview(CLIENT_HELLO.pack(0x4D424843, 1, 77, 0, os.urandom(32)))
    )
    assert reason and "role" in reason


def test_the_secret_never_crosses_the_wire() -> None:
    secret = "s3cr3t-value"
    client = ClientHandshake(secret.encode(), PeerRole.CLIENT)
    server = ServerHandshake(secret.encode())
    reason, wire = exchange(client, server)
    assert reason is None and len(wire) == 40 + 16 + 72 + 16 + 36 + 8  # all of version 2
    assert secret.encode() not in wire


# -- client against the real data server (in process) ---------------------------------


def pg(volume: int, chunk: int) -> int:
    return pg_of(volume, chunk, PG_COUNT)


def ref(volume: int, chunk: int, epoch: int = EPOCH) -> ChunkRef:
    """The address of a chunk of pool POOL, routed at ``epoch``."""
    return ChunkRef(POOL, pg(volume, chunk), epoch, volume, chunk)


def test_client_pipelines_many_requests_from_many_tasks(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, service):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            expected: dict[tuple[int, int], bytes] = {}

            async def worker(w: int) -> None:
                rng = random.Random(w)
                for i in range(40):
                    chunk = w * 100 + i % 5
                    off = rng.randrange(0, 64) * 4096
                    data = rng.randbytes(rng.choice([512, 4096, 65536]))
                    await cl.write(ref(9, chunk), off, data)
                    got = await cl.read(ref(9, chunk), off, len(data))
                    assert bytes(got) == data
                    expected[(chunk, off)] = data

            await asyncio.gather(*(worker(w) for w in range(64)))
            assert service.stats.ops[Op.WRITE] == 64 * 40
            big = os.urandom(CHUNK_SIZE)
            await cl.write(ref(9, 7), 0, big, fua=True)
            assert bytes(await cl.read(ref(9, 7), 0, CHUNK_SIZE)) == big
            await cl.flush()
            assert await cl.ping(POOL) == EPOCH
            assert cl.in_flight == 0
            await cl.close()
            assert cl.closed

    asyncio.run(main())


def test_client_limits_in_flight_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            peak = 0

            async def one(i: int) -> None:
                nonlocal peak
                peak = max(peak, cl.in_flight)
                await cl.write(ref(3, i), 0, b"x" * 4096)
                peak = max(peak, cl.in_flight)

            await asyncio.gather(*(one(i) for i in range(3 * MAX_IN_FLIGHT)))
            assert 0 < peak <= MAX_IN_FLIGHT
            await cl.close()

    asyncio.run(main())


def test_request_errors_keep_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            with pytest.raises(RequestError) as ei:
                await cl.read(ref(1, 1, EPOCH - 1), 0, 512)
            assert ei.value.status == Status.EPOCH_STALE and ei.value.epoch == EPOCH
            assert ei.value.retriable
            with pytest.raises(RequestError) as ei:
                await cl.read(ChunkRef(POOL + 1, 0, 1, 1, 1), 0, 512)  # a pool we have no map of
            assert ei.value.status == Status.MAP_PENDING and ei.value.retriable
            with pytest.raises(RequestError) as ei:
                await cl.read(ref(1, 1), 0, CHUNK_SIZE + 1)
            assert ei.value.status == Status.TOO_LARGE and not ei.value.retriable
            assert await cl.ping() == 0
            await cl.close()

    asyncio.run(main())


def test_not_primary_when_another_sds_is(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path, sds_id=2) as (server, service):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            with pytest.raises(RequestError) as ei:
                await cl.write(ref(1, 1), 0, b"no")
            assert ei.value.status == Status.NOT_PRIMARY
            assert service.store.location(1, 1) is None
            await cl.close()

    asyncio.run(main())


def test_a_replica_read_is_served_by_the_secondary_of_a_clean_pg_only(tmp_path: Path) -> None:
    """READ with the REPLICA flag (an SDC whose primary did not answer): the secondary
    of a clean PG serves it; not without the flag, not a write, not in a PG that is
    not clean (its copy may be stale)."""

    async def main() -> None:
        async with sds_server(tmp_path, sds_id=2) as (server, state):
            dev = state.store.devices[0]
            state.store.write(dev, 1, 1, 0, b"copy")

            def as_secondary(epoch: int, clean: bool) -> None:
                state.maps.update(
                    PgMap(
                        pool_id=POOL,
                        epoch=epoch,
                        pg_count=PG_COUNT,
                        primary=((1, 10),) * PG_COUNT,
                        secondary=((2, 10),) * PG_COUNT,
                        sds={1: ("127.0.0.1", 0), 2: ("127.0.0.1", 0)},
                        doc={},
                        clean=(clean,) * PG_COUNT,
                    )
                )

            as_secondary(EPOCH + 1, clean=True)
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            at = ref(1, 1, EPOCH + 1)
            reply = await cl.call(Op.READ, ReqFlag.REPLICA, at, 0, 4, None)
            assert bytes(reply.payload) == b"copy"
            with pytest.raises(RequestError) as ei:
                await cl.read(at, 0, 4)  # no flag: the primary only
            assert ei.value.status == Status.NOT_PRIMARY
            with pytest.raises(RequestError) as ei:
                await cl.call(Op.WRITE, ReqFlag.REPLICA, at, 0, 2, b"no")
            assert ei.value.status == Status.NOT_PRIMARY
            as_secondary(EPOCH + 2, clean=False)
            with pytest.raises(RequestError) as ei:
                await cl.call(Op.READ, ReqFlag.REPLICA, ref(1, 1, EPOCH + 2), 0, 4, None)
            assert ei.value.status == Status.NOT_PRIMARY
            await cl.close()

    asyncio.run(main())


def test_a_peer_that_answers_nothing_is_dropped_after_its_short_budget(tmp_path: Path) -> None:
    """An SDS's connection to a peer with a forward outstanding and nothing received
    for the peer's budget (0.3 s here; peer_timeout_s 10 s is only the ceiling) is
    dropped: the forward fails as a lost connection. Answered forwards raise the
    budget of a slow peer."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            peers = Peers(SECRET, 10.0, timeout_min=0.3, timeout_factor=4.0)
            client = await peers.get(2, ("127.0.0.1", server.port))
            assert client.request_timeout == pytest.approx(0.3)
            assert client.sync_timeout == pytest.approx(10.0)  # REPL_FLUSH, FUA: the ceiling
            # a newer epoch than the server's map: it waits 2 s before MAP_PENDING
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ConnectionLost) as ei:
                await client.repl_write(ref(1, 1, EPOCH + 5), 0, b"late")
            took = asyncio.get_running_loop().time() - t0
            assert isinstance(ei.value.__cause__, TimeoutError), ei.value
            assert took < 1.5, f"dropped after {took:.2f} s"
            # a slow peer: answers in 0.5 s make its budget 2 s, on the next connection too
            for _ in range(40):
                peers.answered(2, 0.5)
            client = await peers.get(2, ("127.0.0.1", server.port))
            assert client.request_timeout == pytest.approx(2.0)
            await peers.close()

    asyncio.run(main())


def test_a_peer_syncing_its_device_longer_than_the_budget_is_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer whose fdatasync takes 1.2 s answers REPL_FLUSH then: with a 0.3 s budget
    (peer_timeout_s 10 s) the connection is kept and the flush succeeds (before: the
    connection was dropped after 0.3 s and the flush failed as a lost connection)."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            real = state.store.sync

            async def slow_sync(devices: Any = None) -> None:
                await asyncio.sleep(1.2)
                await real(devices)

            monkeypatch.setattr(state.store, "sync", slow_sync)
            peers = Peers(SECRET, 10.0, timeout_min=0.3, timeout_factor=4.0)
            client = await peers.get(2, ("127.0.0.1", server.port))
            t0 = asyncio.get_running_loop().time()
            await client.repl_flush()
            assert asyncio.get_running_loop().time() - t0 >= 1.2
            assert not client.closed
            await peers.close()

    asyncio.run(main())


def test_connect_with_wrong_secret_fails_and_is_not_retriable(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, service):
            with pytest.raises(HandshakeError) as ei:
                await WireClient.connect("127.0.0.1", server.port, "wrong")
            assert not ei.value.retriable
            await asyncio.sleep(0.05)
            assert service.stats.handshake_failures == 1

    asyncio.run(main())


def test_chunk_list_pages_through_one_pg(tmp_path: Path) -> None:
    """CHUNK_LIST answers the chunks of one PG that the SDS stores, ascending, in pages
    (the client asks again from the key after the last one); roles that may not list
    are refused, a bad PG or length is INVALID, a pool without a map MAP_PENDING."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, service):
            store = service.store
            dev = store.devices[0]
            stored = [(v, c) for v in (2, 7) for c in range(40)]
            for v, c in stored:
                store.write(dev, v, c, 0, b"x")
            want = {p: sorted(k for k in stored if pg(*k) == p) for p in range(PG_COUNT)}
            assert max(len(w) for w in want.values()) > 4  # several pages of 2
            peer = await WireClient.connect("127.0.0.1", server.port, SECRET, PeerRole.SDS_PEER)
            assert peer.features & FEATURE_CHUNK_LIST  # announced in the handshake
            tool = await WireClient.connect("127.0.0.1", server.port, SECRET, PeerRole.TOOL)
            for p in range(PG_COUNT):
                assert await peer.list_chunks(POOL, p, page=2) == want[p]
            assert await tool.list_chunks(POOL, 3) == want[3]
            store.zero(*want[3][0], 0, CHUNK_SIZE)  # a whole chunk zeroed: not stored now
            assert await peer.list_chunks(POOL, 3, page=1) == want[3][1:]
            for bad_pg, length in ((PG_COUNT, 12), (0, 0), (0, 11)):
                cursor = ChunkRef(POOL, bad_pg, 0, 0, 0)
                fut = peer.submit(Op.CHUNK_LIST, 0, cursor, 0, length, None, peer.future())
                assert (await fut).status == Status.INVALID
            with pytest.raises(RequestError) as ei:
                await peer.list_chunks(POOL + 1, 0)
            assert ei.value.status == Status.MAP_PENDING
            client = await WireClient.connect("127.0.0.1", server.port, SECRET)
            with pytest.raises(RequestError) as ei:
                await client.list_chunks(POOL, 0)
            assert ei.value.status == Status.NOT_PERMITTED
            with pytest.raises(ValueError, match="page"):
                await peer.list_chunks(POOL, 0, page=0)
            for cl in (peer, tool, client):
                await cl.close()

    asyncio.run(main())


# -- client against a hand-written server --------------------------------------------------


@asynccontextmanager
async def fake_server(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    secret: str = SECRET,
    features: int = SERVER_FEATURES,
    version: int = 1,
) -> AsyncIterator[int]:
    """A server that does the real handshake (announcing ``features``, speaking
    protocol versions up to ``version``: 1, the frames these tests write by hand),
    then ``behaviour``."""
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        hs = ServerHandshake(secret.encode(), features, max_version=version)
        try:
            while hs.need:
                out, reason = hs.feed(memoryview(await reader.readexactly(hs.need)))
                writer.write(out)
                if reason is not None:
                    return
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def test_replies_out_of_order_reach_the_right_callers() -> None:
    async def reverse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = [Request(*REQUEST.unpack(await reader.readexactly(REQUEST.size))) for _ in range(20)]
        for r in reversed(reqs):
            body = struct.pack(">Q", r.chunk_index) * (r.length // 8)
            writer.write(REPLY.pack(REPLY_MAGIC, 0, 0, r.request_id, 1, len(body), 0) + body)
        await writer.drain()
        await reader.read()  # until the client closes

    async def main() -> None:
        async with fake_server(reverse) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            results = await asyncio.gather(
                *(cl.read(ChunkRef(1, 0, 1, 1, chunk), 0, 64) for chunk in range(20))
            )
            for chunk, data in enumerate(results):
                assert bytes(data) == struct.pack(">Q", chunk) * 8
            await cl.close()

    asyncio.run(main())


class Waiter:
    """A waiter of one's own (wire.client.ReplyWaiter): records what it is given."""

    def __init__(self) -> None:
        self.outcomes: list[ClientReply | BaseException] = []

    def done(self) -> bool:
        return bool(self.outcomes)

    def set_result(self, reply: ClientReply) -> None:
        self.outcomes.append(reply)

    def set_exception(self, exc: BaseException) -> None:
        self.outcomes.append(exc)


def test_a_waiter_of_ones_own_gets_the_typed_reply_or_the_loss() -> None:
    """submit() hands a reply to any waiter with a future's three methods, typed
    (status, flags, epoch, payload, by name); a waiter still waiting when the
    connection closes gets ConnectionLost; ``ready`` says whether a request would
    leave without waiting for a slot."""

    async def answer_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r = Request(*REQUEST.unpack(await reader.readexactly(REQUEST.size)))
        writer.write(REPLY.pack(REPLY_MAGIC, Status.EPOCH_STALE, 1, r.request_id, 9, 0, 0))
        r = Request(*REQUEST.unpack(await reader.readexactly(REQUEST.size)))
        writer.write(REPLY.pack(REPLY_MAGIC, 0, 0, r.request_id, 7, 3, 0) + b"abc")
        await reader.readexactly(REQUEST.size)  # then hang up without answering

    async def main() -> None:
        async with fake_server(answer_first) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            assert cl.ready
            stale, ok, lost = Waiter(), Waiter(), Waiter()
            assert cl.submit(Op.READ, 0, ref(1, 2), 0, 3, None, stale) is stale
            await asyncio.sleep(0.05)  # in order: the fake server reads one at a time
            cl.submit(Op.READ, 0, ref(1, 3), 0, 3, None, ok)
            await asyncio.sleep(0.05)
            cl.submit(Op.READ, 0, ref(1, 4), 0, 3, None, lost)
            await asyncio.sleep(0.2)
            (reply,) = stale.outcomes
            assert isinstance(reply, ClientReply)
            assert (reply.status, reply.flags, reply.epoch) == (Status.EPOCH_STALE, 1, 9)
            (reply,) = ok.outcomes
            assert isinstance(reply, ClientReply)
            assert (reply.status, reply.epoch, bytes(reply.payload)) == (0, 7, b"abc")
            (exc,) = lost.outcomes
            assert isinstance(exc, ConnectionLost) and exc.retriable
            assert not cl.ready and cl.closed
            with pytest.raises(ConnectionLost):
                cl.submit(Op.READ, 0, ref(1, 5), 0, 3, None, Waiter())
            await cl.close()

    asyncio.run(main())


def test_closed_connection_fails_every_pending_request_with_its_cause() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(5):
            await reader.readexactly(REQUEST.size)
        # then close without answering

    async def main() -> None:
        async with fake_server(hang_up) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            results = await asyncio.gather(
                *(cl.read(ChunkRef(1, 0, 1, 1, i), 0, 8) for i in range(5)), return_exceptions=True
            )
            for r in results:
                assert isinstance(r, ConnectionLost) and r.retriable
                assert r.__cause__ is not None
            with pytest.raises(ConnectionLost):
                await cl.ping()
            await cl.close()

    asyncio.run(main())


def test_garbage_reply_drops_the_connection_with_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(REQUEST.size)
        writer.write(b"\xff" * REPLY.size)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with fake_server(garbage) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            with pytest.raises(ConnectionLost) as ei:
                await cl.ping()
            assert isinstance(ei.value.__cause__, ProtocolError)
            await cl.close()

    asyncio.run(main())


def test_silent_server_times_out_pending_requests() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        async with fake_server(silent) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET, request_timeout=0.3)
            with pytest.raises(ConnectionLost) as ei:
                await cl.ping()
            assert isinstance(ei.value.__cause__, TimeoutError)
            await cl.close()

    asyncio.run(main())


def test_cancelled_caller_does_not_break_the_connection() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            r = Request(*REQUEST.unpack(await reader.readexactly(REQUEST.size)))
            await asyncio.sleep(0.1)
            writer.write(REPLY.pack(REPLY_MAGIC, 0, 0, r.request_id, 1, 0, 0))

    async def main() -> None:
        async with fake_server(slow) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await cl.ping()
            assert await cl.ping() == 1  # the late reply to the cancelled ping was ignored
            assert not cl.closed
            await cl.close()

    asyncio.run(main())


def test_server_without_the_secret_is_detected() -> None:
    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    async def main() -> None:
        async with fake_server(nothing, secret="another secret") as port:
            with pytest.raises(HandshakeError, match="does not hold"):
                await WireClient.connect("127.0.0.1", port, SECRET)

    asyncio.run(main())


def test_unreachable_server_raises_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        with pytest.raises(OSError):
            await WireClient.connect("127.0.0.1", port, SECRET)

    asyncio.run(main())


def test_listing_needs_the_feature_and_a_sound_reply() -> None:
    """A peer whose handshake lacks FEATURE_CHUNK_LIST (an SDS of the first release,
    which would drop the connection on the opcode) is not asked: None. One that has
    it and then drops the connection, or answers out of order (a cursor that would
    never end), fails the listing: the copy job retries rather than skipping the trim."""
    served: list[int] = []

    async def old_release(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(REQUEST.size)  # a request, or b"" when the client closes
        if data:
            served.append(len(data))

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(REQUEST.size)

    async def same_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            r = Request(*REQUEST.unpack(await reader.readexactly(REQUEST.size)))
            body = b"".join(CHUNK_ENTRY.pack(1, c) for c in (5, 9))
            writer.write(REPLY.pack(REPLY_MAGIC, 0, 0, r.request_id, 1, len(body), 0) + body)

    async def main() -> None:
        async with fake_server(old_release, features=0) as port:
            peers = Peers(SECRET, 5.0)
            assert await peers.list_chunks(9, ("127.0.0.1", port), POOL, 0) is None
            await peers.close()
        assert not served, "a request was sent to a release that does not know it"
        async with fake_server(hang_up) as port:
            peers = Peers(SECRET, 5.0)
            with pytest.raises(ConnectionLost):
                await peers.list_chunks(9, ("127.0.0.1", port), POOL, 0)
            await peers.close()
        async with fake_server(same_page) as port:
            cl = await WireClient.connect("127.0.0.1", port, SECRET, PeerRole.SDS_PEER)
            assert cl.features & FEATURE_CHUNK_LIST
            with pytest.raises(ProtocolError, match="out of order"):
                await cl.list_chunks(POOL, 0, page=2)
            await cl.close()

    asyncio.run(main())
