"""Who may add an SDS: join tokens, SDSs pending approval, and moves of known SDSs.

Against a real MDM on SQLite and on PostgreSQL, over its API (as the SDS daemon and
an operator call it) and through ``meshctl``: a new SDS that registers with the
cluster secret alone is held as pending (202, no id, nothing placed on it) until an
admin approves it; one with a valid join token joins and takes a use; an expired,
used-up, deleted or unknown token is refused (403, logged) and changes nothing (the
cluster epoch and the pool's map epoch stay); a known SDS moves to another address or
data port only with an admin's credential (or its own certificate:
tests/test_mdm_identity.py). docs/security.md, "Joining the cluster".
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _http import Api, Response
from _mdm import MdmDaemon
from _process import started
from _sds import SdsDaemon
from _wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def ok(resp: Any, status: int = 200) -> Any:
    code, body = resp
    assert code == status, f"expected {status}, got {code}: {body}"
    return body


def registration(name: str, data_port: int, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "protection_domain": "pd1",
        "address": "127.0.0.1",
        "data_port": data_port,
        "control_port": data_port + 1,
        "devices": [{"path": f"/srv/{name}/dev0", "capacity": "16GiB", "pool": "p1"}],
    }
    if token is not None:
        body["join_token"] = token
    return body


@pytest.fixture(scope="module")
def mdm_overrides() -> dict[str, dict[str, Any]]:
    """The SDSs these tests register never heartbeat: with the default timeout the
    failure detector would declare them down while a test compares epochs (seen in
    the parallel run on a loaded machine: 'a refused registration moved an epoch')."""
    return {"cluster": {"heartbeat_timeout_s": 600.0}}


class Cluster:
    """The MDM with pd1 and pool p1, and the calls the tests make."""

    def __init__(self, mdm: MdmDaemon, api: Api) -> None:
        self.mdm, self.api = mdm, api
        self.pool_id = 0

    def register(self, body: dict[str, Any], token: str | None = None) -> Response:
        """As an SDS daemon does: with the cluster secret (or ``token``)."""
        return self.api(
            "POST", "/api/v1/sds/register", body, token=token or self.mdm.cluster_secret
        )

    def epochs(self) -> tuple[int, int]:
        """(the cluster epoch, the pool's map epoch)."""
        health = ok(self.api("GET", "/health", token=None))
        pool = ok(self.api("GET", f"/api/v1/pools/{self.pool_id}"))
        return int(health["epoch"]), int(pool["map_epoch"])

    def names(self) -> set[str]:
        return {s["name"] for s in ok(self.api("GET", "/api/v1/sds"))["sds"]}

    def in_map(self) -> set[str]:
        """The names of the SDSs the pool's map places copies on."""
        doc = ok(self.api("GET", f"/api/v1/pools/{self.pool_id}/pgmap"))
        ids = {d["sds_id"] for d in doc["devices"]}
        by_id = {s["id"]: s["name"] for s in ok(self.api("GET", "/api/v1/sds"))["sds"]}
        return {by_id[i] for i in ids}

    def pgs_on(self, name: str, pool_id: int) -> int:
        """How many PG copies the pool's map places on SDS ``name``."""
        doc = ok(self.api("GET", f"/api/v1/pools/{pool_id}/pgmap"))
        ids = {s["id"] for s in ok(self.api("GET", "/api/v1/sds"))["sds"] if s["name"] == name}
        copies = [c for pg in doc["pgs"] for c in (pg["primary"], pg["secondary"]) if c]
        return sum(1 for c in copies if c["sds_id"] in ids)

    def token(self, **body: Any) -> dict[str, Any]:
        return dict(ok(self.api("POST", "/api/v1/sds/join-tokens", body), 201))

    def tokens(self) -> dict[str, dict[str, Any]]:
        doc = ok(self.api("GET", "/api/v1/sds/join-tokens"))
        return {t["token_id"]: t for t in doc["join_tokens"]}

    def requests(self) -> dict[str, dict[str, Any]]:
        doc = ok(self.api("GET", "/api/v1/sds/join-requests"))
        return {r["name"]: r for r in doc["join_requests"]}

    def refused(self, body: dict[str, Any], message: str, token: str | None = None) -> None:
        """The registration is a 403 saying ``message``, logged, changing nothing."""
        before, names, waiting = self.epochs(), self.names(), self.requests()
        status, doc = self.register(body, token)
        assert status == 403, doc
        assert message in doc["error"]["message"], doc
        assert self.epochs() == before, "a refused registration moved an epoch"
        assert self.names() == names and self.requests() == waiting
        assert f"refused the join of SDS {body['name']}" in self.mdm.log_text() or (
            f"refused the re-registration of SDS {body['name']}" in self.mdm.log_text()
        )

    def meshctl(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "meshblock.cli", *args],
            env=self.mdm.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == expect, f"meshctl {args}: {proc.stdout}{proc.stderr}"
        return proc


@pytest.fixture(scope="module")
def c(mdm: MdmDaemon, api: Api) -> Cluster:
    cluster = Cluster(mdm, api)
    pd = ok(api("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
    pool = {"name": "p1", "protection_domain_id": pd["id"], "pg_count": 16}
    cluster.pool_id = ok(api("POST", "/api/v1/pools", pool), 201)["id"]
    # Two SDSs joined by the admin, so that the pool has a map.
    for i in (1, 2):
        ok(cluster.register(registration(f"sds{i}", 17500 + 10 * i), mdm.admin_token), 201)
    return cluster


def test_a_token_is_shown_once_and_only_its_hash_is_kept(c: Cluster, mdm: MdmDaemon) -> None:
    made = c.token(uses=3, ttl_s=3600, description="rack 12")
    token_id, _, secret = made["token"].partition(".")
    assert token_id == made["token_id"] and len(secret) == 32 and secret.isalnum()
    assert (made["uses"], made["max_uses"], made["state"]) == (0, 3, "valid")
    listed = c.tokens()[token_id]
    assert listed["description"] == "rack 12" and "token" not in listed
    assert secret not in json.dumps(c.tokens()) and secret not in mdm.log_text()
    if mdm.db_url.startswith("sqlite"):
        db = sqlite3.connect(mdm.db_url.partition(":///")[2])
        dump = "\n".join(db.iterdump())
        db.close()
        assert token_id in dump and secret not in dump
    # Only an admin makes, lists or deletes them.
    for who in (mdm.readonly_token, mdm.cluster_secret):
        assert c.api("GET", "/api/v1/sds/join-tokens", token=who).status == 403
        assert c.api("POST", "/api/v1/sds/join-tokens", {}, token=who).status == 403
        assert c.api("DELETE", f"/api/v1/sds/join-tokens/{made['id']}", token=who).status == 403
    ok(c.api("DELETE", f"/api/v1/sds/join-tokens/{made['id']}"), 204)
    assert token_id not in c.tokens()
    c.refused(registration("sds-del", 17600, made["token"]), f"join token {token_id} is not valid")


def test_a_token_admits_as_many_sdss_as_its_uses_then_none(c: Cluster) -> None:
    made = c.token(uses=2)
    before = c.epochs()[1]
    for i, name in enumerate(("sds-u1", "sds-u2")):
        doc = ok(c.register(registration(name, 17610 + 10 * i, made["token"])), 201)
        assert doc["name"] == name and len(doc["devices"]) == 1
    assert {"sds-u1", "sds-u2"} <= c.in_map() and c.epochs()[1] > before
    listed = c.tokens()[made["token_id"]]
    assert (listed["uses"], listed["state"], listed["last_used_by"]) == (2, "used up", "sds-u2")
    c.refused(
        registration("sds-u3", 17630, made["token"]),
        f"join token {made['token_id']} is used up (2 of 2)",
    )
    # A known SDS registers again without taking a use (and with a spent token).
    ok(c.register(registration("sds-u1", 17610, made["token"])), 200)
    assert c.tokens()[made["token_id"]]["uses"] == 2


def test_an_expired_or_forged_token_is_refused(c: Cluster) -> None:
    made = c.token(uses=5, ttl_s=1)
    wait_until(
        lambda: c.tokens()[made["token_id"]]["state"] == "expired", timeout=30, what="expiry"
    )
    c.refused(
        registration("sds-exp", 17640, made["token"]), f"join token {made['token_id']} expired"
    )
    assert c.tokens()[made["token_id"]]["uses"] == 0
    valid = c.token()
    forged = valid["token_id"] + "." + "a" * 32
    c.refused(registration("sds-f", 17650, forged), f"join token {valid['token_id']} is not valid")
    c.refused(registration("sds-f", 17650, "not-a-token"), "the join token is malformed")
    assert c.tokens()[valid["token_id"]]["uses"] == 0


def test_without_a_token_an_sds_waits_pending_until_approved(c: Cluster, mdm: MdmDaemon) -> None:
    cluster_epoch, map_epoch = c.epochs()
    body = registration("sds-p", 17700)
    pending = ok(c.register(body), 202)
    assert (pending["state"], pending["caller"]) == ("pending", "cluster secret")
    assert "sds-p asks to join from 127.0.0.1:17700" in mdm.log_text()
    # Asking again is the same request; nothing is placed on it, no epoch moves.
    assert ok(c.register(body), 202)["id"] == pending["id"]
    assert "sds-p" not in c.names() and "sds-p" not in c.in_map()
    assert c.epochs() == (cluster_epoch, map_epoch)
    # Its request keeps the endpoint it was made from.
    c.refused(registration("sds-p", 17790), "asked to join from 127.0.0.1:17700")
    # Shown to operators (meshctl sds list), who approve it by name.
    listed = c.meshctl("sds", "list").stdout
    assert "waiting to join" in listed and "sds-p" in listed and "pending" in listed
    as_json = json.loads(c.meshctl("sds", "list", "--json").stdout)
    assert [r["name"] for r in as_json["join_requests"]] == ["sds-p"]
    # ...and in the components MGMT's health page lists.
    components = ok(c.api("GET", "/health/components", token=mdm.readonly_token))["components"]
    (shown,) = [x for x in components if x["name"] == "sds-p"]
    assert (shown["component_type"], shown["state"], shown["data_port"]) == (
        "sds",
        "pending",
        17700,
    )
    approve = f"/api/v1/sds/join-requests/{pending['id']}/approve"
    assert c.api("POST", approve, token=mdm.cluster_secret).status == 403
    c.meshctl("sds", "approve", "sds-p")
    assert c.requests()["sds-p"]["state"] == "approved" and "sds-p" not in c.names()
    # Approved at 127.0.0.1:17700: not from elsewhere.
    c.refused(registration("sds-p", 17791), "was approved at 127.0.0.1:17700")
    doc = ok(c.register(body), 201)
    assert doc["name"] == "sds-p" and "sds-p" in c.in_map()
    assert "sds-p" not in c.requests()
    assert "SDS sds-p registered (approved by admin token)" in mdm.log_text()


def test_a_rejected_sds_is_refused_until_its_request_is_removed(c: Cluster) -> None:
    ok(c.register(registration("evil", 17800)), 202)
    c.meshctl("sds", "reject", "evil")
    c.refused(registration("evil", 17800), "an admin rejected SDS 'evil'")
    c.meshctl("sds", "approve", "evil", expect=5)  # rejected: delete it first
    c.meshctl("sds", "remove", "evil")
    assert "evil" not in c.requests()
    assert ok(c.register(registration("evil", 17800)), 202)["state"] == "pending"
    c.meshctl("sds", "remove", "evil")
    c.meshctl("sds", "approve", "nobody", expect=4)


def test_a_known_sds_moves_only_with_an_admin_or_its_certificate(
    c: Cluster, mdm: MdmDaemon
) -> None:
    before = ok(c.api("GET", f"/api/v1/pools/{c.pool_id}/pgmap"))
    sds1 = next(s for s in ok(c.api("GET", "/api/v1/sds"))["sds"] if s["name"] == "sds1")
    moved = registration("sds1", sds1["data_port"] + 5)
    c.refused(moved, "only its own certificate (sds:sds1) or an admin may move it")
    c.refused(moved | {"address": "127.0.0.9", "data_port": sds1["data_port"]}, "may move it")
    after = ok(c.api("GET", f"/api/v1/pools/{c.pool_id}/pgmap"))
    assert after["epoch"] == before["epoch"] and after["sds"] == before["sds"]
    # The same endpoint again is fine (a restart), and an admin may move it.
    ok(c.register(registration("sds1", sds1["data_port"])), 200)
    ok(c.register(moved, mdm.admin_token), 200)
    ok(c.register(registration("sds1", sds1["data_port"]), mdm.admin_token), 200)


def test_meshctl_join_token_create_list_delete(c: Cluster) -> None:
    made = json.loads(
        c.meshctl(
            "sds", "join-token", "create", "--uses", "4", "--ttl", "2h", "--description", "cli",
            "--json",
        ).stdout
    )  # fmt: skip
    assert made["max_uses"] == 4 and made["token"].startswith(made["token_id"] + ".")
    text = c.meshctl("sds", "join-token", "create").stdout
    assert "it is not shown again" in text and text.split()[0].count(".") == 1
    listed = c.meshctl("sds", "join-token", "list").stdout
    assert made["token_id"] in listed and "0/4" in listed and "cli" in listed
    assert made["token"].partition(".")[2] not in listed
    c.meshctl("sds", "join-token", "delete", made["token_id"])
    assert made["token_id"] not in c.tokens()
    c.meshctl("sds", "join-token", "delete", made["token_id"], expect=4)
    c.meshctl("sds", "join-token", "create", "--ttl", "0", expect=2)
    c.meshctl("sds", "join-token", "create", "--uses", "0", expect=2)


def test_an_sds_daemon_without_a_token_serves_nothing_until_approved(
    c: Cluster, mdm: MdmDaemon, tmp_path: Path
) -> None:
    """The real SDS: pending, it asks again every few seconds and has no PGs; once
    approved, its next registration creates it and the map places copies on it (in a
    pool where one SDS alone could hold no PG: the second copy goes to it)."""
    pd = ok(c.api("GET", "/api/v1/protection-domains"))["protection_domains"][0]["id"]
    body = {"name": "p2", "protection_domain_id": pd, "pg_count": 8}
    pool = ok(c.api("POST", "/api/v1/pools", body), 201)["id"]
    solo = registration("solo", 17900) | {
        "devices": [{"path": "/srv/solo/dev0", "capacity": "16GiB", "pool": "p2"}]
    }
    ok(c.register(solo, mdm.admin_token), 201)
    sds = SdsDaemon(tmp_path, "sds-real", mdm, None, pool="p2", settings={"join_token": None})
    with started(sds):
        wait_until(
            lambda: c.requests().get("sds-real", {}).get("state") == "pending",
            timeout=60,
            what="the SDS to ask to join",
        )
        assert "sds-real" not in c.names()
        wait_until(
            lambda: "as pending until an admin approves" in sds.log_text(),
            timeout=30,
            what="its warning",
        )
        assert sds.health()["state"] == "starting"
        epoch = ok(c.api("GET", f"/api/v1/pools/{pool}/pgmap"))["epoch"]
        assert c.pgs_on("solo", pool) == 0, "one SDS holds no PG of two copies"
        c.meshctl("sds", "approve", "sds-real")
        wait_until(
            lambda: c.pgs_on("sds-real", pool) == 8, timeout=60, what="PGs on the approved SDS"
        )
        assert ok(c.api("GET", f"/api/v1/pools/{pool}/pgmap"))["epoch"] > epoch
        sds.wait_serving()
        assert "sds-real" not in c.requests()
