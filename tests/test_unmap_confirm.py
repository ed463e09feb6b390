"""An unmap says which SDSs have not taken it (issue 13; docs/security.md, "Revoking a
mapping").

An SDS checks an SDC's client IO against the mappings document it holds, which its
long-poll keeps current while it reaches the MDM. One cut off from the MDM serves the
SDC by its old document until it reaches the MDM again. So ``meshctl volume unmap``
(``DELETE /api/v1/mappings/{id}?confirm_timeout=S``) waits for every SDS of the
volume's pool to name the new mappings epoch in its requests, and names those that do
not, with exit code 9.

The cluster's ``sds1`` reaches the MDM through a TCP relay the test can cut (its data
port stays open to the SDC): cut, the unmap names it (and it does still serve the
SDC, as the report warns); reconnected, it refuses the SDC. Its own
``meshblock_sds_mappings_unconfirmed_seconds`` says so too, while cut.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _cluster import SmallCluster, small_cluster
from _mdm import MdmDaemon
from _sds import PG_COUNT, SdsDaemon
from _wait import wait_until
from meshblock.chunks import ChunkRef, pg_of
from meshblock.wire.client import RequestError, WireClient
from meshblock.wire.protocol import PeerRole, Status
from test_data_path_attacks import sdc_identity, stolen

pytestmark = pytest.mark.cluster

CUT = "sds1"  # the SDS behind the relay


class Relay:
    """Forwards TCP connections from a loopback port to ``target``; :meth:`cut` closes
    every connection and closes the new ones at once until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._is_cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if self._is_cut.is_set():
                down.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._open |= {down, up}
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            except OSError:
                pass
            s.close()
            with self._lock:
                self._open.discard(s)

    def cut(self) -> None:
        self._is_cut.set()
        with self._lock:
            socks = list(self._open)
        self._drop(*socks)

    def restore(self) -> None:
        self._is_cut.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()


@dataclass
class Cut:
    c: SmallCluster
    relay: Relay


@pytest.fixture(scope="module")
def cc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cut]:
    root = tmp_path_factory.mktemp("unmap-confirm")
    relays: list[Relay] = []

    def make_sds(workdir: Path, name: str, mdm: MdmDaemon, fault_set: str | None) -> SdsDaemon:
        if name != CUT:
            return SdsDaemon(workdir, name, mdm, fault_set)
        relay = Relay(("127.0.0.1", mdm.port))
        relays.append(relay)
        url = f"https://127.0.0.1:{relay.port}"
        return SdsDaemon(workdir, name, mdm, fault_set, settings={"mdm_urls": [url]})

    # the cut SDS is not declared down while the test runs
    settings = {"cluster": {"heartbeat_timeout_s": 60.0}}
    try:
        with small_cluster(root, "first", "64MiB", settings, make_sds=make_sds) as c:
            yield Cut(c, relays[0])
    finally:
        for r in relays:
            r.close()


def mapped_volume(c: SmallCluster, name: str) -> tuple[int, int]:
    """A new volume of the pool mapped to the SDC: (volume id, mapping id)."""
    api = c.mdm.api()
    status, vol = api.post(
        "/api/v1/volumes", {"name": name, "pool_id": c.pool_id, "size": "64MiB", "type": "thin"}
    )
    assert status == 201, vol
    sdc_id = c.sdc.health()["sdc_id"]
    status, m = api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})
    assert status == 201, m
    return int(vol["id"]), int(m["id"])


def chunk_on(c: SmallCluster, d: SdsDaemon, vol: int) -> ChunkRef:
    """A chunk of ``vol`` whose PG's primary is ``d``."""
    doc = c.pgmap()
    me = c.sds_id(d)
    for chunk in range(64):
        pg = pg_of(vol, chunk, PG_COUNT)
        if doc["pgs"][pg]["primary"]["sds_id"] == me:
            return ChunkRef(c.pool_id, pg, doc["epoch"], vol, chunk)
    raise AssertionError(f"no chunk of volume {vol} has {d.name} as its primary")


def write_as_sdc(c: SmallCluster, d: SdsDaemon, ref: ChunkRef) -> Status:
    """A WRITE to ``ref`` on ``d`` as the SDC: OK, or the status it was refused with."""

    async def main() -> Status:
        async with await WireClient.connect(
            "127.0.0.1",
            d.data_port,
            c.mdm.cluster_secret,
            PeerRole.CLIENT,
            tls=stolen(sdc_identity(c)),
        ) as cl:
            try:
                await cl.write(ref, 0, b"\x5a" * 4096)
            except RequestError as exc:
                return Status(exc.status)
        return Status.OK

    return asyncio.run(main())


