"""Forwarding a client's write from a PG's primary to its secondary and to a move's
target (docs/sds.md, "Forwarding"): one function, one error handling, and per role
what a failure makes of the client's write. The request handler
(meshblock.sds.io_path.DataService) is driven directly on a real store; the peers
are stand-ins that fail or answer as each test says (no socket)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from _wait import wait_until_async
from meshblock.chunks import ChunkRef, pg_of
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import NO_COPY, MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec
from meshblock.wire.client import ConnectionLost, Reply, WireClient
from meshblock.wire.protocol import REQUEST_MAGIC, Op, Request, Status

pytestmark = pytest.mark.unit

POOL, PG_COUNT, VOLUME, CHUNK = 3, 4, 5, 6
PG = pg_of(VOLUME, CHUNK, PG_COUNT)
ME, DEVICE, SECONDARY, TARGET = 1, 10, 2, 3
DATA = b"\x5a" * 4096


class Client:
    """A peer connection that records what is submitted; the test answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, ChunkRef, bytes]] = []
        self.waiters: list[asyncio.Future[Reply]] = []

    def future(self) -> asyncio.Future[Reply]:
        return asyncio.get_running_loop().create_future()

    def submit(self, op: Op, flags: int, ref: ChunkRef, *rest: Any) -> asyncio.Future[Reply]:
        """As ``WireClient.submit`` (offset, length, payload, waiter follow ``ref``)."""
        _, _, payload, waiter = rest
        self.sent.append((int(op), ref, bytes(payload or b"")))
        self.waiters.append(waiter)
        return cast("asyncio.Future[Reply]", waiter)

    def answer(self, status: Status) -> None:
        self.waiters.pop(0).set_result(Reply(int(status), 0, 1, memoryview(b"")))

    def lose(self) -> None:
        self.waiters.pop(0).set_exception(ConnectionLost("reset by peer"))


class FakePeers(Peers):
    """Peer ``sds_id``: a :class:`Client`, or None (its connection cannot be made: ``on_fail``
    runs first, as the map may change while a connect is tried)."""

    def __init__(self) -> None:
        super().__init__("secret", 5.0)
        self.clients: dict[int, Client | None] = {}
        self.on_fail: Callable[[], object] = lambda: None

    def connected(self, sds_id: int, address: tuple[str, int]) -> WireClient | None:
        return None

    async def get(self, sds_id: int, address: tuple[str, int]) -> WireClient:
        client = self.clients.get(sds_id)
        if client is None:
            self.on_fail()
            raise ConnectionLost(f"cannot connect to SDS {sds_id}: refused")
        return cast(WireClient, client)


class Replies:
    allowed = frozenset(int(op) for op in Op)
    role = "client"

    def __init__(self) -> None:
        self.got: dict[int, int] = {}

    def reply(
        self,
        request_id: int,
        status: int,
        epoch: int,
        flags: int,
        payload: memoryview | None,
        length: int = -1,
    ) -> None:
        self.got[request_id] = int(status)


def pg_map(epoch: int, *, clean: bool = True, target: bool = False) -> PgMap:
    return PgMap(
        pool_id=POOL,
        epoch=epoch,
        pg_count=PG_COUNT,
        primary=((ME, DEVICE),) * PG_COUNT,
        secondary=((SECONDARY, 20),) * PG_COUNT,
        sds={SECONDARY: ("127.0.0.1", 2), TARGET: ("127.0.0.1", 3)},
        doc={},
        clean=(clean,) * PG_COUNT,
        target=((TARGET, 30) if target else NO_COPY,) * PG_COUNT,
    )


class Primary:
    """Our SDS, primary of every PG, with the stand-in peers."""

    def __init__(self, tmp_path: Path) -> None:
        path = str(tmp_path / "dev.img")
        self.store = ChunkStore([DeviceSpec(path, 16 << 20, "pool")])
        self.store.open()
        self.peers = FakePeers()
        self.state = SdsState(self.store, MapCache(), self.peers, SdsStats())
        self.state.set_identity(ME, {path: (DEVICE, POOL)})
        self.unreachable: list[int] = []
        self.state.peer_unreachable = self.unreachable.append
        self.resync = Resync(self.state)
        # No copy job runs: a test says itself whether a move still copies.
        self.state.maps.listeners.remove(self.resync.map_changed)
        self.service = DataService(self.state, self.resync)
        self.conn = Replies()
        self.ids = iter(range(1, 100))

    def write(self, epoch: int) -> int:
        rid = next(self.ids)
        req = Request(
            REQUEST_MAGIC, Op.WRITE, 0, 0, rid, POOL, PG, epoch, VOLUME, CHUNK, 0, len(DATA)
        )
        self.service.handle(self.conn, req, memoryview(DATA))
        return rid

    async def answer(self, rid: int) -> int:
        await wait_until_async(lambda: rid in self.conn.got, 5, f"the reply to {rid}")
        return self.conn.got[rid]

    def written(self) -> bool:
        return self.store.read(VOLUME, CHUNK, 0, len(DATA)) is not None

    def copying(self) -> None:
        """As while a move of the PG still copies: misses are copied again."""
        self.resync._missed[(POOL, PG)] = set()

    def missed(self) -> set[tuple[int, int]]:
        return self.resync._missed.get((POOL, PG), set())


