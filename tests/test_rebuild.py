"""Maintenance mode, rebuild onto other SDSs, rebalance and drain (docs/mdm.md
"Rebuild and rebalance"), with a real MDM, three real SDSs in three fault sets and
the real SDC; data goes in and out through NBD (qemu-io) and every chunk's replicas
are compared by the replica checker after each step.

One cluster for the module, the tests in order: each leaves it clean and verified.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import _http
import _tls
from _cluster import SmallCluster, meshctl_command, small_cluster
from _sds import PG_COUNT
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE
from meshblock.mdm.placement import copy_tolerance
from meshblock.tools.replica_check import check_volume
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "rb1"
CHUNKS = 48
MiB = 1024 * 1024
WAIT_S = 60.0


@pytest.fixture(scope="module")
def rb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {
        "cluster": {
            "heartbeat_timeout_s": 5.0,  # 3 s flaps on a loaded 2-core machine
            "rebuild_delay_s": 0.0,
            "rebalance_interval_s": 0.5,
        }
    }
    with small_cluster(tmp_path_factory.mktemp("rebuild"), VOLUME, f"{CHUNKS}MiB", settings) as c:
        # every chunk written once: full copies have something to copy
        write(c, list(range(CHUNKS)), 0x11)
        yield c


def write(c: SmallCluster, chunks: list[int], pattern: int) -> None:
    cmds = [f"write -P {pattern:#x} {n * MiB + 4096} 8k" for n in chunks]
    qemu_io(c.sdc.uri(VOLUME), *cmds, "flush")


def read_back(c: SmallCluster, expected: dict[int, int]) -> None:
    cmds = [f"read -P {p:#x} {n * MiB + 4096} 8k" for n, p in sorted(expected.items())]
    qemu_io(c.sdc.uri(VOLUME), *cmds, read_only=True)


def wait_for(c: SmallCluster, what: str, cond: Any, timeout: float = WAIT_S) -> dict[str, Any]:
    """Until ``cond(pgmap)`` holds; return that map (a failure counts the PG states)."""
    seen: list[dict[str, Any]] = [{"pgs": []}]

    def holds() -> dict[str, Any] | None:
        seen[0] = c.pgmap()
        return seen[0] if cond(seen[0]) else None

    def states() -> str:
        return f"{dict(Counter(pg['state'] for pg in seen[0]['pgs']))}\n{c.logs()}"

    return wait_until(holds, timeout, what, interval=0.2, detail=states)


def all_clean(doc: dict[str, Any]) -> bool:
    return all(pg["state"] == "clean" and "target" not in pg for pg in doc["pgs"])


def verify(c: SmallCluster, doc: dict[str, Any], chunks: int = CHUNKS) -> None:
    vol = {"id": c.volume_id, "name": VOLUME, "size_bytes": chunks * CHUNK_SIZE}
    report = asyncio.run(
        check_volume(vol, doc, c.mdm.cluster_secret, tls=_tls.data_context(c.mdm.tls))
    )
    out = report.to_json()
    assert report.ok and report.fully_redundant, out
    assert out["identical"] == chunks, out


def copies_per_sds(doc: dict[str, Any]) -> Counter[int]:
    n: Counter[int] = Counter()
    for pg in doc["pgs"]:
        n[pg["primary"]["sds_id"]] += 1
        n[pg["secondary"]["sds_id"]] += 1
    return n


def api(c: SmallCluster, method: str, path: str, body: Any = None) -> _http.Response:
    a = c.mdm.api()
    if method == "GET":
        return a.get(path)
    if method == "DELETE":
        return a.delete(path)
    return a.post(path, body if body is not None else {})


def meshctl(c: SmallCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*meshctl_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=c.mdm.env(),
        stdin=subprocess.DEVNULL,
    )


def test_maintenance_enter_exit_resyncs_only_the_delta(rb: SmallCluster) -> None:
    expected = dict.fromkeys(range(CHUNKS), 0x11)
    target = rb.sds[0]
    sid = rb.sds_id(target)
    out = meshctl(rb, "--json", "sds", "maintenance", "enter", target.name)
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["mode"] == "maintenance", out.stdout
    # Its PGs are degraded at once, served by the other copy.
    m = wait_for(
        rb,
        "the maintenance SDS's PGs degraded",
        lambda d: all(
            (pg["state"] == "degraded")
            == (sid in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"]))
            for pg in d["pgs"]
        ),
        timeout=10,
    )
    assert all(pg["primary"]["sds_id"] != sid for pg in m["pgs"]), "it serves nothing"
    # A second SDS cannot enter: PGs shared with the first would have no copy.
    refused = meshctl(rb, "sds", "maintenance", "enter", rb.sds[1].name)
    assert refused.returncode == 5 and "no copy left" in refused.stderr, refused
    # Writes meanwhile, then exit: only those chunks are copied back.
    changed = [1, 5, 9, 30]
    write(rb, changed, 0x22)
    expected.update(dict.fromkeys(changed, 0x22))
    before = {d.name: dict(d.health()["resync"]) for d in rb.sds}
    status, doc = api(rb, "POST", f"/api/v1/sds/{sid}/maintenance", {"mode": "exit"})
    assert status == 200 and doc["mode"] == "normal", doc
    watched = meshctl(rb, "rebuild", "status", "--watch", "--interval", "0.3", "--max-wait", "60")
    assert watched.returncode == 0, watched
    assert "rebuild [" in watched.stderr and "100.0%" in watched.stderr, watched.stderr
    done = wait_for(rb, "clean after maintenance exit", all_clean)
    copied = sum(
        d.health()["resync"]["chunks_total"] - before[d.name]["chunks_total"] for d in rb.sds
    )
    assert 0 < copied <= len(changed), f"a delta of at most {len(changed)} chunks, got {copied}"
    read_back(rb, expected)
    verify(rb, done)


def test_lost_sds_is_rebuilt_on_the_others_then_rebalanced_back(rb: SmallCluster) -> None:
    victim = rb.sds[2]
    dead = rb.sds_id(victim)
    before = rb.pgmap()
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    write(rb, [2, 3, 40], 0x33)
    # Rebuild: every PG gets a new copy on a surviving SDS, then is clean.
    rebuilt = wait_for(
        rb,
        "every PG rebuilt away from the dead SDS",
        lambda d: (
            all_clean(d)
            and all(
                dead not in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"]) for pg in d["pgs"]
            )
        ),
    )
    moved = [
        pg for pg in before["pgs"] if dead in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])
    ]
    assert moved, "the dead SDS held copies"
    verify(rb, rebuilt)
    status, progress = api(rb, "GET", "/api/v1/rebuild")
    assert status == 200, progress
    pool = next(p for p in progress["pools"] if p["pool_id"] == rb.pool_id)
    assert pool["rebuild"]["copied_bytes"] > 0, pool
    # It comes back: its stale chunks are freed, and rebalance moves copies onto it.
    victim.start()
    victim.wait_serving()
    balanced = wait_for(
        rb,
        "rebalance onto the returning SDS",
        lambda d: all_clean(d) and copies_per_sds(d)[dead] >= PG_COUNT * 2 // 3 - 2,
    )
    ideal = PG_COUNT * 2 / 3
    tol = copy_tolerance(ideal)
    counts = copies_per_sds(balanced)
    assert all(abs(n - ideal) <= tol for n in counts.values()), (counts, ideal, tol)
    verify(rb, balanced)
    read_back(rb, {2: 0x33, 3: 0x33, 40: 0x33, 7: 0x11})


def test_drain_then_remove(rb: SmallCluster) -> None:
    leaving = rb.sds[2]
    sid = rb.sds_id(leaving)
    status, doc = api(rb, "DELETE", f"/api/v1/sds/{sid}")
    assert status == 409 and "drain it first" in doc["error"]["message"], doc
    status, doc = api(rb, "POST", f"/api/v1/sds/{sid}/drain", {})
    assert status == 202 and doc["mode"] == "draining", doc
    # A second drain of another SDS: one fault domain would be left.
    status, refusal = api(rb, "POST", f"/api/v1/sds/{rb.sds_id(rb.sds[1])}/drain", {})
    assert status == 409 and "fault domain" in refusal["error"]["message"], refusal
    # meshctl waits for the drain (a progress bar on stderr), then removes it.
    out = meshctl(rb, "sds", "remove", leaving.name, "--interval", "0.3", "--max-wait", "90")
    assert out.returncode == 0, (out, rb.logs())
    assert "drained and removed" in out.stdout and "draining sds3 [" in out.stderr, out
    drained = wait_for(rb, "clean after the drain", all_clean)
    assert all(
        sid not in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"]) for pg in drained["pgs"]
    )
    verify(rb, drained)
    status, _ = api(rb, "GET", f"/api/v1/sds/{sid}")
    assert status == 404
    leaving.stop()
    read_back(rb, {2: 0x33, 1: 0x22, 7: 0x11})


def test_mdm_killed_during_a_rebuild_which_then_finishes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The copies run on the SDSs and the state is in the store: an MDM SIGKILLed in
    the middle of a rebuild comes back, reloads, takes the reports and the rebuild
    completes, every chunk identical on both copies. The throttle is changed while
    the rebuild runs and applies at once."""
    settings = {"cluster": {"heartbeat_timeout_s": 5.0, "rebuild_delay_s": 0.0}}
    root = tmp_path_factory.mktemp("rebuild-restart")
    # Twice the other tests' chunks: the throttled rebuild would take about 34 s, far
    # from the about 17 s the unthrottled one takes on a loaded machine (failure
    # detection, the MDM's death and restart included), so the check below has room.
    chunks = 2 * CHUNKS
    with small_cluster(root, VOLUME, f"{chunks}MiB", settings) as c:
        write(c, list(range(chunks)), 0x44)
        # Slow copies (1 MiB/s per copying SDS), so the rebuild spans the MDM's death.
        status, pool = c.mdm.api().patch(
            f"/api/v1/pools/{c.pool_id}", {"rebuild_bandwidth_mibps": 1}
        )
        assert status == 200, pool
        survivors = c.sds[:2]
        before = {d.name: d.health()["resync"]["bytes_total"] for d in survivors}
        victim = c.sds[2]
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        t_kill = time.monotonic()
        wait_for(
            c, "a rebuild to start", lambda d: any(pg["state"] == "rebuilding" for pg in d["pgs"])
        )
        assert c.mdm.proc is not None
        c.mdm.proc.send_signal(signal.SIGKILL)
        assert c.mdm.proc.wait(10) == -signal.SIGKILL
        c.mdm.kill()
        time.sleep(3.0)  # copies go on meanwhile; their reports wait for the MDM
        c.mdm.start()
        # It reloaded a rebuild in progress (at 1 MiB/s it has seconds to go).
        assert any(pg["state"] == "rebuilding" for pg in c.pgmap()["pgs"]), c.logs()
        # Unthrottled while it runs: the next chunks go at full speed.
        status, pool = c.mdm.api().patch(
            f"/api/v1/pools/{c.pool_id}", {"rebuild_bandwidth_mibps": 0}
        )
        assert status == 200, pool
        doc = wait_for(c, "the rebuild to finish after the MDM restart", all_clean, timeout=90)
        elapsed = time.monotonic() - t_kill
        copied = {d.name: d.health()["resync"]["bytes_total"] - before[d.name] for d in survivors}
        throttled_s = max(copied.values()) / MiB  # at 1 MiB/s
        assert elapsed < throttled_s, (
            f"done {elapsed:.1f} s after the kill; at 1 MiB/s it takes {throttled_s:.0f} s: "
            "the new throttle did not apply"
        )
        assert "rebuild done" in "".join(d.log_text() for d in survivors), c.logs()
        verify(c, doc, chunks)
        read_back(c, {0: 0x44, 17: 0x44, chunks - 1: 0x44})
