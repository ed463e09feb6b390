"""The MDM keeps each pool's scrub schedule in its database (docs/mdm.md, "Scrub";
the ``scrub_state`` table): a restarted MDM resumes the pass it was in, paused or
running, with its start time, instead of starting every pool's period over. The
real MDM on SQLite and on PostgreSQL; no SDS (the pass cannot complete)."""

from __future__ import annotations

from typing import Any

import pytest

from _mdm import MdmDaemon

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mdm_overrides() -> dict[str, dict[str, Any]]:
    return {"scrub": {"start_delay_s": 3600.0, "period_s": 86400.0}}


def scrub(mdm: MdmDaemon, pool_id: int, action: str = "") -> dict[str, Any]:
    api = mdm.api()
    path = f"/api/v1/pools/{pool_id}/scrub" + (f"/{action}" if action else "")
    status, doc = api.post(path, {}) if action else api.get(path)
    assert status == 200, doc
    return dict(doc)


def test_a_restarted_mdm_resumes_each_pools_scrub(mdm: MdmDaemon) -> None:
    running = mdm.create_pool("pd-scrub-a", "scrub-running", 4)["id"]
    paused = mdm.create_pool("pd-scrub-b", "scrub-paused", 4)["id"]
    idle = mdm.create_pool("pd-scrub-c", "scrub-idle", 4)["id"]
    first = scrub(mdm, running, "start")
    assert (first["state"], first["pass"]) == ("running", 1), first
    scrub(mdm, paused, "start")
    scrub(mdm, paused, "start")  # running already: the same pass
    was_paused = scrub(mdm, paused, "pause")
    assert (was_paused["state"], was_paused["pass"]) == ("paused", 1), was_paused
    due = scrub(mdm, idle)["next_pass_at"]
    assert due is not None

    mdm.restart()

    again = scrub(mdm, running)
    assert (again["state"], again["pass"]) == ("running", 1), again
    assert again["pass_started_at"] == pytest.approx(first["pass_started_at"], abs=0.01)
    still = scrub(mdm, paused)
    assert (still["state"], still["pass"]) == ("paused", 1), still
    resumed = scrub(mdm, paused, "start")  # the paused pass goes on: not a new one
    assert (resumed["state"], resumed["pass"]) == ("running", 1), resumed
    # an idle pool's next pass stays when it was due (not the new start's delay)
    assert scrub(mdm, idle)["next_pass_at"] == pytest.approx(due, abs=0.01)
