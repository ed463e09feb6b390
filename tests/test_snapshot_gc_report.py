"""The report of the garbage passes of snapshot trees, against the real MDM (docs/mdm.md,
"Garbage of snapshot trees"): the SDSs' heartbeats carry their passes per tree, the MDM
sums them in ``GET /api/v1/snapshot-gc`` and ``meshctl snapshot-gc status`` (``--json``
too), and a malformed report is refused naming the field."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from _mdm import MdmDaemon
from meshblock.mdm import heartbeats, snapshot_gc
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, DatabaseConfig, MdmConfig, ScrubConfig
from meshblock.mdm.context import CTX
from meshblock.mdm.snapshot_gc import TreeGcReports

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def _ok(resp: Any, status: int = 200) -> Any:
    code, doc = resp
    assert code == status, doc
    return doc


def _pass(tree: int, state: str, chunks: int, done: int, unread: dict[int, int]) -> dict[str, Any]:
    return {
        "tree_id": tree,
        "pool_id": 1,
        "state": state,
        "chunks": chunks,
        "chunks_done": done,
        "blocks_freed": 10 * done,
        "slots_freed": done,
        "collapsed": 1,
        "unread_slots": [{"version": v, "slots": n} for v, n in unread.items()],
    }


@pytest.fixture(scope="module")
def sds_ids(mdm: MdmDaemon) -> list[int]:
    api = mdm.api()
    pool = mdm.create_pool("pd-gc", "pool-gc", 16)
    return [
        _ok(
            api.post(
                "/api/v1/sds",
                {
                    "name": f"gc{i}",
                    "protection_domain_id": pool["protection_domain_id"],
                    "address": "127.0.0.1",
                    "data_port": 17370 + i,
                    "devices": [
                        {"path": f"/dev/gc{i}", "capacity": "100GiB", "pool_id": pool["id"]}
                    ],
                },
            ),
            201,
        )["id"]
        for i in (1, 2)
    ]


def meshctl(mdm: MdmDaemon, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = mdm.env() | {"XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "meshblock.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_the_sdss_passes_are_summed_per_tree_in_the_api_and_meshctl(
    mdm: MdmDaemon, sds_ids: list[int], tmp_path: Path
) -> None:
    component = mdm.api(mdm.cluster_secret)
    a, b = sds_ids
    assert _ok(mdm.api().get("/api/v1/snapshot-gc")) == {"trees": [], "unreported": {}}
    beats = {
        a: [_pass(7, "running", 100, 40, {}), _pass(9, "done", 5, 5, {2: 0})],
        b: [_pass(7, "done", 80, 80, {1: 3, 4: 0})],
    }
    for sds_id, trees in beats.items():
        body = {"seq": 1, "full": True, "devices": [], "volumes": [], "tree_gc": trees}
        _ok(component.post(f"/api/v1/sds/{sds_id}/heartbeat", body))
    doc = _ok(mdm.api().get("/api/v1/snapshot-gc"))
    tree7, tree9 = doc["trees"]
    assert {k: v for k, v in tree7.items() if k != "sds"} == {
        "tree_id": 7,
        "pool_id": 1,
        "state": "running",
        "sds_reporting": 2,
        "chunks": 180,
        "chunks_done": 120,
        "chunks_left": 60,
        "blocks_freed": 1200,
        "slots_freed": 120,
        "collapsed": 2,
        "unread_slots": {"1": 3, "4": 0},
    }
    assert [s["sds_id"] for s in tree7["sds"]] == [a, b]
    assert tree9["state"] == "done" and tree9["unread_slots"] == {"2": 0}

    out = json.loads(meshctl(mdm, tmp_path, "--json", "snapshot-gc", "status").stdout)
    assert out == doc
    table = meshctl(mdm, tmp_path, "snapshot-gc", "status").stdout.splitlines()
    assert table[0].split()[:3] == ["TREE", "POOL", "STATE"]
    assert table[1].split() == ["7", "1", "running", "2", "120", "60", "1200", "120", "2", "3"]

    # A delta updates the passes it carries and drops those gone; one without
    # keeps them; with tree_gc_left, the SDS has more to send.
    base = {"seq": 2, "base": 1}
    delta = {"tree_gc": [_pass(9, "running", 6, 1, {})], "tree_gc_gone": [7]}
    _ok(component.post(f"/api/v1/sds/{a}/heartbeat", base | delta | {"tree_gc_left": 40}))
    _ok(component.post(f"/api/v1/sds/{b}/heartbeat", base))
    doc = _ok(mdm.api().get("/api/v1/snapshot-gc"))
    assert [(t["tree_id"], t["state"], t["sds_reporting"]) for t in doc["trees"]] == [
        (7, "done", 1),
        (9, "running", 1),
    ]
    assert doc["unreported"] == {str(a): 40}
    table = meshctl(mdm, tmp_path, "snapshot-gc", "status").stdout.splitlines()
    assert table[-1] == f"SDS {a}: 40 tree report(s) still to come with its next heartbeats"

    # A full heartbeat without tree_gc: the SDS has no pass any more (a restart).
    _ok(component.post(f"/api/v1/sds/{b}/heartbeat", {"seq": 3, "full": True}))
    _ok(component.post(f"/api/v1/sds/{a}/heartbeat", {"seq": 3, "full": True}))
    assert _ok(mdm.api().get("/api/v1/snapshot-gc")) == {"trees": [], "unreported": {}}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"state": "paused"}, "tree_gc.0.state"),
        ({"tree_id": 0}, "tree_gc.0.tree_id"),
        ({"chunks_done": -1}, "tree_gc.0.chunks_done"),
        ({"unread_slots": [{"version": 1}]}, "tree_gc.0.unread_slots.0"),
        ({"extra": 1}, "tree_gc.0"),
        ({"tree_gc_gone": [7]}, "tree_gc_gone"),  # a full heartbeat has none
        ({"tree_gc_left": -1}, "tree_gc_left"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(
    mdm: MdmDaemon, sds_ids: list[int], change: dict[str, Any], field: str
) -> None:
    top = {k: v for k, v in change.items() if k.startswith("tree_gc_")}
    entry = _pass(7, "done", 1, 1, {}) | {k: v for k, v in change.items() if k not in top}
    body = {"seq": 5, "full": True, "tree_gc": [entry]} | top
    status, doc = mdm.api(mdm.cluster_secret).post(f"/api/v1/sds/{sds_ids[0]}/heartbeat", body)
    assert status == 422, doc
    assert doc["error"]["details"]["field"] == field, doc
    assert doc["error"]["message"].startswith(field), doc


def test_an_sds_reporting_no_pass_any_more_leaves_the_report() -> None:
    reports = TreeGcReports()
    reports.report(3, [{**_pass(7, "done", 1, 1, {}), "unread_slots": {}}])
    assert [t["tree_id"] for t in reports.status()] == [7]
    reports.report(3, [])
    assert reports.status() == []
    reports.report(4, [{**_pass(8, "running", 4, 1, {}), "unread_slots": {2: 1}}])
    reports.forget(4)
    assert reports.status() == []


def test_a_failed_pass_is_accepted_and_makes_its_tree_failed() -> None:
    """An SDS whose pass over a tree failed reports it ``failed`` (it tries it again
    later); the MDM takes the report, and the tree is ``failed`` while any SDS's is."""
    beat = heartbeats.decode_sds(
        {"seq": 1, "full": True, "tree_gc": [_pass(7, "failed", 10, 3, {})]}
    )
    assert beat.tree_gc is not None and beat.tree_gc[0]["state"] == "failed"
    reports = TreeGcReports()
    reports.report(3, beat.tree_gc)
    reports.report(4, [{**_pass(7, "running", 4, 1, {}), "unread_slots": {}}])
    (tree,) = reports.status()
    assert tree["state"] == "failed" and tree["chunks_left"] == 7 + 3
    assert [s["state"] for s in tree["sds"]] == ["failed", "running"]


