"""A whole meshblock cluster on one machine: ``meshctl lab up | status | down``.

The lab runs the real daemons as detached processes on loopback: one MDM on SQLite,
three SDSs in three fault sets (a sparse file device each) and one SDC; then it
builds protection domain ``pd1``, fault sets ``fs1``..``fs3`` and pool ``sp1`` through
the MDM's API, lets the SDSs register themselves from their configs, creates volume
``vol1`` and maps it to the SDC, and waits until the SDC serves it over NBD.

Its control plane is HTTPS with client certificates required (docs/security.md): a
new lab makes a CA and a certificate for the MDM, each SDS, the SDC, MGMT and an
admin, and the daemons and meshctl (``DIR/env``) present their own.

Everything lives under one directory (``docs/lab.md``)::

    DIR/lab.json            what runs: ports, pids, names (mode 0600)
    DIR/env                 ". DIR/env" sets MESHCTL_MDM, MESHCTL_TOKEN, ... (0600)
    DIR/cluster.secret      the cluster secret (0600)
    DIR/ca/                 the lab's CA (meshblock.pki: ca.crt, ca.key 0600, crl.pem)
    DIR/tls/                KIND-NAME.crt and .key (0600) of each identity, ca.crt
    DIR/config/*.toml       generated daemon configs (0600); mgmt.toml for a MGMT the
                            user starts against the lab (the lab runs none)
    DIR/data/               mdm.db, sdsN/dev0.img (sparse), sdsN/state, sdc1/
    DIR/logs/*.log          one log per daemon
    DIR/nbd.sock            the SDC's NBD unix socket (0660)
    DIR/nbd-tls/            ca-cert.pem, client-cert.pem, client-key.pem: NBD over TLS

A pid counts as the lab's only while ``/proc/PID/cmdline`` still names the lab's
config file for it, so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshblock import pki
from meshblock.cli.client import MdmClient
from meshblock.files import write_atomic
from meshblock.sizes import format_size

DIR_ENV = "MESHBLOCK_LAB_DIR"
BASE_PORT_ENV = "MESHBLOCK_BASE_PORT"  # `lab up` without --base-port: ports N..N+8
DEFAULT_DIR = Path("run/lab")
STATE_FILE = "lab.json"
STATE_VERSION = 1

PROTECTION_DOMAIN = "pd1"
POOL = "sp1"
VOLUME = "vol1"
SDC_NAME = "sdc1"
SDS_COUNT = 3
HOST = "127.0.0.1"
ADMIN = "admin:lab"  # the identity meshctl presents (DIR/env)
MGMT = "mgmt:mgmt"  # issued for a MGMT pointed at the lab; the lab runs none
MGMT_ADMIN = "admin:mgmt"  # that MGMT's credential for its cluster pages' actions
MGMT_PORT = 8080  # its HTTPS port with the standard ports (MGMT's default); base+9 else

DEFAULT_VOLUME_SIZE = 4 * 1024**3
DEFAULT_DEVICE_SIZE = 64 * 1024**3

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.1
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL

Progress = Callable[[str], None]


class LabError(Exception):
    """The lab cannot do what was asked; the message says why and what to do."""


class LabRunning(LabError):
    """``up`` found a lab already running in the directory."""


class NoLab(LabError):
    """There is no lab in the directory."""


def default_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$MESHBLOCK_LAB_DIR``, else ``./run/lab``."""
    return Path(env.get(DIR_ENV) or DEFAULT_DIR)


