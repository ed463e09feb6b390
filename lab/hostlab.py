#!/usr/bin/env python3
"""meshblock's host lab: systemd-nspawn hosts and one QEMU VM on a bridge in a netns.

Run as root. Standard library only, so it runs before any virtualenv exists.

    lab/hostlab.py image     build the cached images (once per machine, or when the
                             package lists change)
    lab/hostlab.py up        the network namespace, the bridge, every host; waits for ssh
    lab/hostlab.py down      stops every host and the VM, removes the namespace and the
                             hosts' state (the cached images stay)
    lab/hostlab.py status    each host: address, process, ssh
    lab/hostlab.py ssh HOST [COMMAND...]   ssh to a host from inside the namespace
    lab/hostlab.py hosts     the host table as JSON (name, address, kind)

Everything is idempotent: `up` on a running lab starts only what is missing, `down`
on a stopped one does nothing. Where things are:

- the cache (`$MESHBLOCK_LAB_CACHE`, default /var/cache/meshblock-lab): the container
  image (a debootstrapped Debian tree), the VM's kernel, initrd and root disk, the
  controller's ssh key pair, debootstrap's package caches;
- the state (`$MESHBLOCK_LAB_STATE`, default /var/lib/meshblock-lab): per host an
  overlay (the image below, the host's changes above), logs, pids; the VM's qcow2
  overlay disk and serial console log. `down` removes it.

docs/hostlab.md has the addresses, how to reach the hosts and troubleshooting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

NETNS = "meshblock-lab"
BRIDGE = "mblab0"
PREFIX = "10.231.0"
CONTROLLER = f"{PREFIX}.1"
NETMASK_BITS = 24
SUITE = "bookworm"

CACHE = Path(os.environ.get("MESHBLOCK_LAB_CACHE", "/var/cache/meshblock-lab"))
STATE = Path(os.environ.get("MESHBLOCK_LAB_STATE", "/var/lib/meshblock-lab"))
CGROUP_NAME = "meshblock-lab"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

# Bumped when the way the images are made changes (not only their package lists).
IMAGE_RECIPE = "4"

# The container image: what every nspawn host has. The daemons themselves come as
# wheels from the controller (no package index is reachable from the hosts), so only
# Debian packages are baked in: what Ansible needs (python3, python3-apt for the apt
# module on packages that are already there, acl for become_user, sudo), what the
# roles run (python3-venv, prometheus, prometheus-alertmanager, nbd-client) and
# what an operator uses to look around (qemu-io: the smoke workload's NBD client).
CONTAINER_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "iproute2",
    "iputils-ping",
    "netbase",
    "procps",
    "sudo",
    "acl",
    "kmod",
    "nbd-client",
    "qemu-utils",
    "prometheus",
    "prometheus-alertmanager",
)

# The VM: Debian's kernel (with the real nbd module) and what an SDC host needs.
VM_PACKAGES = (
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "iproute2",
    "netbase",
    "procps",
    "sudo",
    "acl",
    "kmod",
    "e2fsprogs",
    "nbd-client",
)

# Units that the image has enabled but the lab does not want running on every host:
# the roles enable what a host needs. The apt timers would only fail (no network).
DISABLED_UNITS = (
    "prometheus.service",
    "prometheus-alertmanager.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dpkg-db-backup.timer",
)
# Units that only slow a boot down here (minutes on the emulated VM): no disk to scrub,
# no binfmt, no screen for a getty on tty1.
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "e2scrub_reap.service",
    "systemd-binfmt.service",
    "getty@tty1.service",
)

VM_MEMORY_MIB = 384
# TCG emulates whatever CPU it is told; a plain one keeps glibc and Python on code
# paths that emulate fast (no AVX-512 string functions).
VM_CPU = os.environ.get("MESHBLOCK_LAB_VM_CPU", "qemu64")
VM_DISK_SIZE = "3G"

SSH_OPTIONS = (
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=30",
)


@dataclass(frozen=True)
class Host:
    name: str
    octet: int
    kind: str  # "nspawn" or "vm"

    @property
    def address(self) -> str:
        return f"{PREFIX}.{self.octet}"


# The lab's hosts. inventory/lab/hosts.yml gives Ansible the same names and addresses
# (tests/test_deploy_lab.py checks that the two agree).
HOSTS = (
    Host("mdm1", 11, "nspawn"),
    Host("sds1", 21, "nspawn"),
    Host("sds2", 22, "nspawn"),
    Host("sds3", 23, "nspawn"),
    Host("sds4", 24, "nspawn"),
    Host("mgmt1", 31, "nspawn"),
    Host("sdc1", 41, "nspawn"),
    Host("sdcvm1", 51, "vm"),
)


def log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


class LabError(Exception):
    pass


def run(cmd: list[str], *, check: bool = True, quiet: bool = False, **kwargs) -> str:
    """Run a command; return its stdout. Fails loudly with its output."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise LabError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n"
            f"{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    if not quiet and result.returncode != 0:
        log(f"(ignored) {' '.join(cmd)}: {result.stderr.strip()}")
    return result.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the host lab needs root (namespaces, nspawn, mounts): run it as root")


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"missing tools: {', '.join(missing)}; `make deps` installs them "
            "(debootstrap, systemd-container, qemu-system-x86, qemu-utils, iproute2, "
            "e2fsprogs, openssh-client)"
        )


