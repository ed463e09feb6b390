"""tests/_nft.py: ports dropped inside a test's network namespace, and given back.

A listener inside the namespace on two ports; from the host, a connection to a
dropped port hangs (no refusal), the other port and the namespace's own connections
out keep working, and after :meth:`Nft.restore` the dropped port answers again."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from _netns import NetNs, netns_unavailable
from _nft import Nft, nft_unavailable
from _wait import wait_until

pytestmark = pytest.mark.cluster

DROPPED, OPEN = 17071, 17072

LISTENER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"hi"); c.close()
for p in (int(sys.argv[2]), int(sys.argv[3])):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


CONNECT_OUT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print("connected")
"""


@pytest.fixture
def ns() -> Iterator[NetNs]:
    why = netns_unavailable() or nft_unavailable()
    if why:
        pytest.skip(why)
    with NetNs() as n:
        yield n


def greeting(host: str, port: int, timeout: float = 1.0) -> bytes | None:
    """What the listener says, or None when the connection does not complete."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(2)
    except OSError:
        return None


def test_dropped_ports_hang_and_come_back(ns: NetNs) -> None:
    cmd = [*ns.exec_prefix(), sys.executable, "-c", LISTENER, ns.ns_ip, str(DROPPED), str(OPEN)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    nft = Nft(ns)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: greeting(ns.ns_ip, DROPPED) == b"hi", 10, "the listener")
        nft.drop_ports([DROPPED])
        assert nft.active
        assert greeting(ns.ns_ip, DROPPED) is None, nft.rules()
        assert greeting(ns.ns_ip, OPEN) == b"hi", nft.rules()
        # the namespace still reaches out (as an SDS reaches the MDM): to a host listener
        with socket.create_server((ns.host_ip, 0)) as server:
            port = server.getsockname()[1]
            out = subprocess.run(
                [*ns.exec_prefix(), sys.executable, "-c", CONNECT_OUT, ns.host_ip, str(port)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        assert out.returncode == 0 and out.stdout.strip() == "connected", out.stderr
        nft.restore()
        nft.restore()  # idempotent
        assert not nft.active
        assert greeting(ns.ns_ip, DROPPED) == b"hi"
    finally:
        nft.restore()
        proc.kill()
        proc.communicate()
