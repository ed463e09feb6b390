"""The SDS's scrub (meshblock.sds.scrub, docs/sds.md "Scrub") in one process: the
PG's primary runs a :class:`Scrubber` against a real secondary (two data services on
loopback, tests/test_sds_resync_units.py's ``pair``), the MDM's orders handed to it
directly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.maps import PgMap
from meshblock.sds.scrub import Scrubber
from meshblock.sds.store import chunk_key
from test_sds_resync_units import PG_COUNT, POOL, SECONDARY, VOLUME, Pair, pair, primary_of

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

PG = 0
CHUNK = next(c for c in range(400) if pg_of(VOLUME, c, PG_COUNT) == PG)
RUN: dict[str, Any] = {"pool_id": POOL, "pass": 1, "state": "running", "bandwidth_mibps": 0}


def both_write(p: Pair, data: bytes, chunk: int = CHUNK) -> None:
    """The same bytes on the primary's copy and the secondary's."""
    mine = p.primary.store.device_by_mdm_id(primary_of(PG)[1])
    theirs = p.secondary.store.device_by_mdm_id(SECONDARY[1])
    assert mine is not None and theirs is not None
    p.primary.store.write(mine, VOLUME, chunk, 0, data)
    p.secondary.store.write(theirs, VOLUME, chunk, 0, data)


def degraded(p: Pair, epoch: int) -> PgMap:
    """The pool's map with every PG degraded (the secondary stale, no copy yet)."""
    m = p.primary.maps.maps[POOL]
    return PgMap(
        POOL, epoch, PG_COUNT, m.primary, m.secondary, m.sds, {}, clean=(False,) * PG_COUNT
    )


def test_a_pg_that_leaves_clean_while_a_chunk_waits_for_its_lock_is_not_judged(
    tmp_path: Any,
) -> None:
    """The scrub of a chunk waits for a write in flight (the chunk's range lock);
    meanwhile the PG is degraded and that write lands on the primary's copy alone.
    The scrub re-checks the PG under the lock and leaves the chunk (and the PG,
    started over when it runs again): no finding. Checked only before the wait, it
    compared the copies and reported a false divergence."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            data = bytes(range(256)) * (CHUNK_SIZE // 256)
            both_write(p, data)
            p.deliver(5, set())
            st = p.primary
            key = chunk_key(VOLUME, CHUNK)
            ticket, _ = st.locks.acquire(key, 0, CHUNK_SIZE)  # a write in flight
            scrub = Scrubber(st)
            try:
                scrub.order([RUN])
                await wait_until_async(
                    lambda: len(st.locks) == 2, 10, "the scrub waiting for the lock", interval=0.01
                )
                m = degraded(p, 6)
                for sds in (p.primary, p.secondary):
                    sds.maps.update(m)
                mine = st.store.device_by_mdm_id(primary_of(PG)[1])
                assert mine is not None
                st.store.write(mine, VOLUME, CHUNK, 4096, b"x" * 4096)  # the write, alone
                st.locks.release(key, ticket)
                await wait_until_async(
                    lambda: not st.locks.busy(key), 10, "the scrub done with the chunk"
                )
                ps = scrub.pools[POOL]
                assert ps.errors == dict.fromkeys(ps.errors, 0), ps.errors
                assert not scrub.findings and PG not in ps.done
            finally:
                await scrub.close()

    asyncio.run(main())
