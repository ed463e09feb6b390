"""End to end: a real MDM, three real SDSs in three fault sets and the real SDC, with
real NBD clients (qemu-io, nbdcopy, nbdinfo) writing and reading volumes through it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _sds
from _mdm import MdmDaemon
from _process import ProcessError
from _sdc import SdcDaemon
from _wait import wait_until
from test_nbd_server import qemu_io, run, sha256, tool
from test_sdc_daemon import ok

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
POOL = "pool-e2e"
PD = "pd-e2e"


class SdsDaemon(_sds.SdsDaemon):
    """One ``python -m meshblock.sds`` process with a 2 GiB file device in this
    module's pool; the SDS's own map-poll and peer timeouts."""

    def __init__(self, workdir: Path, mdm: MdmDaemon, name: str, fault_set: str) -> None:
        super().__init__(
            workdir,
            name,
            mdm,
            fault_set,
            pool=POOL,
            protection_domain=PD,
            capacity="2GiB",
            settings={
                "heartbeat_interval_s": 0.5,
                "map_poll_timeout_s": None,
                "peer_timeout_s": None,
            },
        )

    def health(self) -> dict[str, Any] | None:  # type: ignore[override]
        try:
            return super().health()
        except (OSError, AssertionError):
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Like the base class, but a hanging SDS is killed and reported as -9."""
        try:
            return super().stop(sig, timeout)
        except ProcessError:
            return -9


