"""meshblock.audit's log on its own: one JSON object per line, opened again after
logrotate moved the file away (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshblock.audit import AuditLog

pytestmark = pytest.mark.unit


def test_entries_are_json_lines_and_a_moved_file_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog("mdm", str(path))
    try:
        log.write("refused", method="POST", status=403, who={"address": "127.0.0.1"})
        path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default (create)
        log.write("request", method="DELETE", status=204)
    finally:
        log.close()
    (old,) = [json.loads(line) for line in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    (new,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert old["event"] == "refused" and old["daemon"] == "mdm" and old["status"] == 403
    assert old["who"] == {"address": "127.0.0.1"} and old["ts"].endswith("Z")
    assert new["event"] == "request" and new["method"] == "DELETE"
