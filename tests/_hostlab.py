"""The host lab for tests (lab/hostlab.py, docs/hostlab.md): systemd-nspawn hosts and
one QEMU VM on a bridge in network namespace ``meshblock-lab``, driven through the
script's command line, and Ansible and ssh run from inside the namespace.

    lab = HostLab()
    lab.up()                                  # builds the images first if needed
    lab.ansible_playbook("playbooks/site.yml")
    lab.ssh("sdc1", "systemctl is-active meshblock-sdc")
    lab.down()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "lab" / "hostlab.py"
INVENTORY = ROOT / "inventory" / "lab"
VENV_BIN = Path(sys.executable).parent
NETNS = "meshblock-lab"
ARTIFACTS = ROOT / "artifacts" / "hostlab"
# The lab's state (lab/hostlab.py): its secrets, and the CA that site.yml makes.
STATE = Path(os.environ.get("MESHBLOCK_LAB_STATE", "/var/lib/meshblock-lab"))

# The tools the lab needs on this machine (`make deps` installs them).
TOOLS = ("debootstrap", "systemd-nspawn", "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "ip")

RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


class LabUnavailable(Exception):
    pass


def lab_unavailable() -> str | None:
    """Why this machine cannot run the lab, or None."""
    if os.geteuid() != 0:
        return "the host lab needs root (network namespaces, nspawn, mounts)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: run `make deps`"
    for tool in ("ansible-playbook", "ansible"):
        if not (VENV_BIN / tool).exists():
            return f"no {tool} in {VENV_BIN}: run `make venv`"
    return None


@dataclass
class PlayResult:
    returncode: int
    output: str
    seconds: float

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: ok, changed, unreachable, failed."""
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(self.output)
        }

    def tail(self, chars: int = 12000) -> str:
        return self.output[-chars:]


@dataclass(frozen=True)
class LabHost:
    name: str
    address: str
    kind: str


class HostLab:
    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir
        self.hosts = {
            h["name"]: LabHost(h["name"], h["address"], h["kind"])
            for h in json.loads(self._script("hosts").stdout)
        }

    def _script(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise LabUnavailable(
                f"lab/hostlab.py {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-5000:]}{result.stderr[-5000:]}"
            )
        return result

    def image(self) -> float:
        started = time.monotonic()
        self._script("image", timeout=1200)
        return time.monotonic() - started

    def up(self) -> float:
        started = time.monotonic()
        self._script("up", timeout=600)
        return time.monotonic() - started

    def down(self) -> None:
        self._script("down", timeout=300)

    def wheelhouse(self) -> None:
        self._script("wheelhouse", "--python", sys.executable, timeout=600)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self._script("status", check=False).stdout)
        return doc

    def smoke(self) -> subprocess.CompletedProcess[str]:
        return self._script("smoke", "--meshctl", str(VENV_BIN / "meshctl"), check=False)

    # -- inside the namespace ------------------------------------------------

    def netns(
        self,
        *cmd: str,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", NETNS, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )

    def ansible_env(self) -> dict[str, str]:
        return {
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            # Each task's time on each host, for artifacts/hostlab/junit/ (the
            # lab's run time is most of `make test`'s).
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit",
            "JUNIT_OUTPUT_DIR": str(ARTIFACTS / "junit"),
            "JUNIT_TASK_CLASS": "true",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        }

    def ansible_playbook(
        self, playbook: str, *args: str, timeout: float = 1500, name: str | None = None
    ) -> PlayResult:
        started = time.monotonic()
        result = self.netns(
            str(VENV_BIN / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            str(ROOT / playbook),
            *args,
            timeout=timeout,
            env=self.ansible_env(),
        )
        output = result.stdout + result.stderr
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            label = name or Path(playbook).stem
            (self.log_dir / f"{label}.log").write_text(output)
        return PlayResult(result.returncode, output, time.monotonic() - started)

    def ansible(
        self, pattern: str, *args: str, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self.netns(
            str(VENV_BIN / "ansible"),
            "-i",
            str(INVENTORY),
            pattern,
            *args,
            timeout=timeout,
            env=self.ansible_env(),
        )

    def ssh(
        self, host: str, command: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "ssh", host, command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return result

    @property
    def pki(self) -> Path:
        """The controller's CA and certificates that site.yml made (inventory/lab)."""
        return STATE / "pki"

    def meshctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """meshctl as the admin: HTTPS with the controller's admin certificate (the
        roles deploy TLS everywhere)."""
        admin = self.pki / "admin"
        env = {
            "MESHCTL_MDM": f"https://{self.hosts['mdm1'].address}:6611",
            "MESHCTL_TOKEN": (STATE / "secrets" / "admin_token").read_text().strip(),
            "MESHCTL_TLS_CA": str(admin / "ca.crt"),
            "MESHCTL_TLS_CERT": str(admin / "admin-ansible.crt"),
            "MESHCTL_TLS_KEY": str(admin / "admin-ansible.key"),
        }
        return self.netns(str(VENV_BIN / "meshctl"), *args, timeout=timeout, env=env)


# -- one lab per test run ----------------------------------------------------------------

timings: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    """Add ``name`` to ``artifacts/hostlab/timings.json`` (one file for the run)."""
    timings[name] = round(seconds, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")


def shared_lab() -> Iterator[HostLab]:
    """The body of the session fixture ``host_lab`` (tests/conftest.py): the image, the
    hosts and the wheelhouse, built once for every lab test of the run; a lab left
    over by an interrupted run is removed first, and the lab is removed at the end."""
    why = lab_unavailable()
    if why is not None:
        raise LabUnavailable(f"the host lab cannot run here: {why}")
    hostlab = HostLab(log_dir=ARTIFACTS)
    hostlab.down()  # a lab left over by an interrupted run: start afresh
    try:
        record_timing("image_s", hostlab.image())
        record_timing("up_s", hostlab.up())
        started = time.monotonic()
        hostlab.wheelhouse()
        record_timing("wheelhouse_s", time.monotonic() - started)
        yield hostlab
    finally:
        hostlab.down()
