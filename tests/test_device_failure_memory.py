"""A failed device is never forgotten (docs/sds.md, "Device errors (fail-stop)"), in
a whole cluster: an MDM, three SDSs (sds2 with the store's test fault hook,
tests/_faults.py), the SDC and fio through NBD.

- state.json cannot record the failure: the SDS stops at once (exit code 4), and fio
  sees no error (the other copies serve).
- state.json lost the failure (edited while the SDS was stopped): at registration the
  MDM's record fails the device again, and no IO reaches it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, small_cluster
from _faults import FaultySds, make_faulty
from _fio import Fio
from _wait import wait_until

pytestmark = pytest.mark.cluster

VOLUME = "dm1"
WAIT_S = 60.0
SETTINGS = {"cluster": {"heartbeat_timeout_s": 5.0, "rebuild_delay_s": 600.0}}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SmallCluster]:
    with small_cluster(
        tmp_path / "c", VOLUME, "64MiB", SETTINGS, make_sds=make_faulty({"sds2"})
    ) as c:
        yield c


def fio(c: SmallCluster, tmp: Path, name: str, **kw: Any) -> Fio:
    return Fio(c.sdc.uri(VOLUME), name, tmp / "fio", extra=("--fsync=8",), **kw)


def device_state(c: SmallCluster, sds_id: int) -> str:
    status, sds = c.mdm.api().get(f"/api/v1/sds/{sds_id}")
    assert status == 200, sds
    return str(sds["devices"][0]["state"])


def state_file(victim: FaultySds) -> Path:
    return victim.device.parent / "state" / "state.json"


def test_an_sds_that_cannot_save_a_failed_device_stops(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    c = cluster
    victim = c.sds[1]
    assert isinstance(victim, FaultySds)
    path = state_file(victim)
    wait_until(path.exists, WAIT_S, "the victim's first state.json")
    path.unlink()
    path.mkdir()  # write_atomic's rename onto it fails (even for root)
    victim.fail_io("pwrite")
    job = fio(c, tmp_path, "w", offset=0, size="8M").start()
    assert victim.proc is not None
    rc = victim.proc.wait(WAIT_S)
    assert rc == 4, victim.log_text()[-3000:]
    assert "cannot be saved to" in victim.log_text(), victim.log_text()[-3000:]
    job.result(timeout=180).assert_clean(c.logs())
    fio(c, tmp_path, "w", offset=0, size="8M", verify_only=True).run(timeout=180).assert_clean(
        c.logs()
    )


def test_a_failure_lost_from_state_json_comes_back_from_the_mdm(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    c = cluster
    victim = c.sds[1]
    assert isinstance(victim, FaultySds)
    sds_id = c.sds_id(victim)
    victim.fail_io("pwrite")
    fio(c, tmp_path, "w", offset=0, size="8M").run(timeout=180).assert_clean(c.logs())
    wait_until(lambda: device_state(c, sds_id) == "failed", WAIT_S, "the MDM to fail it")

    victim.stop()
    path = state_file(victim)
    state = json.loads(path.read_text())
    assert state["failed_devices"], state
    state["failed_devices"] = {}  # the local record is lost
    path.write_text(json.dumps(state))
    victim.start()
    wait_until(
        lambda: victim.health()["devices"][0]["state"] == "failed",
        WAIT_S,
        f"{victim.name} to fail its device again at registration",
    )
    assert device_state(c, sds_id) == "failed"

    for op in ("pwrite", "pread", "fdatasync"):
        victim.fail_io(op)  # from now on any call that reaches the device counts
    fio(c, tmp_path, "w2", offset=8 << 20, size="8M").run(timeout=180).assert_clean(c.logs())
    fio(c, tmp_path, "w", offset=0, size="8M", verify_only=True).run(timeout=180).assert_clean(
        c.logs()
    )
    reached = victim.fault_state()["injected"].get(str(victim.device), {})
    assert not any(reached.values()), f"IO reached the failed device: {reached}"
    assert json.loads(path.read_text())["failed_devices"], "not saved again"
