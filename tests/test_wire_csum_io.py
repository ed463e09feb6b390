"""Checksums of payloads on the wire (docs/protocol.md §8.6) between a real client and
the SDS's data server in this process, on loopback: a write's checksums are checked
before anything is written (a damaged payload is refused with CHECKSUM_MISMATCH,
counted, nothing stored, the connection lives on), a READ's reply carries its
payload's checksums, and a client refuses a reply that does not match them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from _wire import EPOCH, PG_COUNT, POOL, SECRET, sds_server
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.pgmap_doc import SdsEndpoint
from meshblock.sdc.datapath import DataPathError, Piece
from meshblock.sdc.wire_path import WireDataPath
from meshblock.sds.checksums import BLOCK
from meshblock.wire import RequestError, WireClient, csum
from meshblock.wire.handshake import (
    FEATURE_CHUNK_LIST,
    SERVER_FEATURES,
    ClientHandshake,
    ServerHandshake,
)
from meshblock.wire.protocol import (
    REPLY_MAGIC_V2,
    REPLY_V2,
    REQUEST_V2,
    WIRE_V2_CSUM,
    Feature,
    Op,
    PeerRole,
    ReqFlag,
    Status,
)
from test_sds_checksums import data_offset, flip
from test_wire_csum import cancelling_write

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

VOL = 12


def ref(chunk: int) -> ChunkRef:
    return ChunkRef(POOL, pg_of(VOL, chunk, PG_COUNT), EPOCH, VOL, chunk)


async def session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made connection of a client with CSUM_CRC32C, after its handshake."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hs = ClientHandshake(SECRET.encode(), PeerRole.CLIENT)
    writer.write(hs.hello())
    while hs.need:
        writer.write(hs.feed(memoryview(await reader.readexactly(hs.need))))
    assert hs.version == 2 and hs.features & Feature.CSUM_CRC32C
    return reader, writer


def write_header(rid: int, chunk: int, offset: int, length: int) -> bytes:
    r = ref(chunk)
    return WIRE_V2_CSUM.pack_request_csum(
        Op.WRITE, 0, rid, r.pool_id, r.pg, r.epoch, VOL, chunk, offset, length, 1, 12
    )


def test_writes_and_reads_carry_checksums_end_to_end(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            assert cl.features == FEATURE_CHUNK_LIST | Feature.CSUM_CRC32C
            data = os.urandom(3 * 4096 + 700)
            await cl.write(ref(1), 0, data)
            await cl.write(ref(1), 5000, data[:9000])  # unaligned: partial units at both ends
            want = bytearray(data)
            want[5000:] = data[:9000]
            assert bytes(await cl.read(ref(1), 0, len(want))) == bytes(want)
            assert bytes(await cl.read(ref(1), 333, 8000)) == bytes(want[333:8333])
            await cl.close()
            # what a READ's reply carries: the payload, then one CRC32C per 4 KiB of it
            reader, writer = await session(server.port)
            r = ref(1)
            writer.write(
                WIRE_V2_CSUM.pack_request_csum(
                    Op.READ, 0, 9, r.pool_id, r.pg, r.epoch, VOL, 1, 0, len(want), 1, 12
                )
            )
            hdr = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
            assert hdr[1] == Status.OK and hdr[5] == len(want) and hdr[7:9] == (1, 12)
            payload = await reader.readexactly(len(want))
            sums = await reader.readexactly(4 * csum.reply_units(len(want)))
            assert payload == bytes(want) and sums == csum.trailer(payload)
            writer.close()

    asyncio.run(main())


def test_an_sds_that_keeps_no_checksums_announces_none(tmp_path: Path) -> None:
    """``[store] checksums = false``: the data server leaves CSUM_CRC32C out of its
    features, so neither side computes wire checksums it could not store."""

    async def main() -> None:
        async with sds_server(tmp_path, checksums=False) as (server, _):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            assert cl.features == FEATURE_CHUNK_LIST
            data = os.urandom(2 * 4096 + 100)
            await cl.write(ref(2), 300, data)
            assert bytes(await cl.read(ref(2), 300, len(data))) == data
            await cl.close()

    asyncio.run(main())


def test_a_damaged_write_payload_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            reader, writer = await session(server.port)
            data = bytearray(os.urandom(8192))
            sums = csum.trailer(data, 4096)
            data[5000] ^= 0x01  # damaged after its checksums were made
            writer.write(write_header(1, 3, 4096, len(data)) + bytes(data) + sums)
            hdr = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
            assert hdr[1] == Status.CHECKSUM_MISMATCH and hdr[5] == 0
            assert state.store.location(VOL, 3) is None  # nothing written
            assert state.stats.wire_checksum_mismatches == {"client": 1, "sds_peer": 0}
            # the connection lives on: the same payload intact is written
            data[5000] ^= 0x01
            writer.write(write_header(2, 3, 4096, len(data)) + bytes(data) + sums)
            hdr = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
            assert hdr[1] == Status.OK
            writer.close()
            got = state.store.read(VOL, 3, 4096, len(data))
            assert got is not None and bytes(got) == bytes(data)

    asyncio.run(main())


def test_a_write_whose_checksums_were_built_to_cancel_is_refused(tmp_path: Path) -> None:
    """A sender that chose the checksums with the bytes so that two units' differences
    cancel in one pass (a checksum and the next unit's first word XORed with the same
    value): the SDS checks the write unit by unit, refuses it and stores nothing,
    rather than keep checksums that disagree with the data."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            reader, writer = await session(server.port)
            data, sums = cancelling_write(5)
            writer.write(write_header(1, 4, 0, len(data)) + data + sums)
            hdr = REPLY_V2.unpack(await reader.readexactly(REPLY_V2.size))
            assert hdr[1] == Status.CHECKSUM_MISMATCH and hdr[5] == 0
            assert state.store.location(VOL, 4) is None  # nothing written
            assert state.stats.wire_checksum_mismatches == {"client": 1, "sds_peer": 0}
            writer.close()

    asyncio.run(main())


