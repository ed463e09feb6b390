"""A rebalance move towards a device that lost power is cancelled when its SDS
registers unclean (mdm/unclean.py; docs/sds.md "Power cuts"), then planned again: the
chunks the target had received and not synced are copied anew, never counted as
copied.

Real MDM, four real SDSs (the fourth, added to make moves run towards it, has the
store's test-only fault hook), the real SDC; IO through NBD with qemu-io, every chunk
compared by the replica checker.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from _cluster import SmallCluster, small_cluster
from _faults import FaultySds
from _wait import wait_until
from test_faults import replicas_identical, wait_settled
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
VOLUME = "mv"
CHUNKS = 64
SETTINGS = {
    "cluster": {
        "heartbeat_timeout_s": 60.0,
        "rebuild_delay_s": 3600.0,
        "rebalance_interval_s": 0.5,
    }
}


@pytest.fixture
def c(tmp_path: Path) -> Iterator[SmallCluster]:
    with small_cluster(tmp_path, VOLUME, f"{CHUNKS}MiB", SETTINGS) as cl:
        yield cl


def test_move_towards_a_power_cut_device_is_started_again(c: SmallCluster, tmp_path: Path) -> None:
    """A fourth SDS joins; moves towards it run slowly (1 MiB/s); it loses power with
    copied chunks unsynced and returns. Every PG ends clean with two identical copies
    and the volume reads back (without the cancel, the moves carried on from where they
    were and left the lost chunks missing on the new copies)."""
    api = c.mdm.api()
    qemu_io(c.sdc.uri(VOLUME), *[f"write -P 0x5a {n * MiB} 1M" for n in range(CHUNKS)], "flush")
    status, body = api.patch(
        f"/api/v1/pools/{c.pool_id}",
        {"rebalance_bandwidth_mibps": 1, "rebalance_concurrency": 1},
    )
    assert status == 200, body
    status, pd = api.get("/api/v1/protection-domains")
    assert status == 200, pd
    status, fs = api.post(
        "/api/v1/fault-sets",
        {"name": "fs4", "protection_domain_id": pd["protection_domains"][0]["id"]},
    )
    assert status == 201, fs
    new = FaultySds(tmp_path / "sds4", "sds4", c.mdm, "fs4")
    c.sds.append(new)
    new.start()
    new.wait_serving()
    me = c.sds_id(new)
    wait_until(
        lambda: sum(new.fault_state()["unsynced_pages"].values()) >= 3 * 256,  # 3 chunks
        30,
        "moves towards the new SDS to have copied chunks it has not synced",
    )
    targets = [pg["pg"] for pg in c.pgmap()["pgs"] if pg.get("target", {}).get("sds_id") == me]
    assert targets, "no move towards the new SDS"
    # The sources are paused meanwhile: no copy is tried while the target is down
    # (a failed one would restart the move's full copy, hiding what is tested).
    for s in c.sds[:3]:
        assert s.proc is not None
        s.proc.send_signal(signal.SIGSTOP)
    try:
        lost = sum(new.fault_state()["unsynced_pages"].values())
        new.power_cut()
        new.start()
        new.wait_serving()
    finally:
        for s in c.sds[:3]:
            assert s.proc is not None
            s.proc.send_signal(signal.SIGCONT)
    wait_settled(c, "every move done, every PG clean", 120)
    assert lost > 0, "no unsynced copy on the target: the test proves nothing"
    assert "after an unclean stop" in c.mdm.log_text()
    replicas_identical(c)
    qemu_io(
        c.sdc.uri(VOLUME), *[f"read -P 0x5a {n * MiB} 1M" for n in range(CHUNKS)], read_only=True
    )
