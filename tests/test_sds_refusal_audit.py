"""Data-path refusals summarised into the SDS's audit log (meshblock.sds.refusals)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from meshblock.audit import AuditLog
from meshblock.chunks import pg_of
from meshblock.sds.checksums import BLOCK
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import PgMap
from meshblock.sds.refusals import MAX_VOLUMES, RefusalAudit
from meshblock.sds.resync import Resync
from meshblock.wire.protocol import REQUEST_MAGIC, ROLE_OPS, Op, PeerRole, Request, Status
from test_device_failstop_units import ME, PG_COUNT, POOL, Conn
from test_sds_checksums import VOL
from test_sds_heal_units import PEER, PeerCopy, answer, pattern, state_with_peer

pytestmark = pytest.mark.unit


def test_a_scan_is_one_entry_a_second_with_its_counts_and_volumes(tmp_path: Path) -> None:
    """250 refused IOs over 120 volume ids from one caller, 3 from another: one entry
    each once the second is up, with the counts, the first 100 ids and the distinct
    count; nothing is written before."""
    path = tmp_path / "audit.log"
    log = AuditLog("sds", str(path))
    audit = RefusalAudit(log, every_s=0.2)

    async def main() -> None:
        for n in range(250):
            audit.note("sdc:g1", "127.0.0.1:5000", "READ", n % 120, "not mapped to it")
        for _ in range(3):
            audit.note("sds:x", "127.0.0.1:6000", "REPL_WRITE", None, "not the primary")
        assert not path.exists() or path.read_text() == ""
        await asyncio.sleep(0.4)

    asyncio.run(main())
    log.close()
    entries = {e["who"]: e for e in map(json.loads, path.read_text().splitlines())}
    scan = entries["sdc:g1"]
    assert scan["event"] == "data_refused" and scan["refused"] == 250
    assert scan["distinct_volumes"] == 120 and scan["volumes"] == list(range(MAX_VOLUMES))
    assert scan["ops"] == {"READ": 250} and scan["reason"] == "not mapped to it"
    assert scan["address"] == "127.0.0.1:5000"
    peer = entries["sds:x"]
    assert peer["refused"] == 3 and peer["volumes"] == [] and peer["distinct_volumes"] == 0


def test_what_is_pending_is_written_on_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog("sds", str(path))
    audit = RefusalAudit(log, every_s=60.0)

    async def main() -> None:
        audit.note("sdc:g1", "127.0.0.1:5000", "WRITE", 9, "mapped to it read-only")
        audit.close()

    asyncio.run(main())
    log.close()
    (entry,) = map(json.loads, path.read_text().splitlines())
    assert entry["refused"] == 1 and entry["volumes"] == [9] and audit.written == 1


def test_a_replica_write_from_an_sds_that_is_not_the_primary_is_refused_with_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A REPL_WRITE to us, the secondary, from an SDS the map does not make the PG's
    primary goes through the connection's refusal (logged, counted and audited with its
    volume) naming the sender and the PG; before, it was answered NOT_PERMITTED past
    it, summarised with no volume and a fixed reason."""
    sds = state_with_peer(tmp_path, PeerCopy(pattern()), monkeypatch)
    svc = DataService(sds, Resync(sds))
    addresses = {ME: ("127.0.0.1", 1), PEER: ("127.0.0.1", 2), PEER + 1: ("127.0.0.1", 3)}
    m = sds.maps.maps[POOL]
    names = {"peer": PEER, "me": ME, "thief": PEER + 1}
    sds.maps.update(
        PgMap(POOL, 2, PG_COUNT, m.primary, m.secondary, addresses, {}, sds_names=names)
    )
    conn = Conn()
    conn.peer_sds = "thief"  # type: ignore[attr-defined]
    refused: list[tuple[int, str]] = []

    def refuse(req: Request, why: str) -> None:
        refused.append((req.volume_id, why))
        conn.reply(req.request_id, Status.NOT_PERMITTED, 0, 0, None)

    conn.refuse = refuse  # type: ignore[attr-defined]
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.SDS_PEER])
    pg = pg_of(VOL, 1, PG_COUNT)
    req = Request(REQUEST_MAGIC, int(Op.REPL_WRITE), 0, 0, 9, POOL, pg, 2, VOL, 1, 0, BLOCK)

    async def main() -> None:
        svc.handle(conn, req, memoryview(bytes(BLOCK)))
        assert await answer(conn, 9) == Status.NOT_PERMITTED

    try:
        asyncio.run(main())
    finally:
        sds.store.close()
    assert refused == [
        (VOL, f"sds:thief is not the PG's primary in this SDS's map (PG {POOL}/{pg}, epoch 2)")
    ]
