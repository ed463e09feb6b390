"""The store's test-only fault hook in a running cluster: ``/test/faults`` exists on
the SDS that enables it only, refuses bad commands, arms EIO faults and cuts the
power (SIGKILL after losing the unsynced pages). Real MDM, three SDSs, the SDC."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

import _http
from _cluster import SmallCluster, small_cluster
from _faults import FaultySds, make_faulty
from _sds import DEVICE_BYTES, POOL

pytestmark = pytest.mark.cluster

VOLUME = "fh1"


@pytest.fixture(scope="module")
def fh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    root = tmp_path_factory.mktemp("faulthook")
    with small_cluster(root, VOLUME, "64MiB", {}, make_sds=make_faulty({"sds1"})) as c:
        yield c


def test_only_the_sds_that_enables_the_hook_serves_it(fh: SmallCluster) -> None:
    plain = fh.sds[1]
    assert not isinstance(plain, FaultySds)
    r = _http.request("GET", plain.control_url + "/test/faults")
    assert r.status == 404
    r = _http.request("POST", plain.control_url + "/test/faults", {"action": "power_cut"})
    assert r.status in (404, 405)
    assert plain.proc is not None and plain.proc.poll() is None
    assert "TEST FAULT HOOK" not in plain.log_text()


def test_faults_are_armed_refused_and_cleared(fh: SmallCluster) -> None:
    sds = fh.sds[0]
    assert isinstance(sds, FaultySds)
    for bad in (
        {"action": "fail", "op": "pread", "device": "/etc/passwd"},
        {"action": "fail", "op": "fsync", "device": str(sds.device)},
        {"action": "power_cut", "lose": "some"},
        {"action": "explode"},
    ):
        r = _http.request("POST", sds.control_url + "/test/faults", bad)
        assert r.status == 400, (bad, r.body)
    assert sds.fault_state()["faults"] == []
    sds.fail_io("fdatasync", count=2)
    assert sds.fault_state()["faults"] == [
        {"device": str(sds.device), "op": "fdatasync", "count": 2}
    ]
    assert sds.faults(action="clear")["faults"] == []


def test_a_power_cut_kills_the_sds_at_once(fh: SmallCluster) -> None:
    sds = fh.sds[0]
    assert isinstance(sds, FaultySds)
    sds.power_cut()
    assert sds.proc is not None and sds.proc.returncode == -signal.SIGKILL
    assert "power cut" in sds.log_text()
    sds.start()  # and it comes back
    sds.wait_serving()


def test_an_unknown_unclean_device_is_refused_and_changes_nothing(fh: SmallCluster) -> None:
    sds = fh.sds[1]
    api = fh.mdm.api(fh.mdm.cluster_secret)
    before = fh.pgmap()
    body = {
        "name": sds.name,
        "protection_domain": "pd1",
        "fault_set": "fs2",
        "address": "127.0.0.1",
        "data_port": sds.data_port,
        "control_port": sds.control_port,
        "devices": [{"path": str(sds.device), "capacity": DEVICE_BYTES, "pool": POOL}],
        "unclean_devices": [str(sds.device) + ".other"],
    }
    status, doc = api.post("/api/v1/sds/register", body)
    assert status == 422, doc
    assert "unclean_devices" in doc["error"]["message"]
    assert fh.pgmap() == before
