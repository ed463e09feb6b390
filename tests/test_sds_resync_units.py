"""The SDS's copy jobs (meshblock.sds.resync) in one process: two real data services
on loopback, a primary and the secondary it resynchronises, with the maps handed to
them directly and the MDM's answer to ``pg-synced`` given by the test (the MDM itself
is exercised by tests/test_resync.py and tests/test_rebuild.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.metrics import SdsStats
from meshblock.sds.replication import Peers
from meshblock.sds.server import DataServer
from meshblock.sds.store import ChunkStore, DeviceSpec

SECRET = "resync-test-secret"
POOL = 3
PG_COUNT = 4
PRIMARY, SECONDARY = (1, 10), (2, 20)


class Pair:
    def __init__(self, primary: DataService, secondary: DataService, ports: dict[int, int]) -> None:
        self.primary, self.secondary, self.ports = primary, secondary, ports
        self.reports: list[tuple[int, int, int]] = []
        self.accept_at: int | None = None  # the MDM's answer: the new map epoch, or refuse

    async def report(self, pool: int, pg: int, epoch: int) -> int | None:
        self.reports.append((pool, pg, epoch))
        return self.accept_at

    def deliver(self, epoch: int, resyncing: set[int]) -> None:
        """A map of ``epoch`` in which the PGs ``resyncing`` are resyncing, to both."""
        m = PgMap(
            pool_id=POOL,
            epoch=epoch,
            pg_count=PG_COUNT,
            primary=(PRIMARY,) * PG_COUNT,
            secondary=(SECONDARY,) * PG_COUNT,
            sds={sid: ("127.0.0.1", port) for sid, port in self.ports.items()},
            doc={},
            clean=tuple(pg not in resyncing for pg in range(PG_COUNT)),
            resyncing=tuple(pg in resyncing for pg in range(PG_COUNT)),
        )
        for svc in (self.secondary, self.primary):
            svc.maps.update(m)


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    async with AsyncExitStack() as stack:
        services, ports = [], {}
        for sds_id, dev_id in (PRIMARY, SECONDARY):
            path = str(tmp_path / f"sds{sds_id}.img")
            store = ChunkStore([DeviceSpec(path, 1 << 30, "pool")])
            store.open()
            stack.callback(store.close)
            svc = DataService(store, MapCache(), Peers(SECRET, 5.0), SdsStats())
            svc.set_identity(sds_id, {path: (dev_id, POOL)})
            server = DataServer(svc, SECRET)
            await server.start("127.0.0.1", 0)
            stack.push_async_callback(server.stop)
            stack.push_async_callback(svc.peers.close)
            stack.push_async_callback(svc.resync.close)
            services.append(svc)
            ports[sds_id] = server.port
        p = Pair(services[0], services[1], ports)
        p.primary.resync.reporter = p.report
        yield p


async def until(what: str, cond: Callable[[], bool]) -> None:
    """Poll ``cond()`` every 10 ms, for at most 10 s."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} after 10 s")


def test_a_map_older_than_the_accepted_report_starts_no_new_job(tmp_path: Path) -> None:
    """The MDM accepts PG 0's report at map epoch 7; a map of epoch 6 (made for another
    PG's report, in flight meanwhile) still shows PG 0 resyncing. It must not start
    a second copy of PG 0, which would copy the PG again and report in vain. A map
    at or past 7 that names a copy again (a new failure) does start one."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            rs = p.primary.resync
            p.accept_at = 7
            p.deliver(5, {0, 1})
            await until("both PGs reported", lambda: len(p.reports) == 2 and not rs.jobs)
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
            await until("the new resync reported", lambda: len(p.reports) == 3 and not rs.jobs)
            assert p.reports[-1] == (POOL, 0, 8) and rs.pgs_total == 3

    asyncio.run(main())
