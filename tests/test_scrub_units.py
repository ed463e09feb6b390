"""The scrub's pure logic: how a chunk's two copies are judged block by block
(``meshblock.sds.scrub.classify``) and the MDM's schedule of a pool's passes
(``meshblock.mdm.scrub.ScrubSchedule``); docs/sds.md and docs/mdm.md, "Scrub"."""

from __future__ import annotations

import pytest

from meshblock.mdm.scrub import HELD, IDLE, PAUSED, RUNNING, ScrubSchedule
from meshblock.sds.checksums import BLOCKS, ROWS, slot_crcs
from meshblock.sds.scrub import (
    BOTH_BAD,
    DIVERGENT,
    PRIMARY_BAD,
    SECONDARY_BAD,
    classify,
    fixed,
    is_busy,
    to_checksum,
)

pytestmark = pytest.mark.unit

DATA = bytes(range(256)) * 4096  # 1 MiB


def rows(data: bytes) -> tuple[bytes, bytes]:
    """A copy that matches its checksums."""
    row = slot_crcs(data)
    return row, row


def corrupt(data: bytes, block: int) -> bytes:
    b = bytearray(data)
    b[block * 4096 + 17] ^= 0xFF
    return bytes(b)


def test_identical_copies_and_holes_are_fine() -> None:
    assert classify(rows(DATA), rows(DATA)) == []
    assert classify(None, None) == []
    assert classify(None, rows(bytes(1 << 20))) == []  # zeroes on both


def test_a_block_bad_on_one_copy_names_that_copy() -> None:
    good = rows(DATA)
    stored = good[0]
    bad = (stored, slot_crcs(corrupt(corrupt(DATA, 3), 200)))  # bytes changed, row kept
    assert classify(bad, good) == [(3, PRIMARY_BAD), (200, PRIMARY_BAD)]
    assert classify(good, bad) == [(3, SECONDARY_BAD), (200, SECONDARY_BAD)]
    assert classify(bad, bad) == [(3, BOTH_BAD), (200, BOTH_BAD)]


def test_copies_that_each_match_their_checksums_but_differ_are_divergent() -> None:
    other = rows(corrupt(DATA, 7))  # a different write, checksummed: not corruption
    assert classify(rows(DATA), other) == [(7, DIVERGENT)]
    # a hole on the primary against data on the secondary: divergent too
    assert classify(None, rows(DATA))[0] == (0, DIVERGENT)


def test_a_block_without_a_checksum_is_judged_by_the_copy_that_has_one() -> None:
    good = rows(DATA)
    unchecked = list(ROWS[BLOCKS].unpack(good[0]))
    unchecked[5] = 0  # written before checksums were kept
    old = (ROWS[BLOCKS].pack(*unchecked), slot_crcs(corrupt(DATA, 5)))
    assert classify(old, good) == [(5, PRIMARY_BAD)]
    assert classify(good, old) == [(5, SECONDARY_BAD)]
    both_old = (ROWS[BLOCKS].pack(*unchecked), good[1])
    assert classify(old, both_old) == [(5, DIVERGENT)]


def test_blocks_without_checksums_alike_on_both_copies_are_to_be_given_one() -> None:
    good = rows(DATA)
    values = list(ROWS[BLOCKS].unpack(good[0]))
    for b in (1, 2, 9):
        values[b] = 0
    old = (ROWS[BLOCKS].pack(*values), good[1])  # 1, 2, 9 unchecked, bytes right
    assert to_checksum(good, good) == ([], [])
    assert to_checksum(old, good) == ([1, 2, 9], [])
    assert to_checksum(good, old) == ([], [1, 2, 9])
    assert to_checksum(old, old) == ([1, 2, 9], [1, 2, 9])
    # unlike the other copy (classify's: bad or divergent): not given one
    other = (old[0], slot_crcs(corrupt(DATA, 9)))
    assert to_checksum(other, good) == ([1, 2], [])
    assert to_checksum(other, old) == ([1, 2], [1, 2])
    # no slot (zeroes) on one side: its blocks get nothing, the other's zero blocks do
    zero = bytes(1 << 20)
    assert to_checksum(None, (bytes(1024), slot_crcs(zero))) == ([], list(range(BLOCKS)))
    assert to_checksum(old, None) == ([], [])  # DATA is not zeroes
    # right now: recorded, matching its bytes and the other copy's
    assert fixed(good, good, [1, 9]) == [1, 9]
    assert fixed(old, good, [1, 9]) == []
    assert fixed(good, other, [1, 9]) == [1]
    assert fixed(None, good, [1]) == []


class _Map:
    def __init__(self, rebuilding: bool = False, moving: bool = False) -> None:
        self.rebuilding = (False, rebuilding)
        self.resyncing = (False, False)
        self.target = ((0, 0), (7, 70) if moving else (0, 0))


