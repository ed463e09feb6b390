"""A network namespace of the test's own, joined to the host by a veth pair, and an SDS
that runs inside it, so that a test can cut one SDS off the network without killing it.

    host (default namespace)                      namespace ``mbt<pid>x<n>``
    MDM, other SDSs, SDC on 10.233.X.1  ---veth--- the SDS on 10.233.X.2
    (host end ``mbh<...>``, a /30)                 (namespace end ``mbn<...>``)

Everything on the host side that the namespaced SDS must reach (the MDM's API, the
peers' data ports) listens on the host end's address, which stays reachable from the
host itself while the link is down; the namespace only ever reaches that address.
:meth:`NetNs.cut` sets the host end down: the namespace's packets are then dropped
silently (connections hang, nothing is refused), the way a pulled cable behaves;
:meth:`NetNs.restore` sets it up again. :meth:`NetNs.destroy` (idempotent) removes the
namespace and the veth pair; the fixtures call it in a finalizer, even on failure.

Requires root (``ip netns``); :func:`netns_unavailable` says why it cannot be used.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess

from _sds import SdsDaemon
from _wait import wait_until

_counter = itertools.count(1)
SUBNET_PREFIX = "10.233"


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        subprocess.run(["ip", "netns", "list"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def _used_third_octets() -> set[int]:
    used = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines() + _ip("-4", "route").splitlines():
        for word in line.split():
            if word.startswith(SUBNET_PREFIX + "."):
                used.add(int(word.split(".")[2]))
    return used


class NetNs:
    """A namespace with a veth pair to the host; unique names and a free /30 per instance."""

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{os.getpid() % 100000}x{n}"
        self.name = f"mbt{tag}"
        self.host_if = f"mbh{tag}"  # interface names: at most 15 characters
        self.ns_if = f"mbn{tag}"
        free = sorted(set(range(1, 255)) - _used_third_octets())
        assert free, f"no free {SUBNET_PREFIX}.X.0/30 subnet"
        octet = random.choice(free)
        self.host_ip = f"{SUBNET_PREFIX}.{octet}.1"
        self.ns_ip = f"{SUBNET_PREFIX}.{octet}.2"
        self.created = False

    def create(self) -> NetNs:
        self.created = True  # from here on destroy() has something to undo
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=self.name)
        _ip("link", "set", self.ns_if, "up", netns=self.name)
        _ip("link", "set", "lo", "up", netns=self.name)
        return self

    def cut(self) -> None:
        """Pull the cable: the host end goes down, the namespace's traffic is dropped."""
        _ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        """Plug the cable back; returns once the host routes to the namespace again."""
        _ip("link", "set", self.host_if, "up")
        subnet = self.ns_ip.rsplit(".", 1)[0]
        wait_until(
            lambda: subnet in _ip("-4", "route", "show", "dev", self.host_if),
            10,
            f"a route on {self.host_if} after setting it up",
            interval=0.05,
        )

    def is_cut(self) -> bool:
        flags = _ip("-o", "link", "show", self.host_if).split("<", 1)[1].split(">", 1)[0]
        return "UP" not in flags.split(",")

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def destroy(self) -> None:
        """Remove the namespace and the veth pair (whatever of them exists)."""
        if not self.created:
            return
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
        self.created = False

    def __enter__(self) -> NetNs:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# An SDS whose data and control ports listen on another address (and which advertises
# it), optionally run inside a network namespace: ``SdsDaemon(..., address, netns)``.
AddressedSds = SdsDaemon