def run(tmp_path: Path, test: Callable[[Primary], Any]) -> None:
    async def main() -> None:
        p = Primary(tmp_path)
        try:
            await test(p)
            await p.service.drain()
        finally:
            p.store.close()

    asyncio.run(main())


def test_a_secondary_that_cannot_be_reached_fails_the_write_unapplied(tmp_path: Path) -> None:
    async def test(p: Primary) -> None:
        p.state.maps.update(pg_map(1))
        assert await p.answer(p.write(1)) == Status.REPLICA_FAILED
        assert not p.written()
        assert p.unreachable == [SECONDARY]
        assert p.state.stats.peer_errors == {SECONDARY: 1}

    run(tmp_path, test)


def test_a_secondary_lost_after_the_failover_map_is_a_write_done_alone(tmp_path: Path) -> None:
    """The connect fails after the MDM's map that makes us the PG's only copy arrived:
    the write is done alone and recorded for the resync."""

    async def test(p: Primary) -> None:
        p.state.maps.update(pg_map(1))
        p.peers.on_fail = lambda: p.state.maps.update(pg_map(2, clean=False))
        assert await p.answer(p.write(1)) == Status.OK
        assert p.written()
        assert p.state.degraded.chunks(POOL, PG) == {(VOLUME, CHUNK)}
        assert p.unreachable == [SECONDARY]

    run(tmp_path, test)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Status.OK, Status.OK),
        (Status.EPOCH_STALE, Status.EPOCH_STALE),
        (Status.SHUTTING_DOWN, Status.REPLICA_FAILED),
        (Status.IO_ERROR, Status.REPLICA_FAILED),
    ],
)
def test_the_secondarys_answer_is_the_clients(
    tmp_path: Path, answer: Status, status: Status
) -> None:
    async def test(p: Primary) -> None:
        sec = p.peers.clients[SECONDARY] = Client()
        p.state.maps.update(pg_map(1))
        rid = p.write(1)
        await wait_until_async(lambda: sec.waiters, 5, "the forward")
        assert sec.sent == [(Op.REPL_WRITE, ChunkRef(POOL, PG, 1, VOLUME, CHUNK), DATA)]
        assert p.written()  # our copy is written while the secondary's is in flight
        sec.answer(answer)
        assert await p.answer(rid) == status
        assert p.state.stats.peer_errors == ({} if answer == Status.OK else {SECONDARY: 1})
        assert SECONDARY in p.peers.dirty
        assert not p.unreachable

    run(tmp_path, test)


def test_a_secondary_lost_under_the_write_fails_it(tmp_path: Path) -> None:
    async def test(p: Primary) -> None:
        sec = p.peers.clients[SECONDARY] = Client()
        p.state.maps.update(pg_map(1))
        rid = p.write(1)
        await wait_until_async(lambda: sec.waiters, 5, "the forward")
        sec.lose()
        assert await p.answer(rid) == Status.REPLICA_FAILED
        assert p.unreachable == [SECONDARY]

    run(tmp_path, test)


@pytest.mark.parametrize("copying", [True, False])
@pytest.mark.parametrize("how", ["unreachable", "lost", "refused"])
def test_a_move_target_that_misses_the_write_fails_it_only_after_the_last_copy(
    tmp_path: Path, copying: bool, how: str
) -> None:
    """While the move copies, the chunk is copied again and the write is done (its two
    in-sync copies have it); once the move is past its last copy, the write fails.
    The target is reported to the MDM as the secondary would be."""

    async def test(p: Primary) -> None:
        sec = p.peers.clients[SECONDARY] = Client()
        tgt = p.peers.clients[TARGET] = None if how == "unreachable" else Client()
        p.state.maps.update(pg_map(1, target=True))
        if copying:
            p.copying()
        rid = p.write(1)
        await wait_until_async(lambda: sec.waiters, 5, "the forward to the secondary")
        if tgt is not None:
            assert len(tgt.waiters) == 1
            if how == "lost":
                tgt.lose()
            else:
                tgt.answer(Status.NOT_REPLICA)  # mapped as the secondary's: REPLICA_FAILED
        sec.answer(Status.OK)
        assert await p.answer(rid) == (Status.OK if copying else Status.REPLICA_FAILED)
        assert p.written()
        assert p.missed() == ({(VOLUME, CHUNK)} if copying else set())
        assert p.unreachable == ([] if how == "refused" else [TARGET])
        assert p.state.stats.peer_errors == {TARGET: 1}

    run(tmp_path, test)