def test_busy_pools() -> None:
    assert not is_busy(_Map())  # type: ignore[arg-type]
    assert is_busy(_Map(rebuilding=True))  # type: ignore[arg-type]
    assert is_busy(_Map(moving=True))  # type: ignore[arg-type]


def report(pool: int, pass_: int, pgs: list[int], chunks: int = 0) -> dict[str, object]:
    return {
        "pools": [
            {"pool_id": pool, "pass": pass_, "pgs_done": pgs, "chunks": chunks, "bytes": 0,
             "errors": {"primary": 1}, "repaired": 1}
        ]
    }  # fmt: skip


def test_a_pass_starts_after_the_delay_completes_with_every_pg_and_repeats_per_period() -> None:
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=5, start_delay_s=10.0, now=0.0)
    s.tick(5.0, {1: (4, False)})
    assert s.pools[1].state == IDLE and s.pools[1].pass_ == 0
    s.tick(10.0, {1: (4, False)})
    assert s.pools[1].state == RUNNING and s.pools[1].pass_ == 1
    assert s.orders() == [{"pool_id": 1, "pass": 1, "state": RUNNING, "bandwidth_mibps": 5}]
    s.report(11, report(1, 1, [0, 1]))
    s.report(12, report(1, 0, [2, 3]))  # an older pass: not counted for this one
    s.tick(20.0, {1: (4, False)})
    assert s.pools[1].state == RUNNING
    s.report(12, report(1, 1, [2, 3]))
    s.tick(30.0, {1: (4, False)})
    ps = s.pools[1]
    assert ps.state == IDLE and ps.completed_at == 30.0 and ps.passes_completed == 1
    assert ps.due == 110.0  # a period after the pass started
    s.tick(109.0, {1: (4, False)})
    assert ps.state == IDLE
    s.tick(110.0, {1: (4, False)})
    assert ps.state == RUNNING and ps.pass_ == 2 and not ps.done


def test_held_while_busy_paused_and_started_by_hand() -> None:
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=1000.0, now=0.0)
    s.tick(1.0, {1: (2, True)})
    s.start(1, 2.0)
    assert s.pools[1].pass_ == 1 and s.orders()[0]["state"] == HELD
    s.tick(3.0, {1: (2, False)})
    assert s.orders()[0]["state"] == RUNNING
    s.report(5, report(1, 1, [0]))
    s.pause(1)
    assert s.orders()[0]["state"] == PAUSED
    s.tick(2000.0, {1: (2, False)})  # past the due time: a paused pool starts nothing
    assert s.pools[1].pass_ == 1 and s.pools[1].state == PAUSED
    s.start(1, 2001.0)  # resumes the same pass, PG 0 done already
    assert s.pools[1].pass_ == 1 and s.pools[1].done == {0}
    s.report(5, report(1, 1, [0, 1]))
    s.tick(2002.0, {1: (2, False)})
    # complete, and overdue (it took longer than a period): the next starts at once
    assert s.pools[1].passes_completed == 1 and s.pools[1].completed_at == 2002.0
    assert s.pools[1].pass_ == 2 and s.pools[1].state == RUNNING
    s.pause(1)
    s.report(5, report(1, 2, [0, 1]))
    s.start(1, 2003.0)  # resumes pass 2, whose PGs are all done: it completes
    s.tick(2003.0, {1: (2, False)})
    assert s.pools[1].passes_completed == 2
    s.pause(1)
    s.start(1, 2004.0)  # after a complete pass: a new one
    assert s.pools[1].pass_ == 3 and s.pools[1].state == RUNNING


def test_counters_add_up_across_sds_restarts_and_findings_are_taken_once() -> None:
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=0.0, now=0.0)
    s.tick(0.0, {1: (1, False)})
    s.report(3, report(1, 1, [], chunks=10))
    s.report(3, report(1, 1, [], chunks=15))
    s.report(3, report(1, 1, [], chunks=4))  # restarted: counts from zero again
    assert s.pools[1].chunks == 19
    finding = {"seq": 1, "pool_id": 1, "kind": "primary"}
    doc = {**report(1, 1, []), "instance": "a", "findings": [finding]}
    assert s.report(3, doc) == 1
    assert s.report(3, doc) == 1  # the same one again (its ack was lost): taken once
    assert len(s.pools[1].findings) == 1
    # the SDS restarted: its findings are numbered from 1 again, and are taken
    later = {"seq": 1, "pool_id": 1, "kind": "secondary"}
    assert s.report(3, {**report(1, 1, []), "instance": "b", "findings": [later]}) == 1
    assert [f["kind"] for f in s.pools[1].findings] == ["primary", "secondary"]
    status = s.status(1, 1000.0, 0.0)
    assert status["errors"]["primary"] == 1 and status["findings"][0]["reported_by"] == 3
    # blocks given a checksum (upgrade) add up apart from the errors and repairs; an
    # SDS of an older release does not send the counter
    up = report(1, 1, [])
    up["pools"][0]["checksummed"] = 40  # type: ignore[index]
    s.report(4, up)
    s.report(4, report(1, 1, []))
    status = s.status(1, 1000.0, 0.0)
    assert status["checksummed_blocks"] == 40 and status["repaired_blocks"] == 2


