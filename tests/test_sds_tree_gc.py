"""The garbage pass of snapshot trees on an SDS (meshblock.sds.tree_gc; docs/sds.md,
"Versions of a chunk"): started by the trees a PG map carries, paced, under the
chunks' range locks, with its report in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE
from meshblock.mdm import heartbeats as mdm_heartbeats
from meshblock.mdm.snapshot_gc import TreeGcReports
from meshblock.sds import heartbeat as tree_gc_heartbeat
from meshblock.sds import store as store_module
from meshblock.sds import tree_gc, worker
from meshblock.sds.heartbeat import Heartbeats, Snapshot
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.metrics import sds_registry
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec, chunk_key
from meshblock.sds.versions import ALL_BLOCKS, VersionTree
from test_sds_versions import GC_TREE, TREE, assert_views, tagged, write_gc_tree

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
POOL, PG_COUNT = 3, 4
ME, DEVICE = 2, 20
#: Every version of GC_TREE read by a volume: heads 5 and 4 (volumes 5 and 14),
#: snapshots reading 0..3 (volumes 20..23).
ALL_VOLUMES = {5: (5, True), 14: (4, True), 20: (0, False), 21: (1, False)}
ALL_VOLUMES |= {22: (2, False), 23: (3, False)}


def pool_map(
    epoch: int, volumes: dict[int, tuple[int, bool]], versions: dict[int, int | None] = GC_TREE
) -> PgMap:
    """Us as the secondary of every PG; tree TREE with ``versions`` (GC_TREE's) and
    ``volumes`` (volume id -> (view, writable))."""
    doc: dict[str, Any] = {
        "pool_id": POOL,
        "epoch": epoch,
        "pg_count": PG_COUNT,
        "pgs": [
            {
                "pg": pg,
                "primary": {"sds_id": 1, "device_id": 10},
                "secondary": {"sds_id": ME, "device_id": DEVICE},
            }
            for pg in range(PG_COUNT)
        ],
        "sds": {"1": {"address": "127.0.0.1", "data_port": 1}},
        "trees": {
            str(TREE): {
                "versions": {str(v): p for v, p in versions.items()},
                "volumes": {str(i): {"view": v, "writable": w} for i, (v, w) in volumes.items()},
            }
        },
    }
    return PgMap.from_doc(doc)


def new_state(tmp_path: Path) -> tuple[ChunkStore, SdsState]:
    path = str(tmp_path / "dev.img")
    store = ChunkStore([DeviceSpec(path, 16 * MiB, "pool")])
    store.open()
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    sds.set_identity(ME, {path: (DEVICE, POOL)})
    return store, sds


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the metrics")


def test_the_maps_trees_start_a_paced_pass_that_frees_and_collapses_what_no_view_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker, started as the SDS starts it, runs no pass while every version is
    read. A map without the volumes reading versions 1 and 5 starts a pass on its own:
    version 5 (a head with no child) goes whole, version 1's block that version 2
    shadows is freed, and version 1 (read by no volume, one child) is collapsed into
    version 2; every live view reads what it read. The pace sleeps once per chunk
    changed, 1/rate each; the report and the metrics say what was done. The worker
    looks again by itself only after an hour here: only the maps wake it."""
    monkeypatch.setattr(tree_gc, "RECHECK_S", 3600.0)

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        slept: list[float] = []

        async def pace(seconds: float) -> None:
            slept.append(seconds)

        gc.sleep = pace
        gc.rate = 10
        try:
            write_gc_tree(store)
            await store.sync()
            gc.start()
            sds.maps.update(pool_map(1, ALL_VOLUMES))
            await wait_until_async(lambda: gc.passes_total == 1, 10, "the first pass")
            assert gc.blocks_freed_total == 0 and gc.slots_freed_total == 0
            assert gc.report()[str(TREE)]["unread_slots"] == {}
            assert slept == []  # nothing changed: nothing paced

            left = {i: v for i, v in ALL_VOLUMES.items() if v[0] not in (1, 5)}
            sds.maps.update(pool_map(2, left))
            await wait_until_async(lambda: gc.passes_total == 2, 10, "the pass of epoch 2")
            vt = VersionTree(GC_TREE)
            assert_views(store, vt, {0, 2, 3, 4})
            # chunk 0: 5's slot {10,11,12} freed, 1's block 4 freed, 1 ({3,10}) merged
            # into 2; chunk 1: 1's block 0 (shadowed by 2) and 5's block 1, both slots
            assert store.versions(TREE, 0) == {
                0: ALL_BLOCKS,
                2: 1 << 3 | 1 << 4 | 1 << 10 | 1 << 11,
                3: 1 << 3 | 1 << 200,
                4: 1 << 3,
            }
            assert store.versions(TREE, 1) == {2: 0b11}
            report = gc.report()[str(TREE)]
            assert report == {
                "state": "done",
                "chunks": 2,
                "chunks_done": 2,
                "blocks_freed": 6,
                "slots_freed": 3,
                "collapsed": 1,
                "unread_slots": {"1": 0, "5": 0},
            }
            assert gc.heartbeat() == [
                {
                    "tree_id": TREE,
                    "pool_id": POOL,
                    "state": "done",
                    "chunks": 2,
                    "chunks_done": 2,
                    "blocks_freed": 6,
                    "slots_freed": 3,
                    "collapsed": 1,
                    "unread_slots": [{"version": 1, "slots": 0}, {"version": 5, "slots": 0}],
                }
            ]
            assert slept == [0.1, 0.1]  # both chunks changed, each paced
            text = generate_latest(sds_registry(sds, Resync(sds))).decode()
            assert metric(text, "meshblock_sds_tree_gc_passes_total") == 2
            assert metric(text, "meshblock_sds_tree_gc_blocks_freed_total") == 6
            assert metric(text, "meshblock_sds_tree_gc_slots_freed_total") == 3
            assert metric(text, "meshblock_sds_tree_gc_collapsed_total") == 1
            assert metric(text, "meshblock_sds_tree_gc_chunks_left") == 0
            assert metric(text, "meshblock_sds_tree_gc_unread_slots") == 0

            # A map at a newer epoch with the same tree: no pass.
            sds.maps.update(pool_map(3, left))
            await asyncio.sleep(0.2)
            assert gc.passes_total == 2 and gc.pending() == []
        finally:
            await gc.close()
            store.close()
        # What was freed is durable: the same after a restart.
        store = ChunkStore([DeviceSpec(str(tmp_path / "dev.img"), 16 * MiB, "pool")])
        store.open()
        try:
            assert store.versions(TREE, 1) == {2: 0b11}
            assert_views(store, VersionTree(GC_TREE), {0, 2, 3, 4})
        finally:
            store.close()

    asyncio.run(main())


def test_the_pass_waits_for_a_write_in_progress_on_the_chunk(tmp_path: Path) -> None:
    """A write holding chunk 0's range lock holds the pass back at that chunk: nothing
    of it is freed until the write is done."""

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        try:
            write_gc_tree(store)
            await store.sync()
            sds.maps.update(pool_map(1, {14: (4, True)}))  # only head 4 left
            ticket, _ = sds.locks.acquire(chunk_key(TREE, 0), 0, 4096)
            task = asyncio.create_task(gc.collect(TREE))
            await asyncio.sleep(0.2)
            assert not task.done() and gc.passes[TREE].done == 0
            assert 5 in store.versions(TREE, 0)  # not freed while the write runs
            sds.locks.release(chunk_key(TREE, 0), ticket)
            p = await asyncio.wait_for(task, 10)
            assert p is not None and p.finished
            # 1, 2 and 5 (no live view below them) freed whole; 3 (read by no volume,
            # one child) merged into head 4; 0 keeps two children in the map's tree
            assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 4: 1 << 3 | 1 << 200}
            assert store.versions(TREE, 1) == {} and store.tree_chunks(TREE) == [0]
            assert p.unread_slots == {0: 1, 1: 0, 2: 0, 3: 0, 5: 0}
        finally:
            store.close()

    asyncio.run(main())


