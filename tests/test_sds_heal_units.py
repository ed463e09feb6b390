"""Reads and writes that heal (docs/sds.md, "Healing"), in process: the SDS's store on
a file, the PG's other copy a fake peer connection that serves its own copy the way
an SDS's checked CHUNK_READ_RAW does (a range with a block bad there is
``IO_ERROR``, never bytes) and takes forwarded writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds import heal, io_path, resync
from meshblock.sds.checksums import BLOCK, BLOCK_SHIFT
from meshblock.sds.heal import repair_from_peer, runs
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync, ResyncAborted, SourceLagging
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.wire import csum
from meshblock.wire.client import RawChunk, Reply, RequestError
from meshblock.wire.protocol import REQUEST_MAGIC, ROLE_OPS, Op, PeerRole, ReqFlag, Request, Status
from test_device_failstop_units import DEV_IDS, ME, PG_COUNT, POOL, Conn
from test_sds_checksums import VOL, data_offset, flip, open_store

pytestmark = pytest.mark.unit

PEER = ME + 1


class PeerCopy:
    """The other copy of a chunk as a peer SDS's connection gives it: ``data`` (the
    whole chunk), ``bad`` the blocks that do not match their checksums there."""

    def __init__(self, data: bytes, bad: Collection[int] = ()) -> None:
        self.data = data
        self.bad = set(bad)
        self.asked: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.refuse = Status.OK  # what a forwarded write is answered (not OK: not applied)
        # Raw reads sent by a map below this epoch are refused NOT_PERMITTED: this
        # copy's map does not name the reader yet (it lags, or the reader's does).
        self.names_us_from = 0
        self.refusals = 0  # the next raw reads refused NOT_PERMITTED all the same
        self.epochs: list[int] = []  # the map epoch each raw read was sent by

    def future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def submit(
        self,
        op: Op,
        flags: int,
        ref: Any,
        offset: int,
        length: int,
        payload: memoryview,
        fut: asyncio.Future[Any],
        sums: Any = None,
    ) -> asyncio.Future[Any]:
        """A forwarded write (or a copy job's): applied to this copy at once, answered OK."""
        assert op == Op.REPL_WRITE, op
        self.writes.append((offset, length))
        if self.refuse != Status.OK:  # answered after the primary wrote its copy
            reply = Reply(self.refuse, 0, 0, memoryview(b""))
            asyncio.get_running_loop().call_soon(fut.set_result, reply)
            return fut
        self.data = self.data[:offset] + bytes(payload[:length]) + self.data[offset + length :]
        fut.set_result(Reply(Status.OK, 0, 0, memoryview(b"")))
        return fut

    async def read_raw_chunk(
        self, volume: int, chunk: int, offset: int = 0, length: int = CHUNK_SIZE, epoch: int = 0
    ) -> RawChunk:
        self.epochs.append(epoch)
        if epoch < self.names_us_from or self.refusals:
            self.refusals = max(0, self.refusals - 1)
            raise RequestError(Op.CHUNK_READ_RAW, Status.NOT_PERMITTED, 1)
        lo, hi = offset >> BLOCK_SHIFT, (offset + length) >> BLOCK_SHIFT
        self.asked.append((lo, hi))
        if self.bad.intersection(range(lo, hi)):
            raise RequestError(Op.CHUNK_READ_RAW, Status.IO_ERROR, 1)
        return RawChunk(True, memoryview(self.data[offset : offset + length]))


def state_with_peer(
    tmp_path: Path, peer: PeerCopy, monkeypatch: pytest.MonkeyPatch, *, primary: bool = False
) -> SdsState:
    """Our store, the secondary (``primary``: the primary) of every PG of a clean map
    whose other copy is ``PEER``'s, reached through ``peer``."""
    store = open_store(tmp_path / "dev.img")
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    sds.set_identity(ME, {store.devices[0].path: (DEV_IDS[0], POOL)})
    theirs, mine = (PEER, 20), (ME, DEV_IDS[0])
    addresses = {ME: ("127.0.0.1", 1), PEER: ("127.0.0.1", 2)}
    first, second = (mine, theirs) if primary else (theirs, mine)
    m = PgMap(POOL, 1, PG_COUNT, (first,) * PG_COUNT, (second,) * PG_COUNT, addresses, {})
    sds.maps.update(m)

    def connected(sds_id: int, address: Any) -> Any:
        assert sds_id == PEER
        return peer

    monkeypatch.setattr(sds.peers, "connected", connected)
    return sds


def pattern() -> bytes:
    return b"".join(bytes([b % 251 + 1]) * BLOCK for b in range(CHUNK_SIZE // BLOCK))


def test_runs_of_blocks() -> None:
    assert runs([]) == []
    assert runs([7, 3, 4, 9, 5]) == [(3, 6), (7, 8), (9, 10)]


def test_blocks_bad_here_are_healed_though_the_peer_has_another_bad_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours bad at 10, 11 and 200, the peer's at 11 and 100: 10 and 200 are repaired
    (the peer holds them good), 11 is bad on both and stays bad. Fetching the range
    10-200 at once repaired nothing (the peer's IO_ERROR for its block 100)."""
    data = pattern()
    peer = PeerCopy(data, bad={11, 100})
    sds = state_with_peer(tmp_path, peer, monkeypatch)
    store = sds.store
    chunk = 1
    try:
        store.write(store.devices[0], VOL, chunk, 0, data)
        for b in (10, 11, 200):
            flip(tmp_path / "dev.img", data_offset(store, VOL, chunk, b * BLOCK + 5))
        left = asyncio.run(repair_from_peer(sds, VOL, chunk, [10, 11, 200]))
        assert left == [11]
        assert peer.asked == [(10, 12), (10, 11), (11, 12), (200, 201)]
        got = store.read(VOL, chunk, 0, 10 * BLOCK)
        assert got is not None and bytes(got) == data[: 10 * BLOCK]
        for b in (10, 200):
            got = store.read(VOL, chunk, b * BLOCK, BLOCK)
            assert got is not None and bytes(got) == data[b * BLOCK : (b + 1) * BLOCK]
        dev = store.devices[0]
        assert (dev.checksum_repaired, dev.checksum_unrepairable) == (2, 1)
    finally:
        store.close()


def partial_write(
    svc: DataService, conn: Conn, req_id: int, op: Op, offset: int, data: bytes
) -> None:
    """Send a WRITE / REPL_WRITE of ``data`` at ``offset`` of chunk 1 without checksums."""
    pg = pg_of(VOL, 1, PG_COUNT)
    hdr = Request(REQUEST_MAGIC, op, 0, 0, req_id, POOL, pg, 1, VOL, 1, offset, len(data))
    svc.handle(conn, hdr, memoryview(data))


async def answer(conn: Conn, req_id: int) -> int:
    await wait_until_async(
        lambda: req_id in conn.replies, 10, f"the reply to {req_id}", interval=0.01
    )
    return conn.replies[req_id][0]


@pytest.mark.parametrize("primary", [False, True], ids=["on-the-secondary", "on-the-primary"])
def test_a_write_of_part_of_a_bad_block_heals_it_then_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, primary: bool
) -> None:
    """A write of 100 bytes into a 4 KiB block bad on our copy: the block is repaired
    from the other copy (the primary's for a forwarded write on the secondary, the
    secondary's for a client's write on the primary, which has the forward or not),
    then written: OK, and both copies hold the same bytes. It was IO_ERROR (nothing
    written here; on the primary the secondary had already written its copy)."""
    data = pattern()
    peer = PeerCopy(data)
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=primary)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    role = PeerRole.CLIENT if primary else PeerRole.SDS_PEER
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[role])
    op = Op.WRITE if primary else Op.REPL_WRITE
    offset, new = 20 * BLOCK + 1000, b"w" * 100
    want = data[:offset] + new + data[offset + len(new) :]

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 20 * BLOCK + 3000))
        partial_write(svc, conn, 1, op, offset, new)
        assert await answer(conn, 1) == Status.OK
        if not primary:
            peer.data = want  # the primary wrote its copy

    try:
        asyncio.run(main())
        got = store.read(VOL, 1, 0, CHUNK_SIZE)
        assert got is not None and bytes(got) == want
        assert peer.data == want
        dev = store.devices[0]
        assert dev.checksum_repaired == 1
    finally:
        store.close()