def test_a_restarted_mdm_acknowledges_no_finding_of_a_pool_it_does_not_know_yet() -> None:
    """Heartbeats that reach a restarted MDM while it reads its kept schedule (before
    its first tick): a finding of a pool not known yet is neither taken nor
    acknowledged, so the SDS sends it again; once every pool is known it is taken,
    once, and one of a pool deleted since is acknowledged (it would hold up the rest)."""
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=0.0, now=0.0)
    bad = {"seq": 1, "pool_id": 1, "kind": "unrecoverable"}
    doc = {"instance": "a", "findings": [bad]}
    assert s.report(3, doc) == 0  # not loaded: the SDS keeps the finding
    assert not s.pools
    # loaded: the kept schedule has pool 1 only (pool 2's first save never happened)
    s.restore([kept_row(1)], 1000.0, 1.0)
    later = [
        {"seq": 2, "pool_id": 2, "kind": "primary"},
        {"seq": 3, "pool_id": 1, "kind": "secondary"},
    ]
    doc = {"instance": "a", "findings": [bad, *later]}
    assert s.report(3, doc) == 1  # up to pool 2's, which waits (and those after it)
    assert [f["seq"] for f in s.pools[1].findings] == [1]
    s.tick(2.0, {1: (4, False), 2: (4, False)})
    assert s.report(3, doc) == 3
    assert [f["seq"] for f in s.pools[1].findings] == [1, 3]  # each once
    assert [f["seq"] for f in s.pools[2].findings] == [2]
    assert s.pools[1].findings[0]["kind"] == "unrecoverable"
    s.tick(3.0, {1: (4, False)})  # pool 2 deleted
    gone = {"seq": 4, "pool_id": 2, "kind": "primary"}
    assert s.report(3, {"instance": "a", "findings": [gone]}) == 4


def kept_row(pool_id: int) -> dict[str, object]:
    """A ``scrub_state`` row of an idle pool that never ran a pass."""
    return {
        "pool_id": pool_id, "pass_number": 0, "state": IDLE, "due_at": 2000.0,
        "started_at": None, "completed_at": None, "completed_pass": 0,
        "passes_completed": 0, "pgs_done": b"",
    }  # fmt: skip


def test_the_kept_schedule_resumes_with_another_clock() -> None:
    """What is saved of a pool's schedule (times as wall clock) and restored by an
    MDM whose monotonic clock starts elsewhere: the same pass, state, PGs done, start
    and due time; changes mark the pool to save."""
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=10.0, now=0.0)
    s.tick(1.0, {1: (20, False), 2: (4, False)})
    assert s.dirty == {1, 2}  # new pools: their due time is kept
    s.dirty.clear()
    s.start(1, 5.0)
    s.report(3, report(1, 1, [0, 3, 17]))
    assert s.dirty == {1}
    rows = [s.saved(p, 1000.0, 6.0) for p in (1, 2)]
    assert rows[0]["started_at"] == 999.0 and rows[1]["due_at"] == 1004.0
    t = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=10.0, now=500.0)
    t.restore(rows, 1100.0, 506.0)  # 100 s later, another monotonic base
    one, two = t.pools[1], t.pools[2]
    assert (one.pass_, one.state, one.done, one.started_at) == (1, RUNNING, {0, 3, 17}, 405.0)
    assert (two.state, two.due) == (IDLE, 410.0)
    t.tick(409.0, {1: (20, False), 2: (4, False)})
    assert two.state == IDLE  # not due yet (its own due time, not the new start's)
    t.tick(410.0, {1: (20, False), 2: (4, False)})
    assert two.state == RUNNING and one.pass_ == 1


def test_a_report_that_comes_before_the_schedules_are_loaded_is_asked_for_again() -> None:
    """After an MDM start, a report taken before the kept schedules are back is
    dropped; an SDS sends it again only when it changes, so the answer asks for its
    whole state (send_full) until the schedule can take it, and the pass completes."""
    s = ScrubSchedule(period_s=100.0, bandwidth_mibps=0, start_delay_s=0.0, now=0.0)
    done = report(1, 1, [0, 1, 2, 3])
    assert s.unready_for(done)
    s.report(11, done)  # dropped: no pool yet
    assert not s.unready_for(None) and not s.unready_for({"pools": []})
    s.loaded = True  # the kept schedules: pass 1 of pool 1 running
    assert s.unready_for(done)  # not ticked yet
    s.tick(1.0, {1: (4, False)})
    assert s.pools[1].state == RUNNING and s.pools[1].pass_ == 1
    assert not s.unready_for(done)
    s.report(11, done)  # the full heartbeat asked for
    s.tick(2.0, {1: (4, False)})
    assert s.pools[1].state == IDLE and s.pools[1].passes_completed == 1
