"""Data-path refusals summarised into the SDS's audit log (meshblock.sds.refusals)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from meshblock.audit import AuditLog
from meshblock.sds.refusals import MAX_VOLUMES, RefusalAudit

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
