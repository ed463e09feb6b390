"""IO survives the loss of one SDS (docs/design.md, invariants 1, 3, 4; docs/mdm.md "Failures").

A real MDM with a short heartbeat timeout, three real SDSs in three fault sets and the
real SDC. fio writes (and then verifies) a volume through NBD while one SDS is
SIGKILLed: the MDM makes its PGs degraded with the survivor as primary, the SDC
retries on the new map, and fio sees no error. The killed SDS comes back: its PGs stay
degraded (no resync yet), IO goes on and its stale copies are never read. Requests
carrying the epoch from before the failover are refused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

import _tls
from _cluster import SmallCluster, small_cluster
from _sds import PG_COUNT, SdsDaemon
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.sds.maps import PgMap
from meshblock.sds.replication import DegradedWrites
from meshblock.tools.replica_check import check_volume
from meshblock.wire import PeerRole, RequestError, Status, WireClient
from test_nbd_server import qemu_io, tool

pytestmark = pytest.mark.cluster

HEARTBEAT_TIMEOUT_S = 3.0
VOLUME = "fo1"
FIO_SIZE = "48M"
FIO_RATE_IOPS = 1500  # 48 MiB of 4 KiB writes take ~8 s: the kill lands mid-run
KILL_AFTER_S = 2.5


Failover = SmallCluster


@pytest.fixture(scope="module")
def fo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    # resync held off: this test checks the stale copies while they are stale
    # (tests/test_resync.py covers the resync)
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "resync_delay_s": 3600.0}}
    with small_cluster(tmp_path_factory.mktemp("failover"), VOLUME, "1GiB", settings) as c:
        yield c


def fio(fo: Failover, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            tool("fio"),
            "--name=failover",
            "--ioengine=nbd",
            f"--uri={fo.sdc.uri(VOLUME)}",
            "--rw=randwrite",
            "--bs=4k",
            f"--size={FIO_SIZE}",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=4242",
            "--output-format=terse",
            "--verify_state_save=0",  # no state file in the working directory
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def fio_result(fo: Failover, proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"fio hung:\n{out}\n{fo.logs()}") from None
    assert proc.returncode == 0, f"fio exited {proc.returncode}:\n{out}\n{fo.logs()}"
    # terse v3: field 5 is the job's error number
    fields = [line.split(";") for line in out.splitlines() if line.count(";") > 10]
    assert fields, out
    assert all(f[4] == "0" for f in fields), out
    assert "verify" not in out.lower() or "bad" not in out.lower(), out
    return out


def wait_degraded(fo: Failover, dead: int, timeout: float = 20.0) -> dict[str, Any]:
    def degraded() -> dict[str, Any] | None:
        doc = fo.pgmap()
        touched = [
            pg for pg in doc["pgs"] if dead in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])
        ]
        return doc if touched and all(pg["state"] == "degraded" for pg in touched) else None

    return wait_until(
        degraded, timeout, f"the PGs of SDS {dead} degraded", interval=0.2, detail=fo.logs
    )


def test_one_sds_lost_and_back(fo: Failover) -> None:
    t_start = time.monotonic()
    before = fo.pgmap()
    assert all(pg["state"] == "clean" for pg in before["pgs"])
    victim = fo.sds[1]
    dead = fo.sds_id(victim)

    # (a) fio writes, the victim dies mid-run, fio's verify pass reads it all back.
    t0 = time.monotonic()
    proc = fio(fo, f"--rate_iops={FIO_RATE_IOPS}")
    time.sleep(KILL_AFTER_S)
    assert proc.poll() is None, "fio finished before the kill: raise FIO_SIZE"
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    after = wait_degraded(fo, dead)
    fio_result(fo, proc, timeout=90)
    print(f"fio write+verify across the failover: {time.monotonic() - t0:.1f} s")

    # The MDM: every PG with a copy on the victim is degraded, the survivor primary,
    # the stale copy kept as secondary; the others are clean and unchanged.
    assert after["epoch"] > before["epoch"]
    for old, new in zip(before["pgs"], after["pgs"], strict=True):
        copies = (old["primary"]["sds_id"], old["secondary"]["sds_id"])
        if dead not in copies:
            assert new["state"] == "clean" and new["primary"] == old["primary"], new
            continue
        assert new["state"] == "degraded", new
        survivor = copies[1] if copies[0] == dead else copies[0]
        assert new["primary"]["sds_id"] == survivor, new
        assert new["secondary"]["sds_id"] == dead, new
    # The survivors remember which chunks they wrote alone (for a later delta resync).
    tracked = {
        pg
        for d in fo.sds
        if d is not victim
        for pg in d.health()["degraded_writes"].get(str(fo.pool_id), {})
    }
    assert tracked, "no survivor recorded writes made while degraded"
    degraded_pgs = {str(pg["pg"]) for pg in after["pgs"] if pg["state"] == "degraded"}
    assert tracked <= degraded_pgs

    # Data written before and after the kill reads back (again, from a fresh client).
    fio_result(fo, fio(fo, "--verify_only"), timeout=60)

    # (b) The victim returns: its PGs stay degraded, nothing of it is read.
    victim.start()
    victim.wait_serving()
    victim.wait(
        lambda: victim.health()["maps"].get(str(fo.pool_id), 0) >= after["epoch"],
        10,
        f"{victim.name} to learn map epoch {after['epoch']}",
    )
    time.sleep(HEARTBEAT_TIMEOUT_S)  # a failure check has seen it connected
    back = fo.pgmap()
    assert [pg["state"] for pg in back["pgs"]] == [pg["state"] for pg in after["pgs"]]
    assert [pg["primary"] for pg in back["pgs"]] == [pg["primary"] for pg in after["pgs"]]

    # New data after the return, over the whole fio range: the stale copies (which
    # still hold fio's blocks) must neither receive it nor serve it.
    uri = fo.sdc.uri(VOLUME)
    qemu_io(uri, "write -P 0x5a 0 8M", "write -P 0xc3 24M 8M", "flush")
    qemu_io(uri, "read -P 0x5a 0 8M", "read -P 0xc3 24M 8M", read_only=True)
    stale_differs = asyncio.run(stale_copies_are_stale(fo, victim, back))
    assert stale_differs, "no chunk written after the return lives in a degraded PG"

    # The replica checker compares the clean PGs only and reports the degraded ones.
    vol = {"id": fo.volume_id, "name": VOLUME, "size_bytes": 64 * CHUNK_SIZE}
    report = asyncio.run(
        check_volume(vol, back, fo.mdm.cluster_secret, tls=_tls.data_context(fo.mdm.tls))
    )
    doc = report.to_json()
    assert report.ok and not report.fully_redundant, doc
    assert doc["degraded_pgs"] == sorted(int(pg) for pg in degraded_pgs), doc
    assert doc["skipped_degraded"] > 0 and doc["identical"] > 0, doc
    assert doc["identical"] + doc["skipped_degraded"] == 64, doc

    # (c) Invariant 3: the epoch from before the failover is refused everywhere.
    asyncio.run(old_epoch_refused(fo, victim, before, back))
    print(f"test body: {time.monotonic() - t_start:.1f} s")


async def stale_copies_are_stale(fo: Failover, victim: SdsDaemon, doc: dict[str, Any]) -> int:
    """How many chunks of the new data are in a degraded PG whose stale copy (on the
    victim) did not get it, checked with CHUNK_READ_RAW on both copies."""
    pgs = {pg["pg"]: pg for pg in doc["pgs"]}
    ports = {int(k): v["data_port"] for k, v in doc["sds"].items()}
    tls = victim.data_tls()
    n = 0
    for chunk in list(range(8)) + list(range(24, 32)):
        pg = pgs[pg_of(fo.volume_id, chunk, doc["pg_count"])]
        if pg["state"] != "degraded":
            continue
        assert pg["secondary"]["sds_id"] == fo.sds_id(victim)
        want = (b"\x5a" if chunk < 8 else b"\xc3") * CHUNK_SIZE
        primary_port = ports[pg["primary"]["sds_id"]]
        async with (
            await WireClient.connect(
                "127.0.0.1", primary_port, fo.mdm.cluster_secret, PeerRole.TOOL, tls=tls
            ) as p,
            await WireClient.connect(
                "127.0.0.1", victim.data_port, fo.mdm.cluster_secret, PeerRole.TOOL, tls=tls
            ) as s,
        ):
            mine = await p.read_raw_chunk(fo.volume_id, chunk)
            stale = await s.read_raw_chunk(fo.volume_id, chunk)
        assert bytes(mine.data) == want, f"chunk {chunk}: the primary lacks the new data"
        assert bytes(stale.data) != want, f"chunk {chunk}: the stale copy took new writes"
        n += 1
    return n


async def old_epoch_refused(
    fo: Failover, victim: SdsDaemon, before: dict[str, Any], now: dict[str, Any]
) -> None:
    secret = fo.mdm.cluster_secret
    pool = fo.pool_id
    dead = fo.sds_id(victim)
    ports = {int(k): v["data_port"] for k, v in now["sds"].items()}
    old, new = before["epoch"], now["epoch"]
    data = os.urandom(4096)
    # a chunk whose PG had the victim as primary: the promoted primary refuses the old
    # epoch; one whose PG had it as secondary: so does the stale secondary
    promoted = stale_sec = None
    for chunk in range(4096):
        pg = pg_of(fo.volume_id, chunk, PG_COUNT)
        was = before["pgs"][pg]
        if was["primary"]["sds_id"] == dead and promoted is None:
            promoted = (chunk, pg)
        if was["secondary"]["sds_id"] == dead and stale_sec is None:
            stale_sec = (chunk, pg)
        if promoted and stale_sec:
            break
    assert promoted is not None and stale_sec is not None

    chunk, pg = promoted
    survivor = now["pgs"][pg]["primary"]["sds_id"]
    # as the cluster's SDC, to which the volume is mapped (the SDS checks client IO
    # against the mappings)
    tls = victim.data_tls(f"sdc:{fo.sdc.settings['sdc'].get('guid') or fo.sdc.cert_guid}")
    async with await WireClient.connect("127.0.0.1", ports[survivor], secret, tls=tls) as cl:
        with pytest.raises(RequestError) as e:
            await cl.write(ChunkRef(pool, pg, old, fo.volume_id, chunk), 0, data)
        assert e.value.status == Status.EPOCH_STALE
        with pytest.raises(RequestError) as e:
            await cl.read(ChunkRef(pool, pg, old, fo.volume_id, chunk), 0, 4096)
        assert e.value.status == Status.EPOCH_STALE
    # the victim, once primary of that PG, serves it at no epoch
    async with await WireClient.connect("127.0.0.1", victim.data_port, secret, tls=tls) as cl:
        for epoch, status in ((old, Status.EPOCH_STALE), (new, Status.NOT_PRIMARY)):
            with pytest.raises(RequestError) as e:
                await cl.read(ChunkRef(pool, pg, epoch, fo.volume_id, chunk), 0, 4096)
            assert e.value.status == status
            with pytest.raises(RequestError) as e:
                await cl.write(ChunkRef(pool, pg, epoch, fo.volume_id, chunk), 0, data)
            assert e.value.status == status

    # the stale secondary refuses replicated writes, at the old epoch and the current
    chunk, pg = stale_sec
    async with await WireClient.connect(
        "127.0.0.1",
        victim.data_port,
        secret,
        PeerRole.SDS_PEER,
        tls=victim.data_tls(PeerRole.SDS_PEER),
    ) as peer:
        for epoch, status in ((old, Status.EPOCH_STALE), (new, Status.NOT_REPLICA)):
            with pytest.raises(RequestError) as e:
                await peer.repl_write(ChunkRef(pool, pg, epoch, fo.volume_id, chunk), 0, data)
            assert e.value.status == status


# -- units: map states and the record of degraded writes -------------------------------


def _doc(states: list[str | None]) -> dict[str, Any]:
    pgs = []
    for i, st in enumerate(states):
        pg: dict[str, Any] = {
            "pg": i,
            "primary": {"sds_id": 1, "device_id": 10},
            "secondary": {"sds_id": 2, "device_id": 20},
        }
        if st is not None:
            pg["state"] = st
        pgs.append(pg)
    return {
        "pool_id": 7,
        "epoch": 3,
        "pg_count": len(states),
        "pgs": pgs,
        "sds": {"1": {"address": "a", "data_port": 1}, "2": {"address": "b", "data_port": 2}},
    }


def test_map_state_parsed_absent_is_clean() -> None:
    m = PgMap.from_doc(_doc([None, "clean", "degraded", "inactive"]))
    assert m.clean == (True, True, False, False)


def test_degraded_writes_recorded_until_clean() -> None:
    d = DegradedWrites()
    d.record(ChunkRef(7, 2, 3, 100, 5))
    d.record(ChunkRef(7, 2, 4, 100, 5))  # the same chunk, at another epoch
    d.record(ChunkRef(7, 3, 3, 100, 6))
    assert d.counts() == {7: {2: 1, 3: 1}}
    d.prune(PgMap.from_doc(_doc(["clean", "clean", "degraded", "clean"])), 1)
    assert d.chunks(7, 2) == {(100, 5)} and d.counts() == {7: {2: 1}}
    d.prune(PgMap.from_doc(_doc(["clean", "clean", "degraded", "clean"])), 2)  # not ours
    assert d.counts() == {}