# ---------------------------------------------------------------------------
# the image


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 .sources or sources.list)."""
    candidates: list[str] = []
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if SUITE in fields.get("suites", "").split():
                candidates.extend(fields.get("uris", "").split())
    lists = [Path("/etc/apt/sources.list"), *sorted(sources_dir.glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                rest = [w for w in words[1:] if not w.startswith("[")]
                if len(rest) >= 2 and rest[1] == SUITE:
                    candidates.append(rest[0])
    if not candidates:
        raise LabError(f"no '{SUITE}' source in this machine's apt configuration")
    return candidates[0]


def ssh_key() -> Path:
    """The controller's key pair (made once, kept in the cache)."""
    key = CACHE / "ssh" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.parent.chmod(0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshblock-lab", "-f", str(key)])
    return key


def _hosts_file() -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{CONTROLLER}\tcontroller")
    lines += [f"{host.address}\t{host.name}" for host in HOSTS]
    return "\n".join(lines) + "\n"


def _network_file(address: str) -> str:
    # Named so that it sorts before systemd's 80-container-host0.network (DHCP).
    return (
        "# meshblock host lab: a static address on the lab bridge, nothing else\n"
        "[Match]\nName=host0 eth0\n\n"
        f"[Network]\nAddress={address}/{NETMASK_BITS}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\nLLMNR=no\nMulticastDNS=no\n"
    )


def _stamp(kind: str, packages: tuple[str, ...], extra: str = "") -> str:
    pub = (CACHE / "ssh" / "id_ed25519.pub").read_text()
    units = [*DISABLED_UNITS, *MASKED_UNITS]
    text = "\n".join([IMAGE_RECIPE, SUITE, kind, *packages, *units, pub, extra])
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp_ok(path: Path, stamp: str) -> bool:
    return path.is_file() and path.read_text().strip() == stamp


def _debootstrap(target: Path, packages: tuple[str, ...], cache_dir: Path) -> subprocess.Popen:
    if target.exists():
        shutil.rmtree(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    logfile = open(target.with_suffix(".log"), "w")  # the child writes it
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        f"--cache-dir={cache_dir}",
        SUITE,
        str(target),
        apt_mirror(),
    ]
    log(f"debootstrap {target.name}: {' '.join(cmd[:2])} ... (log: {logfile.name})")
    return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)


def _unit_file(tree: Path, unit: str) -> Path | None:
    for d in ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system"):
        if (tree / d / unit).exists():
            return tree / d / unit
    return None


def _unit_enabled(tree: Path, unit: str) -> bool:
    wants = (tree / "etc/systemd/system").glob(f"*.wants/{unit}")
    return any(True for _ in wants)


