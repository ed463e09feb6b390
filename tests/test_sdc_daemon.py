"""The SDC daemon against a real MDM (SQLite), without storage servers.

What needs no SDS: registration, heartbeats, following the maps (a mapping becomes an
export within a second, unmapping closes it), a read-only mapping, /health and
/metrics, exit 0 on SIGTERM with no secret in the log, and docs/design.md, invariant 5
(the MDM down: the SDC keeps its exports, also across its own restart, from cached
maps).
The data path through real SDSs is in test_sdc_e2e.py.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _http
from _mdm import MdmDaemon
from _process import started
from _sdc import SdcDaemon
from _wait import wait_until
from test_nbd_fuzz import Client
from test_nbd_server import run, tool
from test_nbd_tls import CLIENT_ID, gnutls_dir, starttls
from test_nbd_tls import listed as listed_names

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


@pytest.fixture(scope="module")
def mdm_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MdmDaemon]:
    workdir = tmp_path_factory.mktemp("mdm")
    with started(
        MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir / 'mdm.db'}", tls=True)
    ) as daemon:
        yield daemon


def ok(resp: _http.Response, status: int = 200) -> Any:
    assert resp.status == status, (resp.status, resp.body)
    return resp.body


@pytest.fixture(scope="module")
def pool_id(mdm_sqlite: MdmDaemon) -> int:
    api = mdm_sqlite.api()
    pd = ok(api.post("/api/v1/protection-domains", {"name": "pd-sdc"}), 201)
    pool = ok(
        api.post(
            "/api/v1/pools", {"name": "pool-sdc", "protection_domain_id": pd["id"], "pg_count": 16}
        ),
        201,
    )
    return int(pool["id"])


@pytest.fixture(scope="module")
def sdc(mdm_sqlite: MdmDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdcDaemon]:
    daemon = SdcDaemon(tmp_path_factory.mktemp("sdc"), mdm_sqlite, secret_file=True)
    with started(daemon):
        yield daemon
    daemon.assert_clean_log()


def sdc_id_of(sdc: SdcDaemon) -> int:
    h = sdc.wait_for("registration", lambda h: h["sdc_id"] is not None)
    return int(h["sdc_id"])


def test_registers_and_heartbeats(sdc: SdcDaemon, mdm_sqlite: MdmDaemon) -> None:
    sdc_id = sdc_id_of(sdc)
    doc = ok(mdm_sqlite.api().get(f"/api/v1/sdc/{sdc_id}"))
    assert doc["name"] == sdc.settings["sdc"]["name"]
    assert doc["nbd_port"] == sdc.nbd_port and doc["control_port"] == sdc.control_port
    assert doc["state"] == "connected"
    h = sdc.wait_for("MDM reachable", lambda h: h["mdm_reachable"])
    assert h["state"] == "ok"
    # The GUID was generated and kept in the state dir.
    guid = (sdc.workdir / "state" / "guid").read_text().strip()
    assert doc["guid"] == guid == h["guid"]


def test_mapping_becomes_export_and_unmapping_closes_it(
    sdc: SdcDaemon, mdm_sqlite: MdmDaemon, pool_id: int
) -> None:
    api = mdm_sqlite.api()
    sdc_id = sdc_id_of(sdc)
    vol = ok(
        api.post(
            "/api/v1/volumes", {"name": "vol-a", "pool_id": pool_id, "size": "1GiB", "type": "thin"}
        ),
        201,
    )
    t0 = time.monotonic()
    m = ok(api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id}), 201)
    sdc.wait_for(
        "export vol-a", lambda h: any(e["name"] == "vol-a" for e in h["exports"]), timeout=5
    )
    assert time.monotonic() - t0 < 1.5, "a mapping took more than a second to reach the SDC"
    out = run(tool("nbdinfo"), "--no-content", "--json", sdc.uri("vol-a")).stdout
    (e,) = json.loads(out)["exports"]
    assert e["export-size"] == vol["size_bytes"]
    assert e["is_read_only"] is False and e["can_multi_conn"] is True
    listed = json.loads(run(tool("nbdinfo"), "--list", "--json", sdc.uri("", "unix")).stdout)
    assert "vol-a" in {x["export-name"] for x in listed["exports"]}
    # An open connection is closed by the unmap.
    proc = subprocess.Popen(
        [tool("qemu-io"), "-f", "raw", "-r", sdc.uri("vol-a")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        sdc.wait_for("a connection", lambda h: any(x["connections"] for x in h["exports"]))
        metrics = sdc.metrics()
        assert 'meshblock_sdc_nbd_connections{volume="vol-a"} 1.0' in metrics
        # The volume's pool, for the per-pool recording rules (docs/monitoring.md).
        assert f'meshblock_sdc_volume_info{{pool_id="{pool_id}",volume="vol-a"}} 1.0' in metrics
        t0 = time.monotonic()
        assert api.delete(f"/api/v1/mappings/{m['id']}").status == 204
        sdc.wait_for("unmap", lambda h: not h["exports"], timeout=5)
        assert time.monotonic() - t0 < 1.5
        assert proc.stdin is not None
        proc.stdin.write("read 0 4096\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "failed" in out.lower() or "error" in out.lower(), out
    assert run(tool("nbdinfo"), "--no-content", sdc.uri("vol-a"), check=False).returncode != 0


def test_read_only_mapping_gives_read_only_export(
    sdc: SdcDaemon, mdm_sqlite: MdmDaemon, pool_id: int
) -> None:
    api = mdm_sqlite.api()
    sdc_id = sdc_id_of(sdc)
    vol = ok(
        api.post(
            "/api/v1/volumes",
            {"name": "vol-ro", "pool_id": pool_id, "size": "1GiB", "type": "thin"},
        ),
        201,
    )
    m = ok(
        api.post(
            "/api/v1/mappings",
            {"volume_id": vol["id"], "sdc_id": sdc_id, "access_mode": "read_only"},
        ),
        201,
    )
    try:
        sdc.wait_for("export vol-ro", lambda h: any(e["name"] == "vol-ro" for e in h["exports"]))
        (e,) = json.loads(run(tool("nbdinfo"), "--no-content", "--json", sdc.uri("vol-ro")).stdout)[
            "exports"
        ]
        assert e["is_read_only"] is True
        # Switching the mapping to read_write replaces the export.
        ok(
            api.patch(
                f"/api/v1/mappings/{m['id']}", {"access_mode": "read_write", "iops_limit": 100}
            )
        )
        sdc.wait_for(
            "read-write export",
            lambda h: any(
                x["name"] == "vol-ro" and not x["read_only"] and x["iops_limit"] == 100
                for x in h["exports"]
            ),
        )
        (e,) = json.loads(run(tool("nbdinfo"), "--no-content", "--json", sdc.uri("vol-ro")).stdout)[
            "exports"
        ]
        assert e["is_read_only"] is False
    finally:
        api.delete(f"/api/v1/mappings/{m['id']}")
    sdc.wait_for("unmap", lambda h: "vol-ro" not in {x["name"] for x in h["exports"]})


def test_health_and_metrics(sdc: SdcDaemon) -> None:
    h = sdc.health()
    assert set(h) >= {"state", "mdm_reachable", "exports", "epoch", "pool_map_epochs", "nbd"}
    assert f"127.0.0.1:{sdc.nbd_port}" in h["nbd"]
    text = sdc.metrics()
    for name in (
        "meshblock_sdc_mdm_reachable 1.0",
        "meshblock_sdc_maps_epoch",
        "# TYPE meshblock_sdc_ops_total counter",
        "# TYPE meshblock_sdc_op_duration_seconds histogram",
        "# TYPE meshblock_sdc_retries_total counter",
        "# TYPE meshblock_sdc_nbd_connections gauge",
    ):
        assert name in text, name


def test_mdm_down_keeps_cached_exports(
    mdm_sqlite: MdmDaemon, pool_id: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """docs/design.md, invariant 5: without the MDM, exports stay, also across an SDC
    restart."""
    api = mdm_sqlite.api()
    sdc = SdcDaemon(tmp_path_factory.mktemp("sdc-cache"), mdm_sqlite)
    sdc.start()
    try:
        sdc_id = sdc_id_of(sdc)
        vol = ok(
            api.post(
                "/api/v1/volumes",
                {"name": "vol-c", "pool_id": pool_id, "size": "1GiB", "type": "thin"},
            ),
            201,
        )
        m = ok(api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id}), 201)
        sdc.wait_for("export vol-c", lambda h: "vol-c" in {e["name"] for e in h["exports"]})
        mdm_sqlite.kill()  # a crash: nothing is said to the SDC
        try:
            h = sdc.wait_for("MDM unreachable", lambda h: not h["mdm_reachable"], timeout=15)
            assert h["state"] == "degraded"
            assert "vol-c" in {e["name"] for e in h["exports"]}
            assert run(tool("nbdinfo"), "--no-content", sdc.uri("vol-c")).returncode == 0
            assert sdc.stop() == 0
            sdc.start()  # restarted while the MDM is down: cached maps
            h = sdc.health()
            assert "vol-c" in {e["name"] for e in h["exports"]}
            assert h["mdm_reachable"] is False
            assert run(tool("nbdinfo"), "--no-content", sdc.uri("vol-c")).returncode == 0
        finally:
            mdm_sqlite.start()
        sdc.wait_for("MDM back", lambda h: h["mdm_reachable"] and h["state"] == "ok", timeout=15)
        assert api.delete(f"/api/v1/mappings/{m['id']}").status == 204
        sdc.wait_for("unmap", lambda h: not h["exports"], timeout=5)
    finally:
        assert sdc.stop() == 0
        sdc.assert_clean_log()


def test_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "sdc.toml"
    cfg.write_text('[mdm]\ncluster_secret = "s"\nurlz = []\n')
    proc = subprocess.run(
        [sys.executable, "-m", "meshblock.sdc", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "mdm.urlz" in proc.stderr
    cfg.write_text('[mdm]\ncluster_secret_file = "/nonexistent/secret"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "meshblock.sdc", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "cluster_secret_file" in proc.stderr


def test_nbd_tls_and_allow_list(
    mdm_sqlite: MdmDaemon, pool_id: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``[nbd] tls`` and ``tcp_allow``: the SDC's TCP listener requires TLS with its
    certificate (nbdinfo over ``nbds://`` with a client certificate lists and opens
    the export; plain NBD is refused), refuses an address outside the allow list,
    and lists to an address whose rule names other exports nothing."""
    certs = gnutls_dir(tmp_path_factory.mktemp("gnutls"), CLIENT_ID)
    overrides = {"nbd": {"tls": True, "tcp_allow": ["127.0.0.1/32", "127.0.0.3/32 other-*"]}}
    sdc = SdcDaemon(tmp_path_factory.mktemp("sdc-tls"), mdm_sqlite, overrides)
    api = mdm_sqlite.api()
    with started(sdc):
        vol = ok(
            api.post(
                "/api/v1/volumes",
                {"name": "vol-tls", "pool_id": pool_id, "size": "1GiB", "type": "thin"},
            ),
            201,
        )
        ok(api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id_of(sdc)}), 201)
        sdc.wait_for("export", lambda h: any(e["name"] == "vol-tls" for e in h["exports"]))
        base = f"nbds://127.0.0.1:{sdc.nbd_port}"
        listed = run(tool("nbdinfo"), "--list", "--json", f"{base}/?tls-certificates={certs}")
        assert {x["export-name"] for x in json.loads(listed.stdout)["exports"]} == {"vol-tls"}
        info = run(tool("nbdinfo"), "--json", f"{base}/vol-tls?tls-certificates={certs}")
        assert json.loads(info.stdout)["exports"][0]["export-size"] == vol["size_bytes"]
        assert run(tool("nbdinfo"), "--list", sdc.uri(""), check=False).returncode != 0
        # 127.0.0.3 may open only other-*: after TLS, the list is empty.
        c = Client(sdc.nbd_port, source="127.0.0.3")
        c.greeting()
        starttls(c)
        assert listed_names(c) == set()
        c.close()
        # 127.0.0.2 is not in the allow list: disconnected before the greeting.
        c = Client(sdc.nbd_port, source="127.0.0.2")
        with pytest.raises(OSError):
            c.recv(1)
        c.close()
        assert "meshblock_sdc_nbd_refused_connections_total 1.0" in sdc.metrics()
        # The unix socket is not the TCP listener: plain NBD, every export.
        by_unix = json.loads(run(tool("nbdinfo"), "--list", "--json", sdc.uri("", "unix")).stdout)
        assert {x["export-name"] for x in by_unix["exports"]} == {"vol-tls"}
    assert "refusing NBD connection from 127.0.0.2" in sdc.log_text()
    sdc.assert_clean_log()