def test_a_failover_read_does_not_heal_from_the_primary_it_came_around(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A READ with the REPLICA flag (the SDC came to us, the secondary, because the
    primary did not answer it) of a block bad here does not ask the primary for it:
    that could take longer than the SDC waits for us. NOT_PRIMARY at once, the block
    left bad for a read that reaches the primary. It fetched from the primary."""
    data = pattern()
    peer = PeerCopy(data)
    sds = state_with_peer(tmp_path, peer, monkeypatch)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 30 * BLOCK + 7))
        pg = pg_of(VOL, 1, PG_COUNT)
        hdr = Request(
            REQUEST_MAGIC, Op.READ, ReqFlag.REPLICA, 0, 1, POOL, pg, 1, VOL, 1, 0, CHUNK_SIZE
        )
        svc.handle(conn, hdr, memoryview(b""))
        assert await answer(conn, 1) == Status.NOT_PRIMARY

    try:
        asyncio.run(main())
        assert peer.asked == []
        dev = store.devices[0]
        assert (dev.checksum_repaired, dev.checksum_unrepairable) == (0, 1)
    finally:
        store.close()


def clean_map(epoch: int, primary: bool) -> PgMap:
    """Every PG clean, ours the primary's copy (``primary``) or the secondary's."""
    theirs, mine = (PEER, 20), (ME, DEV_IDS[0])
    first, second = (mine, theirs) if primary else (theirs, mine)
    addresses = {ME: ("127.0.0.1", 1), PEER: ("127.0.0.1", 2)}
    return PgMap(POOL, epoch, PG_COUNT, (first,) * PG_COUNT, (second,) * PG_COUNT, addresses, {})


def test_a_primary_that_lost_its_role_while_it_waited_does_not_write_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's write whose forward had to connect to the secondary first, during
    which a map came that makes us the secondary: our copy is left as it was and the
    write refused (EPOCH_STALE: the client retries on the newer map). The role was
    checked once, before the waits, and the stale primary wrote its copy."""
    data = pattern()
    peer = PeerCopy(data)
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])

    async def get(sds_id: int, address: Any) -> Any:
        sds.maps.update(clean_map(2, primary=False))  # demoted while connecting
        return peer

    monkeypatch.setattr(sds.peers, "connected", lambda sds_id, address: None)
    monkeypatch.setattr(sds.peers, "get", get)

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        partial_write(svc, conn, 1, Op.WRITE, 0, b"n" * BLOCK)
        assert await answer(conn, 1) == Status.EPOCH_STALE

    try:
        asyncio.run(main())
        got = store.read(VOL, 1, 0, BLOCK)
        assert got is not None and bytes(got) == data[:BLOCK]
    finally:
        store.close()


