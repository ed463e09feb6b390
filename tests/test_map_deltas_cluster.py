"""PG maps followed as deltas, end to end: in a real cluster (MDM, three SDSs, an SDC),
an SDS goes down and the MDM fails its PGs over (their primaries move); the two other
SDSs and the SDC take the new map as a delta from the one they had, and what they keep
is the MDM's whole document at that epoch. A caller without ``since`` (an older one)
still gets the whole document, and one whose epoch the MDM never served as well."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from _cluster import SmallCluster, small_cluster
from _wait import wait_until

pytestmark = pytest.mark.cluster

HEARTBEAT_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {
        "cluster": {
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "rebuild_delay_s": 600.0,
            "hold_down_s": 1.0,
        }
    }
    with small_cluster(tmp_path_factory.mktemp("deltas"), "dv1", "64MiB", settings) as cluster:
        yield cluster


def sds_saved_map(c: SmallCluster, i: int) -> dict[str, Any]:
    state = json.loads((c.sds[i].workdir / "state" / "state.json").read_text())
    return dict(state["maps"][str(c.pool_id)])


def sdc_saved_map(c: SmallCluster) -> dict[str, Any]:
    saved = json.loads((c.sdc.workdir / "state" / "maps.json").read_text())
    return dict(saved["maps"]["pools"][str(c.pool_id)])


def test_sdss_and_the_sdc_follow_a_failover_by_deltas(c: SmallCluster) -> None:
    before = c.pgmap()
    down = c.sds_id(c.sds[2])
    moving = [pg["pg"] for pg in before["pgs"] if pg["primary"]["sds_id"] == down]
    assert moving, "SDS 3 is the primary of no PG"
    c.sds[2].kill()

    def failed_over() -> dict[str, Any] | None:
        doc = c.pgmap()
        primaries = {pg["pg"]: pg["primary"]["sds_id"] for pg in doc["pgs"]}
        return doc if all(primaries[n] != down for n in moving) else None

    after = wait_until(failed_over, 30.0, "the MDM to fail SDS 3's PGs over")
    epoch = after["epoch"]
    assert epoch > before["epoch"]

    def followed() -> bool:
        doc = c.pgmap()  # the whole document, as an older caller asks for it
        return all(sds_saved_map(c, i) == doc for i in (0, 1)) and sdc_saved_map(c) == doc

    wait_until(followed, 30.0, "the SDSs and the SDC to keep the MDM's new map")
    for i in (0, 1):
        assert f"pool {c.pool_id}: map epoch {epoch} by a delta" in c.sds[i].log_text(), c.logs()
    by_delta = [int(n) for n in re.findall(r"\((\d+) pool map\(s\) by delta", c.sdc.log_text())]
    assert by_delta and by_delta[-1] > 0, c.logs()


def test_the_pgmap_route_answers_deltas_only_to_callers_that_ask(c: SmallCluster) -> None:
    api = c.mdm.api(c.mdm.cluster_secret)
    whole = c.pgmap()
    epoch = whole["epoch"]
    status, same = api.get(f"/api/v1/pools/{c.pool_id}/pgmap?since={epoch}")
    assert status == 200, same
    assert same["from_epoch"] == epoch and same["pgs"] == [] and same["epoch"] == epoch
    status, unknown = api.get(f"/api/v1/pools/{c.pool_id}/pgmap?since={epoch + 1000}")
    assert status == 200 and unknown == whole  # never served: the whole map
    status, bad = api.get(f"/api/v1/sdc/1/maps?map_epochs=x:{epoch}")
    assert status == 400, bad