def test_bad_nbd_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "sdc.toml"
    for nbd, words in (
        ("tls = true", "nbd.tls needs [tls] cert"),
        ('tcp_allow = ["10.0.0.1/8"]', "nbd.tcp_allow"),
        ('tls_client_certs = "maybe"', "nbd.tls_client_certs"),
        ('unix_socket = ""', "no listener"),
        ('unix_socket = ""\ntcp = true\nattach_nbd = true', "attach_nbd needs nbd.unix_socket"),
    ):
        cfg.write_text(
            f'[mdm]\ncluster_secret = "s"\nurls = ["http://127.0.0.1:1"]\n[nbd]\n{nbd}\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "meshblock.sdc", "--config", str(cfg), "--check-config"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and words in proc.stderr, (nbd, proc.stderr)


def test_nbd_defaults_to_the_unix_socket(
    mdm_sqlite: MdmDaemon, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Without ``[nbd] tcp`` the SDC serves NBD on its unix socket only: mode 0660 of
    ``socket_group``, the peer's uid logged; nothing listens on the TCP port."""
    gid = grp.getgrnam("nogroup").gr_gid
    sdc = SdcDaemon(tmp_path_factory.mktemp("sdc-unix"), mdm_sqlite)
    del sdc.settings["nbd"]["tcp"]  # the daemon's default
    sdc.settings["nbd"]["socket_group"] = "nogroup"
    sdc.write_config()
    with started(sdc):
        assert sdc.health()["nbd"] == [f"unix:{sdc.unix_socket}"]
        st = os.stat(sdc.unix_socket)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sdc.nbd_port), timeout=5).close()
        run(tool("nbdinfo"), "--list", sdc.uri("", "unix"))
        wait_until(lambda: "NBD connection from unix(pid=" in sdc.log_text(), 10, "the peer logged")
        assert f"uid={os.getuid()}," in sdc.log_text()
    sdc.assert_clean_log()


def test_unknown_socket_group_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "sdc.toml"
    cfg.write_text(
        '[mdm]\ncluster_secret = "s"\nurls = ["http://127.0.0.1:1"]\n'
        '[nbd]\nsocket_group = "no-such-group-here"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "meshblock.sdc", "--config", str(cfg), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no-such-group-here" in proc.stderr, proc.stderr