def test_a_write_the_secondary_refused_after_ours_is_recorded_for_the_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secondary refuses a forwarded write (NOT_REPLICA: its map is newer) that we
    wrote to our copy meanwhile: the client gets the refusal, and the chunk is in the
    record of writes the secondary lacks, which a delta resync copies. It was recorded
    nowhere: a write the client gave up on left the copies different for good."""
    data = pattern()
    peer = PeerCopy(data)
    peer.refuse = Status.NOT_REPLICA
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        partial_write(svc, conn, 1, Op.WRITE, 0, b"n" * BLOCK)
        assert await answer(conn, 1) != Status.OK

    try:
        asyncio.run(main())
        assert sds.degraded.chunks(POOL, pg_of(VOL, 1, PG_COUNT)) == {(VOL, 1)}
    finally:
        store.close()


@pytest.mark.parametrize("client_sums", [False, True], ids=["no-checksums", "checksums"])
def test_a_secondary_checksum_mismatch_reaches_only_a_client_that_sent_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_sums: bool
) -> None:
    """The secondary answers a forwarded write CHECKSUM_MISMATCH (the forward was
    damaged between the SDSs: the primary checksums its forwards on a connection
    with CSUM_CRC32C whatever its client sent). A client that sent checksums gets
    it (it sends the write again); one that did not (version 1, or no CSUM_CRC32C)
    may not know status 14 and gets REPLICA_FAILED, which it retries. It got 14."""
    peer = PeerCopy(pattern())
    peer.refuse = Status.CHECKSUM_MISMATCH
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])
    data = b"c" * BLOCK
    sums = csum.trailer(data) if client_sums else b""
    pg = pg_of(VOL, 1, PG_COUNT)
    hdr = Request(
        REQUEST_MAGIC, Op.WRITE, 0, 0, 1, POOL, pg, 1, VOL, 1, 0, len(data), 0,
        csum.CSUM_CRC32C if client_sums else 0, csum.CSUM_SHIFT if client_sums else 0,
    )  # fmt: skip

    async def main() -> int:
        svc.handle(conn, hdr, memoryview(data + sums))
        return await answer(conn, 1)

    try:
        status = asyncio.run(main())
        want = Status.CHECKSUM_MISMATCH if client_sums else Status.REPLICA_FAILED
        assert status == want
    finally:
        sds.store.close()


NEW = PEER + 1  # a new copy holder that reads from us


def held_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch: int
) -> tuple[SdsState, DataService, Conn, Request, Callable[[int, int], PgMap]]:
    """We are the primary of every PG at map 2, whose secondary is ``PEER``; ``NEW``'s
    raw read of block 0 of chunk 1, sent by its map ``epoch``, on a peer connection;
    and the maps of our pool (epoch, secondary) that may come next."""
    sds = state_with_peer(tmp_path, PeerCopy(pattern()), monkeypatch, primary=True)
    svc = DataService(sds, Resync(sds))
    names = {"peer": PEER, "new": NEW}
    addresses = {ME: ("127.0.0.1", 1), PEER: ("127.0.0.1", 2), NEW: ("127.0.0.1", 3)}
    mine = ((ME, DEV_IDS[0]),) * PG_COUNT

    def pgmap(epoch: int, secondary: int) -> PgMap:
        second = ((secondary, 30),) * PG_COUNT
        return PgMap(POOL, epoch, PG_COUNT, mine, second, addresses, {}, sds_names=names)

    sds.maps.update(pgmap(2, PEER))
    conn = Conn()
    conn.peer_sds = "new"  # type: ignore[attr-defined]
    refused = lambda r, why: conn.reply(r.request_id, Status.NOT_PERMITTED, 0, 0, None)  # noqa: E731
    conn.refuse = refused  # type: ignore[attr-defined]
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.SDS_PEER])
    pg = pg_of(VOL, 1, PG_COUNT)
    req = Request(REQUEST_MAGIC, int(Op.CHUNK_READ_RAW), 0, 0, 7, POOL, pg, epoch, VOL, 1, 0, BLOCK)
    sds.store.write(sds.store.devices[0], VOL, 1, 0, pattern())
    return sds, svc, conn, req, pgmap


def test_a_peer_read_waits_for_the_map_it_was_sent_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new copy holder's raw read sent by map 4 reaches us at map 2: the map after
    ours (3) does not name it yet; we wait on for 4, which does, and serve it (we
    refused it at 3 before: its heal took the refusal for a copy with no good block)."""
    sds, svc, conn, req, pgmap = held_read(tmp_path, monkeypatch, 4)

    async def main() -> None:
        svc.handle(conn, req, memoryview(b""))
        await asyncio.sleep(0.1)
        sds.maps.update(pgmap(3, PEER))
        await asyncio.sleep(0.2)
        sds.maps.update(pgmap(4, NEW))
        assert await answer(conn, 7) == Status.OK

    try:
        asyncio.run(main())
    finally:
        sds.store.close()


