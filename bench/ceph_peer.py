"""A throw-away Ceph cluster on loopback, the replicated peer of ``bench/nbd_fio.py``.

One monitor, one manager and three BlueStore OSDs whose block devices are sparse files,
all from the Debian packages (``ceph``, Pacific 16.2 on bookworm) and all bound to
127.0.0.1; a pool of two copies (``size 2``, ``min_size 1``, CRUSH choosing OSDs, as they
share one host) with one RBD image, which fio's ``rbd`` engine reads and writes with the
librbd cache off. Every file of the cluster lives under one directory: its
configuration, keyrings, the daemons' data, logs and sockets. :meth:`CephCluster.stop`
ends the daemons it started (by their process ids) and removes their data.

The daemons run in the foreground (``-f``) as children of the benchmark, which also asks
the kernel to end them if the benchmark dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

GiB = 1024 * 1024 * 1024
POOL = "rbdbench"
IMAGE = "vol1"
OSDS = 3
START_TIMEOUT_S = 180.0
DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd")


class CephError(Exception):
    """Ceph could not be installed, started or used."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark's process ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ceph_conf(workdir: Path, fsid: str, mon_v2: int, mon_v1: int, block_bytes: int) -> str:
    """The cluster's ceph.conf: everything under ``workdir``, loopback only, two copies,
    OSDs as CRUSH's failure domain (one host), the librbd cache off."""
    w = str(workdir)
    return "\n".join(
        [
            "[global]",
            f"fsid = {fsid}",
            f"mon_host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]",
            "public_addr = 127.0.0.1",
            "cluster_addr = 127.0.0.1",
            "public_network = 127.0.0.0/8",
            "ms_bind_ipv6 = false",
            "auth_cluster_required = cephx",
            "auth_service_required = cephx",
            "auth_client_required = cephx",
            f"run_dir = {w}/run",
            f"admin_socket = {w}/run/$cluster-$name.asok",
            f"pid_file = {w}/run/$cluster-$name.pid",
            f"log_file = {w}/log/$cluster-$name.log",
            "osd_pool_default_size = 2",
            "osd_pool_default_min_size = 1",
            "osd_pool_default_pg_autoscale_mode = off",
            "osd_crush_chooseleaf_type = 0",
            "mon_allow_pool_delete = true",
            "mon_allow_pool_size_one = false",
            "mon_warn_on_insecure_global_id_reclaim_allowed = false",
            "",
            "[mon]",
            f"mon_data = {w}/mon.$id",
            f"keyring = {w}/mon.$id/keyring",
            "",
            "[mgr]",
            f"mgr_data = {w}/mgr.$id",
            f"keyring = {w}/mgr.$id/keyring",
            "",
            "[osd]",
            "osd_objectstore = bluestore",
            f"osd_data = {w}/osd.$id",
            f"keyring = {w}/osd.$id/keyring",
            f"bluestore_block_path = {w}/osd.$id.img",  # osd_data/block links to it
            "bluestore_block_create = true",
            f"bluestore_block_size = {block_bytes}",
            "osd_crush_update_on_start = true",
            "",
            "[client]",
            f"keyring = {w}/client.admin.keyring",
            "rbd_cache = false",
            "",
        ]
    )


def ensure_installed() -> None:
    """Install Debian's ``ceph`` with apt-get if its daemons are missing (as root)."""
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise CephError("Ceph is not installed: apt-get install ceph (as root), then again")
    log("installing Ceph from the distribution's packages (apt-get install ceph) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "ceph"]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise CephError("apt-get install ceph failed")
    if not all(shutil.which(d) for d in DAEMONS):
        raise CephError("apt-get installed ceph but its daemons are not on the PATH")


def fio_has_rbd() -> bool:
    """Whether this fio was built with its ``rbd`` engine (Debian's is, with librbd)."""
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, check=False)
    return "rbd" in out.stdout.split()


def version() -> str:
    out = subprocess.run(["ceph", "--version"], capture_output=True, text=True, check=False)
    return " ".join(out.stdout.split()[:3]) if out.returncode == 0 else "ceph (not installed)"


def pgs_clean(status: dict[str, Any]) -> bool:
    """Whether ``ceph status --format json`` shows every PG active+clean and
    ``OSDS`` OSDs up and in."""
    osdmap = status.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)  # nested in some releases
    if osdmap.get("num_up_osds") != OSDS or osdmap.get("num_in_osds") != OSDS:
        return False
    pgmap = status.get("pgmap", {})
    total = int(pgmap.get("num_pgs", 0))
    clean = sum(
        int(s["count"]) for s in pgmap.get("pgs_by_state", []) if s["state_name"] == "active+clean"
    )
    return total > 0 and clean == total


