"""The MDM's data-protocol probe (``meshblock.mdm.holddown.probe``), which both the
hold-down and the confirmation of failure reports use (docs/mdm.md, "Failures"),
against servers on loopback: a serving SDS answers; a refused port and a hung one
(the kernel completes the TCP connection, nothing answers, as for a SIGSTOPped SDS)
do not, the hung one within the limit although a TCP connect succeeds."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from _wire import SECRET, sds_server
from meshblock.mdm import holddown

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

LIMIT_S = 1.0


def test_a_serving_sds_answers_the_probe(tmp_path: Path) -> None:
    async def main() -> None:
        async with sds_server(tmp_path) as (server, _):
            assert await holddown.probe("127.0.0.1", server.port, SECRET, LIMIT_S)
            assert not await holddown.probe("127.0.0.1", server.port, "wrong", LIMIT_S)

    asyncio.run(main())


def test_a_hung_sds_fails_the_probe_within_its_limit_though_it_connects() -> None:
    async def main() -> None:
        # A listening socket nobody accepts on: the kernel completes connections into
        # its backlog and nothing ever reads or writes, as with a stopped process.
        with socket.socket() as hung:
            hung.bind(("127.0.0.1", 0))
            hung.listen(8)
            port = hung.getsockname()[1]
            assert await holddown.connects("127.0.0.1", port, LIMIT_S)
            t0 = time.monotonic()
            assert not await holddown.probe("127.0.0.1", port, SECRET, LIMIT_S)
            elapsed = time.monotonic() - t0
            assert LIMIT_S * 0.9 <= elapsed < LIMIT_S + 2.0, elapsed

    asyncio.run(main())


def test_a_refused_port_fails_the_probe_at_once() -> None:
    async def main() -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]  # bound, not listening: refused
            t0 = time.monotonic()
            assert not await holddown.probe("127.0.0.1", port, SECRET, LIMIT_S)
            assert time.monotonic() - t0 < LIMIT_S
            assert not await holddown.connects("127.0.0.1", port, LIMIT_S)

    asyncio.run(main())