def test_a_peer_read_is_served_at_a_map_before_the_one_it_was_sent_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw read sent by map 5 reaches us at map 2; our map 3 names the reader and
    map 5 never comes: served at 3. Before, we waited for 5 alone, never looked at 3,
    and refused NOT_PERMITTED at the deadline with no last look at our map."""
    monkeypatch.setattr(io_path, "MAP_WAIT_S", 60.0)
    sds, svc, conn, req, pgmap = held_read(tmp_path, monkeypatch, 5)

    async def main() -> None:
        svc.handle(conn, req, memoryview(b""))
        await asyncio.sleep(0.1)
        assert 7 not in conn.replies  # waiting for a map that names the reader
        sds.maps.update(pgmap(3, NEW))
        assert await answer(conn, 7) == Status.OK

    try:
        asyncio.run(main())
    finally:
        sds.store.close()


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_peer_read_sent_by_an_older_map_than_ours_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch: int
) -> None:
    """A raw read sent by map 2 (or 1) whose reader our map 2 does not name: the
    reader's map is the one that lags, so it is refused at once, not after MAP_WAIT_S."""
    monkeypatch.setattr(io_path, "MAP_WAIT_S", 60.0)
    sds, svc, conn, req, _ = held_read(tmp_path, monkeypatch, epoch)

    async def main() -> int:
        svc.handle(conn, req, memoryview(b""))
        return await answer(conn, 7)

    try:
        assert asyncio.run(main()) == Status.NOT_PERMITTED
    finally:
        sds.store.close()