def meshctl(mdm: MdmDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshblock.cli", *args],
        env=mdm.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sdss(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["sds"]}


def test_unmap_with_every_sds_reachable_is_confirmed_by_all(cc: Cut) -> None:
    c = cc.c
    vol, mapping = mapped_volume(c, "reachable")
    status, doc = c.mdm.api().delete(f"/api/v1/mappings/{mapping}?confirm_timeout=10")
    assert status == 200, doc
    assert doc["enforced"] is True
    assert doc["confirmed"] is True, doc
    assert doc["unconfirmed"] == []
    assert doc["volume_id"] == vol and doc["mapping_id"] == mapping
    assert set(sdss(doc)) == {"sds1", "sds2", "sds3"}
    for s in doc["sds"]:
        assert s["confirmed"] and s["epoch"] >= doc["mappings_epoch"], s
        assert s["state"] == "connected"
    # without confirm_timeout, as before: 204 and nothing waited for
    _, other = mapped_volume(c, "reachable2")
    status, _ = c.mdm.api().delete(f"/api/v1/mappings/{other}")
    assert status == 204


def test_unmap_names_the_sds_cut_off_from_the_mdm_which_refuses_once_back(cc: Cut) -> None:
    """And a change to read-only, the same way."""
    c, relay = cc.c, cc.relay
    (cut,) = [d for d in c.sds if d.name == CUT]
    vol, _ = mapped_volume(c, "revoked")
    ref = chunk_on(c, cut, vol)
    assert write_as_sdc(c, cut, ref) == Status.OK
    ro_vol, _ = mapped_volume(c, "made-read-only")
    ro_ref = chunk_on(c, cut, ro_vol)
    assert write_as_sdc(c, cut, ro_ref) == Status.OK
    sdc_id = str(c.sdc.health()["sdc_id"])

    relay.cut()
    try:
        proc = meshctl(
            c.mdm, "volume", "set-access", "made-read-only", "--sdc", sdc_id, "--read-only",
            "--json", "--confirm-timeout", "8",
        )  # fmt: skip
        assert proc.returncode == 9, proc.stdout + proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["access_mode"] == "read_only"
        assert doc["revocation"]["unconfirmed"] == [CUT]
        proc = meshctl(
            c.mdm, "volume", "unmap", "revoked", "--sdc", sdc_id, "--json", "--confirm-timeout", "8"
        )
        assert proc.returncode == 9, proc.stdout + proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["volume"] == "revoked"
        assert doc["confirmed"] is False
        assert doc["unconfirmed"] == [CUT]
        rows = sdss(doc)
        assert not rows[CUT]["confirmed"]
        assert rows[CUT]["epoch"] is not None and rows[CUT]["epoch"] < doc["mappings_epoch"]
        assert rows["sds2"]["confirmed"] and rows["sds3"]["confirmed"]
        # and the MDM logged it
        assert any(
            "not confirmed within" in line and f"sds:{CUT}" in line
            for line in c.mdm.log_text().splitlines()
        )
        # what the report warns of: cut off, it still serves the SDC by its old mappings
        assert write_as_sdc(c, cut, ref) == Status.OK
        assert write_as_sdc(c, cut, ro_ref) == Status.OK
    finally:
        relay.restore()

    wait_until(
        lambda: write_as_sdc(c, cut, ref) == Status.NOT_PERMITTED,
        15.0,
        f"{CUT} refusing the unmapped SDC once it reaches the MDM",
    )
    assert "is not mapped to it" in cut.log_text()
    assert write_as_sdc(c, cut, ro_ref) == Status.NOT_PERMITTED
    assert f"volume {ro_vol} is mapped to it read-only" in cut.log_text()


def test_unmap_text_names_the_sds_that_has_not_confirmed(cc: Cut) -> None:
    c, relay = cc.c, cc.relay
    mapped_volume(c, "revoked-text")
    sdc_id = str(c.sdc.health()["sdc_id"])
    relay.cut()
    try:
        proc = meshctl(
            c.mdm, "volume", "unmap", "revoked-text", "--sdc", sdc_id, "--confirm-timeout", "3"
        )
    finally:
        relay.restore()
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert "NOT confirmed" in proc.stdout
    assert f"sds {CUT} (" in proc.stdout
    assert "sds sds2" not in proc.stdout


def mappings_metrics(d: SdsDaemon, pool_id: int) -> tuple[float | None, float | None]:
    """``d``'s (mappings epoch, seconds unconfirmed) of the pool, from its /metrics."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(d.metrics()):
        for sample in family.samples:
            if sample.labels == {"pool_id": str(pool_id)}:
                values[sample.name] = sample.value
    return (
        values.get("meshblock_sds_mappings_epoch"),
        values.get("meshblock_sds_mappings_unconfirmed_seconds"),
    )


def test_an_sds_cut_off_from_the_mdm_says_its_mappings_are_unconfirmed(cc: Cut) -> None:
    """The SDS's side of the report: its gauge grows while it cannot reach the MDM and
    drops at the MDM's first answer once it can; the other SDSs' stay within the
    long-poll's timeout (``map_poll_timeout_s``, 5 s in these tests)."""
    c, relay = cc.c, cc.relay
    (cut,) = [d for d in c.sds if d.name == CUT]
    bound = 10.0  # above the long-poll's timeout: no answer for two of them
    for d in c.sds:
        epoch, age = mappings_metrics(d, c.pool_id)
        assert epoch is not None and age is not None and age < bound, (d.name, epoch, age)

    relay.cut()
    try:
        wait_until(
            lambda: (mappings_metrics(cut, c.pool_id)[1] or 0.0) > bound,
            30.0,
            f"{CUT}'s mappings unconfirmed for over {bound:g} s",
        )
        for d in c.sds:
            if d is not cut:
                _, age = mappings_metrics(d, c.pool_id)
                assert age is not None and age < bound, (d.name, age)
        epoch, age = mappings_metrics(cut, c.pool_id)
        assert epoch is not None and age is not None and age > bound
    finally:
        relay.restore()

    wait_until(
        lambda: (mappings_metrics(cut, c.pool_id)[1] or bound) < 3.0,
        20.0,
        f"{CUT}'s mappings confirmed again once it reaches the MDM",
    )
