"""Deleting a volume frees it: nobody reads its bytes, its space comes back, its id is
never reused (issue 10 item 1; docs/mdm.md "Deleting a volume", docs/sds.md
"Tombstones").

A real MDM, three real SDSs and the real SDC; IO through NBD with qemu-io and fio.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, meshctl_command, small_cluster
from _fio import fio_binary
from _mdm import MdmDaemon
from _sds import SdsDaemon
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE
from test_mdm_backup import mdm_command
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

HEARTBEAT_TIMEOUT_S = 3.0
PURGE_TIMEOUT_S = 30.0
CHUNKS = 12  # written chunks of a test volume: spread over the three SDSs
COPIES = 2


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    with small_cluster(tmp_path_factory.mktemp("delete"), "base", "64MiB", settings) as cl:
        yield cl


def allocated(c: SmallCluster) -> int:
    status, pool = c.mdm.api().get(f"/api/v1/pools/{c.pool_id}")
    assert status == 200, pool
    return int(pool["capacity"]["allocated_bytes"])


def sds_used(c: SmallCluster, count: int = 3) -> list[int]:
    """Bytes used on the devices of the first ``count`` SDSs."""
    return [sum(d["used_bytes"] for d in s.health()["devices"]) for s in c.sds[:count]]


def volume(c: SmallCluster, vid: int) -> dict[str, Any] | None:
    status, doc = c.mdm.api().get(f"/api/v1/volumes/{vid}")
    if status == 404:
        return None
    assert status == 200, doc
    return dict(doc)


def create_mapped(c: SmallCluster, name: str) -> tuple[int, int]:
    """Create a thin volume of 64 MiB mapped to the SDC; (volume id, mapping id)."""
    api = c.mdm.api()
    status, v = api.post("/api/v1/volumes", {"name": name, "pool_id": c.pool_id, "size": "64MiB"})
    assert status == 201, v
    sdc_id = c.sdc.health()["sdc_id"]
    status, m = api.post("/api/v1/mappings", {"volume_id": v["id"], "sdc_id": sdc_id})
    assert status == 201, m
    c.sdc.wait_for(f"the export {name}", lambda h: name in {e["name"] for e in h["exports"]})
    return int(v["id"]), int(m["id"])


def unmap(c: SmallCluster, name: str, mapping_id: int) -> None:
    status, body = c.mdm.api().delete(f"/api/v1/mappings/{mapping_id}")
    assert status == 204, body
    c.sdc.wait_for(f"{name} unexported", lambda h: name not in {e["name"] for e in h["exports"]})


def write_chunks(c: SmallCluster, name: str, pattern: int) -> None:
    """One 4 KiB block at the start of each of CHUNKS chunks, then a flush."""
    qemu_io(
        c.sdc.uri(name),
        *[f"write -P {pattern:#x} {i * CHUNK_SIZE} 4k" for i in range(CHUNKS)],
        "flush",
    )


def wait_purged(c: SmallCluster, vid: int, base_allocated: int) -> None:
    wait_until(
        lambda: volume(c, vid) is None,
        PURGE_TIMEOUT_S,
        f"volume {vid} purged once every SDS freed it",
        detail=c.logs,
    )
    wait_until(
        lambda: allocated(c) == base_allocated,
        PURGE_TIMEOUT_S,
        "the pool's allocated bytes back to their value before the writes",
        detail=lambda: f"allocated {allocated(c)}, expected {base_allocated}",
    )
    # The SDSs freed the chunks (not only the MDM forgot them) and dropped the tombstone.
    wait_until(
        lambda: sds_used(c) == [0, 0, 0] and all(not s.health()["tombstones"] for s in c.sds),
        PURGE_TIMEOUT_S,
        "every SDS's devices empty and its tombstones dropped",
        detail=lambda: (
            f"used {sds_used(c)}, tombstones {[s.health()['tombstones'] for s in c.sds]}"
        ),
    )


def test_deleted_volume_is_never_read_and_its_space_comes_back(c: SmallCluster) -> None:
    """The issue's reproduction: tenantB written, unmapped, deleted; tenantC created and
    mapped reads zeroes. The delete is visible at once (state deleting, name free,
    mapping refused), the chunks are freed on every SDS and the volume disappears."""
    api = c.mdm.api()
    base = allocated(c)
    b_id, b_map = create_mapped(c, "tenantB")
    write_chunks(c, "tenantB", 0xAB)
    wait_until(
        lambda: allocated(c) == base + COPIES * CHUNKS * CHUNK_SIZE,
        15,
        "the SDSs' heartbeats to report tenantB's chunks",
    )
    unmap(c, "tenantB", b_map)
    status, body = api.delete(f"/api/v1/volumes/{b_id}")
    assert status == 204, body

    doc = volume(c, b_id)
    assert doc is not None and doc["state"] == "deleting", doc
    sdc_id = c.sdc.health()["sdc_id"]
    status, body = api.post("/api/v1/mappings", {"volume_id": b_id, "sdc_id": sdc_id})
    assert status == 409, body
    # The name is free at once.
    status, again = api.post(
        "/api/v1/volumes", {"name": "tenantB", "pool_id": c.pool_id, "size": "64MiB"}
    )
    assert status == 201, again
    assert again["id"] > b_id

    c_id, c_map = create_mapped(c, "tenantC")
    assert c_id > again["id"]
    qemu_io(c.sdc.uri("tenantC"), f"read -P 0 0 {CHUNKS * CHUNK_SIZE}", read_only=True)

    unmap(c, "tenantC", c_map)
    for vid in (c_id, again["id"]):
        status, body = api.delete(f"/api/v1/volumes/{vid}")
        assert status == 204, body
    wait_purged(c, b_id, base)
    for vid in (c_id, again["id"]):
        wait_until(
            lambda v=vid: volume(c, v) is None,  # type: ignore[misc]
            PURGE_TIMEOUT_S,
            f"volume {vid} purged",
        )


def test_sds_down_at_delete_frees_its_copies_when_it_returns(c: SmallCluster) -> None:
    """An SDS killed before the delete holds the purge back (the volume stays
    deleting, its space counted) until it returns and frees its copies."""
    api = c.mdm.api()
    base = allocated(c)
    vid, mid = create_mapped(c, "down1")
    write_chunks(c, "down1", 0x5A)
    wait_until(
        lambda: allocated(c) == base + COPIES * CHUNKS * CHUNK_SIZE,
        15,
        "the SDSs' heartbeats to report down1's chunks",
    )
    unmap(c, "down1", mid)
    victim = c.sds[2]
    victim_held = sds_used(c)[2]
    assert victim_held > 0, "the victim SDS must hold copies of the volume"
    victim.stop(signal.SIGKILL)
    try:
        status, body = api.delete(f"/api/v1/volumes/{vid}")
        assert status == 204, body
        # The live SDSs free their copies ...
        wait_until(
            lambda: sds_used(c, 2) == [0, 0],
            PURGE_TIMEOUT_S,
            "the two live SDSs to free their copies",
        )
        # ... the volume stays until the third returns, its copies counted as used.
        doc = wait_until(
            lambda: (d := volume(c, vid)) and d["bytes_left"] == victim_held and d,
            15,
            "the MDM to show the victim's copies as what is left",
            detail=lambda: f"{volume(c, vid)}; victim held {victim_held}",
        )
        assert doc["state"] == "deleting", doc
        assert doc["chunks_left"] * CHUNK_SIZE == doc["bytes_left"], doc
        assert allocated(c) == base + victim_held
        assert volume(c, vid) is not None, "purged while an SDS holding copies is down"
    finally:
        victim.start()
    victim.wait_serving()
    wait_purged(c, vid, base)


# -- a large volume, freed in the background across restarts --------------------------

BIG_CHUNKS = 100_000  # one 4 KiB block written in each: small on disk
BIG_DEVICE = "128GiB"  # sparse; room for two copies of every chunk over three SDSs
FREE_RATE = 4000  # chunks per second per SDS: the free takes long enough to restart


def big_sds(workdir: Path, name: str, mdm: MdmDaemon, fault_set: str | None) -> SdsDaemon:
    return SdsDaemon(
        workdir,
        name,
        mdm,
        fault_set,
        capacity=BIG_DEVICE,
        settings={"delete_free_rate": FREE_RATE},
    )


def meshctl_json(c: SmallCluster, *args: str) -> Any:
    proc = subprocess.run(
        [*meshctl_command(), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=c.mdm.env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_large_volume_is_freed_in_the_background_across_restarts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """100,000 written chunks: the delete returns at once (the name is reusable), the
    progress shows in the API and meshctl, the MDM and an SDS (SIGKILLed) restart in the
    middle of the free, and every chunk is freed all the same."""
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    root = tmp_path_factory.mktemp("bigdelete")
    size = f"{BIG_CHUNKS}MiB"
    with small_cluster(root, "big", size, settings, make_sds=big_sds) as c:
        api = c.mdm.api()
        base = allocated(c)
        # One 4 KiB write at the start of every chunk: fio's sequential write with a
        # skip of the rest of the chunk after each block.
        fio = subprocess.run(
            [
                fio_binary(),
                "--name=big",
                "--ioengine=nbd",
                f"--uri={c.sdc.uri('big')}",
                "--rw=write:1020k",
                "--bs=4k",
                f"--size={BIG_CHUNKS * CHUNK_SIZE}",  # bytes: fio reads "MiB" as 10**6
                f"--io_size={BIG_CHUNKS * 4096}",
                "--iodepth=32",
                "--output-format=json",
                f"--output={root / 'fio.json'}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert fio.returncode == 0, fio.stdout + fio.stderr
        written = json.loads((root / "fio.json").read_text())["jobs"][0]["write"]["total_ios"]
        assert written == BIG_CHUNKS
        total = COPIES * BIG_CHUNKS * CHUNK_SIZE
        wait_until(
            lambda: allocated(c) == base + total,
            30,
            "the heartbeats to report every copy of the big volume",
            detail=lambda: (
                f"allocated {allocated(c)}; "
                + str(
                    [
                        (d["used_bytes"], d["free_slots"])
                        for s in c.sds
                        for d in s.health()["devices"]
                    ]
                )
                + str(c.mdm.api().get(f"/api/v1/volumes/{c.volume_id}"))
            ),
        )
        status, maps = api.get(f"/api/v1/mappings?volume_id={c.volume_id}")
        assert status == 200, maps
        unmap(c, "big", maps["mappings"][0]["id"])

        status, body = api.delete(f"/api/v1/volumes/{c.volume_id}")
        assert status == 204, body
        status, again = api.post(
            "/api/v1/volumes", {"name": "big", "pool_id": c.pool_id, "size": "1GiB"}
        )
        assert status == 201, again

        def in_progress() -> tuple[dict[str, Any], int] | None:
            # the pool's allocated bytes read first: both only go down while the free
            # goes on, so an allocation read before the listing is at least what it was
            # when the listing was made (read after, a heartbeat in between could have
            # lowered it below the listing's bytes_left)
            before = allocated(c)
            vols = meshctl_json(c, "volume", "list")["volumes"]
            (v,) = [v for v in vols if v["id"] == c.volume_id]
            in_flight = v["state"] == "deleting" and 0 < v["bytes_left"] < total
            return (v, before) if in_flight else None

        doc, before = wait_until(in_progress, 30, "meshctl volume list to show the free under way")
        assert doc["chunks_left"] * CHUNK_SIZE == doc["bytes_left"]
        assert before >= base + doc["bytes_left"]  # counted as used until freed

        # Restarts in the middle of the free.
        c.mdm.restart()
        victim = c.sds[0]
        assert sum(d["used_bytes"] for d in victim.health()["devices"]) > 0, (
            "the victim finished its free before the restart: slow FREE_RATE down"
        )
        victim.stop(signal.SIGKILL)
        victim.start()
        victim.wait_serving()

        wait_until(
            lambda: volume(c, c.volume_id) is None,
            120,
            "the big volume purged",
            detail=c.logs,
        )
        wait_until(
            lambda: allocated(c) == base,
            30,
            "the pool's allocated bytes back to their value before the writes",
            detail=lambda: f"allocated {allocated(c)}, expected {base}",
        )
        assert sds_used(c) == [0, 0, 0]
        status, body = api.delete(f"/api/v1/volumes/{again['id']}")
        assert status == 204, body


# -- after a database restore -----------------------------------------------------------


def test_restored_database_catches_up_with_the_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The MDM's SQLite file is copied while the MDM is stopped; a volume is then
    created and written, and a map epoch moves on; the old copy is put back. The MDM
    raises its map epoch and cluster epoch above what the SDSs and the SDC have seen,
    tombstones the volume it no longer knows (its chunks are freed) and never hands
    out its id again: a new volume reads zeroes and the SDC follows the new maps."""
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    root = tmp_path_factory.mktemp("restore")
    db = root / "mdm.db"
    with small_cluster(root, "base", "64MiB", settings) as c:
        api = c.mdm.api()
        assert c.mdm.stop() == 0
        backup = root / "backup.db"
        backup.write_bytes(db.read_bytes())
        c.mdm.start()

        later, _ = create_mapped(c, "later")
        write_chunks(c, "later", 0x77)
        wait_until(lambda: sum(sds_used(c)) > 0, 15, "the SDSs to store the writes")
        status, temp = api.post(
            "/api/v1/volumes", {"name": "temp", "pool_id": c.pool_id, "size": "64MiB"}
        )
        assert status == 201, temp
        status, body = api.delete(f"/api/v1/volumes/{temp['id']}")
        assert status == 204, body
        wait_until(lambda: volume(c, temp["id"]) is None, PURGE_TIMEOUT_S, "temp purged")
        seen = max(s.health()["maps"][str(c.pool_id)] for s in c.sds)

        assert c.mdm.stop() == 0
        for suffix in ("-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        db.write_bytes(backup.read_bytes())
        c.mdm.start()

        def pool_epoch() -> int:
            status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
            assert status == 200, pool
            return int(pool["map_epoch"])

        wait_until(
            lambda: (
                pool_epoch() > seen
                and all(s.health()["maps"][str(c.pool_id)] == pool_epoch() for s in c.sds)
            ),
            30,
            f"the pool's map epoch above {seen}, the SDSs on it",
            detail=c.logs,
        )
        # The volume written after the copy was taken: tombstoned, freed, purged.
        wait_until(
            lambda: sds_used(c) == [0, 0, 0],
            PURGE_TIMEOUT_S,
            "the chunks of the volume the restored database does not know freed",
            detail=c.logs,
        )
        wait_until(lambda: volume(c, later) is None, PURGE_TIMEOUT_S, "the unknown volume purged")
        fresh, _ = create_mapped(c, "fresh")  # the SDC follows the restored MDM's maps
        assert fresh > later
        qemu_io(c.sdc.uri("fresh"), f"read -P 0 0 {CHUNKS * CHUNK_SIZE}", read_only=True)


def test_meshblock_mdm_restore_makes_the_copy_safe_before_any_sds_reports(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``meshblock-mdm backup`` while the cluster runs; then a volume created and
    written, and one the backup has deleted. The SDSs are stopped, the MDM restored
    with ``meshblock-mdm restore`` and started: a volume created before any SDS has
    reported gets an id no SDS has chunks of and reads zeroes; once the SDSs are back,
    the newer volume's chunks and the deleted one's are freed, and the SDSs follow the
    restored MDM's maps; the deleted volume, back in the restored database, reads
    zeroes."""
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    root = tmp_path_factory.mktemp("mdm-restore")
    with small_cluster(root, "base", "64MiB", settings) as c:
        api = c.mdm.api()
        gone, gone_map = create_mapped(c, "gone")
        write_chunks(c, "gone", 0x55)
        backup = root / "mdm.backup"
        done = mdm_command(c.mdm, "backup", str(backup))
        assert done.returncode == 0, done.stderr

        later, _ = create_mapped(c, "later")
        write_chunks(c, "later", 0x77)
        unmap(c, "gone", gone_map)
        status, body = api.delete(f"/api/v1/volumes/{gone}")
        assert status == 204, body
        wait_until(lambda: volume(c, gone) is None, PURGE_TIMEOUT_S, "gone purged")
        seen = max(s.health()["maps"][str(c.pool_id)] for s in c.sds)

        for s in c.sds:
            assert s.stop() == 0
        assert c.mdm.stop() == 0
        restored = mdm_command(c.mdm, "restore", str(backup))
        assert restored.returncode == 0, restored.stderr
        c.mdm.start()
        status, fresh = api.post(
            "/api/v1/volumes", {"name": "fresh", "pool_id": c.pool_id, "size": "64MiB"}
        )
        assert status == 201, fresh
        assert fresh["id"] > later, (fresh["id"], later)
        status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
        assert status == 200, pool
        assert pool["map_epoch"] > seen, (pool["map_epoch"], seen)

        for s in c.sds:
            s.start()
        sdc_id = c.sdc.health()["sdc_id"]
        status, m = api.post("/api/v1/mappings", {"volume_id": fresh["id"], "sdc_id": sdc_id})
        assert status == 201, m
        c.sdc.wait_for("the export fresh", lambda h: "fresh" in {e["name"] for e in h["exports"]})
        qemu_io(c.sdc.uri("fresh"), f"read -P 0 0 {CHUNKS * CHUNK_SIZE}", read_only=True)

        def pool_epoch() -> int:
            status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
            assert status == 200, pool
            return int(pool["map_epoch"])

        wait_until(
            lambda: sds_used(c) == [0, 0, 0],
            PURGE_TIMEOUT_S,
            "the chunks of the newer volume and of the deleted one freed",
            detail=c.logs,
        )
        # "gone" was purged before the restore: the SDSs dropped its tombstone, so the
        # restored database keeps it, with no chunk left anywhere (docs/mdm.md).
        qemu_io(c.sdc.uri("gone"), f"read -P 0 0 {CHUNKS * CHUNK_SIZE}", read_only=True)
        wait_until(lambda: volume(c, later) is None, PURGE_TIMEOUT_S, "the unknown volume purged")
        wait_until(
            lambda: all(s.health()["maps"][str(c.pool_id)] == pool_epoch() for s in c.sds),
            30,
            "the SDSs on the restored MDM's maps",
            detail=c.logs,
        )
        qemu_io(c.sdc.uri("fresh"), "write -P 0x99 0 4k", "flush")
        qemu_io(c.sdc.uri("fresh"), "read -P 0x99 0 4k", read_only=True)


def test_reported_epochs_above_the_cap_are_refused(c: SmallCluster) -> None:
    """An SDS or SDC heartbeat with an epoch of 2^63-1 (the reconciliation would
    overflow BIGINT raising above it) is refused with 422 and changes nothing."""
    api = c.mdm.api()
    status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
    assert status == 200, pool
    sds_id = c.sds[0].health()["sds_id"]
    top = 2**63 - 1
    for body in (
        {"epoch": top},
        {"map_epochs": [{"pool_id": c.pool_id, "epoch": top}]},
        {"tombstones": [{"id": 1, "chunks_left": 0, "epoch": top}]},
    ):
        status, doc = api.post(f"/api/v1/sds/{sds_id}/heartbeat", body, token=c.mdm.cluster_secret)
        assert status == 422, (body, doc)
    sdc_id = c.sdc.health()["sdc_id"]
    status, doc = api.post(
        f"/api/v1/sdc/{sdc_id}/heartbeat", {"epoch": top}, token=c.mdm.cluster_secret
    )
    assert status == 422, doc
    status, after = api.get(f"/api/v1/pools/{c.pool_id}")
    assert status == 200, after
    assert after["map_epoch"] < 2**62, after
    qemu_io(c.sdc.uri("base"), "read 0 4k", read_only=True)


def test_an_implausible_volume_id_does_not_exhaust_the_ids(c: SmallCluster) -> None:
    """A heartbeat that marks the database restored (a map epoch above the MDM's) and
    reports chunks of volume 2^31-1 (a broken SDS, a fuzzer) does not raise the volume
    id counter there nor tombstone that id: the next volume gets an ordinary id. (The
    API addresses ids up to 2^31-1: on PostgreSQL the counter at its end made every
    create a 500; on SQLite the next volume got an id no URL can name.)"""
    api = c.mdm.api()

    def pool_epoch() -> int:
        status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
        assert status == 200, pool
        return int(pool["map_epoch"])

    above = pool_epoch() + 5
    sds_id = c.sds[0].health()["sds_id"]
    body = {
        "map_epochs": [{"pool_id": c.pool_id, "epoch": above}],
        "volumes": [{"id": 2**31 - 1, "chunks": 1}],
    }
    status, doc = api.post(f"/api/v1/sds/{sds_id}/heartbeat", body, token=c.mdm.cluster_secret)
    assert status == 200, doc
    wait_until(lambda: pool_epoch() > above, 30, "the report reconciled")
    status, listed = api.get("/api/v1/volumes")
    assert status == 200, listed
    assert all(v["id"] < 2**20 for v in listed["volumes"]), listed
    status, v = api.post(
        "/api/v1/volumes", {"name": "after", "pool_id": c.pool_id, "size": "64MiB"}
    )
    assert status == 201, v
    assert v["id"] < 2**20, v
    status, _ = api.delete(f"/api/v1/volumes/{v['id']}")
    assert status == 204


def test_a_tombstone_from_an_sds_outside_the_pool_deletes_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """After ``meshblock-mdm restore``, an SDS with no device in a live volume's pool
    reports a tombstone of it (with an epoch newer than the backup): the volume stays
    active and mapped."""
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    root = tmp_path_factory.mktemp("intruder")
    with small_cluster(root, "base", "64MiB", settings) as c:
        api = c.mdm.api()
        status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
        assert status == 200, pool
        status, intruder = api.post(
            "/api/v1/sds",
            {
                "name": "intruder",
                "protection_domain_id": pool["protection_domain_id"],
                "address": "127.0.0.1",
            },
        )
        assert status == 201, intruder
        status, vols = api.get("/api/v1/volumes")
        assert status == 200, vols
        (base,) = [v for v in vols["volumes"] if v["name"] == "base"]
        backup = root / "mdm.backup"
        done = mdm_command(c.mdm, "backup", str(backup))
        assert done.returncode == 0, done.stderr
        assert c.mdm.stop() == 0
        restored = mdm_command(c.mdm, "restore", str(backup))
        assert restored.returncode == 0, restored.stderr
        c.mdm.start()

        status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
        assert status == 200, pool
        # A map epoch above the pool's in the same report: seeing the pool's raised
        # shows this report was reconciled (tombstone included).
        above = int(pool["map_epoch"]) + 10
        status, doc = api.post(
            f"/api/v1/sds/{intruder['id']}/heartbeat",
            {
                "map_epochs": [{"pool_id": c.pool_id, "epoch": above}],
                "tombstones": [{"id": base["id"], "chunks_left": 0, "epoch": above}],
            },
            token=c.mdm.cluster_secret,
        )
        assert status == 200, doc

        def pool_epoch() -> int:
            status, pool = api.get(f"/api/v1/pools/{c.pool_id}")
            assert status == 200, pool
            return int(pool["map_epoch"])

        wait_until(lambda: pool_epoch() > above, 30, "the intruder's report reconciled")
        after = volume(c, base["id"])
        assert after is not None and after["state"] == "active", after
        qemu_io(c.sdc.uri("base"), "write -P 0x42 0 4k", "flush")
        qemu_io(c.sdc.uri("base"), "read -P 0x42 0 4k", read_only=True)