def test_a_copy_that_refuses_us_for_map_lag_is_asked_again_at_our_next_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our block 5 is bad; the peer's map does not name us at the epoch our read
    carries (1) and refuses NOT_PERMITTED: that is no answer about its block. Once
    our map moves to 2 the repair asks again, with epoch 2, and heals the block
    (before: the refusal was taken like a bad block there, and the block stayed bad)."""
    data = pattern()
    peer = PeerCopy(data)
    peer.names_us_from = 2
    sds = state_with_peer(tmp_path, peer, monkeypatch)
    store = sds.store
    m1 = sds.maps.maps[POOL]

    async def main() -> list[int]:
        repair = asyncio.create_task(repair_from_peer(sds, VOL, 1, [5]))
        await wait_until_async(lambda: peer.epochs == [1], 10, "the first raw read")
        sds.maps.update(PgMap(POOL, 2, PG_COUNT, m1.primary, m1.secondary, m1.sds, {}))
        return await repair

    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 5 * BLOCK + 5))
        assert asyncio.run(main()) == []
        assert peer.epochs == [1, 2]
        got = store.read(VOL, 1, 5 * BLOCK, BLOCK)
        assert got is not None and bytes(got) == data[5 * BLOCK : 6 * BLOCK]
    finally:
        store.close()


def test_a_copy_job_does_not_mark_bad_what_a_lagging_copy_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy job's source read finds block 5 bad and the only other copy refuses
    NOT_PERMITTED (its map lags; ours does not move): the chunk is not copied now
    (ResyncAborted: the job starts again later) and nothing is marked bad; before, the
    block was sent as zeroes and marked bad on the target for good."""
    monkeypatch.setattr(heal, "MAP_WAIT_S", 0.05)
    data = pattern()
    peer = PeerCopy(data)
    peer.names_us_from = 99
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    resync = Resync(sds)
    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 5 * BLOCK + 5))
        with pytest.raises(ResyncAborted, match="refused us"):
            asyncio.run(resync._source(VOL, 1))
        assert resync.marked_bad_total == 0 and peer.epochs == [1]
    finally:
        store.close()


def test_a_read_whose_good_copy_refuses_us_for_map_lag_is_retried_not_eio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client READ on the primary finds block 30 bad; the only other copy refuses
    NOT_PERMITTED (its map does not name us yet) and our map does not move: answered
    EPOCH_STALE, which the SDC retries after a map refresh (before: IO_ERROR, EIO at
    the application though that copy may hold the block good)."""
    monkeypatch.setattr(heal, "MAP_WAIT_S", 0.05)
    data = pattern()
    peer = PeerCopy(data)
    peer.names_us_from = 99
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])
    pg = pg_of(VOL, 1, PG_COUNT)
    req = Request(REQUEST_MAGIC, Op.READ, 0, 0, 1, POOL, pg, 1, VOL, 1, 0, CHUNK_SIZE)

    async def main() -> int:
        svc.handle(conn, req, memoryview(b""))
        return await answer(conn, 1)

    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 30 * BLOCK + 7))
        assert asyncio.run(main()) == Status.EPOCH_STALE
        assert peer.epochs == [1]
    finally:
        store.close()


def test_the_waits_for_our_next_map_end_one_map_wait_after_the_first_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block 5 is bad here; the only other copy refuses NOT_PERMITTED at every map,
    and our map moves on after each refusal (a rebuild whose finished PGs move the
    pool's epoch). The repair asks again at the newer maps, but stops one MAP_WAIT_S
    (0.3 s here) after the first refusal: it holds the chunk's range lock all along.
    Before, it went on for as long as the map moved (here for ever: it did not
    return within 10 s)."""
    monkeypatch.setattr(heal, "MAP_WAIT_S", 0.3)
    data = pattern()
    peer = PeerCopy(data)
    peer.names_us_from = 1 << 30
    sds = state_with_peer(tmp_path, peer, monkeypatch)
    store = sds.store
    m1 = sds.maps.maps[POOL]
    read_raw = peer.read_raw_chunk

    async def refused_then_a_new_map(*args: Any) -> RawChunk:
        epoch = sds.maps.epoch(POOL) + 1
        new = PgMap(POOL, epoch, PG_COUNT, m1.primary, m1.secondary, m1.sds, {})
        asyncio.get_running_loop().call_later(0.02, sds.maps.update, new)
        return await read_raw(*args)

    monkeypatch.setattr(peer, "read_raw_chunk", refused_then_a_new_map)

    async def main() -> tuple[list[int], set[int]]:
        lagging: set[int] = set()
        async with asyncio.timeout(10):
            left = await repair_from_peer(sds, VOL, 1, [5], lagging=lagging)
        return left, lagging

    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 5 * BLOCK + 5))
        assert asyncio.run(main()) == ([5], {PEER})
        assert len(peer.epochs) > 1 and peer.epochs == sorted(set(peer.epochs))
        assert not sds.locks, "the range lock is free again"
    finally:
        store.close()


