"""The whole operator flow, step by step, with meshctl and the real daemons.

An MDM (SQLite) is started; then, as an operator would: check health, create a
protection domain and fault sets, create a pool, start three SDS daemons (they
register themselves from their configs), declare an SDC and start its daemon, create
a thin and a thick volume, map them, write and read them through NBD, check the data
(sha256, and both copies with ``meshctl volume verify``), unmap (the export
disappears), and delete the volumes. The tests run in file order and share one
cluster; each step asserts what the next relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from _cluster import meshctl_command
from _mdm import MdmDaemon
from _sdc import SdcDaemon
from _sds import POOL, SdsDaemon
from _wait import wait_until
from test_nbd_server import qemu_io, run, sha256, tool

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1024 * 1024


@dataclass
class Flow:
    mdm: MdmDaemon
    root: Path
    sds: list[SdsDaemon] = field(default_factory=list)
    sdc: SdcDaemon | None = None
    guid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def meshctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**self.mdm.env(), "MESHBLOCK_CLUSTER_SECRET": self.mdm.cluster_secret}
        env.pop("MESHBLOCK_CLUSTER_SECRET_FILE", None)
        proc = subprocess.run(
            [*meshctl_command(), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"meshctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.meshctl(*args, "--json").stdout)

    def exports(self) -> set[str]:
        assert self.sdc is not None
        return self.sdc.export_names()


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    root = tmp_path_factory.mktemp("flow")
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm.db'}", tls=True)
    mdm.start()
    f = Flow(mdm, root)
    try:
        yield f
    finally:
        codes: dict[str, int] = {}
        if f.sdc is not None:
            codes["sdc"] = f.sdc.stop()
        for d in f.sds:
            codes[d.name] = d.stop()
        codes["mdm"] = mdm.stop()
        mdm.kill()
        assert all(rc == 0 for rc in codes.values()), codes
        if f.sdc is not None:
            f.sdc.assert_clean_log()
        mdm.assert_no_secrets_in_log()


def test_health(flow: Flow) -> None:
    proc = flow.meshctl("health")
    assert "cluster test: ok" in proc.stdout, proc.stdout
    doc = flow.json("health")
    assert doc["status"] == "ok"
    assert [c["component_type"] for c in doc["components"]] == ["mdm"]


def test_create_protection_domain_and_fault_sets(flow: Flow) -> None:
    flow.meshctl("pd", "create", "pd1")
    for i in (1, 2, 3):
        flow.meshctl("faultset", "create", f"fs{i}", "--pd", "pd1")
    (pd,) = flow.json("pd", "list")["protection_domains"]
    assert pd["name"] == "pd1"
    names = {fs["name"] for fs in flow.json("faultset", "list")["fault_sets"]}
    assert names == {"fs1", "fs2", "fs3"}


def test_create_pool(flow: Flow) -> None:
    flow.meshctl("pool", "create", POOL, "--pd", "pd1", "--pg-count", "32",
                 "--granularity", "64MiB")  # fmt: skip
    (pool,) = flow.json("pool", "list")["pools"]
    assert pool["name"] == POOL and pool["pg_count"] == 32
    assert pool["capacity"]["total_bytes"] == 0  # no devices yet


def test_add_sds_daemons_register_themselves(flow: Flow) -> None:
    for i in (1, 2, 3):
        d = SdsDaemon(flow.root / f"sds{i}", f"sds{i}", flow.mdm, f"fs{i}")
        flow.sds.append(d)
        d.start()
    for d in flow.sds:
        d.wait_serving()
    listed = {s["name"]: s for s in flow.json("sds", "list")["sds"]}
    assert set(listed) == {"sds1", "sds2", "sds3"}
    for d in flow.sds:
        s = listed[d.name]
        assert s["state"] == "connected" and s["data_port"] == d.data_port
        (dev,) = s["devices"]
        assert dev["path"] == str(d.device)
    pgmap = flow.json("pool", "pgmap", POOL)
    assert all(pg["primary"] and pg["secondary"] for pg in pgmap["pgs"])
    for pg in pgmap["pgs"]:
        assert pg["primary"]["sds_id"] != pg["secondary"]["sds_id"]


def test_add_sdc(flow: Flow) -> None:
    flow.meshctl("sdc", "add", "host1", "--guid", flow.guid, "--address", "127.0.0.1")
    flow.sdc = SdcDaemon(flow.root / "sdc", flow.mdm, {"sdc": {"guid": flow.guid, "name": "host1"}})
    flow.sdc.start()
    flow.sdc.wait_for("registration", lambda h: h["sdc_id"] is not None)
    (sdc,) = flow.json("sdc", "list")["sdc"]  # the daemon joined the declared SDC
    assert sdc["name"] == "host1" and sdc["guid"] == flow.guid
    assert sdc["state"] == "connected" and sdc["nbd_port"] == flow.sdc.nbd_port
    assert flow.meshctl("health").returncode == 0


def test_create_thin_and_thick_volumes(flow: Flow) -> None:
    flow.meshctl("volume", "create", "vol-thin", "--pool", POOL, "--size", "128MiB", "--thin")
    flow.meshctl("volume", "create", "vol-thick", "--pool", POOL, "--size", "100MiB", "--thick")
    vols = {v["name"]: v for v in flow.json("volume", "list")["volumes"]}
    assert vols["vol-thin"]["type"] == "thin" and vols["vol-thin"]["size_bytes"] == 128 * MiB
    assert vols["vol-thick"]["type"] == "thick"
    assert vols["vol-thick"]["size_bytes"] == 128 * MiB  # rounded up to the granularity
    (cap,) = flow.json("capacity")["pools"]
    assert cap["thick_reserved_bytes"] == 2 * 128 * MiB


def test_map_volumes(flow: Flow) -> None:
    assert flow.sdc is not None
    flow.meshctl("volume", "map", "vol-thin", "--sdc", "host1")
    flow.meshctl("volume", "map", "vol-thick", "--sdc", "host1")
    flow.sdc.wait_for("both exports", lambda h: {e["name"] for e in h["exports"]} >= {
        "vol-thin", "vol-thick"})  # fmt: skip
    listed = json.loads(run(tool("nbdinfo"), "--list", "--json", flow.sdc.uri("")).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert sizes == {"vol-thin": 128 * MiB, "vol-thick": 128 * MiB}


def test_write_read_and_data_integrity(flow: Flow, tmp_path: Path) -> None:
    sdc = flow.sdc
    assert sdc is not None
    for name, pattern in (("vol-thin", 0x4B), ("vol-thick", 0x5C)):
        uri = sdc.uri(name)
        qemu_io(uri, f"write -P {pattern} 1000 {3 * MiB}", f"write -P 1 {100 * MiB - 3} 7",
                "flush")  # fmt: skip
        qemu_io(sdc.uri(name, "unix"), f"read -P {pattern} 1000 {3 * MiB}",
                f"read -P 1 {100 * MiB - 3} 7", "read -P 0 0 1000", read_only=True)  # fmt: skip
    # Random data through nbdcopy (the SDS devices are small: 128 MiB of two copies
    # fit, a thin volume may over-commit the pool), out again through the unix socket: same bytes.
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(40 * MiB) + bytes(24 * MiB) + os.urandom(64 * MiB))
    run(tool("nbdcopy"), str(src), sdc.uri("vol-thin"), timeout=300)
    out = tmp_path / "out.img"
    run(tool("nbdcopy"), sdc.uri("vol-thin", "unix"), str(out), timeout=300)
    assert sha256(out) == sha256(src)
    # Both copies of every chunk, straight from the SDSs.
    for name in ("vol-thin", "vol-thick"):
        report = flow.json("volume", "verify", name)
        assert report["ok"] is True and report["stored_on_both"] > 0, report


def test_unmap_makes_the_export_disappear(flow: Flow) -> None:
    sdc = flow.sdc
    assert sdc is not None
    flow.meshctl("volume", "unmap", "vol-thin", "--sdc", "host1")
    sdc.wait_for("vol-thin gone", lambda h: "vol-thin" not in {e["name"] for e in h["exports"]})
    assert run(tool("nbdinfo"), "--no-content", sdc.uri("vol-thin"), check=False).returncode != 0
    assert flow.exports() == {"vol-thick"}
    flow.meshctl("volume", "unmap", "vol-thick", "--all")
    sdc.wait_for("no exports", lambda h: not h["exports"])
    assert flow.json("mapping", "list")["mappings"] == []


def test_delete_volumes(flow: Flow) -> None:
    for name in ("vol-thin", "vol-thick"):
        flow.meshctl("volume", "delete", name, "--yes")
    # a deleted volume is listed as deleting until every SDS has freed its chunks
    listed = flow.json("volume", "list")["volumes"]
    assert all(v["state"] == "deleting" for v in listed), listed
    wait_until(lambda: flow.json("volume", "list")["volumes"] == [], 30, "both volumes purged")
    (cap,) = flow.json("capacity")["pools"]
    assert cap["thick_reserved_bytes"] == 0
    assert flow.meshctl("volume", "show", "vol-thin", check=False).returncode == 4
    assert flow.meshctl("health").returncode == 0
