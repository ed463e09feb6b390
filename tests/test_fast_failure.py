"""Fast failure reports (docs/mdm.md, "Failures"): a peer that cannot reach an SDS
reports it, the MDM confirms by connecting to the SDS itself, and only then fails it,
long before the heartbeat timeout. Real MDM (heartbeat timeout 60 s, so the timeout
cannot be what acts), three real SDSs, the real SDC; IO through NBD with qemu-io."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from _cluster import SmallCluster, small_cluster
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "ff1"
MiB = 1024 * 1024
HEARTBEAT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def ff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
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
