"""Free TCP ports on loopback for the servers that tests start.

Under pytest-xdist each worker takes its ports from a slice of its own
(:func:`worker_slice`), so that two workers never hand out the same port.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Below the kernel's ephemeral range (outgoing connections take their source ports
# there: a port freed by a bind(0) check can be taken by one before the server binds
# it) and below the blocks of ``_cluster.free_port_block`` (20000-32000).
LOW, HIGH = 10000, 19999
_given: set[int] = set()  # handed out in this run: never twice


def worker_slice(low: int, high: int) -> tuple[int, int]:
    """The part of ``low..high`` (inclusive) that this pytest-xdist worker uses: the
    whole range outside xdist, else the ``i``-th of ``PYTEST_XDIST_WORKER_COUNT``
    equal slices for worker ``gw<i>``."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if count <= 1 or not worker.startswith("gw") or not worker[2:].isdigit():
        return low, high
    span = (high - low + 1) // count
    first = low + int(worker[2:]) % count * span
    return first, first + span - 1


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, and that this test
    run has not handed out before.

    The port is released before it is returned, so another process could still take
    it first; servers that tests start on it fail loudly in that (rare) case.
    """
    if _ephemeral_low() > HIGH:
        low, high = worker_slice(LOW, HIGH)
        for _ in range(500):
            port = random.randint(low, high)
            if port in _given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _given.add(port)
            return port
    # an unusual ephemeral range: let the kernel choose
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _given.add(port)
    return port
