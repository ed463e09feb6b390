"""The SDS's copy jobs (meshblock.sds.resync) in one process: two real data services
on loopback, a primary and the secondary it resynchronises, with the maps handed to
them directly and the MDM's answer to ``pg-synced`` given by the test (the MDM itself
is exercised by tests/test_resync.py and tests/test_rebuild.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.server import DataServer
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

SECRET = "resync-test-secret"
POOL = 3
VOLUME = 5
PG_COUNT = 4
PRIMARY_SDS, SECONDARY = 1, (2, 20)
PRIMARY_DEVICES = {10: (0, 1), 11: (2, 3)}  # device of the primary -> the PGs it holds


def primary_of(pg: int) -> tuple[int, int]:
    return next((PRIMARY_SDS, d) for d, pgs in PRIMARY_DEVICES.items() if pg in pgs)


class Pair:
    def __init__(
        self, primary: SdsState, resync: Resync, secondary: SdsState, ports: dict[int, int]
    ) -> None:
        self.primary, self.secondary, self.ports = primary, secondary, ports
        self.resync = resync  # the primary's copy jobs
        self.secondary_service: DataService | None = None
        self.reports: list[tuple[int, int, int]] = []
        self.accept_at: int | None = None  # the MDM's answer: the new map epoch, or refuse

    async def report(self, pool: int, pg: int, epoch: int) -> int | None:
        self.reports.append((pool, pg, epoch))
        return self.accept_at

    def deliver(
        self, epoch: int, resyncing: set[int], rebuilding: frozenset[int] = frozenset(), **kw: Any
    ) -> None:
        """A map of ``epoch`` in which the PGs ``resyncing`` are resyncing and those in
        ``rebuilding`` rebuilding (``kw``: the pool's throttles), to both SDSs."""
        m = PgMap(
            pool_id=POOL,
            epoch=epoch,
            pg_count=PG_COUNT,
            primary=tuple(primary_of(pg) for pg in range(PG_COUNT)),
            secondary=(SECONDARY,) * PG_COUNT,
            sds={sid: ("127.0.0.1", port) for sid, port in self.ports.items()},
            doc={},
            clean=tuple(pg not in resyncing | rebuilding for pg in range(PG_COUNT)),
            resyncing=tuple(pg in resyncing for pg in range(PG_COUNT)),
            rebuilding=tuple(pg in rebuilding for pg in range(PG_COUNT)),
            **kw,
        )
        for sds in (self.secondary, self.primary):
            sds.maps.update(m)


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """The primary SDS (two devices in the pool) and the secondary (one)."""
    async with AsyncExitStack() as stack:
        states, resyncs, services, ports = [], [], [], {}
        for sds_id, dev_ids in ((PRIMARY_SDS, list(PRIMARY_DEVICES)), (SECONDARY[0], [20])):
            paths = {str(tmp_path / f"dev{d}.img"): (d, POOL) for d in dev_ids}
            store = ChunkStore([DeviceSpec(path, 1 << 30, "pool") for path in paths])
            store.open()
            stack.callback(store.close)
            sds = SdsState(store, MapCache(), Peers(SECRET, 5.0), SdsStats())
            sds.set_identity(sds_id, paths)
            resync = Resync(sds)
            service = DataService(sds, resync)
            services.append(service)
            server = DataServer(service, SECRET)
            await server.start("127.0.0.1", 0)
            stack.push_async_callback(server.stop)
            stack.push_async_callback(sds.peers.close)
            stack.push_async_callback(resync.close)
            states.append(sds)
            resyncs.append(resync)
            ports[sds_id] = server.port
        p = Pair(states[0], resyncs[0], states[1], ports)
        p.secondary_service = services[1]
        p.resync.reporter = p.report
        yield p


def test_a_map_older_than_the_accepted_report_starts_no_new_job(tmp_path: Path) -> None:
    """The MDM accepts PG 0's report at map epoch 7; a map of epoch 6 (made for another
    PG's report, in flight meanwhile) still shows PG 0 resyncing. It must not start
    a second copy of PG 0, which would copy the PG again and report in vain. A map
    at or past 7 that names a copy again (a new failure) does start one."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            rs = p.resync
            p.accept_at = 7
            p.deliver(5, {0, 1})
            await wait_until_async(
                lambda: len(p.reports) == 2 and not rs.jobs, 10, "both PGs reported", interval=0.01
            )
            assert sorted(p.reports) == [(POOL, 0, 5), (POOL, 1, 5)]
            assert rs.pgs_total == 2

            p.accept_at = None  # the MDM refuses what it already accepted
            p.deliver(6, {0})  # PG 1 clean at 6; PG 0's clean map (7) not yet here
            assert not rs.active(), rs.active()
            await asyncio.sleep(0.3)
            assert len(p.reports) == 2 and not rs.active(), (p.reports, rs.active())

            p.deliver(7, set())
            assert not rs.active()
            p.accept_at = 9
            p.deliver(8, {0})  # the secondary failed and returned: a new resync
            await wait_until_async(
                lambda: len(p.reports) == 3 and not rs.jobs,
                10,
                "the new resync reported",
                interval=0.01,
            )
            assert p.reports[-1] == (POOL, 0, 8) and rs.pgs_total == 3

    asyncio.run(main())


def test_copies_are_throttled_per_source_device(tmp_path: Path) -> None:
    """The pool's rebuild throttle holds for each device that copies, not for the
    SDS: two devices of the primary each send their chunks 1 MiB / (2 MiB/s) apart,
    and side by side (their first chunks go together, not 500 ms apart). The slow rate
    leaves room for a busy machine's scheduling delays in the "together" check (at 10
    MiB/s its margin was 75 ms, and it failed under load)."""
    mibps, per_device = 2, 4
    interval = 1.0 / mibps

    async def main() -> None:
        async with pair(tmp_path) as p:
            rs = p.resync
            store = p.primary.store
            wanted = {d: 0 for d in PRIMARY_DEVICES}
            chunk_device: dict[tuple[int, int], int] = {}
            for c in range(1000):
                dev_id = primary_of(pg_of(VOLUME, c, PG_COUNT))[1]
                if wanted[dev_id] == per_device:
                    continue
                dev = store.device_by_mdm_id(dev_id)
                assert dev is not None
                store.write(dev, VOLUME, c, 0, bytes([c % 251]) * CHUNK_SIZE)
                wanted[dev_id] += 1
                chunk_device[(VOLUME, c)] = dev_id
                if sum(wanted.values()) == per_device * len(PRIMARY_DEVICES):
                    break
            sends: list[tuple[float, int]] = []
            copy = rs._copy

            async def logged(pool: int, pg: int, volume: int, chunk: int) -> None:
                sends.append((time.monotonic(), chunk_device[(volume, chunk)]))
                await copy(pool, pg, volume, chunk)

            rs._copy = logged  # type: ignore[method-assign]
            p.accept_at = 6
            p.deliver(
                5,
                set(),
                frozenset(range(PG_COUNT)),
                rebuild_bandwidth_mibps=mibps,
                rebuild_concurrency=4,
            )
            await wait_until_async(
                lambda: len(p.reports) == PG_COUNT and not rs.jobs,
                10,
                "every PG rebuilt",
                interval=0.01,
            )
            assert len(sends) == len(chunk_device), sends
            for dev_id in PRIMARY_DEVICES:
                times = [t for t, d in sends if d == dev_id]
                gaps = [b - a for a, b in itertools.pairwise(times)]
                assert len(times) == per_device and min(gaps) >= interval * 0.9, (dev_id, gaps)
            first = [min(t for t, d in sends if d == dev_id) for dev_id in PRIMARY_DEVICES]
            # paced per SDS they would be an interval apart (each job lists the copy's
            # chunks first, on the one peer connection: both lists come back together)
            assert max(first) - min(first) < interval * 0.75, first
            for (volume, c), _ in chunk_device.items():
                got = p.secondary.store.read(volume, c, 0, CHUNK_SIZE)
                assert got is not None and bytes(got) == bytes([c % 251]) * CHUNK_SIZE

    asyncio.run(main())


def test_a_full_copy_trims_what_only_the_copy_stores(tmp_path: Path) -> None:
    """A full resync (the primary kept no record, e.g. it restarted) copies what the
    primary stores and trims on the secondary the chunks of the PG that only the
    secondary stores: zeroed or trimmed on the primary while the secondary was away,
    they would read there as the old data. Chunks of other PGs stay."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            prim, sec = p.primary.store, p.secondary.store
            in_pg = [c for c in range(200) if pg_of(VOLUME, c, PG_COUNT) == 0][:3]
            other = next(c for c in range(200) if pg_of(VOLUME, c, PG_COUNT) == 1)
            kept, gone, changed = in_pg
            dev10, dev20 = prim.device_by_mdm_id(10), sec.device_by_mdm_id(20)
            assert dev10 is not None and dev20 is not None
            prim.write(dev10, VOLUME, kept, 0, b"\x01" * CHUNK_SIZE)
            prim.write(dev10, VOLUME, changed, 0, b"\x02" * CHUNK_SIZE)
            for c, fill in ((gone, 3), (changed, 4), (other, 5)):
                sec.write(dev20, VOLUME, c, 0, bytes([fill]) * CHUNK_SIZE)
            p.accept_at = 6
            p.deliver(5, {0})
            rs = p.resync
            await wait_until_async(
                lambda: len(p.reports) == 1 and not rs.jobs,
                10,
                "PG 0 resynchronised",
                interval=0.01,
            )
            done = rs.done[f"{POOL}/0"]
            assert done["full"] and done["chunks"] == 3, done
            assert sec.location(VOLUME, gone) is None
            for c, fill in ((kept, 1), (changed, 2), (other, 5)):
                got = sec.read(VOLUME, c, 0, CHUNK_SIZE)
                assert got is not None and bytes(got) == bytes([fill]) * CHUNK_SIZE, c

    asyncio.run(main())


