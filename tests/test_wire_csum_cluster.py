"""A write payload damaged between the SDC and the SDS, and between the primary and
its secondary, in a running cluster (docs/protocol.md §8.6, docs/sds.md
"Checksums"): each SDS's test-only fault hook (tests/_faults.py) flips a byte of the
next write payload it receives, before anything checks it. The primary finds the
client's payload damaged, the secondary the forwarded one: each is refused
(CHECKSUM_MISMATCH), counted by the sender's role, retried by the SDC, and nothing
damaged is stored: the bytes read back through NBD are those written, and both copies
are identical. Real MDM, three SDSs, the SDC; IO with qemu-io."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _cluster import SmallCluster, small_cluster
from _faults import FaultySds, make_faulty
from test_faults import assert_no_tracebacks, replicas_identical, wait_settled
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "cs1"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SmallCluster]:
    every = make_faulty({"sds1", "sds2", "sds3"})
    with small_cluster(tmp_path, VOLUME, "64MiB", {}, make_sds=every) as c:
        yield c


def sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in a /metrics text; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sds_metrics(sds: FaultySds) -> str:
    r = sds.control_get("/metrics")
    assert r.status == 200, r.body
    return str(r.body)


def test_a_damaged_write_payload_is_refused_retried_and_never_stored(
    cluster: SmallCluster,
) -> None:
    c = cluster
    uri = c.sdc.uri(VOLUME)
    qemu_io(uri, "write -P 0x5a 0 64k", "flush")  # the chunk now exists on both copies
    wait_settled(c, "every PG clean", 60.0)
    every = [d for d in c.sds if isinstance(d, FaultySds)]
    assert len(every) == 3
    for sds in every:
        sds.faults(action="flip_payload", count=1)
    qemu_io(uri, "write -P 0xa5 4096 8k", "flush")  # the primary's flip, then the secondary's
    qemu_io(
        uri,
        "read -P 0x5a 0 4k",
        "read -P 0xa5 4096 8k",
        "read -P 0x5a 12288 53248",
        read_only=True,
    )
    flipped = {sds.name: sds.fault_state()["payload_flips"]["flipped"] for sds in every}
    assert sorted(flipped.values()) == [0, 1, 1], flipped  # the third holds no copy
    by_role = {"client": 0.0, "sds_peer": 0.0}
    for sds in every:
        text = sds_metrics(sds)
        for role in by_role:
            by_role[role] += sample(
                text, f'meshblock_sds_wire_checksum_mismatches_total{{role="{role}"}}'
            )
    assert by_role == {"client": 1.0, "sds_peer": 1.0}, by_role
    retried = sample(c.sdc.metrics(), 'meshblock_sdc_retries_total{reason="checksum_mismatch"}')
    assert retried == 2.0
    for sds in every:
        sds.faults(action="clear")
    replicas_identical(c)  # both copies of every chunk identical: nothing damaged kept
    for sds in every:  # no damaged block reached a disk
        lines = sds_metrics(sds).splitlines()
        counts = [x for x in lines if x.startswith("meshblock_sds_checksum_errors_total{")]
        assert counts and all(x.endswith(" 0.0") for x in counts), (sds.name, counts)
    assert_no_tracebacks(c)