def test_a_map_that_changes_the_tree_ends_the_pass_and_the_next_runs_on_it(
    tmp_path: Path,
) -> None:
    """The tree loses a volume while a pass runs: the pass stops unfinished at the
    next chunk, and the worker's next step passes again on the newer tree."""

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        gc.rate = 1000
        first = {i: v for i, v in ALL_VOLUMES.items() if v[0] != 5}
        second = {i: v for i, v in first.items() if v[0] != 1}

        async def pace(seconds: float) -> None:
            if sds.maps.epoch(POOL) == 1:
                sds.maps.update(pool_map(2, second))

        gc.sleep = pace
        try:
            write_gc_tree(store)
            await store.sync()
            sds.maps.update(pool_map(1, first))
            p = await gc.collect(TREE)
            assert p is not None and not p.finished and p.done == 1
            assert gc.pending() == [TREE]
            await gc.step()
            p = gc.passes[TREE]
            assert p.finished and p.key == sds.maps.maps[POOL].trees[TREE].key
            assert gc.pending() == []
            assert 1 not in store.versions(TREE, 0) and 1 not in store.versions(TREE, 1)
            assert_views(store, VersionTree(GC_TREE), {0, 2, 3, 4})
        finally:
            store.close()

    asyncio.run(main())


def gc_entry(tree: int, state: str = "done", chunks_done: int = 10) -> dict[str, Any]:
    return {
        "tree_id": tree,
        "pool_id": 3,
        "state": state,
        "chunks": 10,
        "chunks_done": chunks_done,
        "blocks_freed": 1000,
        "slots_freed": 100,
        "collapsed": 10,
        "unread_slots": [{"version": 1, "slots": 0}, {"version": 2, "slots": 12}],
    }