def test_a_silent_sds_report_expires_and_its_next_heartbeat_is_asked_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SDS not heard from for STALE_S (down, cut off) leaves no ``running`` pass
    behind; once heard again, the MDM takes no delta of its report (it would leave
    gaps) but asks for its whole state, which restores it."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    reports = TreeGcReports()
    reports.heard(3)
    reports.report(3, [{**_pass(7, "running", 4, 1, {}), "unread_slots": {}}])
    reports.heard(4)
    reports.report(4, [{**_pass(7, "done", 4, 4, {}), "unread_slots": {}}])
    now[0] += snapshot_gc.STALE_S - 1
    reports.heard(4)
    assert reports.status()[0]["state"] == "running"
    now[0] += snapshot_gc.EXPIRE_EVERY_S  # looked at again no sooner
    assert [s["sds_id"] for s in reports.status()[0]["sds"]] == [4]
    reports.heard(3)
    assert reports.needs_full(3) and not reports.needs_full(4)
    reports.update(3, [{**_pass(8, "running", 4, 2, {}), "unread_slots": {}}], [])
    assert [t["tree_id"] for t in reports.status()] == [7]  # the delta is not taken
    reports.report(3, [{**_pass(7, "running", 4, 3, {}), "unread_slots": {}}])
    assert not reports.needs_full(3)
    assert reports.status()[0]["state"] == "running"


def test_heartbeats_naming_no_registered_sds_leave_nothing_in_memory(tmp_path: Path) -> None:
    """A heartbeat for an id no SDS has is refused 404 before the reports note it as
    heard: ids made up by a caller holding the cluster secret do not grow memory."""
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token", cluster_secret="cluster-secret"),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/mdm.db"),
        scrub=ScrubConfig(start_delay_s=3600.0),
    )

    async def main() -> dict[int, float]:
        app = create_app(config)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for sds_id in range(900, 950):
                resp = await client.post(
                    f"/api/v1/sds/{sds_id}/heartbeat",
                    json={"seq": 1, "full": True},
                    headers={"Authorization": "Bearer cluster-secret"},
                )
                assert resp.status == 404, await resp.text()
            return dict(app[CTX].tree_gc._heard)

    assert asyncio.run(main()) == {}