def test_a_payload_damaged_on_arrival_is_retriable_for_the_sdc(tmp_path: Path) -> None:
    """The test-only hook flips a byte of the next payload received: the client's
    write is refused (a retriable CHECKSUM_MISMATCH, the SDC's reason
    checksum_mismatch) and nothing is stored; sent again, it is written."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            svc = server._svc
            flips = [2]

            def flip(payload: memoryview) -> None:
                if flips[0]:
                    flips[0] -= 1
                    payload[0] ^= 0xFF

            svc.corrupt_payload = flip
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            data = os.urandom(4096)
            with pytest.raises(RequestError) as ei:
                await cl.write(ref(4), 0, data)
            assert ei.value.status == Status.CHECKSUM_MISMATCH and ei.value.retriable
            assert state.store.location(VOL, 4) is None
            await cl.close()
            path = WireDataPath(SECRET)
            sds = SdsEndpoint(1, "127.0.0.1", server.port)
            piece = Piece(Op.WRITE, 0, ref(4), 0, 4096, data)
            with pytest.raises(DataPathError) as dp:
                await path.call(sds, piece)
            assert dp.value.reason == "checksum_mismatch" and dp.value.retriable
            assert state.store.location(VOL, 4) is None
            await path.call(sds, piece)  # the hook is spent: written
            reply = await path.call(sds, Piece(Op.READ, 0, ref(4), 0, 4096, None))
            assert bytes(reply.payload) == data
            assert state.stats.wire_checksum_mismatches["client"] == 2
            await path.close()

    asyncio.run(main())


def test_a_read_the_client_checks_gets_the_stored_checksums_unchecked(tmp_path: Path) -> None:
    """READ with CLIENT_CHECKS (docs/sds.md, "Checksums"): the SDS sends the checksums
    it keeps without checking the bytes against them, the client's check covering
    that and more. A block flipped on the device reaches the client with its stored
    checksum, which the client refuses (CHECKSUM_MISMATCH), and the SDS has counted
    nothing; the same READ without the flag is checked by the SDS, which finds the
    block bad and counts it (no other copy here to heal it from: IO_ERROR)."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            store = state.store
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET)
            data = os.urandom(CHUNK_SIZE)
            await cl.write(ref(5), 0, data)
            reply = await cl.call(Op.READ, ReqFlag.CLIENT_CHECKS, ref(5), 0, CHUNK_SIZE, None)
            assert bytes(reply.payload) == data
            flip(tmp_path / "dev.img", data_offset(store, VOL, 5, 7 * BLOCK + 9))
            with pytest.raises(RequestError) as ei:
                await cl.call(Op.READ, ReqFlag.CLIENT_CHECKS, ref(5), 0, CHUNK_SIZE, None)
            assert ei.value.status == Status.CHECKSUM_MISMATCH
            assert store.devices[0].checksum_errors == 0
            with pytest.raises(RequestError) as ei:
                await cl.call(Op.READ, 0, ref(5), 0, CHUNK_SIZE, None)
            assert ei.value.status == Status.IO_ERROR
            assert store.devices[0].checksum_errors == 1
            await cl.close()

    asyncio.run(main())