class Cluster:
    def __init__(self, mdm: MdmDaemon, sds: list[SdsDaemon], sdc: SdcDaemon, pool_id: int) -> None:
        self.mdm = mdm
        self.api = mdm.api()
        self.sds = sds
        self.sdc = sdc
        self.pool_id = pool_id
        self.sdc_id = int(sdc.wait_for("registration", lambda h: h["sdc_id"] is not None)["sdc_id"])

    def volume(self, name: str, size: str, **mapping: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Create a thin volume, map it to the SDC, wait for the export."""
        vol = ok(
            self.api.post(
                "/api/v1/volumes",
                {"name": name, "pool_id": self.pool_id, "size": size, "type": "thin"},
            ),
            201,
        )
        m = ok(
            self.api.post(
                "/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": self.sdc_id, **mapping}
            ),
            201,
        )
        self.sdc.wait_for(f"export {name}", lambda h: name in {e["name"] for e in h["exports"]})
        return vol, m

    def unmap(self, mapping: dict[str, Any], name: str) -> None:
        assert self.api.delete(f"/api/v1/mappings/{mapping['id']}").status == 204
        self.sdc.wait_for(
            f"{name} unexported", lambda h: name not in {e["name"] for e in h["exports"]}
        )


def wait_pg_map_complete(mdm: MdmDaemon, pool_id: int, timeout: float = 60) -> dict[str, Any]:
    def complete() -> dict[str, Any] | None:
        doc: dict[str, Any] = ok(mdm.api().get(f"/api/v1/pools/{pool_id}/pgmap"))
        full = doc["pgs"] and all(pg["primary"] and pg["secondary"] for pg in doc["pgs"])
        return doc if full else None

    return wait_until(complete, timeout, "the PG map to fill", interval=0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("e2e")
    mdm = MdmDaemon(base / "mdm", f"sqlite+aiosqlite:///{base / 'mdm' / 'mdm.db'}", tls=True)
    mdm.start()
    sds: list[SdsDaemon] = []
    sdc: SdcDaemon | None = None
    try:
        api = mdm.api()
        pd = ok(api.post("/api/v1/protection-domains", {"name": PD}), 201)
        for i in range(3):
            ok(
                api.post(
                    "/api/v1/fault-sets", {"name": f"fs{i}", "protection_domain_id": pd["id"]}
                ),
                201,
            )
        pool = ok(
            api.post(
                "/api/v1/pools",
                {
                    "name": POOL,
                    "protection_domain_id": pd["id"],
                    "pg_count": 32,
                    "allocation_granularity": "64MiB",
                },
            ),
            201,
        )
        for i in range(3):
            d = SdsDaemon(base / f"sds{i}", mdm, f"sds{i}", f"fs{i}")
            d.start()
            sds.append(d)
        for d in sds:
            d.wait_serving(60)
        wait_pg_map_complete(mdm, pool["id"])
        sdc = SdcDaemon(base / "sdc", mdm)
        sdc.start()
        yield Cluster(mdm, sds, sdc, pool["id"])
    finally:
        rcs = {}
        if sdc is not None:
            rcs["sdc"] = sdc.stop()
        for d in sds:
            rcs[d.name] = d.stop()
        mdm.kill()
        if sdc is not None:
            sdc.assert_clean_log()
        assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_io_through_the_cluster(cluster: Cluster, transport: str) -> None:
    name = f"qio-{transport}"
    _, m = cluster.volume(name, "64MiB")
    uri = cluster.sdc.uri(name, transport)
    chunk = MiB
    qemu_io(
        uri,
        "write -P 0xa1 0 64k",
        "write -P 0xb2 4097 12345",  # unaligned
        f"write -P 0xc3 {chunk - 1000} 3000",  # across a chunk boundary (two PGs)
        f"write -P 0xd4 {3 * chunk - 512} {2 * chunk + 1024}",  # three chunks in one write
        f"write -f -P 0xe5 {10 * chunk + 7} 1",  # FUA
        f"write -z {20 * chunk} {3 * chunk}",
        f"discard {30 * chunk} {chunk}",
        "flush",
    )
    qemu_io(
        uri,
        "read -P 0xa1 0 4097",
        "read -P 0xb2 4097 12345",
        f"read -P 0xa1 {4097 + 12345} {65536 - 4097 - 12345}",
        f"read -P 0xc3 {chunk - 1000} 3000",
        f"read -P 0xd4 {3 * chunk - 512} {2 * chunk + 1024}",
        f"read -P 0xe5 {10 * chunk + 7} 1",
        f"read -P 0 {10 * chunk + 8} 4096",
        f"read -P 0 {20 * chunk} {3 * chunk}",
        f"read -P 0 {30 * chunk} {chunk}",
        f"read -P 0 {60 * chunk} {4 * chunk}",  # never written
        read_only=True,
    )
    text = cluster.sdc.metrics()
    assert f'meshblock_sdc_ops_total{{op="write",volume="{name}"}}' in text
    cluster.unmap(m, name)


def test_nbdcopy_random_data_round_trip(cluster: Cluster, tmp_path: Path) -> None:
    size = 128 * MiB
    _, m = cluster.volume("copy", "128MiB")
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        for i in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB) if i % 5 != 3 else bytes(8 * MiB))
    uri = cluster.sdc.uri("copy")
    info = json.loads(run(tool("nbdinfo"), "--no-content", "--json", uri).stdout)
    assert info["exports"][0]["export-size"] == size
    run(tool("nbdcopy"), str(src), uri, timeout=180)
    out = tmp_path / "out.img"
    run(tool("nbdcopy"), cluster.sdc.uri("copy", "unix"), str(out), timeout=180)
    assert sha256(out) == sha256(src)
    # The data is on both copies: every SDS stores chunks now.
    cluster.unmap(m, "copy")


def test_unmap_closes_the_export(cluster: Cluster) -> None:
    _, m = cluster.volume("closing", "64MiB")
    proc = subprocess.Popen(
        [tool("qemu-io"), "-f", "raw", cluster.sdc.uri("closing")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("write -P 7 0 4096\n")
        proc.stdin.flush()
        cluster.sdc.wait_for("a connection", lambda h: any(e["connections"] for e in h["exports"]))
        cluster.unmap(m, "closing")
        proc.stdin.write("read -P 7 0 4096\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "failed" in out.lower() or "error" in out.lower(), out
    assert (
        run(tool("nbdinfo"), "--no-content", cluster.sdc.uri("closing"), check=False).returncode
        != 0
    )


def test_iops_limit_slows_writes(cluster: Cluster) -> None:
    _, m = cluster.volume("qos", "64MiB", iops_limit=50)
    cmds = [f"write -P 9 {i * 4096} 4k" for i in range(200)]
    t0 = time.monotonic()
    qemu_io(cluster.sdc.uri("qos"), *cmds)
    elapsed = time.monotonic() - t0
    assert elapsed >= 3.0, f"200 writes at 50 IOPS took only {elapsed:.2f} s"
    # Lifting the limit takes effect on the live mapping.
    ok(cluster.api.patch(f"/api/v1/mappings/{m['id']}", {"iops_limit": None}))
    cluster.sdc.wait_for(
        "no limit",
        lambda h: any(e["name"] == "qos" and e["iops_limit"] is None for e in h["exports"]),
    )
    t0 = time.monotonic()
    qemu_io(cluster.sdc.uri("qos"), *cmds)
    assert time.monotonic() - t0 < elapsed
    cluster.unmap(m, "qos")


def test_io_waits_out_an_sds_restart_without_errors(cluster: Cluster) -> None:
    """An SDS killed and restarted while IO runs: the SDC retries (connection refused,
    lost, replica failed) and the NBD client sees no error; the data is intact."""
    _, m = cluster.volume("restart", "64MiB")
    uri = cluster.sdc.uri("restart")
    qemu_io(uri, f"write -P 0x5c 0 {8 * MiB}")
    victim = cluster.sds[1]
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait()
    victim.proc = None
    reader = subprocess.Popen(
        [tool("qemu-io"), "-f", "raw", "-c", f"read -P 0x5c 0 {8 * MiB}",
         "-c", f"write -P 0x6d {8 * MiB} {8 * MiB}", "-c", "flush", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        victim.start()
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0 and "failed" not in out.lower(), out
    # The IO may be done before the SDS is back (the SDC reports it unreachable and
    # the MDM fails its PGs over at once); the rest of the module wants it serving.
    victim.wait_serving(60)
    qemu_io(uri, f"read -P 0x5c 0 {8 * MiB}", f"read -P 0x6d {8 * MiB} {8 * MiB}", read_only=True)
    text = cluster.sdc.metrics()
    assert 'meshblock_sdc_retries_total{reason="connect"}' in text or (
        'meshblock_sdc_retries_total{reason="connection"}' in text
    ), text
    cluster.unmap(m, "restart")
