"""Fail-stop on device errors, in a whole cluster (docs/sds.md "Device errors",
docs/mdm.md "Device states"): an MDM, three SDSs (one with the store's test fault
hook, tests/_faults.py), the SDC, and fio writing and verifying through NBD.

While fio writes (flushing every few writes), every ``fdatasync`` (or ``pwrite``) of
the faulty SDS's device starts failing with EIO. A failed fdatasync does what Linux
does: the pages are marked clean without reaching the disk, and are then evicted,
so the device holds older bytes while a later fdatasync would succeed. Expected:
fio sees no error and reads back every byte it wrote; the device is failed at its
first error and no IO reaches it afterwards (no FLUSH after the error succeeds on
it: none is even tried); the SDS reports it; the MDM marks it failed, rebuilds its
PGs from the other copies onto the other SDSs, leaves it out of the capacity;
``meshctl volume verify`` finds both copies of every chunk identical; the device
stays failed across a restart of its SDS; ``meshctl sds device-remove`` removes it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, meshctl_command, small_cluster
from _faults import FaultySds, make_faulty
from _fio import Fio
from _wait import wait_until

pytestmark = pytest.mark.cluster

VOLUME = "df1"
FIO_SIZE = "32M"
FIO_RATE_IOPS = 1500  # 8192 writes of 4 KiB: ~5 s; the fault lands in the middle
FAULT_AFTER_S = 2.0
WAIT_S = 60.0
SETTINGS = {
    "cluster": {
        "heartbeat_timeout_s": 5.0,
        # A failed device is rebuilt at once; an SDS that stops only after this long:
        # the rebuild seen here comes from the device failure, not from a lost SDS.
        "rebuild_delay_s": 600.0,
    }
}


@pytest.fixture(params=["fdatasync", "pwrite"])
def op(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SmallCluster]:
    with small_cluster(
        tmp_path / "c", VOLUME, "64MiB", SETTINGS, make_sds=make_faulty({"sds2"})
    ) as c:
        yield c


def meshctl(c: SmallCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*meshctl_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=c.mdm.env(),
        stdin=subprocess.DEVNULL,
    )


def fio(c: SmallCluster, tmp: Path, name: str, **kw: Any) -> Fio:
    return Fio(c.sdc.uri(VOLUME), name, tmp / "fio", extra=("--fsync=8",), **kw)


def device_doc(c: SmallCluster, sds_id: int) -> dict[str, Any]:
    status, sds = c.mdm.api().get(f"/api/v1/sds/{sds_id}")
    assert status == 200, sds
    (dev,) = sds["devices"]
    return dict(dev)


def names(doc: dict[str, Any], pg: dict[str, Any]) -> set[int]:
    return {pg["primary"]["device_id"], pg["secondary"]["device_id"]} - {None}


def test_device_error_fails_the_device_and_no_client_sees_it(
    cluster: SmallCluster, tmp_path: Path, op: str
) -> None:
    c = cluster
    victim = c.sds[1]
    assert isinstance(victim, FaultySds)
    sds_id = c.sds_id(victim)
    dev_id = int(device_doc(c, sds_id)["id"])
    before = c.pgmap()
    on_victim = [pg["pg"] for pg in before["pgs"] if dev_id in names(before, pg)]
    assert on_victim, "the faulty device holds no PG copy"
    status, pool = c.mdm.api().get(f"/api/v1/pools/{c.pool_id}")
    assert status == 200, pool
    total_before = pool["capacity"]["total_bytes"]

    t0 = time.monotonic()
    job = fio(c, tmp_path, "w", offset=0, size=FIO_SIZE, rate_iops=FIO_RATE_IOPS).start()
    time.sleep(FAULT_AFTER_S)
    assert job.running(), "fio finished before the fault"
    victim.fail_io(op)  # every call from now on: EIO
    wait_until(
        lambda: victim.fault_state()["injected"].get(str(victim.device), {}).get(op),
        30,
        f"the first {op} EIO on {victim.name}",
    )
    if op == "fdatasync":
        victim.faults(action="evict")  # the dropped pages are gone: the disk is stale
    for other in ("pwrite", "pread", "fdatasync"):
        victim.fail_io(other)  # from now on any call that reaches the device counts
    res = job.result(timeout=120)
    res.assert_clean(c.logs())
    print(f"{res.summary()} ({op} EIO at {FAULT_AFTER_S} s)")

    # The device is failed at the SDS (health, metric) and at the MDM.
    health = wait_until(
        lambda: victim.health()["devices"][0]["state"] == "failed" and victim.health(),
        WAIT_S,
        "the SDS to show its device failed",
    )
    assert health["status"] == "degraded", health
    assert op in (health["devices"][0]["error"] or ""), health
    dev = wait_until(
        lambda: (d := device_doc(c, sds_id))["state"] == "failed" and d,
        WAIT_S,
        "the MDM to mark the device failed",
    )
    assert op in (dev["error"] or ""), dev
    metrics = victim.metrics()
    assert f'meshblock_sds_device_failed{{device="{victim.device}"}} 1.0' in metrics, metrics

    # Its PGs rebuilt from the other copy onto other devices, never onto it again.
    def rebuilt() -> dict[str, Any] | None:
        doc = c.pgmap()
        ok = all(pg["state"] == "clean" and dev_id not in names(doc, pg) for pg in doc["pgs"])
        return doc if ok else None

    doc = wait_until(rebuilt, WAIT_S, "every PG clean without the failed device")
    print(f"rebuilt {len(on_victim)} PG(s) {time.monotonic() - t0:.1f} s after fio started")
    assert all(names(doc, pg) and len(names(doc, pg)) == 2 for pg in doc["pgs"]), doc
    status, pool = c.mdm.api().get(f"/api/v1/pools/{c.pool_id}")
    assert status == 200, pool
    assert pool["capacity"]["total_bytes"] == total_before - dev["capacity_bytes"], pool

    # More IO with flushes after the failover: none of it reaches the failed device.
    reached = victim.fault_state()["injected"][str(victim.device)]
    fio(c, tmp_path, "w2", offset=32 << 20, size="8M").run(timeout=120).assert_clean(c.logs())
    fio(c, tmp_path, "w", offset=0, size=FIO_SIZE, verify_only=True).run(timeout=120).assert_clean(
        c.logs()
    )
    assert victim.fault_state()["injected"][str(victim.device)] == reached, (
        "IO reached the failed device after its error"
    )
    assert sum(reached.values()) >= 1, reached

    secret = tmp_path / "cluster.secret"
    secret.write_text(c.mdm.cluster_secret)
    proc = meshctl(c, "volume", "verify", VOLUME, "--secret-file", str(secret), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["fully_redundant"], report
    assert report["stored_on_both"] >= 40, report  # 40 MiB written: chunks on both copies

    shown = meshctl(c, "sds", "show", victim.name, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["devices"][0]["state"] == "failed", shown.stdout
    listed = meshctl(c, "sds", "list")
    assert "1 (1 failed)" in listed.stdout, listed.stdout

    # A restart does not bring it back (the SDS saved it), nor does the MDM.
    victim.stop()
    victim.start()
    health = victim.wait_serving()
    assert health["devices"][0]["state"] == "failed", health
    time.sleep(2.0)  # a heartbeat or two, and a report of the failure again
    assert device_doc(c, sds_id)["state"] == "failed"
    assert all(dev_id not in names(d, pg) for d in [c.pgmap()] for pg in d["pgs"])

    # The operator removes it (its data was rebuilt elsewhere).
    proc = meshctl(c, "sds", "device-remove", victim.name, str(victim.device))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status, sds = c.mdm.api().get(f"/api/v1/sds/{sds_id}")
    assert status == 200 and sds["devices"] == [], sds