class CephCluster:
    """``mon.a``, ``mgr.x`` and ``osd.0-2`` on loopback; a pool of size 2 with one image."""

    def __init__(self, workdir: Path, size: int, pg_count: int) -> None:
        self.workdir = workdir
        self.size = size
        self.pg_count = pg_count
        self.fsid = str(uuid.uuid4())
        self.conf = workdir / "ceph.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Two copies over three OSDs; BlueStore's RocksDB on the same sparse file.
        self.block_bytes = max(10 * GiB, (2 * size // OSDS) + 8 * GiB)

    @property
    def uri(self) -> str:
        """What ``nbd_fio.fio_args`` turns into fio's rbd engine options."""
        return f"rbd:{POOL}/{IMAGE}"

    @property
    def env(self) -> dict[str, str]:
        """The environment fio needs: librados reads $CEPH_CONF."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def _run(self, *cmd: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            list(cmd), input=stdin, capture_output=True, text=True, check=False, timeout=120
        )
        if proc.returncode != 0:
            raise CephError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def _authtool(self, keyring: Path, name: str, caps: tuple[str, ...]) -> None:
        """A new keyring holding a new key of ``name`` with ``caps`` (service, grant...)."""
        pairs = [x for i in range(0, len(caps), 2) for x in ("--cap", caps[i], caps[i + 1])]
        self._run(
            "ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", name, *pairs
        )

    def ceph(self, *args: str) -> str:
        return self._run("ceph", "--conf", str(self.conf), "--connect-timeout", "30", *args)

    def _daemon(self, name: str, exe: str, ident: str) -> None:
        log_file = open(self.workdir / "log" / f"{name}.stdout", "ab")
        with log_file:
            self.procs[name] = subprocess.Popen(
                [exe, "-f", "--conf", str(self.conf), "-i", ident],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def start(self) -> None:
        if not fio_has_rbd():
            raise CephError(
                "this fio has no rbd engine (fio --enghelp): Debian's fio has it when "
                "librbd1 is installed; install librbd1, or build fio with librbd-dev"
            )
        w = self.workdir
        for sub in ("run", "log", "mon.a", "mgr.x"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        mon_v2, mon_v1 = _free_port(), _free_port()
        self.conf.write_text(ceph_conf(w, self.fsid, mon_v2, mon_v1, self.block_bytes))
        mon_key, admin_key = w / "mon.keyring", w / "client.admin.keyring"
        everything = ("mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *")
        self._authtool(mon_key, "mon.", ("mon", "allow *"))
        self._authtool(admin_key, "client.admin", everything)
        self._run("ceph-authtool", str(mon_key), "--import-keyring", str(admin_key))
        monmap = w / "monmap"
        addr = f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]"
        self._run("monmaptool", "--create", "--addv", "a", addr, "--fsid", self.fsid, str(monmap))
        mkfs = ("--mkfs", "--monmap", str(monmap), "--keyring", str(mon_key))
        self._run("ceph-mon", "--conf", str(self.conf), "-i", "a", *mkfs)
        self._daemon("mon", "ceph-mon", "a")
        self._wait("the monitor", lambda: self.ceph("status", "--format", "json") != "")
        mgr_caps = ("mon", "allow profile mgr", "osd", "allow *", "mds", "allow *")
        self.ceph("auth", "get-or-create", "mgr.x", *mgr_caps, "-o", str(w / "mgr.x" / "keyring"))
        self._daemon("mgr", "ceph-mgr", "x")
        osd_caps = ("osd", "allow *", "mon", "allow profile osd", "mgr", "allow profile osd")
        for i in range(OSDS):
            osd_uuid = str(uuid.uuid4())
            osd_id = self.ceph("osd", "new", osd_uuid).strip()
            if osd_id != str(i):
                raise CephError(f"ceph osd new gave id {osd_id!r}, expected {i}")
            key = w / f"osd.{i}" / "keyring"
            key.parent.mkdir(exist_ok=True)
            self.ceph("auth", "get-or-create", f"osd.{i}", *osd_caps, "-o", str(key))
            osd_mkfs = ("--mkfs", "--osd-uuid", osd_uuid)
            self._run("ceph-osd", "--conf", str(self.conf), "-i", str(i), *osd_mkfs)
            self._daemon(f"osd.{i}", "ceph-osd", str(i))
        self.ceph("osd", "pool", "create", POOL, str(self.pg_count), str(self.pg_count))
        self.ceph("osd", "pool", "set", POOL, "size", "2")
        self.ceph("osd", "pool", "set", POOL, "min_size", "1")
        self.ceph("osd", "pool", "application", "enable", POOL, "rbd")
        image = ("create", f"{POOL}/{IMAGE}", "--size", f"{self.size // (1024 * 1024)}M")
        self._run("rbd", "--conf", str(self.conf), *image)
        self._wait(
            "every PG active+clean on 3 OSDs",
            lambda: pgs_clean(json.loads(self.ceph("status", "--format", "json"))),
        )

    def _wait(self, what: str, ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise CephError(f"{name} exited with {p.returncode}; see {self.workdir}/log")
            try:
                if ready():
                    return
            except (CephError, subprocess.TimeoutExpired, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise CephError(f"no {what} within {START_TIMEOUT_S:g} s; see {self.workdir}/log")
            time.sleep(0.5)

    def stop(self, keep_logs: bool = False) -> None:
        """End the daemons this cluster started (OSDs first) and remove its data: all of
        ``workdir``, or all but ``log/`` and ``ceph.conf`` with ``keep_logs``."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = {}
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for child in self.workdir.iterdir():
            if child.name in ("log", "ceph.conf"):
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