@pytest.mark.parametrize("io", [Op.READ, Op.WRITE], ids=["read", "write"])
def test_a_clients_io_whose_copy_refuses_us_for_map_lag_does_not_wait_for_our_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io: Op
) -> None:
    """A client READ of chunk 1, or a WRITE into part of its block 30, on the primary:
    block 30 is bad here and the only other copy refuses NOT_PERMITTED. Answered
    EPOCH_STALE at once (the SDC refreshes its map and retries), the copy asked once;
    the chunk's range lock is not held while we wait for our next map (MAP_WAIT_S is
    60 s here: before, the answer came only at its end)."""
    monkeypatch.setattr(heal, "MAP_WAIT_S", 60.0)
    data = pattern()
    peer = PeerCopy(data)
    peer.names_us_from = 99
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])
    pg = pg_of(VOL, 1, PG_COUNT)

    async def main() -> int:
        if io == Op.READ:
            req = Request(REQUEST_MAGIC, Op.READ, 0, 0, 1, POOL, pg, 1, VOL, 1, 0, CHUNK_SIZE)
            svc.handle(conn, req, memoryview(b""))
        else:
            partial_write(svc, conn, 1, Op.WRITE, 30 * BLOCK + 100, b"w" * 100)
        return await answer(conn, 1)

    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 30 * BLOCK + 7))
        assert asyncio.run(main()) == Status.EPOCH_STALE
        assert peer.epochs == [1]
    finally:
        store.close()


@pytest.mark.parametrize("refusals", [2, 99], ids=["for-a-while", "for-long"])
def test_a_copy_job_tries_a_chunk_again_while_a_copy_refuses_its_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusals: int
) -> None:
    """A resync of chunk 1, whose block 5 is bad on us, the primary: the resync's
    target (the only other copy) refuses our repair NOT_PERMITTED (its map lags) for
    a while. The chunk is tried again RETRY_S apart, its range lock free in between:
    after two refusals the block is repaired and the chunk copied whole, and the job
    goes on; a copy that keeps refusing stops the job after LAG_RETRIES more tries
    (SourceLagging), nothing sent. Before, the first refusal stopped the job, which
    started over after RESTART_S, listed and copied its chunks again."""
    monkeypatch.setattr(heal, "MAP_WAIT_S", 0.05)
    monkeypatch.setattr(resync, "RETRY_S", 0.01)
    data = pattern()
    peer = PeerCopy(data)
    peer.refusals = refusals
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    m1 = sds.maps.maps[POOL]
    not_clean = (False,) * PG_COUNT
    m2 = PgMap(
        POOL, 2, PG_COUNT, m1.primary, m1.secondary, m1.sds, {}, not_clean, (True,) * PG_COUNT
    )
    sds.maps.update(m2)  # PG resyncing, before the Resync listens: no job of its own
    rs = Resync(sds)
    pg = pg_of(VOL, 1, PG_COUNT)
    rs._dest[(POOL, pg)] = (m2.secondary[pg], False)
    tries = resync.LAG_RETRIES + 1

    async def main() -> None:
        await rs._copy(POOL, pg, VOL, 1)

    try:
        store.write(store.devices[0], VOL, 1, 0, data)
        flip(tmp_path / "dev.img", data_offset(store, VOL, 1, 5 * BLOCK + 5))
        if refusals < tries:
            asyncio.run(main())
            assert peer.epochs == [2] * (refusals + 1)
            assert (rs.chunks_total, rs.marked_bad_total) == (1, 0)
            assert peer.writes == [(0, CHUNK_SIZE)] and peer.data == data
        else:
            with pytest.raises(SourceLagging, match="refused us"):
                asyncio.run(main())
            assert peer.epochs == [2] * tries
            assert (rs.chunks_total, rs.marked_bad_total, peer.writes) == (0, 0, [])
        assert not sds.locks
    finally:
        store.close()