def fill_pg0(p: Pair, chunks: int, data: Callable[[int], bytes]) -> list[int]:
    """Write ``data(chunk)`` into the first ``chunks`` chunks of PG 0 on the primary."""
    store = p.primary.store
    ours = [c for c in range(400) if pg_of(VOLUME, c, PG_COUNT) == 0][:chunks]
    dev = store.device_by_mdm_id(primary_of(0)[1])
    assert dev is not None
    for c in ours:
        store.write(dev, VOLUME, c, 0, data(c))
    return ours


def test_a_copy_does_not_report_to_a_copy_a_forward_lost_meanwhile(tmp_path: Path) -> None:
    """A forward to the copy's SDS lost its connection while the job copied (the copy
    may have missed a write, and the SDS could not be reached then): the job does
    not report its copy done even though the final flush gets through; it starts
    over (a full copy again, its record being incomplete) and reports then."""
    chunks = 6

    async def main() -> None:
        async with pair(tmp_path) as p:
            rs = p.resync
            fill_pg0(p, chunks, lambda c: b"z" * 4096)
            p.accept_at = 6
            p.deliver(5, {0}, rebuild_bandwidth_mibps=8, rebuild_concurrency=1)
            await wait_until_async(
                lambda: rs.chunks_total >= 1, 10, "the first chunk copied", interval=0.01
            )
            rs.lost(SECONDARY[0])  # as io_path does when a forward loses its connection
            await wait_until_async(
                lambda: bool(p.reports) and not rs.jobs, 20, "the report", interval=0.01
            )
            assert p.reports == [(POOL, 0, 5)]
            # the job under way at the loss did not report: a second one copied again
            assert rs.chunks_total == 2 * chunks, rs.chunks_total
            assert rs.pgs_total == 1

    asyncio.run(main())


