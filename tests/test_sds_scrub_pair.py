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
from meshblock.sds.checksums import BLOCK, BLOCKS, ROWS, slot_crcs
from meshblock.sds.maps import PgMap
from meshblock.sds.scrub import Scrubber
from meshblock.sds.store import ChunkStore, chunk_key
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


def forget_checksums(store: ChunkStore, chunk: int, blocks: range | list[int]) -> None:
    """Zero the stored checksums of ``blocks`` of the chunk (in its device file): what
    a store written before checksums were kept, or with them off, holds."""
    loc = store.location(VOLUME, chunk)
    assert loc is not None
    dev, slot = loc
    with open(dev.path, "r+b") as f:
        for b in blocks:
            f.seek(dev.row_offset(slot) + 4 * b)
            f.write(bytes(4))


def stored(store: ChunkStore, chunk: int = CHUNK) -> tuple[int, ...]:
    rows = store.checksum_rows(VOLUME, chunk, count=False)
    assert rows is not None
    return ROWS[BLOCKS].unpack(rows[0])


def change_block(store: ChunkStore, chunk: int, block: int) -> None:
    """Change one byte of ``block`` behind the store's back (its checksum kept)."""
    loc = store.location(VOLUME, chunk)
    assert loc is not None
    dev, slot = loc
    with open(dev.path, "r+b") as f:
        at = dev.slot_offset(slot) + block * BLOCK + 9
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


async def one_pass(p: Pair) -> Scrubber:
    """A scrub pass over every PG of the primary, to its end."""
    p.deliver(5, set())
    scrub = Scrubber(p.primary)
    scrub.order([RUN])
    try:
        await wait_until_async(
            lambda: set(range(PG_COUNT)) <= scrub.pools[POOL].done, 20, "the pass", interval=0.02
        )
    finally:
        await scrub.close()
    return scrub


def test_blocks_without_checksums_alike_on_both_copies_are_given_one(tmp_path: Any) -> None:
    """Upgrade: a chunk whose blocks 0-99 have no checksum on the primary and 50-199
    none on the secondary, the bytes alike: the scrub stores the CRC32C of each on
    the copy that lacked it, counts 200 blocks checksummed, no error, nothing
    repaired. Nothing was stored (the blocks stayed unchecked for good)."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            data = bytes(range(256)) * (CHUNK_SIZE // 256)
            both_write(p, data)
            forget_checksums(p.primary.store, CHUNK, range(100))
            forget_checksums(p.secondary.store, CHUNK, range(50, 200))
            scrub = await one_pass(p)
            want = ROWS[BLOCKS].unpack(slot_crcs(data))
            assert stored(p.primary.store) == want
            assert stored(p.secondary.store) == want
            ps = scrub.pools[POOL]
            assert (ps.checksummed, ps.repaired) == (100 + 150, 0)
            assert ps.errors == dict.fromkeys(ps.errors, 0) and not scrub.findings
            assert scrub.report()["pools"][0]["checksummed"] == 250

    asyncio.run(main())


@pytest.mark.parametrize("where", ["primary", "secondary"])
def test_a_block_without_checksum_unlike_the_good_copy_is_really_repaired(
    tmp_path: Any, where: str
) -> None:
    """Block 7 has no checksum on one copy and other bytes than the other copy's,
    which match their checksum: that copy is bad, and is rewritten from the good one
    with its checksum; reported repaired once the rows read back say so. The scrub
    reported it repaired while nothing was rewritten (the repair skips blocks with
    no checksum)."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            data = bytes(range(256)) * (CHUNK_SIZE // 256)
            both_write(p, data)
            bad = p.primary if where == "primary" else p.secondary
            forget_checksums(bad.store, CHUNK, [7])
            change_block(bad.store, CHUNK, 7)
            scrub = await one_pass(p)
            for sds in (p.primary, p.secondary):
                got = sds.store.read(VOLUME, CHUNK, 0, CHUNK_SIZE)
                assert got is not None and bytes(got) == data, where
                assert stored(sds.store) == ROWS[BLOCKS].unpack(slot_crcs(data))
            ps = scrub.pools[POOL]
            assert ps.errors[where] == 1 and ps.repaired == 1, (ps.errors, ps.repaired)
            assert [f["repaired"] for f in scrub.findings] == [True]

    asyncio.run(main())


def test_blocks_without_checksums_that_differ_are_divergent_and_left_alone(
    tmp_path: Any,
) -> None:
    """Block 3 has no checksum on either copy and the copies differ: divergent,
    reported not repaired, neither copy changed nor given a checksum."""

    async def main() -> None:
        async with pair(tmp_path) as p:
            data = bytes(range(256)) * (CHUNK_SIZE // 256)
            both_write(p, data)
            for sds in (p.primary, p.secondary):
                forget_checksums(sds.store, CHUNK, [3])
            change_block(p.secondary.store, CHUNK, 3)
            before = bytes(p.secondary.store.read(VOLUME, CHUNK, 0, CHUNK_SIZE) or b"")
            scrub = await one_pass(p)
            ps = scrub.pools[POOL]
            assert ps.errors["divergent"] == 1 and (ps.repaired, ps.checksummed) == (0, 0)
            assert [(f["kind"], f["repaired"]) for f in scrub.findings] == [("divergent", False)]
            assert stored(p.primary.store)[3] == stored(p.secondary.store)[3] == 0
            after = p.secondary.store.read(VOLUME, CHUNK, 0, CHUNK_SIZE)
            assert after is not None and bytes(after) == before

    asyncio.run(main())
