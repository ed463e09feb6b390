"""A deleted volume's chunks are never copied by a resync (issue 10 item 1; docs/sds.md
"Tombstones"): the copy jobs leave them out, each SDS frees its own.

A real MDM, three real SDSs and the real SDC; IO through NBD with qemu-io, the replicas
compared by the replica checker.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import _tls
from _cluster import SmallCluster, small_cluster
from _sds import PG_COUNT, wait_copy_jobs_ended
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.tools.replica_check import check_volume
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

LIVE = "live"
CHUNKS = 12  # chunks written in each volume: spread over the PGs of all three SDSs
WAIT_S = 30.0


@pytest.fixture
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {
        "cluster": {
            "heartbeat_timeout_s": 3.0,
            "rebuild_delay_s": 600.0,  # the SDS comes back: a resync, never a rebuild
        }
    }
    with small_cluster(tmp_path_factory.mktemp("notcopied"), LIVE, "64MiB", settings) as cl:
        yield cl


def write(c: SmallCluster, name: str, pattern: int) -> None:
    qemu_io(
        c.sdc.uri(name),
        *[f"write -P {pattern:#x} {i * CHUNK_SIZE} 4k" for i in range(CHUNKS)],
        "flush",
    )


def volume_doc(c: SmallCluster, vid: int) -> dict[str, Any] | None:
    status, doc = c.mdm.api().get(f"/api/v1/volumes/{vid}")
    if status == 404:
        return None
    assert status == 200, doc
    return dict(doc)


def test_resync_after_a_return_never_copies_a_volume_deleted_meanwhile(c: SmallCluster) -> None:
    """Two volumes written; an SDS SIGKILLed; both written again while it is down (the
    survivors record those chunks for its resync); one deleted; the SDS returns. The
    resync copies the live volume's chunks only, the deleted one is freed everywhere
    and purged, the live one reads back with two identical copies."""
    api = c.mdm.api()
    status, gone = api.post(
        "/api/v1/volumes", {"name": "gone", "pool_id": c.pool_id, "size": "64MiB"}
    )
    assert status == 201, gone
    sdc_id = c.sdc.health()["sdc_id"]
    status, mapping = api.post("/api/v1/mappings", {"volume_id": gone["id"], "sdc_id": sdc_id})
    assert status == 201, mapping
    c.sdc.wait_for("the export gone", lambda h: "gone" in {e["name"] for e in h["exports"]})
    write(c, LIVE, 0x11)
    write(c, "gone", 0x22)

    victim = c.sds[2]
    dead = c.sds_id(victim)
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(
        lambda: all(
            pg["state"] != "clean"
            for pg in c.pgmap()["pgs"]
            if dead in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])
        ),
        WAIT_S,
        "the dead SDS's PGs degraded",
        detail=c.logs,
    )
    write(c, LIVE, 0x33)
    write(c, "gone", 0x44)  # recorded for the resync like the live volume's writes
    status, body = api.delete(f"/api/v1/mappings/{mapping['id']}")
    assert status == 204, body
    c.sdc.wait_for("gone unexported", lambda h: "gone" not in {e["name"] for e in h["exports"]})
    status, body = api.delete(f"/api/v1/volumes/{gone['id']}")
    assert status == 204, body

    victim.start()
    victim.wait_serving()

    def all_clean() -> dict[str, Any] | None:
        d = c.pgmap()
        return d if all(pg["state"] == "clean" for pg in d["pgs"]) else None

    doc = wait_until(
        all_clean,
        WAIT_S,
        "every PG clean again after the resync",
        detail=c.logs,
    )
    wait_copy_jobs_ended(c.sds)

    # Every copy job counted only the live volume's chunks of its PG.
    done = {k: r for s in c.sds for k, r in s.health()["resync"]["done"].items()}
    resynced = {int(k.split("/")[1]) for k in done}
    assert resynced, "the returning SDS was resynced"
    assert any(pg_of(gone["id"], i, PG_COUNT) in resynced for i in range(CHUNKS)), (
        "the deleted volume had chunks in the resynced PGs"
    )
    for key, record in done.items():
        pg = int(key.split("/")[1])
        live = sum(pg_of(c.volume_id, i, PG_COUNT) == pg for i in range(CHUNKS))
        assert record["chunks"] == live, (key, record, live)

    # The deleted volume is freed on every SDS and purged; the live one is intact.
    wait_until(
        lambda: (
            volume_doc(c, gone["id"]) is None and all(not s.health()["tombstones"] for s in c.sds)
        ),
        WAIT_S,
        "the deleted volume purged and every SDS's tombstone dropped",
        detail=c.logs,
    )
    vol = {"id": c.volume_id, "name": LIVE, "size_bytes": 64 * CHUNK_SIZE}
    report = asyncio.run(
        check_volume(vol, doc, c.mdm.cluster_secret, tls=_tls.data_context(c.mdm.tls))
    )
    out = report.to_json()
    assert report.ok and report.fully_redundant, out
    assert out["identical"] == out["chunks"] == 64, out  # unwritten chunks: absent on both
    qemu_io(
        c.sdc.uri(LIVE),
        *[f"read -P 0x33 {i * CHUNK_SIZE} 4k" for i in range(CHUNKS)],
        read_only=True,
    )
