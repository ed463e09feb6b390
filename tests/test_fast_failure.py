"""Fast failure reports (docs/mdm.md, "Failures"): a peer that cannot reach an SDS
reports it, the MDM confirms by probing the SDS itself (an authenticated connection and
a PING over the data protocol), and only then fails it, long before the heartbeat
timeout. Such an SDS is held down until the MDM and a peer
have reached its data port for ``hold_down_s`` (docs/mdm.md, "Hold-down and
flapping"): its heartbeats alone do not bring it back. Real MDM (heartbeat timeout
60 s, so the timeout cannot be what acts), three real SDSs, the real SDC; IO through
NBD with qemu-io."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from _cluster import SmallCluster, small_cluster
from _wait import wait_until
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "ff1"
MiB = 1024 * 1024
HEARTBEAT_TIMEOUT_S = 60.0
HOLD_DOWN_S = 6.0


@pytest.fixture(scope="module")
def ff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "hold_down_s": HOLD_DOWN_S}}
    with small_cluster(tmp_path_factory.mktemp("fastfail"), VOLUME, "64MiB", settings) as c:
        yield c


def test_a_report_about_a_live_sds_is_not_confirmed(ff: SmallCluster) -> None:
    sid = ff.sds_id(ff.sds[0])
    api = ff.mdm.api(ff.mdm.cluster_secret)
    status, doc = api.post(f"/api/v1/sds/{sid}/unreachable", {"reporter": "test"})
    assert status == 200, doc
    assert doc == {"sds_id": sid, "confirmed": False, "state": "connected"}
    assert all(pg["state"] == "clean" for pg in ff.pgmap()["pgs"])
    # an admin may report as well (it is the same check)
    status, doc = ff.mdm.api().post(f"/api/v1/sds/{sid}/unreachable", {})
    assert status == 200 and not doc["confirmed"], doc  # admin may, too


def test_killed_sds_is_failed_on_report_not_after_the_timeout(ff: SmallCluster) -> None:
    victim = ff.sds[1]
    dead = ff.sds_id(victim)
    qemu_io(ff.sdc.uri(VOLUME), *[f"write -P 0x5a {n * MiB} 64k" for n in range(32)], "flush")
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    t0 = time.monotonic()
    # Writes to every chunk: some PGs have their primary on the dead SDS. The SDC's
    # connection fails, it reports, the MDM confirms, the PGs fail over.
    qemu_io(ff.sdc.uri(VOLUME), *[f"write -P 0x6b {n * MiB} 64k" for n in range(32)], "flush")
    elapsed = time.monotonic() - t0
    assert elapsed < HEARTBEAT_TIMEOUT_S / 3, f"writes took {elapsed:.1f} s: {ff.logs()}"
    doc = ff.pgmap()
    for pg in doc["pgs"]:
        if dead in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"]):
            assert pg["state"] == "degraded" and pg["primary"]["sds_id"] != dead, pg
    assert "not reachable from the MDM: down now" in ff.mdm.log_text(), ff.logs()
    qemu_io(ff.sdc.uri(VOLUME), *[f"read -P 0x6b {n * MiB} 64k" for n in range(32)], read_only=True)
    print(f"failover on report: writes done {elapsed:.1f} s after the kill")


def sds_doc(ff: SmallCluster, name: str) -> dict[str, Any]:
    status, doc = ff.mdm.api().get("/api/v1/sds")
    assert status == 200, doc
    return next(s for s in doc["sds"] if s["name"] == name)


def test_a_reported_sds_returns_only_once_probes_prove_it_up(ff: SmallCluster) -> None:
    """The SDS of the previous test, declared down on a report, restarts: it registers
    and heartbeats at once, yet stays disconnected (held down) until the MDM's and its
    peers' pings have answered for ``hold_down_s``; then it is connected and its PGs
    resync to clean."""
    victim = ff.sds[1]
    if sds_doc(ff, victim.name)["state"] == "connected":  # run alone: fail it first
        test_killed_sds_is_failed_on_report_not_after_the_timeout(ff)
    before = sds_doc(ff, victim.name)
    assert before["held_down"] and not before["flapping"], before
    victim.start()
    victim.wait_serving()
    samples: list[dict[str, Any]] = []

    def returned() -> bool:
        doc = sds_doc(ff, victim.name)
        samples.append(doc)
        return bool(doc["state"] == "connected")

    wait_until(returned, 60, f"{victim.name} to be proven up", interval=0.2, detail=ff.logs)
    # It heartbeated while it was held: a last_seen newer than before, still disconnected.
    held = [d for d in samples if d["held_down"] and d["last_seen"] != before["last_seen"]]
    assert held and all(d["state"] == "disconnected" for d in held), samples
    assert not samples[-1]["held_down"], samples[-1]
    assert "proven up" in ff.mdm.log_text(), ff.logs()
    # Each SDS was asked to probe it, and did (a peer's report is part of the proof).
    assert any("asks us to probe" in d.log_text() for d in ff.sds if d is not victim)
    wait_until(
        lambda: all(pg["state"] == "clean" for pg in ff.pgmap()["pgs"]),
        60,
        "every PG clean after the resync",
        detail=ff.logs,
    )


def test_a_report_about_a_hung_sds_is_confirmed_at_once(ff: SmallCluster) -> None:
    """A SIGSTOPped SDS still accepts TCP connections (the kernel completes them), so
    only the data-protocol probe (authenticated connection and PING answered within
    1 s) tells the MDM that it does not serve: the report is confirmed within a couple
    of seconds, not after the 60 s heartbeat timeout. Thawed, it is proven up again."""
    victim = ff.sds[2]
    sid = ff.sds_id(victim)
    assert sds_doc(ff, victim.name)["state"] == "connected"
    proc = victim.proc
    assert proc is not None
    api = ff.mdm.api(ff.mdm.cluster_secret)
    proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, doc = api.post(f"/api/v1/sds/{sid}/unreachable", {"reporter": "test"})
        elapsed = time.monotonic() - t0
        assert status == 200, doc
        assert doc == {"sds_id": sid, "confirmed": True, "state": "disconnected"}, doc
        # the probe's 1 s limit plus the MDM's work; generous for a loaded machine
        assert elapsed < 5.0, f"the report took {elapsed:.1f} s to confirm"
        for pg in ff.pgmap()["pgs"]:
            if sid in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"]):
                assert pg["state"] == "degraded" and pg["primary"]["sds_id"] != sid, pg
        print(f"hung SDS confirmed down {elapsed:.2f} s after the report")
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_until(
        lambda: sds_doc(ff, victim.name)["state"] == "connected",
        60,
        f"{victim.name} to be proven up after the thaw",
        interval=0.2,
        detail=ff.logs,
    )
    wait_until(
        lambda: all(pg["state"] == "clean" for pg in ff.pgmap()["pgs"]),
        60,
        "every PG clean after the resync",
        detail=ff.logs,
    )
