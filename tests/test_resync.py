"""A returning SDS is resynchronised before its copies count again (docs/design.md,
invariant 4; docs/mdm.md "Failures", docs/sds.md "Copies").

Real MDM (heartbeat timeout 3 s), three real SDSs in three fault sets, the real SDC.
An SDS is SIGKILLed, new data is written through NBD while it is down, it comes back:
its PGs go ``resyncing`` then ``clean``, the primaries copy exactly the chunks they
wrote alone (the delta), and the replica checker finds every chunk identical and fully
redundant. Then a primary restarts while its peer is down: it has no record of what
it wrote alone, so it copies every chunk of those PGs (full).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import _tls
from _cluster import small_cluster
from _sds import PG_COUNT, SdsDaemon, wait_copy_jobs_ended
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.tools.replica_check import check_volume
from test_failover import HEARTBEAT_TIMEOUT_S, VOLUME, Failover, wait_degraded
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

CLEAN_TIMEOUT_S = 30.0
MiB = 1024 * 1024
BASE_CHUNKS = set(range(16))  # written before any failure


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    with small_cluster(tmp_path_factory.mktemp("resync"), VOLUME, "64MiB", settings) as c:
        yield c


def resync_counts(d: SdsDaemon) -> dict[str, Any]:
    return dict(d.health()["resync"])


def wait_clean(rs: Failover, timeout: float = CLEAN_TIMEOUT_S) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    while True:
        doc = rs.pgmap()
        states = {pg["state"] for pg in doc["pgs"]}
        if states == {"clean"}:
            return doc, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"PGs not clean after {timeout} s: {doc}\n{rs.logs()}")
        time.sleep(0.2)


def write_chunks(rs: Failover, chunks: list[int], pattern: int) -> None:
    """4 KiB of ``pattern`` in the middle of each chunk, flushed."""
    cmds = [f"write -P {pattern:#x} {c * MiB + 256 * 1024} 4k" for c in chunks]
    qemu_io(rs.sdc.uri(VOLUME), *cmds, "flush")
    reads = [f"read -P {pattern:#x} {c * MiB + 256 * 1024} 4k" for c in chunks]
    qemu_io(rs.sdc.uri(VOLUME), *reads, read_only=True)


def verify(rs: Failover, doc: dict[str, Any]) -> dict[str, Any]:
    vol = {"id": rs.volume_id, "name": VOLUME, "size_bytes": 64 * CHUNK_SIZE}
    report = asyncio.run(
        check_volume(vol, doc, rs.mdm.cluster_secret, tls=_tls.data_context(rs.mdm.tls))
    )
    out = report.to_json()
    assert report.ok and report.fully_redundant, out
    assert out["identical"] == 64, out
    return out


def pgs_between(doc: dict[str, Any], primary: int, secondary: int) -> set[int]:
    return {
        pg["pg"]
        for pg in doc["pgs"]
        if pg["primary"]["sds_id"] == primary and pg["secondary"]["sds_id"] == secondary
    }


def in_pgs(rs: Failover, chunks: set[int], pgs: set[int]) -> int:
    return sum(1 for c in chunks if pg_of(rs.volume_id, c, PG_COUNT) in pgs)


def restart(rs: Failover, d: SdsDaemon, timeout: float = CLEAN_TIMEOUT_S) -> float:
    t0 = time.monotonic()
    d.start()
    d.wait_serving()
    wait_clean(rs, timeout)
    took = time.monotonic() - t0
    wait_copy_jobs_ended(rs.sds)
    return took


def test_delta_resync_after_return(rs: Failover) -> None:
    qemu_io(rs.sdc.uri(VOLUME), f"write -P 0x11 0 {len(BASE_CHUNKS)}M", "flush")
    wait_clean(rs)
    victim = rs.sds[1]
    dead = rs.sds_id(victim)
    others = [d for d in rs.sds if d is not victim]
    before = {rs.sds_id(d): resync_counts(d)["chunks_total"] for d in others}

    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    down = wait_degraded(rs, dead)
    # new data while it is away: some chunks written before, two new ones
    changed = [1, 4, 7, 9, 12, 15, 40, 50]
    write_chunks(rs, changed, 0x77)
    expect = {
        rs.sds_id(d): in_pgs(rs, set(changed), pgs_between(down, rs.sds_id(d), dead))
        for d in others
    }
    assert sum(expect.values()) > 0, "no changed chunk in a degraded PG"
    recorded = {
        rs.sds_id(d): sum(d.health()["degraded_writes"].get(str(rs.pool_id), {}).values())
        for d in others
    }
    assert recorded == expect

    took = restart(rs, victim)
    print(f"delta resync: victim restarted and every PG clean in {took:.1f} s")
    doc = rs.pgmap()
    assert doc["epoch"] > down["epoch"]
    # The primaries report PGs done together in pgs-synced calls, each one map epoch
    # (one to make them resyncing, then one per call; PG by PG it would be one per PG):
    # here typically 3 for 21 PGs, but jobs ending more than 0.2 s apart on a loaded
    # machine take a call each, so only "some calls carried several" is asserted.
    resynced = sum(1 for pg in down["pgs"] if pg["state"] != "clean")
    print(f"{resynced} PG(s) resynchronised in {doc['epoch'] - down['epoch']} map epoch(s)")
    assert resynced >= 2
    assert doc["epoch"] - down["epoch"] <= resynced, (resynced, down["epoch"], doc["epoch"])
    for d in others:
        counts = resync_counts(d)
        sid = rs.sds_id(d)
        assert counts["chunks_total"] - before[sid] == expect[sid], (counts, expect, rs.logs())
        assert counts["full_total"] == 0, counts
        assert not counts["active"], counts
    assert resync_counts(victim)["chunks_total"] == 0

    out = verify(rs, doc)
    print(f"replica check after delta resync: {out['identical']} chunk(s) identical")
    reads = [f"read -P 0x77 {c * MiB + 256 * 1024} 4k" for c in changed]
    qemu_io(rs.sdc.uri(VOLUME), *reads, read_only=True)
    # the metric says the same
    d = others[0]
    r = d.control_get("/metrics")  # HTTPS with [tls]
    assert r.status == 200, r.body
    text = str(r.body)
    want = f"meshblock_sds_resync_chunks_total {float(resync_counts(d)['chunks_total'])}"
    assert want in text, text


def test_full_resync_when_the_primary_lost_its_record(rs: Failover) -> None:
    wait_clean(rs)
    victim, restarted, other = rs.sds[2], rs.sds[0], rs.sds[1]
    dead = rs.sds_id(victim)
    before = {d: resync_counts(d) for d in (restarted, other)}

    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    down = wait_degraded(rs, dead)
    changed = [2, 5, 8, 13, 44]
    write_chunks(rs, changed, 0x3C)
    # the primary restarts (cleanly, quickly): what it wrote alone is forgotten
    assert restarted.stop() == 0
    restarted.start()
    restarted.wait_serving()
    write_chunks(rs, [3, 6], 0x4D)  # more while both are away from their record
    # A chunk zeroed whole meanwhile: the primary frees it, the victim still holds the
    # old bytes; the full copy must trim it there (the replica check below sees it).
    alone = pgs_between(down, rs.sds_id(restarted), dead)
    zeroed = next((c for c in sorted(BASE_CHUNKS - {3, 6}) if in_pgs(rs, {c}, alone)), None)
    assert zeroed is not None, f"no base chunk in the PGs {alone} it shares with the victim"
    qemu_io(rs.sdc.uri(VOLUME), f"write -z -u {zeroed * MiB} 1M", "flush")
    took = restart(rs, victim)
    print(f"full resync: victim restarted and every PG clean in {took:.1f} s")
    # Judged per PG from each primary's record of its resyncs: a slow restart may
    # have failed PGs over meanwhile, which changes who copies what, not the rule.
    stored = BASE_CHUNKS | {1, 4, 7, 9, 12, 15, 40, 50} | set(changed) | {3, 6}
    fulls, trimmed = 0, False
    for d in (restarted, other):
        counts = resync_counts(d)
        for key, job in counts["done"].items():
            pool, pg = map(int, key.split("/"))
            if job["target"] != dead or pool != rs.pool_id:
                continue
            if job["full"]:
                fulls += 1
                # what it stores and what the victim stores: the zeroed chunk too
                assert job["chunks"] == in_pgs(rs, stored, {pg}), (d.name, key, job)
                trimmed = trimmed or in_pgs(rs, {zeroed}, {pg}) == 1
            else:
                assert d is other, (d.name, key, job)  # the restarted one kept no record
                assert job["chunks"] == in_pgs(rs, set(changed) | {3, 6}, {pg}), (key, job)
    assert fulls > 0 and resync_counts(restarted)["full_total"] > 0
    assert resync_counts(other)["full_total"] == before[other]["full_total"]
    # (unless a slow restart failed its PG over to the other SDS, which kept a record)
    print(f"chunk {zeroed} zeroed on the primary alone; its PG fully copied: {trimmed}")
    verify(rs, rs.pgmap())  # compares both copies: the victim's old bytes would show
    qemu_io(rs.sdc.uri(VOLUME), f"read -P 0 {zeroed * MiB} 1M", read_only=True)
