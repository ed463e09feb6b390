"""The SDS's side of a FLUSH, in one process (docs/sds.md, "Crash safety" 8): only
the devices written since their last sync are synced, a FLUSH that finds a device
clean still waits for a sync of it in progress, the peers are REPL_FLUSHed at the
same time as the local sync, and a FLUSH waits for a REPL_FLUSH an earlier one has
in progress. The SDC's side is in tests/test_sdc_units.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshblock.chunks import CHUNK_SIZE
from meshblock.sds import device_io
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.metrics import SdsCollector
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec
from meshblock.wire.client import ConnectionLost
from meshblock.wire.protocol import REQUEST_MAGIC, Op, Request, Status

pytestmark = pytest.mark.unit

VOLUME = 3
PEER = 2


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    s = ChunkStore([DeviceSpec(str(tmp_path / f"dev{i}.img"), 64 << 20, "p") for i in (0, 1)])
    s.open()
    yield s
    s.close()


class SlowSync:
    """device_io.fdatasync replaced: each call waits for ``release`` (in its thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        monkeypatch.setattr(device_io, "fdatasync", self._fdatasync)

    def _fdatasync(self, fd: int) -> None:
        self.calls += 1
        self.started.set()
        if not self.release.wait(10):
            raise AssertionError("fdatasync never released")


def test_only_devices_written_since_their_last_sync_are_synced(store: ChunkStore) -> None:
    """Counted by meshblock_sds_device_syncs_total: the first FLUSH syncs both
    devices (a new process does not know what an earlier one left unsynced), a
    FLUSH after a write to one device syncs only that one, a FLUSH with nothing
    written syncs none."""
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    resync = Resync(sds)
    svc = DataService(sds, resync)
    registry = CollectorRegistry()
    registry.register(SdsCollector(sds, resync))
    a, b = store.devices

    def syncs() -> list[float]:
        return [
            registry.get_sample_value("meshblock_sds_device_syncs_total", {"device": d.path}) or 0.0
            for d in (a, b)
        ]

    async def flush() -> int:
        return await _flush_of(svc)

    async def main() -> None:
        assert await flush() == Status.OK
        assert syncs() == [1.0, 1.0]
        store.write(a, VOLUME, 0, 0, b"a" * 4096)
        assert await flush() == Status.OK
        assert syncs() == [2.0, 1.0]
        assert await flush() == Status.OK
        assert syncs() == [2.0, 1.0]
        store.zero(VOLUME, 0, 4096, 4096)  # an overwrite in place, on a
        store.write(b, VOLUME, 1, 0, b"b" * 4096)
        assert await flush() == Status.OK
        assert syncs() == [3.0, 2.0]

    asyncio.run(main())


class Conn:
    def __init__(self) -> None:
        self.allowed = frozenset(Op)
        self.role = "client"
        self.status: int | None = None

    def reply(
        self,
        req_id: int,
        status: int,
        epoch: int,
        flags: int,
        payload: memoryview | None,
        length: int = -1,
    ) -> None:
        self.status = status


@pytest.mark.parametrize("change", ["new chunk", "overwrite", "zero part", "free", "mark bad"])
def test_every_change_marks_its_device_dirty(store: ChunkStore, change: str) -> None:
    dev = store.devices[0]
    store.write(dev, VOLUME, 0, 0, b"x" * 8192)
    asyncio.run(store.sync())
    assert not dev.dirty
    if change == "new chunk":
        store.write(dev, VOLUME, 1, 0, b"y" * 4096)
    elif change == "overwrite":
        store.write(dev, VOLUME, 0, 100, b"y" * 10)
    elif change == "zero part":
        store.zero(VOLUME, 0, 4096, 4096)
    elif change == "free":
        store.zero(VOLUME, 0, 0, CHUNK_SIZE)
    else:
        store.mark_bad(VOLUME, 0, 0, 4096)
    assert dev.dirty and not store.devices[1].dirty


def test_a_flush_of_a_clean_device_waits_for_its_sync_in_progress(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync cleared the device's mark and its fdatasync is running: a second FLUSH
    finds the device clean, and must still not return before that fdatasync did (the
    write before it is not durable until then)."""
    dev = store.devices[0]
    store.write(dev, VOLUME, 0, 0, b"a" * 4096)
    asyncio.run(store.sync())
    store.write(dev, VOLUME, 0, 0, b"b" * 4096)
    slow = SlowSync(monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(store.sync_dirty(store.devices))
        await asyncio.get_running_loop().run_in_executor(None, slow.started.wait, 5)
        assert not dev.dirty and slow.calls == 1
        second = asyncio.ensure_future(store.sync_dirty(store.devices))
        await asyncio.sleep(0.1)
        assert not second.done(), "a FLUSH returned before the sync covering it finished"
        slow.release.set()
        await asyncio.gather(first, second)
        assert slow.calls == 1  # the second one did not sync again

    asyncio.run(main())


class FakePeer:
    """A peer connection whose REPL_FLUSH waits for ``release``."""

    def __init__(self) -> None:
        self.closed = False
        self.flushes = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def repl_flush(self) -> None:
        self.flushes += 1
        self.started.set()
        await self.release.wait()


def _peers_with(peer: FakePeer) -> Peers:
    peers = Peers("secret", 5.0)
    peers._clients[PEER] = peer  # type: ignore[assignment]
    peers._addresses[PEER] = ("127.0.0.1", 1)
    return peers


def test_a_flush_waits_for_an_earlier_ones_repl_flush() -> None:
    """FLUSH 1 took the peer out of the dirty set and its REPL_FLUSH is running: FLUSH 2
    (nothing forwarded since) must not be answered before it is done."""
    peer = FakePeer()
    peers = _peers_with(peer)

    async def main() -> None:
        peers.dirty.add(PEER)
        first = asyncio.ensure_future(peers.flush())
        await peer.started.wait()
        assert not peers.dirty and peers.unflushed
        second = asyncio.ensure_future(peers.flush())
        await asyncio.sleep(0.05)
        assert not second.done()
        peer.release.set()
        assert await first == [] and await second == []
        assert peer.flushes == 1 and not peers.unflushed

    asyncio.run(main())


def test_the_local_sync_and_the_peers_flush_run_at_once(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device's fdatasync waits until the peer's REPL_FLUSH has begun, and the
    REPL_FLUSH until the fdatasync has: one after the other, the FLUSH never ends."""
    peer = FakePeer()
    sds = SdsState(store, MapCache(), _peers_with(peer), SdsStats())
    svc = DataService(sds, Resync(sds))
    slow = SlowSync(monkeypatch)
    sds.peers.dirty.add(PEER)
    conn = Conn()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        svc.handle(
            conn, Request(REQUEST_MAGIC, Op.FLUSH, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0), memoryview(b"")
        )
        ok = await loop.run_in_executor(None, slow.started.wait, 5)
        assert ok, "the devices were not synced"
        await asyncio.wait_for(peer.started.wait(), 5)  # while the fdatasync runs
        peer.release.set()
        slow.release.set()
        for _ in range(500):
            if conn.status is not None:
                break
            await asyncio.sleep(0.01)
        assert conn.status == Status.OK

    asyncio.run(main())


ME = 1
OTHER = 3


def _map_with_peer() -> PgMap:
    """PG 0: we are primary, PEER the secondary; PG 1: OTHER is primary, we are its
    secondary (nothing for us to flush)."""
    return PgMap(
        pool_id=1,
        epoch=5,
        pg_count=2,
        primary=((ME, 10), (OTHER, 30)),
        secondary=((PEER, 20), (ME, 10)),
        sds={ME: ("127.0.0.1", 1), PEER: ("127.0.0.1", 2), OTHER: ("127.0.0.1", 3)},
        doc={},
    )


async def _flush_of(svc: DataService) -> int:
    conn = Conn()
    svc.handle(
        conn, Request(REQUEST_MAGIC, Op.FLUSH, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0), memoryview(b"")
    )
    for _ in range(500):
        if conn.status is not None:
            return conn.status
        await asyncio.sleep(0.01)
    raise AssertionError("FLUSH got no reply")


def test_the_first_flush_of_a_new_process_flushes_every_secondary(store: ChunkStore) -> None:
    """A new SDS process does not know which peers its predecessor forwarded writes
    to that no REPL_FLUSH covered since: its first FLUSH REPL_FLUSHes the secondary
    of every PG it is primary of, though it forwarded nothing itself; the next one,
    with nothing forwarded, none. (Before: none at all.)"""
    peer = FakePeer()
    peer.release.set()
    cache = MapCache()
    cache.update(_map_with_peer())
    sds = SdsState(store, cache, _peers_with(peer), SdsStats())
    sds.set_identity(ME, {d.path: (10 + i, 1) for i, d in enumerate(store.devices)})
    svc = DataService(sds, Resync(sds))

    async def main() -> None:
        assert await _flush_of(svc) == Status.OK
        assert peer.flushes == 1
        assert OTHER not in sds.peers.dirty
        assert await _flush_of(svc) == Status.OK
        assert peer.flushes == 1

    asyncio.run(main())


class FailingPeer(FakePeer):
    """A peer whose REPL_FLUSH fails once released: lost, or with ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def repl_flush(self) -> None:
        await super().repl_flush()
        raise self.error


def test_a_failed_repl_flush_keeps_a_mark_made_since_it_began() -> None:
    """The REPL_FLUSH to a stale peer fails; a forward to it was acknowledged meanwhile
    (it may be in sync by the next FLUSH): dropping the stale peer keeps that mark.
    With no mark since, it is dropped. (Before: dropped in both cases.)"""
    peer = FailingPeer(ConnectionLost("reset"))
    peers = _peers_with(peer)

    async def main() -> None:
        peers.mark(PEER)
        first = asyncio.ensure_future(peers.flush())
        await peer.started.wait()
        peers.mark(PEER)  # a forward acknowledged during the REPL_FLUSH
        peer.release.set()
        assert await first == [PEER]
        assert peers.drop_unmarked([PEER]) == set()
        assert PEER in peers.dirty
        assert await peers.flush() == [PEER]
        assert peers.drop_unmarked([PEER]) == {PEER}
        assert not peers.dirty

    asyncio.run(main())


def test_a_repl_flush_that_raises_anything_keeps_the_mark() -> None:
    """An unexpected exception in a peer's REPL_FLUSH fails the FLUSH and keeps the
    peer marked. (Before: it reached the FLUSH task, which ended with no reply.)"""
    peer = FailingPeer(RuntimeError("a bug"))
    peer.release.set()
    peers = _peers_with(peer)

    async def main() -> None:
        peers.mark(PEER)
        assert await peers.flush() == [PEER]
        assert PEER in peers.dirty

    asyncio.run(main())


def test_a_flush_waiting_for_a_cancelled_sync_syncs_afresh(
    store: ChunkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync a FLUSH waits for (the device was clean) is cancelled (a drain): the
    FLUSH syncs the device itself. (Before: CancelledError, the FLUSH got no reply.)"""
    dev = store.devices[0]
    slow = SlowSync(monkeypatch)

    async def main() -> None:
        first = asyncio.ensure_future(store.sync([dev]))
        await asyncio.get_running_loop().run_in_executor(None, slow.started.wait, 5)
        second = asyncio.ensure_future(store.sync_dirty([dev]))
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.sleep(0.05)
        slow.release.set()
        await asyncio.wait_for(second, 10)
        assert slow.calls == 2 and not dev.dirty

    asyncio.run(main())