def test_a_chunk_damaged_on_the_wire_is_sent_again_not_the_job_aborted(tmp_path: Path) -> None:
    """The copy's SDS finds the third chunk's REPL_WRITE damaged (a byte flipped in
    its receive buffer, through the test-only hook) and answers CHECKSUM_MISMATCH:
    the chunk is sent again and the job goes on, each chunk copied once, one report,
    the copy's bytes right. The whole job was aborted and started over (8 chunks
    copied for 6)."""
    chunks = 6

    async def main() -> None:
        async with pair(tmp_path) as p:
            rs = p.resync
            ours = fill_pg0(p, chunks, lambda c: bytes([c % 250 + 1]) * 4096)
            seen = itertools.count()

            def damage(payload: memoryview) -> None:
                if len(payload) > 4096 and next(seen) == 2:
                    payload[100] ^= 0xFF

            assert p.secondary_service is not None
            p.secondary_service.corrupt_payload = damage
            p.accept_at = 6
            p.deliver(5, {0}, rebuild_concurrency=1)
            await wait_until_async(
                lambda: bool(p.reports) and not rs.jobs, 20, "the report", interval=0.01
            )
            assert p.reports == [(POOL, 0, 5)]
            assert (rs.chunks_total, rs.mismatches_total) == (chunks, 1)
            for c in ours:
                got = p.secondary.store.read(VOLUME, c, 0, 4096)
                assert got is not None and bytes(got) == bytes([c % 250 + 1]) * 4096

    asyncio.run(main())