def _customise(tree: Path, pub: str) -> None:
    """What both images get: the controller's key, no apt sources, quiet units."""
    ssh_dir = tree / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pub)
    (ssh_dir / "authorized_keys").chmod(0o600)
    # The hosts have no way out: no package source, no DNS server.
    for sources in [tree / "etc/apt/sources.list", *(tree / "etc/apt/sources.list.d").glob("*")]:
        sources.unlink(missing_ok=True)
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("# meshblock host lab: no DNS, names are in /etc/hosts\n")
    sshd = tree / "etc/ssh/sshd_config.d"
    sshd.mkdir(parents=True, exist_ok=True)
    (sshd / "meshblock-lab.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    root = ["systemctl", f"--root={tree}"]
    present = [u for u in DISABLED_UNITS if _unit_file(tree, u) is not None]
    if present:
        run([*root, "disable", *present])
    run([*root, "mask", *MASKED_UNITS])
    enabled = [u for u in present if _unit_enabled(tree, u)]
    if enabled:
        raise LabError(f"still enabled in {tree}: {', '.join(enabled)}")
    run([*root, "enable", "systemd-networkd.service"])
    # Each host gets its own machine id at `up`.
    (tree / "etc/machine-id").write_text("")
    for leftover in (tree / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()


def build_images(force: bool = False) -> None:
    require_root()
    require_tools("debootstrap", "mkfs.ext4", "ssh-keygen", "systemctl")
    CACHE.mkdir(parents=True, exist_ok=True)
    pub = ssh_key().with_suffix(".pub").read_text()
    base, vm = CACHE / "base", CACHE / "vm"
    base_stamp = _stamp("container", CONTAINER_PACKAGES)
    vm_tree_stamp = _stamp("vm-tree", VM_PACKAGES)
    vm_disk_stamp = _stamp("vm-disk", VM_PACKAGES, _hosts_file() + _vm_network())
    want_base = force or not _stamp_ok(CACHE / "base.stamp", base_stamp)
    want_vm_tree = force or not _stamp_ok(CACHE / "vm-tree.stamp", vm_tree_stamp)
    want_vm_disk = want_vm_tree or not _stamp_ok(CACHE / "vm-disk.stamp", vm_disk_stamp)
    if not (want_base or want_vm_tree or want_vm_disk):
        log(f"images are up to date in {CACHE}")
        return
    if lab_is_up():
        raise LabError("the images are out of date but the lab is up: `lab down` first")
    started = time.monotonic()
    # Both debootstraps at once: they mostly wait on downloads and dpkg.
    jobs: list[tuple[str, Path, subprocess.Popen]] = []
    if want_base:
        (CACHE / "base.stamp").unlink(missing_ok=True)
        tmp = CACHE / "base.new"
        jobs.append(("base", tmp, _debootstrap(tmp, CONTAINER_PACKAGES, CACHE / "debs-base")))
    if want_vm_tree:
        (CACHE / "vm-tree.stamp").unlink(missing_ok=True)
        tmp = CACHE / "vm-tree.new"
        jobs.append(("vm-tree", tmp, _debootstrap(tmp, VM_PACKAGES, CACHE / "debs-vm")))
    failed = []
    for name, tmp, proc in jobs:
        if proc.wait() != 0:
            failed.append(f"{name} (log: {tmp.with_suffix('.log')})")
    if failed:
        raise LabError(f"debootstrap failed: {', '.join(failed)}")
    for name, tmp, _proc in jobs:
        _customise(tmp, pub)
        final = base if name == "base" else CACHE / "vm-tree"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    if want_base:
        (CACHE / "base.stamp").write_text(base_stamp + "\n")
    if want_vm_tree:
        (CACHE / "vm-tree.stamp").write_text(vm_tree_stamp + "\n")
    if want_vm_disk:
        _build_vm_disk(CACHE / "vm-tree", vm)
        (CACHE / "vm-disk.stamp").write_text(vm_disk_stamp + "\n")
    log(f"images built in {time.monotonic() - started:.0f} s ({CACHE})")


def _vm_host() -> Host:
    return next(host for host in HOSTS if host.kind == "vm")


def _vm_network() -> str:
    return _network_file(_vm_host().address)


def _build_vm_disk(tree: Path, out: Path) -> None:
    """The VM's root disk (ext4 made from the tree) and its kernel and initrd."""
    vm = _vm_host()
    (tree / "etc/hostname").write_text(vm.name + "\n")
    (tree / "etc/hosts").write_text(_hosts_file())
    (tree / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1\n")
    netdir = tree / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    (netdir / "10-meshblock-lab.network").write_text(_vm_network())
    (tree / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise LabError(f"no kernel or initrd in {tree}/boot (linux-image-amd64 missing?)")
    tmp = out.with_name("vm.new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy2(kernels[-1], tmp / "vmlinuz")
    shutil.copy2(initrds[-1], tmp / "initrd.img")
    log(f"VM root disk: mkfs.ext4 -d {tree} ({VM_DISK_SIZE}, sparse)")
    image = tmp / "root.img"
    run(["mkfs.ext4", "-q", "-F", "-L", "meshroot", "-d", str(tree), str(image), VM_DISK_SIZE])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ---------------------------------------------------------------------------
# the network namespace


def netns_exists() -> bool:
    return Path(f"/run/netns/{NETNS}").exists()


def lab_is_up() -> bool:
    return netns_exists() or any(_pid_alive(h) for h in HOSTS)


def in_netns(cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *cmd]


def enter_netns(cmd: list[str]) -> list[str]:
    """Like in_netns, without `ip netns exec`'s fresh /sys: systemd-nspawn needs this
    machine's cgroup mounts under /sys/fs/cgroup to see."""
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *cmd]


def setup_network() -> None:
    if not netns_exists():
        log(f"network namespace {NETNS}, bridge {BRIDGE} ({CONTROLLER}/{NETMASK_BITS})")
        run(["ip", "netns", "add", NETNS])
    ipn = ["ip", "-n", NETNS]
    run([*ipn, "link", "set", "lo", "up"])
    links = run([*ipn, "-o", "link", "show"])
    if f" {BRIDGE}:" not in links:
        run([*ipn, "link", "add", BRIDGE, "type", "bridge"])
    addresses = run([*ipn, "-o", "addr", "show", "dev", BRIDGE])
    if f"{CONTROLLER}/{NETMASK_BITS}" not in addresses:
        run([*ipn, "addr", "add", f"{CONTROLLER}/{NETMASK_BITS}", "dev", BRIDGE])
    run([*ipn, "link", "set", BRIDGE, "up"])


# ---------------------------------------------------------------------------
# processes and cgroups


def _host_dir(host: Host) -> Path:
    return STATE / host.name


def _pid_file(host: Host) -> Path:
    return _host_dir(host) / ("qemu.pid" if host.kind == "vm" else "nspawn.pid")


def _pid(host: Host) -> int | None:
    try:
        return int(_pid_file(host).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(host: Host) -> bool:
    """True while the recorded pid is this host's nspawn or qemu (not a reused pid)."""
    pid = _pid(host)
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    want = b"systemd-nspawn" if host.kind == "nspawn" else b"qemu-system"
    return any(want in arg for arg in cmdline[:1]) and host.name.encode() in b" ".join(cmdline)


def _cgroups(host: Host) -> list[Path]:
    return [root / CGROUP_NAME / host.name for root in CGROUP_ROOTS if root.is_dir()]


def _make_cgroups(host: Host) -> list[Path]:
    groups = _cgroups(host)
    if not groups:
        raise LabError(f"none of {', '.join(map(str, CGROUP_ROOTS))} is mounted")
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)
    return groups


def _cgroup_pids(group: Path) -> set[int]:
    pids: set[int] = set()
    if not group.is_dir():
        return pids
    for procs in group.rglob("cgroup.procs"):
        try:
            pids.update(int(line) for line in procs.read_text().split())
        except (FileNotFoundError, OSError):
            continue
    return pids


def _kill_cgroups(host: Host, timeout: float = 10.0) -> None:
    """SIGKILL whatever is left in the host's cgroups, then remove them."""
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for group in _cgroups(host):
            pids |= _cgroup_pids(group)
        if not pids:
            break
        if time.monotonic() > deadline:
            raise LabError(f"{host.name}: processes {sorted(pids)} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for group in _cgroups(host):
        if not group.is_dir():
            continue
        # Deepest first: the container's systemd leaves its own sub-groups behind.
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            group.rmdir()
        except OSError as exc:
            log(f"(ignored) cannot remove cgroup {group}: {exc}")


def _start_in_cgroup(host: Host, cmd: list[str], logfile: Path) -> int:
    """Start cmd detached, inside the host's own cgroups and the lab's netns."""
    groups = _make_cgroups(host)
    enter = "; ".join(f'echo $$ > "{group}/cgroup.procs"' for group in groups)
    shell = f'{enter}; exec "$@"'
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", shell, "sh", *enter_netns(cmd)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


# ---------------------------------------------------------------------------
# containers


def _mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4] == target:
            return True
    return False


def _prepare_container(host: Host) -> Path:
    hdir = _host_dir(host)
    upper, work, root = hdir / "upper", hdir / "work", hdir / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    if not _mounted(root):
        opts = f"lowerdir={CACHE / 'base'},upperdir={upper},workdir={work}"
        run(["mount", "-t", "overlay", f"meshblock-lab-{host.name}", "-o", opts, str(root)])
    (root / "etc/hostname").write_text(host.name + "\n")
    (root / "etc/hosts").write_text(_hosts_file())
    machine_id = root / "etc/machine-id"
    if not machine_id.read_text().strip():
        machine_id.write_text(uuid.uuid4().hex + "\n")
    netdir = root / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    (netdir / "10-meshblock-lab.network").write_text(_network_file(host.address))
    return root


def start_container(host: Host) -> None:
    if _pid_alive(host):
        return
    root = _prepare_container(host)
    cmd = [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        f"--machine={host.name}",
        f"--hostname={host.name}",
        f"--directory={root}",
        "--register=no",
        "--keep-unit",
        f"--network-bridge={BRIDGE}",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=passive",
    ]
    pid = _start_in_cgroup(host, cmd, _host_dir(host) / "nspawn.log")
    _pid_file(host).write_text(f"{pid}\n")
    log(f"{host.name}: systemd-nspawn pid {pid}, {host.address}")


def _terminate(host: Host, timeout: float) -> None:
    """SIGTERM the host's nspawn or qemu, wait up to ``timeout`` for it to end, then
    kill whatever is left in its cgroups."""
    pid = _pid(host)
    if pid is not None and _pid_alive(host):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(host) and time.monotonic() < deadline:
            time.sleep(0.2)
    _kill_cgroups(host)


def stop_container(host: Host, timeout: float = 20.0) -> None:
    # nspawn turns SIGTERM into an orderly shutdown of the container's systemd.
    _terminate(host, timeout)
    root = _host_dir(host) / "root"
    if _mounted(root):
        run(["umount", str(root)], check=False)
        if _mounted(root):
            run(["umount", "-l", str(root)])


# ---------------------------------------------------------------------------
# the VM


def start_vm(host: Host) -> None:
    if _pid_alive(host):
        return
    hdir = _host_dir(host)
    hdir.mkdir(parents=True, exist_ok=True)
    vm = CACHE / "vm"
    disk = hdir / "disk.qcow2"
    if not disk.exists():
        run(
            [
                *("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"),
                *("-b", str(vm / "root.img"), str(disk)),
            ]
        )
    tap = f"tap-{host.name}"[:15]
    ipn = ["ip", "-n", NETNS]
    if f" {tap}:" not in run([*ipn, "-o", "link", "show"]):
        run([*ipn, "tuntap", "add", "dev", tap, "mode", "tap"])
    run([*ipn, "link", "set", tap, "master", BRIDGE, "up"])
    pid_file = _pid_file(host)
    pid_file.unlink(missing_ok=True)
    mac = f"52:54:00:e1:00:{host.octet:02x}"
    cmd = [
        "qemu-system-x86_64",
        "-name",
        f"{host.name},process=qemu-{host.name}",
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        VM_CPU,
        "-smp",
        "1",
        "-m",
        str(VM_MEMORY_MIB),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{hdir / 'console.log'}",
        "-kernel",
        str(vm / "vmlinuz"),
        "-initrd",
        str(vm / "initrd.img"),
        "-append",
        "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet",
        "-drive",
        f"file={disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-netdev",
        f"tap,id=net0,ifname={tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
        "-device",
        "virtio-rng-pci",
        "-pidfile",
        str(pid_file),
    ]
    pid = _start_in_cgroup(host, cmd, hdir / "qemu.log")
    # qemu writes its pid file itself; until then, the pid we started is the same
    # process (sh and nsenter both exec).
    if not pid_file.exists():
        pid_file.write_text(f"{pid}\n")
    log(f"{host.name}: qemu (TCG, {VM_MEMORY_MIB} MiB) pid {pid}, {host.address}")


def stop_vm(host: Host, timeout: float = 10.0) -> None:
    _terminate(host, timeout)
    tap = f"tap-{host.name}"[:15]
    if netns_exists():
        run(["ip", "-n", NETNS, "link", "del", tap], check=False, quiet=True)


# ---------------------------------------------------------------------------
# ssh


def ssh_command(host: Host, command: list[str], *, tty: bool = False) -> list[str]:
    key = CACHE / "ssh" / "id_ed25519"
    opts = ["-t"] if tty else []
    return in_netns(["ssh", "-i", str(key), *SSH_OPTIONS, *opts, f"root@{host.address}", *command])


def ssh_ready(host: Host) -> bool:
    result = subprocess.run(
        ssh_command(host, ["true"]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=90,
    )
    return result.returncode == 0


def wait_for_ssh(hosts: list[Host], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(hosts)
    while waiting:
        for host in list(waiting):
            if not _pid_alive(host):
                logfile = _host_dir(host) / ("qemu.log" if host.kind == "vm" else "nspawn.log")
                tail = logfile.read_text()[-3000:] if logfile.exists() else ""
                raise LabError(f"{host.name} exited while starting; {logfile}:\n{tail}")
            try:
                ready = ssh_ready(host)
            except subprocess.TimeoutExpired:
                ready = False
            if ready:
                log(f"{host.name}: ssh is up")
                waiting.remove(host)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(h.name for h in waiting)
            raise LabError(
                f"no ssh after {timeout:.0f} s from: {names} (logs in {STATE}/<host>/; "
                f"the VM's console: {STATE}/sdcvm1/console.log)"
            )
        if waiting:
            time.sleep(1)


# ---------------------------------------------------------------------------
# commands


def write_secrets() -> None:
    """Fresh tokens and cluster secret for a new lab (inventory/lab reads them)."""
    sdir = STATE / "secrets"
    sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in (
        "admin_token",
        "readonly_token",
        "cluster_secret",
        "webhook_token",
        "mgmt_password",
    ):
        path = sdir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))


def build_wheelhouse(python: str, project: Path, out: Path) -> None:
    """The project's wheel and its dependencies' for the hosts, built here (the
    controller) outside the namespace, where the package index is reachable."""
    out.mkdir(parents=True, exist_ok=True)
    log(f"wheelhouse: pip wheel {project} -> {out}")
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    cmd = [python, "-m", "pip", "wheel", "--disable-pip-version-check", "--quiet"]
    run([*cmd, "--wheel-dir", str(out), str(project)], env=env)


def meshctl_env() -> dict[str, str]:
    """meshctl's environment for the lab's MDM: HTTPS with the controller's admin
    certificate once site.yml has made the CA (the roles' default, inventory/lab), plain
    HTTP with the admin token otherwise."""
    mdm = find_host("mdm1")
    env = {**os.environ, "MESHCTL_TOKEN": (STATE / "secrets" / "admin_token").read_text().strip()}
    admin = STATE / "pki" / "admin"
    if not (admin / "admin-ansible.crt").exists():
        return {**env, "MESHCTL_MDM": f"http://{mdm.address}:6611"}
    tls = {"CA": "ca.crt", "CERT": "admin-ansible.crt", "KEY": "admin-ansible.key"}
    return {
        **env,
        "MESHCTL_MDM": f"https://{mdm.address}:6611",
        **{f"MESHCTL_TLS_{k}": str(admin / name) for k, name in tls.items()},
    }


def smoke(meshctl: str, volume: str = "smoke", timeout: float = 60.0) -> None:
    """A volume created and mapped to sdc1 with meshctl (from the controller, inside
    the namespace), then written and read back verified by qemu-io on sdc1 over the
    SDC's NBD unix socket (its TCP export is TLS only, for other lab hosts)."""
    env = meshctl_env()
    for args in (
        ["volume", "create", volume, "--pool", "sp1", "--size", "1GiB"],
        ["volume", "map", volume, "--sdc", "sdc1"],
    ):
        result = subprocess.run(in_netns([meshctl, *args]), env=env, capture_output=True, text=True)
        if result.returncode not in (0, 5):  # 5: it exists already (a second smoke)
            raise LabError(f"meshctl {' '.join(args)}: {result.stderr.strip()}")
        log(f"meshctl {' '.join(args)}: {'done' if result.returncode == 0 else 'exists'}")
    pattern = f"0x{secrets.randbelow(255) + 1:02x}"
    uri = f"nbd+unix:///{volume}?socket=/run/meshblock-sdc/nbd.sock"
    io = [
        *("qemu-io", "-f", "raw"),
        *("-c", f"write -P {pattern} 1048064 2M"),  # across a chunk boundary, unaligned
        *("-c", f"read -P {pattern} 1048064 2M"),
        uri,
    ]
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ssh_command(find_host("sdc1"), [shlex.join(io)]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode == 0 and "Pattern verification failed" not in result.stdout:
            break
        if time.monotonic() > deadline:
            raise LabError(f"qemu-io on sdc1 ({uri}):\n{result.stdout}{result.stderr}")
        time.sleep(2)
    log(f"smoke: 2 MiB of {pattern} written to {volume} on sdc1 and read back verified")


def up(timeout: float) -> None:
    require_root()
    require_tools("ip", "systemd-nspawn", "qemu-system-x86_64", "qemu-img", "ssh", "mount")
    build_images()
    started = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    write_secrets()
    setup_network()
    # The VM boots slowest: start it first.
    for host in sorted(HOSTS, key=lambda h: h.kind != "vm"):
        if host.kind == "vm":
            start_vm(host)
        else:
            start_container(host)
    wait_for_ssh(list(HOSTS), timeout)
    log(f"the lab is up ({time.monotonic() - started:.0f} s): {len(HOSTS)} hosts on {BRIDGE}")
    print(f"ssh: ip netns exec {NETNS} ssh -i {CACHE}/ssh/id_ed25519 root@{PREFIX}.N")


def down() -> None:
    require_root()
    for host in HOSTS:
        if host.kind == "vm":
            stop_vm(host)
        else:
            stop_container(host)
    for root in CGROUP_ROOTS:
        group = root / CGROUP_NAME
        if group.is_dir():
            try:
                group.rmdir()
            except OSError as exc:
                log(f"(ignored) cannot remove cgroup {group}: {exc}")
    if netns_exists():
        run(["ip", "netns", "del", NETNS])
    if STATE.exists():
        for host in HOSTS:
            if _mounted(_host_dir(host) / "root"):
                raise LabError(f"{_host_dir(host) / 'root'} is still mounted; not removing {STATE}")
        shutil.rmtree(STATE)
    log("the lab is down (the images stay in " + str(CACHE) + ")")


def status() -> int:
    rows = []
    for host in HOSTS:
        alive = _pid_alive(host)
        ssh = False
        if alive and netns_exists():
            try:
                ssh = ssh_ready(host)
            except subprocess.TimeoutExpired:
                ssh = False
        rows.append(
            {
                "name": host.name,
                "address": host.address,
                "kind": host.kind,
                "pid": _pid(host) if alive else None,
                "running": alive,
                "ssh": ssh,
            }
        )
    print(json.dumps({"netns": netns_exists(), "hosts": rows}, indent=2))
    return 0 if netns_exists() and all(r["ssh"] for r in rows) else 1


def find_host(name: str) -> Host:
    for host in HOSTS:
        if host.name == name:
            return host
    raise LabError(f"no host {name!r}; hosts: {', '.join(h.name for h in HOSTS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="build the cached images if missing or out of date")
    image.add_argument("--force", action="store_true", help="rebuild even when up to date")
    up_cmd = sub.add_parser("up", help="start the lab (builds the images first if needed)")
    up_cmd.add_argument("--timeout", type=float, default=300, help="seconds to wait for ssh")
    sub.add_parser("down", help="stop the lab and remove its state")
    sub.add_parser("status", help="each host: process and ssh, as JSON")
    sub.add_parser("hosts", help="the host table as JSON")
    wheels = sub.add_parser("wheelhouse", help="build the wheelhouse the roles copy")
    wheels.add_argument("--python", default=sys.executable, help="the Python with pip")
    wheels.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent)
    wheels.add_argument("--out", type=Path, default=None, help="default: PROJECT/.build/wheelhouse")
    smoke_cmd = sub.add_parser("smoke", help="a volume written and read back on sdc1")
    smoke_cmd.add_argument("--meshctl", default="meshctl", help="the controller's meshctl")
    ssh = sub.add_parser("ssh", help="ssh to a host from inside the namespace")
    ssh.add_argument("host")
    ssh.add_argument("remote", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "image":
            build_images(force=args.force)
        elif args.command == "up":
            up(args.timeout)
        elif args.command == "down":
            down()
        elif args.command == "status":
            return status()
        elif args.command == "hosts":
            table = [{"name": h.name, "address": h.address, "kind": h.kind} for h in HOSTS]
            print(json.dumps(table, indent=2))
        elif args.command == "smoke":
            smoke(args.meshctl)
        elif args.command == "wheelhouse":
            build_wheelhouse(
                args.python, args.project, args.out or args.project / ".build/wheelhouse"
            )
        elif args.command == "ssh":
            cmd = ssh_command(find_host(args.host), args.remote, tty=not args.remote)
            os.execvp(cmd[0], cmd)
    except LabError as exc:
        print(f"hostlab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
