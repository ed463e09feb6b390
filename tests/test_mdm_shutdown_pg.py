"""Stopping the MDM process on PostgreSQL while it loses its leader lease.

A SIGTERM starts aiohttp's graceful stop: requests in progress get up to 5 s, then
the background loops stop (tests/test_mdm_shutdown.py). A leader that lost its lease
meanwhile used to raise a SIGTERM of its own, which aiohttp turned into a second
``GracefulExit`` out of ``web.run_app``: the stop was cut short and the process
exited with code 1 instead of the lease-loss code 5 (docs/mdm.md, exit codes)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest

from _mdm import MdmDaemon
from _pg import PgServer
from meshblock.mdm.db import create_engine, session_factory
from meshblock.mdm.leader import Lease

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

EXIT_DEPOSED = 5


async def _take_the_lease(url: str) -> None:
    engine = create_engine(url)
    try:
        assert await Lease(session_factory(engine), "usurper", 60.0).try_acquire(force=True)
    finally:
        await engine.dispose()


def test_a_lease_lost_during_the_stop_exits_with_the_lease_loss_code(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.create_database()
    ha = {"ha": {"name": "stopping", "lease_s": 2.0, "renew_interval_s": 0.2}}
    mdm = MdmDaemon(tmp_path, url, ha)
    mdm.start()
    try:
        # a request in progress holds the stop in aiohttp's drain (its body never ends)
        with contextlib.closing(socket.create_connection((mdm.host, mdm.port))) as slow:
            slow.sendall(
                b"POST /api/v1/protection-domains HTTP/1.1\r\n"
                b"Host: mdm\r\n"
                b"Authorization: Bearer " + mdm.admin_token.encode() + b"\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            time.sleep(0.5)
            assert mdm.proc is not None
            mdm.proc.terminate()  # SIGTERM: the drain begins
            time.sleep(0.5)
            asyncio.run(_take_the_lease(url))  # its next renewal finds it deposed
            rc = mdm.wait_exit(30.0)
    finally:
        mdm.kill()
    log = mdm.log_text()
    assert "was taken over by another MDM): it stops acting" in log, mdm.log_tail()
    assert rc == EXIT_DEPOSED, f"exit code {rc}\n{mdm.log_tail()}"
    assert "the last heartbeat times are not written: this MDM no longer leads" in log