def test_the_heartbeats_report_of_5000_trees_is_bounded_and_reaches_the_mdm_whole() -> None:
    """5000 trees' passes: every heartbeat stays far under the MDM's 1 MiB request
    limit (TREE_GC_MAX entries at most, failed and running passes first, the count of
    the rest in ``tree_gc_left``); the MDM, fed the heartbeats as it decodes them, has
    the whole report after a few, then only what changes, and trees no longer
    reported go (``tree_gc_gone``)."""
    trees = [gc_entry(t) for t in range(1, 5001)]
    trees[4000] = gc_entry(4001, "failed", 3)
    trees[4500] = gc_entry(4501, "running", 5)
    beats = Heartbeats()
    reports = TreeGcReports()
    sds = 9

    def send(snap: Snapshot) -> dict[str, Any]:
        body = beats.body(snap)
        assert len(json.dumps(body)) < 256 * 1024  # the MDM takes 1 MiB at most
        beat = mdm_heartbeats.decode_sds(json.loads(json.dumps(body)))
        if beat.full:
            reports.report(sds, beat.tree_gc or [], beat.tree_gc_left)
        elif beat.tree_gc is not None or beat.tree_gc_gone:
            reports.update(sds, beat.tree_gc or [], beat.tree_gc_gone, beat.tree_gc_left)
        beats.answered(200, {})
        return body

    first = send(Snapshot(tree_gc=list(trees)))
    assert len(first["tree_gc"]) == tree_gc_heartbeat.TREE_GC_MAX
    assert [t["tree_id"] for t in first["tree_gc"][:3]] == [4001, 4501, 1]
    assert first["tree_gc_left"] == 5000 - tree_gc_heartbeat.TREE_GC_MAX
    assert reports.unreported() == {str(sds): first["tree_gc_left"]}
    for _ in range(5000 // tree_gc_heartbeat.TREE_GC_MAX):
        send(Snapshot(tree_gc=list(trees)))
    assert reports.unreported() == {}
    status = reports.status()
    assert len(status) == 5000
    assert status[4000]["state"] == "failed" and status[4500]["state"] == "running"
    assert status[0]["unread_slots"] == {"1": 0, "2": 12}
    assert "tree_gc" not in send(Snapshot(tree_gc=list(trees)))  # nothing changed

    # One pass progresses, one tree goes: the delta says just that.
    trees[4500] = gc_entry(4501, "running", 8)
    del trees[0]
    body = send(Snapshot(tree_gc=list(trees)))
    assert body["tree_gc"] == [trees[4499]]
    assert body["tree_gc_gone"] == [1] and body["tree_gc_left"] == 0
    status = reports.status()
    assert len(status) == 4999 and status[0]["tree_id"] == 2
    assert next(t for t in status if t["tree_id"] == 4501)["chunks_done"] == 8


def test_the_mdms_count_of_entries_to_come_is_cleared_when_they_vanish_unsent() -> None:
    """A heartbeat carries TREE_GC_MAX of 300 passes and says 44 are left; those 44
    trees' passes go before they are sent (the trees left the map): the next heartbeat
    tells the MDM nothing is left, else its report stays ``unreported`` forever."""
    extra = 44
    trees = [gc_entry(t) for t in range(1, tree_gc_heartbeat.TREE_GC_MAX + extra + 1)]
    beats = Heartbeats()
    reports = TreeGcReports()

    def send(snap: Snapshot) -> dict[str, Any]:
        body = beats.body(snap)
        beat = mdm_heartbeats.decode_sds(json.loads(json.dumps(body)))
        if beat.full:
            reports.report(9, beat.tree_gc or [], beat.tree_gc_left)
        elif beat.tree_gc is not None or beat.tree_gc_gone:
            reports.update(9, beat.tree_gc or [], beat.tree_gc_gone, beat.tree_gc_left)
        beats.answered(200, {})
        return body

    assert send(Snapshot(tree_gc=trees))["tree_gc_left"] == extra
    assert reports.unreported() == {"9": extra}
    kept = trees[: tree_gc_heartbeat.TREE_GC_MAX]
    assert send(Snapshot(tree_gc=kept))["tree_gc_left"] == 0
    assert reports.unreported() == {}
    assert len(reports.status()) == tree_gc_heartbeat.TREE_GC_MAX
    assert "tree_gc" not in send(Snapshot(tree_gc=kept))  # said once


def test_an_entry_carries_at_most_the_rows_one_heartbeat_carries(tmp_path: Path) -> None:
    """A tree with more unread versions than a heartbeat's row budget reports the
    lowest ones, so that even a single entry stays bounded."""
    store, sds = new_state(tmp_path)
    try:
        gc = sds.tree_gc
        p = gc.passes[TREE] = tree_gc.TreePass(None, 1, POOL, finished=True)
        p.unread_slots = {v: 0 for v in range(1, tree_gc_heartbeat.TREE_GC_MAX_ROWS + 100)}
        (entry,) = gc.heartbeat()
        rows = entry["unread_slots"]
        assert len(rows) == tree_gc_heartbeat.TREE_GC_MAX_ROWS and rows[0]["version"] == 1
    finally:
        store.close()


def test_the_heartbeat_carries_the_passes_once_there_is_one_and_when_they_change() -> None:
    """An MDM of an earlier release never sees ``tree_gc``: no pass, no field."""
    beats = Heartbeats()
    assert "tree_gc" not in beats.body(Snapshot())
    beats.answered(200, {})
    one = [{"tree_id": 7, "pool_id": 3, "state": "running", "chunks": 4, "chunks_done": 1}]
    assert beats.body(Snapshot(tree_gc=one))["tree_gc"] == one
    beats.answered(200, {})
    assert "tree_gc" not in beats.body(Snapshot(tree_gc=one))  # unchanged
    beats.answered(200, {})
    two = [one[0] | {"chunks_done": 2}]
    assert beats.body(Snapshot(tree_gc=two))["tree_gc"] == two
    beats.answered(200, {"send_full": True})
    assert beats.body(Snapshot(tree_gc=two))["tree_gc"] == two  # full


def test_an_unexpected_error_is_logged_counted_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a pass (here the store's scan raising a RuntimeError once) does not end
    the worker: it is logged with its traceback, counted in
    ``meshblock_sds_tree_gc_errors_total``, and after a back-off the next pass runs;
    ``close()`` at the SDS's stop does not raise."""
    monkeypatch.setattr(tree_gc, "RECHECK_S", 3600.0)
    monkeypatch.setattr(worker, "BACKOFF_FIRST_S", 0.05)

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        real = store.trees_chunks
        calls = 0

        async def flaky(trees: Any) -> dict[int, list[int]]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            return await real(trees)

        monkeypatch.setattr(store, "trees_chunks", flaky)
        try:
            write_gc_tree(store)
            await store.sync()
            gc.start()
            sds.maps.update(pool_map(1, ALL_VOLUMES))
            await wait_until_async(lambda: gc.errors_total == 1, 10, "the failed pass")
            sds.maps.update(pool_map(2, {14: (4, True)}))
            await wait_until_async(lambda: gc.passes_total == 1, 10, "a pass after the bug")
            text = generate_latest(sds_registry(sds, Resync(sds))).decode()
            assert metric(text, "meshblock_sds_tree_gc_errors_total") == 1
        finally:
            await gc.close()  # does not raise
            store.close()
        assert any(r.exc_info is not None and "a bug" in str(r.exc_info[1]) for r in caplog.records)

    asyncio.run(main())


def two_trees_map(epoch: int, volumes: dict[int, tuple[int, bool]]) -> PgMap:
    """:func:`pool_map` with a second tree, OTHER, carrying the same versions and views
    (its volumes' ids shifted by 100)."""
    doc = dict(pool_map(epoch, volumes).doc)
    trees = dict(doc["trees"])
    trees[str(OTHER)] = {
        "versions": {str(v): p for v, p in GC_TREE.items()},
        "volumes": {str(i + 100): {"view": v, "writable": w} for i, (v, w) in volumes.items()},
    }
    doc["trees"] = trees
    return PgMap.from_doc(doc)


OTHER = TREE + 1


def test_a_failing_tree_does_not_stop_the_passes_of_the_trees_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tree TREE's pass fails (its chunk's garbage pass raises a device error): the
    pass of tree OTHER, after it, still runs; TREE is reported ``failed`` with the
    error, counted, not tried again before its back-off, then tried again (and done)
    once the back-off has passed."""
    monkeypatch.setattr(tree_gc, "RETRY_FIRST_S", 3600.0)

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        real = store.collect_garbage
        broken = True

        def failing(
            vtree: VersionTree, views: Any, tree: int, chunk: int, **kw: Any
        ) -> dict[int, int]:
            if tree == TREE and broken:
                raise OSError(5, "a failed device")
            return real(vtree, views, tree, chunk, **kw)

        monkeypatch.setattr(store, "collect_garbage", failing)
        try:
            write_gc_tree(store)
            dev = store.devices[0]
            store.write_version(dev, OTHER, 0, 5, 10 * 4096, bytes(4096))
            await store.sync()
            sds.maps.update(two_trees_map(1, {14: (4, True)}))
            await gc.step()
            assert gc.passes[OTHER].finished and gc.passes[OTHER].error is None
            assert 5 not in store.versions(OTHER, 0)  # OTHER collected
            p = gc.passes[TREE]
            assert p.state == "failed" and p.error is not None and "failed device" in p.error
            assert gc.report()[str(TREE)]["state"] == "failed"
            assert gc.heartbeat()[0]["state"] == "failed"
            assert gc.errors_total == 1
            assert gc.pending() == []  # its retry is not due yet
            broken = False
            p.retry_at = 0.0  # the back-off is over
            assert gc.pending() == [TREE]
            await gc.step()
            assert gc.passes[TREE].state == "done" and gc.errors_total == 1
        finally:
            store.close()

    asyncio.run(main())


def test_a_pass_failing_before_it_begins_names_the_trees_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree's pass that fails before it has begun (here its start raising a device
    error) is reported ``failed`` with the pool of the map that carries the tree, not
    pool 0 (the MDM sums the reports per pool's SDSs)."""
    monkeypatch.setattr(tree_gc, "RETRY_FIRST_S", 3600.0)

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc

        async def fails_at_once(tree: int, chunks: Any = None) -> None:
            raise OSError(5, "a failed device")

        monkeypatch.setattr(gc, "collect", fails_at_once)
        try:
            sds.maps.update(pool_map(1, {14: (4, True)}))
            await gc.step()
            (entry,) = gc.heartbeat()
            assert (entry["tree_id"], entry["state"]) == (TREE, "failed")
            assert entry["pool_id"] == POOL
        finally:
            store.close()

    asyncio.run(main())


def test_the_scan_of_the_store_runs_once_per_step_and_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with two pending trees scans the store once, for both, in a thread: not
    once per tree on the event loop (``ChunkStore.tree_chunks``, a Python loop over
    every chunk of the store)."""
    scans: list[tuple[frozenset[int], bool]] = []
    real = store_module._chunks_by_tree

    def scan(keys: Any, trees: frozenset[int]) -> dict[int, list[int]]:
        scans.append((trees, threading.current_thread() is threading.main_thread()))
        return real(keys, trees)

    monkeypatch.setattr(store_module, "_chunks_by_tree", scan)

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc

        def on_the_loop(tree: int) -> list[int]:
            raise AssertionError("a scan of the whole store on the event loop")

        try:
            write_gc_tree(store)
            store.write_version(store.devices[0], OTHER, 0, 5, 0, bytes(4096))
            await store.sync()
            monkeypatch.setattr(store, "tree_chunks", on_the_loop)
            sds.maps.update(two_trees_map(1, {14: (4, True)}))
            await gc.step()
            assert gc.passes[TREE].finished and gc.passes[OTHER].finished
            assert gc.passes[TREE].chunks == 2 and gc.passes[OTHER].chunks == 1
            assert scans == [(frozenset({TREE, OTHER}), False)]
        finally:
            store.close()

    asyncio.run(main())


def test_the_pass_leaves_the_plain_slot_the_io_path_reads_alone(tmp_path: Path) -> None:
    """The IO path reads and writes the tree's chunks as plain version-0 slots (the
    root volume's): the pass neither zeroes the blocks of it that no view reads
    (block 3 of chunk 0: versions 4 and 1 shadow it for views 4 and 2), nor collapses
    version 0 into its only child, which would relabel the plain slot and leave the
    root volume reading nothing. The slot stays counted unread."""

    async def main() -> None:
        store, sds = new_state(tmp_path)
        gc = sds.tree_gc
        plain = b"".join(tagged(0, 0, b, 1) for b in range(256))
        try:
            write_gc_tree(store)
            await store.sync()
            sds.maps.update(pool_map(1, {14: (4, True), 22: (2, False)}))
            p = await gc.collect(TREE)
            assert p is not None and p.finished
            got = store.read(TREE, 0, 0, CHUNK_SIZE)
            assert got is not None and bytes(got) == plain

            store.write(store.devices[0], TREE, 7, 0, plain)  # a chunk of version 0 only
            sds.maps.update(pool_map(2, {TREE: (1, True)}, {0: None, 1: 0}))
            p = await gc.collect(TREE)
            assert p is not None and p.finished and p.collapsed == 0
            got = store.read(TREE, 7, 0, CHUNK_SIZE)
            assert got is not None and bytes(got) == plain
            assert p.unread_slots == {0: 2}
        finally:
            store.close()

    asyncio.run(main())


def test_cancelling_the_caller_of_a_workers_cancel_is_not_swallowed() -> None:
    """``worker.cancel()`` swallows the end of the worker it cancels, never the
    cancellation of the task that called it: a stop (or a timeout) around a close
    that waits for a slow worker still stops the caller."""

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # still ending when the caller is cancelled

    async def main() -> tuple[bool, bool]:
        task = asyncio.create_task(slow_to_end())
        await asyncio.sleep(0)
        after = False

        async def closing() -> None:
            nonlocal after
            await worker.cancel(task)
            after = True  # the caller went on as if not cancelled

        caller = asyncio.create_task(closing())
        await asyncio.sleep(0.05)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller

        # a caller cancelled before (a stop: aiohttp cleans up in the cancelled task)
        # still closes every worker: cancel() raises nothing of its own
        async def idle() -> None:
            await asyncio.Event().wait()

        quiet = [asyncio.create_task(idle()) for _ in range(2)]
        await asyncio.sleep(0)

        async def stopping() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                for t in quiet:
                    await worker.cancel(t)

        stop = asyncio.create_task(stopping())
        await asyncio.sleep(0)
        stop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stop
        assert all(t.cancelled() for t in quiet)
        return caller.cancelled(), after

    assert asyncio.run(main()) == (True, False)
