"""``meshctl lab up | status | down`` through the real CLI, in a temporary directory.

One lab is started, looked at, broken (an SDS killed), stopped, started again from
its data, and purged; every step checks what an operator would rely on: the exit
codes, the JSON documents, the files and their modes, that the volume is served over
NBD, and that no process is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _http
from _cluster import LabCluster, process_running
from _mgmt import WebClient, form_value
from _process import ServerProcess
from _wait import WaitTimeout, wait_until
from meshblock import pki
from test_nbd_server import qemu_io, run, tool
from test_nbd_tls import qemu_io_tls

pytestmark = pytest.mark.cluster

NAMES = ["mdm", "sds1", "sds2", "sds3", "sdc1"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabCluster]:
    cluster = LabCluster(tmp_path / "lab", volume_size="2GiB", device_size="8GiB")
    try:
        yield cluster
    finally:
        cluster.cleanup()


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """The pids still running after at most ``timeout`` s (none, when all exited)."""

    def left() -> list[int]:
        return [p for p in pids if process_running(p)]

    with contextlib.suppress(WaitTimeout):
        wait_until(lambda: not left(), timeout, "the processes to exit", interval=0.05)
    return left()


def test_up_status_down(lab: LabCluster) -> None:
    info = lab.up()
    root = lab.root
    assert info["dir"] == str(root)
    assert [p["name"] for p in info["processes"]] == NAMES
    assert info["volume"] == {"name": "vol1", "size_bytes": 2 * 1024**3}
    assert info["nbd"]["tcp"] == lab.uri("tcp")
    assert info["nbd"]["unix"] == lab.uri("unix")
    assert Path(info["env"]) == root / "env" and Path(info["logs"]) == root / "logs"

    # Generated credentials and configs are private; every daemon has its log.
    for path in [root / "env", root / "cluster.secret", root / "lab.json",
                 *sorted((root / "config").glob("*.toml"))]:  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(list((root / "config").glob("*.toml"))) == 6  # the five daemons' and MGMT's
    assert {p.name for p in (root / "logs").iterdir()} == {f"{n}.log" for n in NAMES}
    secret = lab.secret
    assert len(secret) >= 24 and secret in (root / "config" / "mdm.toml").read_text()
    env_text = (root / "env").read_text()
    assert "MESHCTL_MDM=" in env_text and "MESHCTL_TOKEN=" in env_text

    # The control plane is HTTPS with client certificates of the lab's own CA: every
    # daemon has its [tls], meshctl its admin certificate, every key is private.
    state = lab.state()
    assert state is not None and state["mdm_url"] == f"https://127.0.0.1:{lab.base_port}"
    configs = {p.stem: tomllib.loads(p.read_text()) for p in (root / "config").glob("*.toml")}
    assert configs["mdm"]["tls"]["client_certs"] == "required"
    assert all(c["tls"]["ca"] == str(root / "ca" / "ca.crt") for c in configs.values())
    assert configs["sds1"]["mdm_urls"] == [state["mdm_url"]]
    assert configs["sdc1"]["mdm"]["urls"] == [state["mdm_url"]]
    for key in [root / "ca" / "ca.key", *sorted((root / "tls").glob("*.key"))]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for var in ("MESHCTL_TLS_CA=", "MESHCTL_TLS_CERT=", "MESHCTL_TLS_KEY="):
        assert var in env_text
    plain = f"http://127.0.0.1:{lab.base_port}/health"
    with pytest.raises(OSError):  # plain HTTP gets no answer
        _http.request("GET", plain, timeout=5)
    with pytest.raises(OSError):  # nor HTTPS without a certificate
        _http.request("GET", state["mdm_url"] + "/health", timeout=5,
                      context=pki.client_context(root / "ca" / "ca.crt"))  # fmt: skip
    assert lab.api().get("/health").status == 200

    # status: every process alive and healthy, exit 0.
    rc, doc = lab.status()
    assert rc == 0, doc
    assert doc["up"] is True
    by_name = {p["name"]: p for p in doc["processes"]}
    assert list(by_name) == NAMES
    for p in doc["processes"]:
        assert p["alive"] is True and process_running(p["pid"]), p
        assert p["health"] in ("ok", "serving"), p
    assert by_name["sds2"]["ports"]["data"] == lab.base_port + 3
    text = lab.lab("status").stdout
    assert "lab in" in text and ": up" in text and "sds3" in text

    # The topology the lab built, seen through meshctl with the env it wrote.
    topo = json.loads(lab.meshctl("topology", "--json").stdout)
    (pd,) = topo["protection_domains"]
    assert pd["name"] == "pd1"
    assert sorted(fs["name"] for fs in pd["fault_sets"]) == ["fs1", "fs2", "fs3"]
    assert all(len(fs["sds"]) == 1 and fs["sds"][0]["state"] == "connected"
               for fs in pd["fault_sets"])  # fmt: skip
    (pool,) = pd["pools"]
    (vol,) = pool["volumes"]
    assert pool["name"] == "sp1" and vol["name"] == "vol1"
    assert [m["sdc_name"] for m in vol["mappings"]] == ["sdc1"]

    # MGMT started with the lab's mgmt.toml manages the cluster: its pages' actions go
    # to the MDM as admin:mgmt.
    check_mgmt_manages_the_lab(lab, configs["mgmt"], root / "ca" / "ca.crt")

    # The volume is served over NBD, TCP and unix socket.
    (export,) = json.loads(run(tool("nbdinfo"), "--json", lab.uri("tcp")).stdout)["exports"]
    assert export["export-size"] == 2 * 1024**3
    qemu_io(lab.uri("unix"), "write -P 0x3c 4095 70000")
    # What the lab exposes: the socket 0660; TCP only with TLS and a client certificate.
    assert stat.S_IMODE(os.stat(root / "nbd.sock").st_mode) == 0o660
    refused = run(tool("nbdinfo"), f"nbd://127.0.0.1:{lab.nbd_port}/vol1", check=False)
    assert refused.returncode != 0 and "export-size" not in refused.stdout, refused.stdout

    # A second `up` is refused clearly while the lab runs.
    again = lab.lab("up", "--base-port", str(lab.base_port), check=False)
    assert again.returncode == 5, again
    assert "already running" in again.stderr and "lab down" in again.stderr

    # One SDS killed: status exits 1 and says which.
    victim = by_name["sds2"]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert not wait_gone([victim])
    rc, doc = lab.status()
    assert rc == 1
    assert doc["up"] is False
    states = {p["name"]: p["alive"] for p in doc["processes"]}
    assert states == {"mdm": True, "sds1": True, "sds2": False, "sds3": True, "sdc1": True}
    human = lab.lab("status", check=False)
    assert human.returncode == 1 and "not running: sds2" in human.stdout

    # down: SIGTERM to all, no process left, the data stays.
    pids = [p["pid"] for p in doc["processes"] if p["alive"]]
    out = lab.down().stdout
    assert "stopped" in out and "data stays" in out
    assert wait_gone(pids, timeout=1) == []
    assert (root / "data" / "sds1" / "dev0.img").exists()
    rc, doc = lab.status()
    assert rc == 1 and not any(p["alive"] for p in doc["processes"])

    # up again: the same cluster, its data kept.
    lab.up()
    rc, doc = lab.status()
    assert rc == 0, doc
    qemu_io_tls(
        lab.nbd_port,
        "vol1",
        lab.nbd_tls,
        "read -P 0x3c 4095 70000",
        "read -P 0 74095 4096",
        read_only=True,
    )

    # down --purge: nothing left, not even the directory; a second down is no error.
    pids = [p["pid"] for p in doc["processes"]]
    lab.down("--purge")
    assert wait_gone(pids, timeout=1) == []
    assert not root.exists()
    assert "nothing to stop" in lab.down().stdout
    rc, _ = lab.status()
    assert rc == 4


def check_mgmt_manages_the_lab(lab: LabCluster, config: dict[str, Any], ca: Path) -> None:
    """``meshblock-mgmt --config DIR/config/mgmt.toml``, as the lab's summary says: an
    admin creates a volume on its page, and the MDM's audit names admin:mgmt."""
    root = lab.root
    assert config["mdm"]["url"] == lab.state()["mdm_url"]  # type: ignore[index]
    assert config["mdm"]["admin_cert"] == str(root / "tls" / "admin-mgmt.crt")
    assert config["mdm"]["admin_key"] == str(root / "tls" / "admin-mgmt.key")
    cert = pki.load_cert(Path(config["mdm"]["admin_cert"]))
    assert str(pki.identity_of(cert)) == "admin:mgmt"
    assert config["tls"]["cert"] == str(root / "tls" / "mgmt-mgmt.crt")
    assert config["http"]["port"] == lab.base_port + 9
    url = f"https://127.0.0.1:{config['http']['port']}"
    assert lab.info["mgmt"] == {"config": str(root / "config" / "mgmt.toml"), "url": url}
    cfg = root / "config" / "mgmt.toml"
    password = "lab-admin-password"
    added = subprocess.run(
        [sys.executable, "-m", "meshblock.mgmt", "--config", str(cfg), "user", "add", "admin",
         "--role", "admin"],
        input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added
    context = pki.client_context(ca)
    mgmt = ServerProcess(root / "mgmt-test", log_name="mgmt")
    mgmt.spawn_module("meshblock.mgmt", cfg)
    try:
        mgmt.wait(
            lambda: (
                _http.request("GET", url + "/healthz", timeout=2, context=context).status == 200
            ),
            30,
            "MGMT to answer /healthz",
        )
        web = WebClient(url, context)
        assert web.login("admin", password, "/volumes").status == 303
        page = web.get("/volumes")
        assert page.status == 200 and 'id="create-form"' in page.body, page
        assert 'id="actions-off"' not in page.body
        pools = json.loads(lab.meshctl("pool", "list", "--json").stdout)
        pool_id = next(p["id"] for p in pools["pools"] if p["name"] == "sp1")
        form = {"name": "from-mgmt", "pool_id": str(pool_id), "size": "1",
                "type": "thin", "csrf_token": form_value(page.body, "csrf_token")}  # fmt: skip
        done = web.post("/volumes", form)
        assert done.status == 303, done
        assert mgmt.stop() == 0, mgmt.log_tail()
    finally:
        mgmt.kill()
    made = json.loads(lab.meshctl("volume", "show", "from-mgmt", "--json").stdout)
    assert made["size_bytes"] == 1024**3, made
    audit = [
        json.loads(line.split("meshblock.audit: ", 1)[1])
        for line in (root / "logs" / "mdm.log").read_text().splitlines()
        if "meshblock.audit: " in line
    ]
    created = [
        e
        for e in audit
        if (e.get("method"), e.get("path"), e.get("status")) == ("POST", "/api/v1/volumes", 201)
    ]
    # vol1 by the lab (admin:lab), then the one through MGMT's page
    assert [e["who"].get("identity") for e in created] == ["admin:lab", "admin:mgmt"], created
    lab.meshctl("volume", "delete", "from-mgmt", "--yes")


def test_force_restarts_afresh_and_foreign_dirs_are_refused(lab: LabCluster) -> None:
    lab.up()
    old_secret = lab.secret
    old = lab.pids()
    info = lab.up("--force")
    assert wait_gone(list(old.values())) == []
    assert lab.secret != old_secret, "--force must generate fresh credentials"
    rc, _ = lab.status()
    assert rc == 0
    assert {p["name"]: p["pid"] for p in info["processes"]} == lab.pids()
    lab.down("--purge")

    # A directory that holds something else is never used (or later purged).
    lab.root.mkdir()
    (lab.root / "precious.txt").write_text("keep me")
    proc = lab.lab("up", "--base-port", str(lab.base_port), check=False)
    assert proc.returncode == 1 and "holds no lab" in proc.stderr, proc
    assert (lab.root / "precious.txt").read_text() == "keep me"