async def csum_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    features: int = SERVER_FEATURES,
) -> tuple[asyncio.Server, int]:
    """A hand-written server announcing ``features`` (default: this release's, with
    CSUM_CRC32C), answering with ``answer``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = ServerHandshake(SECRET.encode(), features)
        try:
            while hs.need:
                out, _ = hs.feed(memoryview(await reader.readexactly(hs.need)))
                writer.write(out)
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_read_reply_that_does_not_match_its_checksums_is_refused() -> None:
    """A READ reply whose payload was damaged after the SDS made its checksums: the
    client answers it CHECKSUM_MISMATCH (retriable), never the bytes; the next reply
    on the same connection, intact, is taken."""
    data = os.urandom(8192)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for damaged in (True, False):
            hdr = REQUEST_V2.unpack(await reader.readexactly(REQUEST_V2.size))
            assert hdr[1] == Op.READ and hdr[12:14] == (1, 12)  # it asked for checksums
            sums = csum.trailer(data)
            payload = bytearray(data)
            if damaged:
                payload[4096] ^= 0x80
            head = WIRE_V2_CSUM.pack_reply_csum(0, 0, hdr[4], EPOCH, len(data), 1, 12)
            writer.write(head + bytes(payload) + sums)
        await reader.read()

    async def main() -> None:
        server, port = await csum_server(answer)
        try:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            with pytest.raises(RequestError) as ei:
                await cl.read(ref(1), 0, len(data))
            assert ei.value.status == Status.CHECKSUM_MISMATCH and ei.value.retriable
            assert bytes(await cl.read(ref(1), 0, len(data))) == data
            await cl.close()
        finally:
            server.close()

    asyncio.run(main())


def test_a_server_without_the_bit_gets_writes_without_checksums(tmp_path: Path) -> None:
    """An SDS that does not announce CSUM_CRC32C (the release before it) is sent
    version 2's frames exactly as before: no checksum fields, no trailer."""
    seen: list[tuple[int, ...]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hdr = REQUEST_V2.unpack(await reader.readexactly(REQUEST_V2.size))
        seen.append(hdr)
        await reader.readexactly(hdr[11])
        writer.write(REPLY_V2.pack(REPLY_MAGIC_V2, 0, 0, hdr[4], EPOCH, 0, 0, 0, 0, 0, 0))
        await reader.read()

    async def main() -> None:
        server, port = await csum_server(answer, FEATURE_CHUNK_LIST)
        try:
            cl = await WireClient.connect("127.0.0.1", port, SECRET)
            assert cl.version == 2 and cl.features == FEATURE_CHUNK_LIST
            await cl.write(ref(1), 0, os.urandom(4096))
            await cl.close()
        finally:
            server.close()
        assert seen and seen[0][12:16] == (0, 0, 0, 0)

    asyncio.run(main())


def test_ops_without_payload_never_carry_checksums(tmp_path: Path) -> None:
    """A primary forwards WRITE_ZEROES and TRIM with an empty payload view: they leave
    without checksum fields (a peer drops a REPL_TRIM with them), answered as before."""

    async def main() -> None:
        async with sds_server(tmp_path) as (server, state):
            cl = await WireClient.connect("127.0.0.1", server.port, SECRET, PeerRole.SDS_PEER)
            assert cl.features & Feature.CSUM_CRC32C
            empty = memoryview(b"")
            for op in (Op.REPL_TRIM, Op.REPL_WRITE_ZEROES):
                with pytest.raises(RequestError) as ei:  # not this PG's secondary
                    await cl.call(op, 0, ref(1), 0, 4096, empty)
                assert ei.value.status == Status.NOT_REPLICA
            assert state.stats.protocol_errors == 0
            await cl.close()

    asyncio.run(main())
