"""Fail-stop on device errors in the SDS, in one process: the chunk store and the
request handler (:class:`~meshblock.sds.io_path.DataService`) driven directly, with
EIO injected into one device's calls by the store's test fault hook
(:mod:`meshblock.sds.device_io`, installed in this process); the cluster test,
tests/test_device_failure.py, injects it into running SDSs.

The rule under test (docs/sds.md, "Device errors"): after an fdatasync error the
kernel has dropped the pages it could not write, so a later fdatasync may succeed
without them. A device is failed at its first IO error; from then on nothing is
written to it, read from it or synced on it, and no FLUSH or FUA that covers it
ever succeeds again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds import device_io
from meshblock.sds.device_io import FaultHook
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.metrics import SdsCollector
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, Device, DeviceFailed, DeviceSpec
from meshblock.wire.protocol import REQUEST_MAGIC, Op, Request, Status

pytestmark = pytest.mark.unit

POOL = 7
VOLUME = 3
PG_COUNT = 2
ME, OTHER = 1, 2
DEV_IDS = (10, 11)  # our devices' MDM ids: PG 0 on the first, PG 1 on the second


class Faults:
    """The store's fault hook, and how many calls of each op reached a device while
    armed: armed for good after a device failed, a count that moves means the store
    called the device again."""

    def __init__(self, hook: FaultHook) -> None:
        self.hook = hook

    def fail(self, dev: Device, op: str) -> None:
        self.hook.fail(dev.path, op)

    def clear(self) -> None:
        self.hook.clear()

    def calls(self, dev: Device, op: str) -> int:
        return self.hook.injected.get(dev.path, {}).get(op, 0)

    def watch(self, dev: Device) -> None:
        """Arm every op on ``dev`` for good: any call that reaches it is counted."""
        for op in device_io.OPS:
            self.hook.fail(dev.path, op)

    def reached(self, dev: Device) -> dict[str, int]:
        return dict(self.hook.injected.get(dev.path, {}))


@pytest.fixture
def faults() -> Iterator[Faults]:
    """Installed before the stores open their devices, as the hook needs."""
    hook = device_io.install_fault_hook()
    try:
        yield Faults(hook)
    finally:
        device_io.uninstall_fault_hook()


@pytest.fixture
def store(tmp_path: Path, faults: Faults) -> Iterator[ChunkStore]:
    s = ChunkStore([DeviceSpec(str(tmp_path / f"dev{i}.img"), 64 << 20, "p") for i in (0, 1)])
    s.open()
    yield s
    s.close()


def test_an_fdatasync_error_fails_the_device_and_no_later_sync_succeeds(
    store: ChunkStore, faults: Faults
) -> None:
    """The second fdatasync after an error would succeed (the kernel dropped the dirty
    pages): the store must not issue it, and must keep raising."""
    bad, good = store.devices
    failures: list[Device] = []
    store.on_failure = failures.append

    async def main() -> None:
        store.write(bad, VOLUME, 0, 0, b"a" * 4096)
        store.write(good, VOLUME, 1, 0, b"b" * 4096)
        faults.fail(bad, "fdatasync")
        with pytest.raises(DeviceFailed):
            await store.sync()
        assert bad.failed and "fdatasync" in bad.failed and not good.failed
        assert failures == [bad]
        faults.clear()  # fdatasync "works" again (the kernel dropped the pages)
        with pytest.raises(DeviceFailed):
            await store.sync([bad])
        faults.watch(bad)
        before = faults.reached(bad)
        with pytest.raises(DeviceFailed):
            await store.sync()
        assert faults.reached(bad) == before, "a failed device was synced again"
        await store.sync([good])
        assert failures == [bad]

    asyncio.run(main())
    before = faults.reached(bad)
    with pytest.raises(DeviceFailed):
        store.read(VOLUME, 0, 0, 4096)
    with pytest.raises(DeviceFailed):
        store.write(bad, VOLUME, 0, 0, b"c" * 4096)  # an existing chunk on it
    with pytest.raises(DeviceFailed):
        store.write(bad, VOLUME, 2, 0, b"c" * 4096)  # a new chunk for it
    with pytest.raises(DeviceFailed):
        store.zero(VOLUME, 0, 0, CHUNK_SIZE)
    assert faults.reached(bad) == before, "a failed device was read or written"
    assert bytes(store.read(VOLUME, 1, 0, 4096) or b"") == b"b" * 4096


@pytest.mark.parametrize("call", ["pwrite", "pread"])
def test_a_write_or_read_error_fails_the_device(
    store: ChunkStore, faults: Faults, call: str
) -> None:
    """A read error fails the device too: what else it lost is unknown, and its PGs
    are rebuilt from the other copy."""
    bad = store.devices[0]
    store.write(bad, VOLUME, 0, 0, b"a" * 4096)
    faults.fail(bad, call)
    with pytest.raises(DeviceFailed):
        if call == "pwrite":
            store.write(bad, VOLUME, 0, 0, b"x" * 4096)
        else:
            store.read(VOLUME, 0, 0, 4096)
    assert bad.failed and call in bad.failed
    faults.clear()
    with pytest.raises(DeviceFailed):
        store.read(VOLUME, 0, 0, 4096)
    with pytest.raises(DeviceFailed):
        asyncio.run(store.sync([bad]))


def test_a_failed_device_stays_failed_after_a_restart(tmp_path: Path, faults: Faults) -> None:
    """A restart does not bring a failed device back: the SDS passes the failed
    devices it saved, and the store leaves them closed, until the device there is
    another one (replaced, or its first 4 KiB zeroed)."""
    specs = [DeviceSpec(str(tmp_path / f"dev{i}.img"), 64 << 20, "p") for i in (0, 1)]
    first = ChunkStore(specs)
    first.open()
    bad = first.devices[0]
    first.write(bad, VOLUME, 0, 0, b"a" * 4096)
    faults.fail(bad, "pwrite")
    with pytest.raises(DeviceFailed):
        first.write(bad, VOLUME, 0, 0, b"b" * 4096)
    faults.clear()
    saved = {bad.path: bad.uuid.hex()}
    first.close()

    again = ChunkStore(specs, saved)
    again.open()
    try:
        dev = again.devices[0]
        assert dev.failed and not dev.loaded and dev.fd == -1
        assert again.location(VOLUME, 0) is None  # not loaded: the SDS answers DEVICE_FAILED
        with pytest.raises(DeviceFailed):
            asyncio.run(again.sync())
    finally:
        again.close()

    with open(specs[0].path, "r+b") as f:  # the operator zeroes it to reuse it
        f.write(bytes(4096))
    replaced = ChunkStore(specs, saved)
    replaced.open()
    try:
        dev = replaced.devices[0]
        assert not dev.failed and dev.loaded and dev.uuid.hex() != saved[dev.path]
        asyncio.run(replaced.sync())
    finally:
        replaced.close()


class Conn:
    """Stands in for a data connection: records the replies."""

    def __init__(self) -> None:
        self.allowed = frozenset(Op)
        self.role = "client"
        self.replies: dict[int, tuple[int, memoryview | None]] = {}

    def reply(
        self,
        req_id: int,
        status: int,
        epoch: int,
        flags: int,
        payload: memoryview | None,
        length: int = -1,
    ) -> None:
        self.replies[req_id] = (status, payload)


def _pg_map(epoch: int, ours: set[int]) -> PgMap:
    """PG n on our device ``DEV_IDS[n]`` as primary when n in ``ours``, else on the
    other SDS (ours then the stale secondary); every PG degraded (no forwarding)."""
    primary, secondary = [], []
    for pg in range(PG_COUNT):
        mine, theirs = (ME, DEV_IDS[pg]), (OTHER, 20)
        primary.append(mine if pg in ours else theirs)
        secondary.append(theirs if pg in ours else mine)
    return PgMap(
        pool_id=POOL,
        epoch=epoch,
        pg_count=PG_COUNT,
        primary=tuple(primary),
        secondary=tuple(secondary),
        sds={ME: ("127.0.0.1", 1), OTHER: ("127.0.0.1", 2)},
        doc={},
        clean=(False,) * PG_COUNT,
    )


def test_requests_on_a_failed_device_are_refused_and_flush_waits_for_the_failover(
    store: ChunkStore, faults: Faults
) -> None:
    """After an fdatasync error: FLUSH answers DEVICE_FAILED (retriable) as long as
    the map names the device as an in-sync copy, even once fdatasync would work
    again; reads and writes of its PGs too, those of the other device are served.
    Once the MDM's map has failed the PG over, FLUSH covers the working device."""
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    sds.set_identity(ME, {d.path: (DEV_IDS[i], POOL) for i, d in enumerate(store.devices)})
    resync = Resync(sds)
    svc = DataService(sds, resync)
    reported: list[Device] = []
    sds.device_failed = reported.append
    conn = Conn()
    ids = iter(range(1, 1000))
    chunk_of = {pg_of(VOLUME, c, PG_COUNT): c for c in range(8)}

    def request(op: Op, epoch: int, pg: int = 0, data: bytes = b"") -> int:
        req = next(ids)
        length = len(data) or (4096 if op == Op.READ else 0)
        hdr = Request(
            REQUEST_MAGIC, op, 0, 0, req, POOL, pg, epoch, VOLUME, chunk_of[pg], 0, length
        )
        svc.handle(conn, hdr, memoryview(data))
        return req

    async def answer(req: int) -> int:
        for _ in range(500):
            if req in conn.replies:
                return conn.replies[req][0]
            await asyncio.sleep(0.01)
        raise AssertionError(f"request {req} got no reply")

    async def main() -> None:
        sds.maps.update(_pg_map(1, {0, 1}))
        for pg in (0, 1):
            assert await answer(request(Op.WRITE, 1, pg, b"w" * 4096)) == Status.OK
        assert await answer(request(Op.FLUSH, 1)) == Status.OK
        bad = store.devices[0]
        assert await answer(request(Op.WRITE, 1, 0, b"v" * 4096)) == Status.OK
        faults.fail(bad, "fdatasync")
        assert await answer(request(Op.FLUSH, 1)) == Status.DEVICE_FAILED
        assert reported == [bad]
        faults.clear()
        # The kernel evicts the pages the failed fdatasync dropped: the device now
        # holds the older bytes ("w"), and an fdatasync would succeed.
        assert faults.hook.evict() > 0
        faults.watch(bad)
        before = faults.reached(bad)
        assert await answer(request(Op.FLUSH, 1)) == Status.DEVICE_FAILED
        assert await answer(request(Op.READ, 1, 0)) == Status.DEVICE_FAILED
        assert await answer(request(Op.WRITE, 1, 0, b"x" * 4096)) == Status.DEVICE_FAILED
        assert await answer(request(Op.READ, 1, 1)) == Status.OK
        assert await answer(request(Op.WRITE, 1, 1, b"y" * 4096)) == Status.OK
        assert Status.DEVICE_FAILED.retriable

        sds.maps.update(_pg_map(2, {1}))  # the MDM failed PG 0 over to the other SDS
        assert await answer(request(Op.FLUSH, 2)) == Status.OK
        assert faults.reached(bad) == before, "a failed device was used again"
        assert await answer(request(Op.READ, 2, 0)) == Status.NOT_PRIMARY

    asyncio.run(main())
    registry = CollectorRegistry()
    registry.register(SdsCollector(sds, resync))
    for i, dev in enumerate(store.devices):
        value = registry.get_sample_value("meshblock_sds_device_failed", {"device": dev.path})
        assert value == (1.0 if i == 0 else 0.0), (dev.path, value)