# -- ports -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """Every port of the lab. Standard ports, or a block of nine from a base port."""

    mdm: int
    sds: tuple[tuple[int, int], ...]  # (data, control) per SDS
    sdc_nbd: int
    sdc_control: int

    @classmethod
    def standard(cls) -> Ports:
        """The daemons' default ports; the SDSs step by 10: 7072/7073, 7082/7083, ..."""
        return cls(
            6611, tuple((7072 + 10 * i, 7073 + 10 * i) for i in range(SDS_COUNT)), 10809, 7074
        )

    @classmethod
    def from_base(cls, base: int) -> Ports:
        """MDM ``base``, SDS i data/control ``base+2i-1``/``base+2i``, SDC control and NBD last."""
        if not 1 <= base <= 65535 - (2 * SDS_COUNT + 3):  # N+9: MGMT's config
            raise LabError(f"--base-port {base} is out of range")
        sds = tuple((base + 1 + 2 * i, base + 2 + 2 * i) for i in range(SDS_COUNT))
        after = base + 1 + 2 * SDS_COUNT
        return cls(base, sds, after + 1, after)

    def all(self) -> list[int]:
        return [self.mdm, *(p for pair in self.sds for p in pair), self.sdc_control, self.sdc_nbd]

    def mgmt(self) -> int:
        """The port of the generated ``mgmt.toml`` (the lab starts no MGMT, so ``up``
        does not check it): MGMT's default with the standard ports, else base + 9."""
        return MGMT_PORT if self == Ports.standard() else self.sdc_nbd + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "mdm": self.mdm,
            "sds": [list(p) for p in self.sds],
            "sdc_nbd": self.sdc_nbd,
            "sdc_control": self.sdc_control,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Ports:
        return cls(
            int(doc["mdm"]),
            tuple((int(d), int(c)) for d, c in doc["sds"]),
            int(doc["sdc_nbd"]),
            int(doc["sdc_control"]),
        )


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something listens on ``host:port`` or holds it (bind fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# -- the daemons -------------------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    """One process of the lab: its name, kind, config, log and ports."""

    name: str  # mdm, sds1..sds3, sdc1
    kind: str  # mdm, sds, sdc: the module is meshblock.<kind>
    config: Path
    log: Path
    ports: dict[str, int]
    health_port: int

    @property
    def health_url(self) -> str:
        return f"http://{HOST}:{self.health_port}/health"

    def command(self) -> list[str]:
        return [sys.executable, "-m", f"meshblock.{self.kind}", "--config", str(self.config)]


def process_alive(pid: int, config: Path) -> bool:
    """True while ``pid`` runs (not a zombie) with ``config`` on its command line."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 :][:1]
    if state in (b"Z", b"X"):
        return False
    return os.fsencode(str(config)) in argv


def child_running(pid: int) -> bool | None:
    """For a child of this process: whether it still runs (reaping it if it exited);
    ``None`` when ``pid`` is not our child. Right after a spawn this is the reliable
    test: ``/proc/PID/cmdline`` is briefly empty while the child execs."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return done == 0


def _alive(pid: int, config: Path) -> bool:
    running = child_running(pid)
    return process_alive(pid, config) if running is None else running


def spawn(daemon: Daemon) -> int:
    """Start ``daemon`` detached (its own session), output appended to its log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    # posix_spawn leaves no Popen object behind to warn that the daemon still runs.
    return os.posix_spawn(
        sys.executable,
        daemon.command(),
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(daemon.log), flags, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def get_json(
    url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None
) -> tuple[int, Any]:
    """``GET url`` without proxies (``context`` for https); (status, JSON body or None).
    OSError if unreachable."""
    https = [urllib.request.HTTPSHandler(context=context)] if context is not None else []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *https)
    try:
        with opener.open(url, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


# -- the lab -----------------------------------------------------------------------


class Lab:
    """The lab in directory ``root``; see the module docstring for its layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.state_path = self.root / STATE_FILE
        self.env_path = self.root / "env"
        self.secret_path = self.root / "cluster.secret"
        self.config_dir = self.root / "config"
        self.data_dir = self.root / "data"
        self.logs_dir = self.root / "logs"
        self.nbd_socket = self.root / "nbd.sock"
        self.ca_dir = self.root / "ca"
        self.tls_dir = self.root / "tls"
        self.nbd_tls_dir = self.root / "nbd-tls"
        self.mgmt_config = self.config_dir / "mgmt.toml"
        self._tls: ssl.SSLContext | None = None

    # -- description ---------------------------------------------------------------

    def daemons(self, ports: Ports) -> list[Daemon]:
        """MDM, SDSs, SDC: the order they start in (and stop in reverse)."""
        out = [
            Daemon(
                "mdm",
                "mdm",
                self.config_dir / "mdm.toml",
                self.logs_dir / "mdm.log",
                {"api": ports.mdm},
                ports.mdm,
            )
        ]
        for i, (data, control) in enumerate(ports.sds, start=1):
            out.append(
                Daemon(
                    f"sds{i}",
                    "sds",
                    self.config_dir / f"sds{i}.toml",
                    self.logs_dir / f"sds{i}.log",
                    {"data": data, "control": control},
                    control,
                )
            )
        out.append(
            Daemon(
                SDC_NAME,
                "sdc",
                self.config_dir / f"{SDC_NAME}.toml",
                self.logs_dir / f"{SDC_NAME}.log",
                {"nbd": ports.sdc_nbd, "control": ports.sdc_control},
                ports.sdc_control,
            )
        )
        return out

    def load_state(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.state_path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise LabError(f"{self.state_path} is not a lab state file this meshctl knows")
        return doc

    def _save_state(self, doc: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(doc, indent=2) + "\n")

    def running(self, state: Mapping[str, Any] | None = None) -> dict[str, int]:
        """name → pid of the lab's processes that are alive."""
        state = self.load_state() if state is None else state
        if state is None:
            return {}
        ports = Ports.from_json(state["ports"])
        pids: Mapping[str, int] = state.get("pids", {})
        return {
            d.name: pids[d.name]
            for d in self.daemons(ports)
            if d.name in pids and _alive(pids[d.name], d.config)
        }

    def uris(self, state: Mapping[str, Any]) -> dict[str, str]:
        ports = Ports.from_json(state["ports"])
        volume = state.get("volume", {}).get("name", VOLUME)
        tls = state.get("nbd_tls")  # a lab made before NBD over TLS: plain
        return {
            "tcp": f"nbds://{HOST}:{ports.sdc_nbd}/{volume}?tls-certificates={tls}"
            if tls
            else f"nbd://{HOST}:{ports.sdc_nbd}/{volume}",
            "unix": f"nbd+unix:///{volume}?socket={self.nbd_socket}",
        }

    # -- up ------------------------------------------------------------------------

    def up(
        self,
        *,
        volume_size: int = DEFAULT_VOLUME_SIZE,
        device_size: int = DEFAULT_DEVICE_SIZE,
        base_port: int | None = None,
        force: bool = False,
        progress: Progress = lambda _: None,
    ) -> dict[str, Any]:
        """Start the lab (afresh, or again from the configs a ``down`` left).

        Raises :class:`LabRunning` when a process of the lab is alive, unless ``force``
        (then it is stopped and the directory wiped first).
        """
        state = self.load_state()
        alive = self.running(state)
        if alive and not force:
            listing = ", ".join(f"{n} (pid {p})" for n, p in alive.items())
            raise LabRunning(
                f"a lab is already running in {self.root}: {listing}; see 'meshctl lab "
                "status', stop it with 'meshctl lab down', or start afresh with "
                "'meshctl lab up --force'"
            )
        if force and state is not None:
            progress(f"--force: stopping the lab in {self.root} and removing its data")
            self.down(purge=True, progress=progress)
            state = None
        if state is not None and base_port is not None:
            if Ports.from_json(state["ports"]) != Ports.from_base(base_port):
                raise LabError(
                    f"the stopped lab in {self.root} uses other ports; start it without "
                    "--base-port, or afresh with --force"
                )
        if state is None:
            self._refuse_foreign_dir()
            ports = Ports.standard() if base_port is None else Ports.from_base(base_port)
            state = self._create(ports, volume_size, device_size, progress)
        else:
            progress(f"starting the stopped lab in {self.root} again (its data is kept)")
            ports = Ports.from_json(state["ports"])
        busy = [p for p in ports.all() if port_in_use(p)]
        if busy:
            raise LabError(
                f"port(s) {', '.join(map(str, busy))} on {HOST} are in use (another lab or "
                "daemon?); choose other ports with --base-port N (it uses N..N+8)"
            )
        state["pids"] = {}
        state["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            self._start(state, ports, progress)
        except BaseException:
            progress("start failed: stopping what was started")
            self.down(purge=False)
            raise
        return self.summary(state)

    def _refuse_foreign_dir(self) -> None:
        """Never write into (or later purge) a directory that holds something else."""
        if self.root.exists() and any(self.root.iterdir()):
            known = {STATE_FILE, "env", "cluster.secret", "config", "data", "logs", "nbd.sock"}
            known |= {"ca", "tls", "nbd-tls"}
            others = sorted(p.name for p in self.root.iterdir() if p.name not in known)
            if others:
                raise LabError(
                    f"{self.root} is not empty and holds no lab ({', '.join(others[:5])}); "
                    "choose another --dir"
                )

    def _create(
        self, ports: Ports, volume_size: int, device_size: int, progress: Progress
    ) -> dict[str, Any]:
        """Write the configs, credentials and state file of a new lab."""
        if len(str(self.nbd_socket)) > _UNIX_PATH_MAX:
            raise LabError(f"{self.root} is too long a path for a unix socket; use a shorter --dir")
        progress(
            f"writing a new lab to {self.root} (fresh tokens, cluster secret, CA and certificates)"
        )
        for d in (self.root, self.config_dir, self.data_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        admin, readonly, secret = (secrets.token_urlsafe(24) for _ in range(3))
        _write_private(self.secret_path, secret + "\n")
        guid = str(uuid.uuid4())
        tls = self._make_pki(guid)
        mdm_url = f"https://{HOST}:{ports.mdm}"
        _write_private(
            self.config_dir / "mdm.toml",
            _toml(
                {
                    "api": {"host": HOST, "port": ports.mdm},
                    "auth": {
                        "admin_token": admin,
                        "readonly_token": readonly,
                        "cluster_secret": secret,
                    },
                    "database": {"url": f"sqlite+aiosqlite:///{self.data_dir / 'mdm.db'}"},
                    "cluster": {"name": "lab"},
                    "logging": {"level": "INFO"},
                    "tls": {**tls["mdm"], "client_certs": "required"},
                },
                header="meshctl lab: the MDM",
            ),
        )
        for i, (data, control) in enumerate(ports.sds, start=1):
            sds_dir = self.data_dir / f"sds{i}"
            sds_dir.mkdir(exist_ok=True)
            _write_private(
                self.config_dir / f"sds{i}.toml",
                _toml(
                    {
                        "": {
                            "name": f"sds{i}",
                            "protection_domain": PROTECTION_DOMAIN,
                            "fault_set": f"fs{i}",
                            "address": HOST,
                            "mdm_urls": [mdm_url],
                            "cluster_secret_file": str(self.secret_path),
                            "state_dir": str(sds_dir / "state"),
                        },
                        "data": {"host": HOST, "port": data},
                        "control": {"host": HOST, "port": control},
                        "logging": {"level": "INFO"},
                        "tls": tls[f"sds{i}"],
                        "[devices]": {
                            "path": str(sds_dir / "dev0.img"),
                            "capacity": device_size,
                            "pool": POOL,
                            "name": "dev0",
                        },
                    },
                    header=f"meshctl lab: SDS sds{i} (it registers itself with the MDM)",
                ),
            )
        sdc_dir = self.data_dir / SDC_NAME
        sdc_dir.mkdir(exist_ok=True)
        _write_private(
            self.config_dir / f"{SDC_NAME}.toml",
            _toml(
                {
                    "sdc": {
                        "name": SDC_NAME,
                        "guid": guid,
                        "address": HOST,
                        "state_dir": str(sdc_dir),
                    },
                    "mdm": {"urls": [mdm_url], "cluster_secret_file": str(self.secret_path)},
                    "nbd": {
                        # the socket (0660, the user's group) and loopback TCP with
                        # TLS and client certificates required: what docs/lab.md says
                        "tcp": True,
                        "tls": True,
                        "host": HOST,
                        "port": ports.sdc_nbd,
                        "unix_socket": str(self.nbd_socket),
                    },
                    "control": {"host": HOST, "port": ports.sdc_control},
                    "logging": {"level": "INFO"},
                    "tls": tls[SDC_NAME],
                },
                header="meshctl lab: the SDC",
            ),
        )
        mgmt_url = f"https://{HOST}:{ports.mgmt()}"
        _write_private(self.mgmt_config, self._mgmt_toml(mdm_url, ports.mgmt(), tls))
        _write_private(
            self.env_path,
            f"# meshctl against the lab in {self.root}: . {self.env_path}\n"
            f"export MESHCTL_MDM={_sh(mdm_url)}\n"
            f"export MESHCTL_TOKEN={_sh(admin)}\n"
            f"export MESHCTL_TLS_CA={_sh(tls['admin']['ca'])}\n"
            f"export MESHCTL_TLS_CERT={_sh(tls['admin']['cert'])}\n"
            f"export MESHCTL_TLS_KEY={_sh(tls['admin']['key'])}\n"
            f"export MESHBLOCK_CLUSTER_SECRET_FILE={_sh(str(self.secret_path))}\n"
            f"export {DIR_ENV}={_sh(str(self.root))}\n"
            f'export PATH={_sh(str(Path(sys.executable).parent))}:"$PATH"\n',
        )
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ports": ports.to_json(),
            "mdm_url": mdm_url,
            "admin_token": admin,
            "tls": tls["admin"],
            "nbd_tls": str(self.nbd_tls_dir),
            "mgmt": {"config": str(self.mgmt_config), "url": mgmt_url},
            "volume": {"name": VOLUME, "size_bytes": volume_size},
            "device_size_bytes": device_size,
            "pids": {},
        }
        self._save_state(state)
        return state

    def _mgmt_toml(self, mdm_url: str, port: int, tls: Mapping[str, Mapping[str, str]]) -> str:
        """A MGMT for the lab (docs/lab.md): HTTPS on loopback with ``mgmt:mgmt``, which
        reads the MDM, and ``admin:mgmt`` for its cluster pages' actions, so that its
        admins manage the cluster. No Prometheus or Alertmanager runs in the lab: no
        charts, no rule sync, no silences, and no webhook token (every webhook refused)."""
        return _toml(
            {
                "http": {"host": HOST, "port": port},
                "database": {"url": f"sqlite+aiosqlite:///{self.data_dir / 'mgmt.db'}"},
                "mdm": {
                    "url": mdm_url,
                    "admin_cert": tls["mgmt_admin"]["cert"],
                    "admin_key": tls["mgmt_admin"]["key"],
                },
                "prometheus": {"url": ""},
                "alertmanager": {"url": ""},
                "logging": {"level": "INFO"},
                "tls": tls["mgmt"],
            },
            header="meshctl lab: a MGMT for the lab, which starts none "
            "(meshblock-mgmt --config THIS_FILE)",
        )

    def _make_pki(self, guid: str) -> dict[str, dict[str, str]]:
        """A CA in DIR/ca and, in DIR/tls, a certificate for the MDM, each SDS, the SDC
        (``sdc:<guid>``), MGMT (``mgmt:mgmt``, and ``admin:mgmt`` for its actions) and
        the admin: each one's ``[tls]`` table by lab name."""
        ca = pki.Ca.init(self.ca_dir, common_name="meshblock lab CA", force=True)
        ca_cert = ca.load()[0]
        who = {
            "mdm": "mdm:mdm",
            **{f"sds{i}": f"sds:sds{i}" for i in range(1, SDS_COUNT + 1)},
            SDC_NAME: f"sdc:{guid}",
            "mgmt": MGMT,
            "mgmt_admin": MGMT_ADMIN,
            "admin": ADMIN,
        }
        tables = {}
        for name, text in who.items():
            ident = pki.Identity.parse(text)
            sans = () if ident.kind == pki.Kind.ADMIN else (HOST, "localhost")
            cert, key = ca.issue(ident, sans=sans)
            paths = pki.write_identity(self.tls_dir, ident, cert, key, ca_cert, force=True)
            tables[name] = {
                "cert": str(paths["cert"]),
                "key": str(paths["key"]),
                "ca": str(ca.cert_path),
                "crl": str(ca.crl_path),
            }
        # NBD clients over TLS (GnuTLS: nbdinfo, nbdcopy, qemu) read a directory of
        # ca-cert.pem, client-cert.pem and client-key.pem: the admin's certificate.
        self.nbd_tls_dir.mkdir(mode=0o700, exist_ok=True)
        for src, dst in (
            (tables["admin"]["ca"], "ca-cert.pem"),
            (tables["admin"]["cert"], "client-cert.pem"),
            (tables["admin"]["key"], "client-key.pem"),
        ):
            shutil.copy(src, self.nbd_tls_dir / dst)  # the key keeps its mode 0600
        return tables

    def client_tls(self, state: Mapping[str, Any]) -> ssl.SSLContext | None:
        """The admin's TLS context for the lab's MDM (None: a lab made before TLS)."""
        files = state.get("tls")
        if not files:
            return None
        if self._tls is None:
            try:
                self._tls = pki.client_context(
                    Path(files["ca"]),
                    cert=Path(files["cert"]),
                    key=Path(files["key"]),
                    crl=Path(files["crl"]),
                )
            except pki.PkiError as exc:
                raise LabError(f"cannot use the lab's certificates: {exc}") from None
        return self._tls

    def health(self, d: Daemon, state: Mapping[str, Any]) -> tuple[int, Any]:
        """``GET /health`` of ``d``: over HTTPS as the admin if the lab has TLS (the
        MDM's API, and the SDSs' and SDC's control ports with their [tls])."""
        if d.kind == "mdm":
            return get_json(state["mdm_url"] + "/health", context=self.client_tls(state))
        if state.get("tls"):
            url = d.health_url.replace("http://", "https://", 1)
            return get_json(url, context=self.client_tls(state))
        return get_json(d.health_url)

    def _start(self, state: dict[str, Any], ports: Ports, progress: Progress) -> None:
        mdm, *sds, sdc = self.daemons(ports)
        deadline = time.monotonic() + START_TIMEOUT_S

        def launch(d: Daemon) -> None:
            state["pids"][d.name] = spawn(d)
            self._save_state(state)

        certs = "client certificates required, " if state.get("tls") else ""
        progress(f"starting the MDM on {state['mdm_url']} ({certs}SQLite in {self.data_dir})")
        launch(mdm)
        self._wait(mdm, state, deadline, lambda s, _: s == 200, "healthy")
        api = MdmClient(
            [state["mdm_url"]], state["admin_token"], timeout=10, tls=self.client_tls(state)
        )

        progress(f"creating protection domain {PROTECTION_DOMAIN}, fault sets, pool {POOL}")
        pd = _ensure(api, "/api/v1/protection-domains", "protection_domains", PROTECTION_DOMAIN, {})
        for i in range(1, SDS_COUNT + 1):
            _ensure(
                api,
                f"/api/v1/fault-sets?protection_domain_id={pd['id']}",
                "fault_sets",
                f"fs{i}",
                {"protection_domain_id": pd["id"]},
            )
        pool = _ensure(api, "/api/v1/pools", "pools", POOL, {"protection_domain_id": pd["id"]})

        size = format_size(int(state["device_size_bytes"]))
        progress(
            f"starting {len(sds)} SDSs in fault sets fs1..fs{len(sds)} ({size} sparse devices)"
        )
        for d in sds:
            launch(d)
        for d in sds:
            self._wait(
                d,
                state,
                deadline,
                lambda s, b: s == 200 and _field(b, "state") == "serving",
                "serving",
            )
            progress(f"  {d.name} is serving (data port {d.ports['data']})")
        progress(f"waiting for pool {POOL}'s PG map to have two copies of every PG")
        self._wait_pgmap(api, int(pool["id"]), deadline)

        progress(f"starting the SDC (NBD on {HOST}:{ports.sdc_nbd} and {self.nbd_socket})")
        launch(sdc)
        health = self._wait(
            sdc,
            state,
            deadline,
            lambda s, b: s == 200 and _field(b, "sdc_id") is not None,
            "registered",
        )
        sdc_id = int(health["sdc_id"])

        vol_name = state["volume"]["name"]
        vol_size = int(state["volume"]["size_bytes"])
        progress(
            f"creating volume {vol_name} ({format_size(vol_size)}, thin), mapping it to {SDC_NAME}"
        )
        vol = _ensure(
            api,
            "/api/v1/volumes",
            "volumes",
            vol_name,
            {"pool_id": pool["id"], "size": vol_size, "type": "thin"},
        )
        maps = api.get("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})["mappings"]
        if not maps:
            api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})
        state["volume"]["size_bytes"] = int(vol["size_bytes"])
        self._save_state(state)

        progress(f"waiting for the SDC to export {vol_name}")
        self._wait(
            sdc,
            state,
            deadline,
            lambda s, b: (
                s == 200 and vol_name in {e.get("name") for e in _field(b, "exports") or []}
            ),
            f"exporting {vol_name}",
        )
        self._wait_listening(ports.sdc_nbd, deadline)

    def _wait(
        self,
        d: Daemon,
        state: Mapping[str, Any],
        deadline: float,
        ready: Callable[[int, Any], bool],
        what: str,
    ) -> Any:
        """Poll ``d``'s /health until ``ready(status, body)``; LabError with its log if not."""
        last = "no answer"
        while time.monotonic() < deadline:
            if not _alive(state["pids"][d.name], d.config):
                raise LabError(
                    f"{d.name} exited while starting; its log {d.log} ends with:\n{_tail(d.log)}"
                )
            try:
                status, body = self.health(d, state)
                if ready(status, body):
                    return body
                last = f"HTTP {status}: {json.dumps(body)[:300]}"
            except OSError as exc:
                last = str(exc)
            time.sleep(_POLL_S)
        raise LabError(
            f"{d.name} was not {what} within {START_TIMEOUT_S:.0f} s ({last}); see {d.log}"
        )

    def _wait_pgmap(self, api: MdmClient, pool_id: int, deadline: float) -> None:
        while True:
            doc = api.get(f"/api/v1/pools/{pool_id}/pgmap")
            pgs = doc.get("pgs") or []
            if pgs and all(pg.get("primary") and pg.get("secondary") for pg in pgs):
                return
            if time.monotonic() > deadline:
                raise LabError(f"pool {POOL}'s PG map is incomplete after {START_TIMEOUT_S:.0f} s")
            time.sleep(_POLL_S)

    def _wait_listening(self, port: int, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError(f"nothing listens on NBD port {port}") from None
                time.sleep(_POLL_S)

    def summary(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What ``up`` reports: where things are and how to use the volume."""
        ports = Ports.from_json(state["ports"])
        return {
            "dir": str(self.root),
            "mdm": state["mdm_url"],
            "volume": state["volume"],
            "nbd": self.uris(state),
            "env": str(self.env_path),
            "logs": str(self.logs_dir),
            "mgmt": state.get("mgmt"),  # None: a lab made before it had a MGMT config
            "tls": {"ca": str(self.ca_dir), "certificates": str(self.tls_dir)}
            if state.get("tls")
            else None,
            "processes": [
                {"name": d.name, "pid": state["pids"].get(d.name), "ports": d.ports}
                for d in self.daemons(ports)
            ],
        }

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Each process: pid, alive, ports, health. Raises NoLab without a lab."""
        state = self.load_state()
        if state is None:
            raise NoLab(f"no lab in {self.root} (start one with 'meshctl lab up')")
        ports = Ports.from_json(state["ports"])
        procs = []
        for d in self.daemons(ports):
            pid = state.get("pids", {}).get(d.name)
            alive = pid is not None and _alive(pid, d.config)
            health: Any = None
            state_text = "stopped"
            if alive:
                try:
                    status, body = self.health(d, state)
                    health = body
                    state_text = _health_word(d.kind, status, body)
                except OSError as exc:
                    state_text = f"unreachable ({exc})"
            procs.append(
                {
                    "name": d.name,
                    "kind": d.kind,
                    "pid": pid,
                    "alive": alive,
                    "ports": d.ports,
                    "health": state_text,
                    "health_doc": health,
                    "log": str(d.log),
                }
            )
        up = all(p["alive"] and p["health"] in ("ok", "serving") for p in procs)
        return {
            "dir": str(self.root),
            "up": up,
            "mdm": state["mdm_url"],
            "nbd": self.uris(state),
            "volume": state["volume"],
            "processes": procs,
        }

    # -- down ----------------------------------------------------------------------

    def down(
        self,
        *,
        purge: bool = False,
        timeout: float = STOP_TIMEOUT_S,
        progress: Progress = lambda _: None,
    ) -> dict[str, Any]:
        """SIGTERM every process (SDC, SDSs, MDM), SIGKILL those still there after
        ``timeout``; ``purge`` also removes the directory. Raises NoLab without a lab."""
        state = self.load_state()
        if state is None:
            raise NoLab(f"no lab in {self.root}")
        ports = Ports.from_json(state["ports"])
        pids: dict[str, int] = dict(state.get("pids", {}))
        order = list(reversed(self.daemons(ports)))
        stopped: dict[str, str] = {}
        targets = [d for d in order if d.name in pids and _alive(pids[d.name], d.config)]
        for d in targets:
            progress(f"stopping {d.name} (pid {pids[d.name]})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[d.name], signal.SIGTERM)
            stopped[d.name] = "terminated"
        deadline = time.monotonic() + timeout
        for d in targets:
            while _alive(pids[d.name], d.config):
                if time.monotonic() > deadline:
                    progress(
                        f"{d.name} (pid {pids[d.name]}) ignored SIGTERM for {timeout:g} s: SIGKILL"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pids[d.name], signal.SIGKILL)
                    stopped[d.name] = "killed"
                    while _alive(pids[d.name], d.config):
                        time.sleep(0.02)
                    break
                time.sleep(0.02)
        state["pids"] = {}
        self._save_state(state)
        if purge:
            progress(f"removing {self.root}")
            shutil.rmtree(self.root)
        return {"dir": str(self.root), "stopped": stopped, "purged": purge}


# -- helpers -------------------------------------------------------------------------


def _ensure(
    api: MdmClient, path: str, key: str, name: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """The object called ``name`` under ``path``, created with ``body`` if missing."""
    for obj in api.get(path)[key]:
        if obj.get("name") == name:
            return dict(obj)
    created: dict[str, Any] = api.post(path.split("?")[0], {"name": name, **body})
    return created


def _field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _health_word(kind: str, status: int, body: Any) -> str:
    """One word for a daemon's /health answer: ok, serving, degraded, starting, ..."""
    if kind == "mdm":
        return str(_field(body, "status") or ("ok" if status == 200 else f"HTTP {status}"))
    if kind == "sds":
        word = str(_field(body, "state") or f"HTTP {status}")
        return word if _field(body, "status") in (None, "ok") else f"{word}, {body['status']}"
    return str(_field(body, "state") or f"HTTP {status}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _sh(value: str) -> str:
    """``value`` quoted for a POSIX shell."""
    return "'" + value.replace("'", "'\\''") + "'"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml(tables: Mapping[str, Mapping[str, object]], header: str) -> str:
    """TOML for ``{"table": {...}}``; ``""`` is the top level, ``"[x]"`` an array table."""
    out = [f"# {header}. Written by 'meshctl lab up'; see docs/ for every key.", ""]
    for table, keys in tables.items():
        if table:
            out.append(f"[{table}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)
