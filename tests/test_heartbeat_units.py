"""Heartbeats that carry what changed, in process (docs/mdm.md, "Heartbeats"): the
MDM's typed decoding (as strict as the schema that documents it), the state it keeps
per SDS (deltas applied, volumes gone, a delta onto a state it does not have), the
SDS's sender (full first, then what changed, full again when asked, the older
protocol for an older MDM), and the interval the cluster sets."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
from collections.abc import AsyncIterator
from typing import Any, cast

import jsonschema_rs
import pytest

from meshblock.config import ConfigError, load
from meshblock.mdm import heartbeats, schemas
from meshblock.mdm.config import MdmConfig
from meshblock.mdm.deletion import Purger
from meshblock.mdm.errors import Invalid
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.reconcile import Reported
from meshblock.sds.heartbeat import Heartbeats, Snapshot
from meshblock.timeouts import heartbeat_interval

pytestmark = pytest.mark.unit

FULL: dict[str, Any] = {
    "seq": 5,
    "full": True,
    "devices": [{"id": 1, "used_bytes": 10}],
    "volumes": [{"id": 1, "chunks": 3}, {"id": 2, "chunks": 4}],
    "tombstones": [{"id": 9, "chunks_left": 2, "epoch": 7}],
    "epoch": 12,
    "map_epochs": [{"pool_id": 1, "epoch": 3}],
    "probes": [{"sds_id": 2, "reachable_s": 1.5}],
    "copies": [{"pool_id": 1, "kind": "rebuild", "remaining_bytes": 0, "copied_bytes": 5}],
    "scrub": {"instance": "x", "pools": [], "findings": []},
}
DELTA: dict[str, Any] = {
    "seq": 6,
    "base": 5,
    "volumes": [{"id": 1, "chunks": 8}],
    "volumes_gone": [2],
    "tombstones_gone": [9],
}
ODD = [None, True, -1, 0, 1, 2**63, 1.5, "x", "", [], [1], {}, {"id": 1}, [{"id": 1}]]


def _mutants(doc: Any, rng: random.Random, n: int) -> list[Any]:
    """``doc`` with one value, somewhere in it, replaced by an odd one (or a key added)."""
    out = []
    for _ in range(n):
        d = copy.deepcopy(doc)
        node = d
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = rng.choice(keys)
            if isinstance(node[k], dict | list) and node[k] and rng.random() < 0.6:
                node = node[k]
                continue
            if isinstance(node, dict) and rng.random() < 0.1:
                node["unexpected"] = 1
            else:
                node[k] = rng.choice(ODD)
            break
        out.append(d)
    return out


def test_the_decoder_refuses_whatever_the_schema_refuses() -> None:
    """Every body the documented schema refuses is refused by the typed decoding too
    (it may refuse more: a delta without ``base``)."""
    validator = jsonschema_rs.validator_for(schemas.SDS_HEARTBEAT)
    rng = random.Random(16)
    refused = 0
    for doc in _mutants(FULL, rng, 1500) + _mutants(DELTA, rng, 500):
        if validator.is_valid(doc):
            continue
        refused += 1
        with pytest.raises(Invalid):
            heartbeats.decode_sds(doc)
    assert refused > 1000
    for doc in (FULL, DELTA, {}, {"epoch": 3}):
        assert validator.is_valid(doc)
        heartbeats.decode_sds(doc)


def test_the_sdc_decoder() -> None:
    assert heartbeats.decode_sdc({}) is None
    assert heartbeats.decode_sdc({"epoch": 4}) == 4
    for bad in ({"epoch": -1}, {"epoch": "4"}, {"epoch": None}, {"x": 1}, {"epoch": 2**63}):
        with pytest.raises(Invalid):
            heartbeats.decode_sdc(bad)


def test_deltas_apply_onto_the_acknowledged_state_only() -> None:
    views: dict[int, heartbeats.SdsView] = {}
    applied = heartbeats.apply(views, 3, heartbeats.decode_sds(FULL))
    assert applied is not None and applied.volumes == [(1, 3), (2, 4)]
    assert applied.tombstones == {9: heartbeats.Tombstone(2, 7)}
    applied = heartbeats.apply(views, 3, heartbeats.decode_sds(DELTA))
    assert applied is not None
    # a count moved, a volume is gone (written as 0 chunks), the tombstone is gone
    assert applied.volumes == [(1, 8), (2, 0)]
    assert applied.tombstones == {}
    assert views[3].volumes == {1: 8} and views[3].seq == 6
    # the same delta again: its base (5) is no longer the state the MDM has (6)
    assert heartbeats.apply(views, 3, heartbeats.decode_sds(DELTA)) is None
    assert views[3].volumes == {1: 8}
    # an SDS the MDM knows no state of (it restarted)
    assert heartbeats.apply(views, 4, heartbeats.decode_sds(DELTA)) is None
    # a full state after a delta: what it no longer has is gone
    full = dict(FULL, seq=7, volumes=[{"id": 5, "chunks": 1}])
    applied = heartbeats.apply(views, 3, heartbeats.decode_sds(full))
    assert applied is not None and applied.volumes == [(5, 1), (1, 0)]
    assert views[3].volumes == {5: 1}


def test_an_older_sds_is_merged_as_before() -> None:
    views: dict[int, heartbeats.SdsView] = {}
    heartbeats.apply(views, 1, heartbeats.decode_sds({"volumes": [{"id": 1, "chunks": 2}]}))
    second = heartbeats.decode_sds({"volumes": [{"id": 2, "chunks": 1}]})
    applied = heartbeats.apply(views, 1, second)
    assert applied is not None and applied.volumes == [(2, 1)]
    assert views[1].volumes == {1: 2, 2: 1}
    # and its next heartbeat, were it upgraded meanwhile, is full
    assert heartbeats.apply(views, 1, heartbeats.decode_sds(DELTA)) is None


def test_reconcile_reads_the_kept_state() -> None:
    """What a restore's reconciliation sees of an SDS is its whole state, not the
    last delta."""
    r = Reported()
    heartbeats.apply(r.views, 3, heartbeats.decode_sds(FULL))
    heartbeats.apply(r.views, 3, heartbeats.decode_sds(dict(DELTA, tombstones_gone=[])))
    volumes, tombstones = r.held_by({3})
    assert volumes == {1: {3}} and tombstones == {9: {3: 7}}


def test_the_writer_gets_only_what_changed() -> None:
    live = Liveness(10.0)
    live.beat("sds", 3, [(1, 10)], [(1, 8), (2, 0)])
    assert live._pending.volume_chunks == {(3, 1): 8, (3, 2): 0}
    assert live._pending.device_used == {(3, 1): 10}


def _snap(**volumes: int) -> Snapshot:
    return Snapshot(
        devices={1: 100},
        volumes={int(k[1:]): v for k, v in volumes.items()},
        map_epochs={1: 4},
        epoch=9,
    )


def test_the_sds_sends_its_state_then_what_changed() -> None:
    hb = Heartbeats()
    first = hb.body(_snap(v1=1, v2=2))
    assert first["full"] is True and len(first["volumes"]) == 2 and first["epoch"] == 9
    hb.answered(200, {"send_full": False})
    second = hb.body(_snap(v1=1, v2=3, v3=1))
    assert second == {
        "seq": first["seq"] + 1,
        "base": first["seq"],
        "volumes": [{"id": 2, "chunks": 3}, {"id": 3, "chunks": 1}],
    }
    # unanswered: the next one is still computed from the first's state
    hb.answered(0, None)
    third = hb.body(_snap(v2=3))
    assert third["base"] == first["seq"] and third["volumes_gone"] == [1]
    hb.answered(200, {})
    assert hb.body(_snap(v2=3)) == {"seq": third["seq"] + 1, "base": third["seq"]}
    # the MDM lost our state: everything again
    hb.answered(200, {"send_full": True})
    assert hb.body(_snap(v2=3))["full"] is True


def test_the_sds_speaks_the_older_protocol_to_an_older_mdm() -> None:
    hb = Heartbeats()
    hb.body(_snap(v1=1))
    hb.answered(422, {"error": {"message": "Additional properties are not allowed"}})
    body = hb.body(_snap(v1=1))
    assert "seq" not in body and "full" not in body and body["volumes"]
    hb.answered(200, {})
    assert hb.body(_snap(v1=1))["volumes"] == [{"id": 1, "chunks": 1}]


def test_scrub_findings_go_again_until_taken() -> None:
    hb = Heartbeats()
    snap = _snap(v1=1)
    snap.scrub = {"instance": "i", "pools": [], "findings": [{"seq": 1, "pool_id": 1}]}
    hb.body(snap)
    hb.answered(200, {})
    assert "scrub" in hb.body(snap)  # not taken yet (still in the report)
    hb.answered(200, {})
    taken = Snapshot(**{**snap.__dict__, "scrub": {"instance": "i", "pools": [], "findings": []}})
    assert "scrub" in hb.body(taken)  # changed
    hb.answered(200, {})
    assert "scrub" not in hb.body(taken)


def _cluster(tmp_path: Any, text: str) -> Any:
    path = tmp_path / "mdm.toml"
    path.write_text(f'[auth]\nadmin_token = "a"\n[cluster]\n{text}\n')
    return load(MdmConfig, path).cluster


@pytest.mark.parametrize(
    ("text", "interval", "timeout"),
    [
        ("", 2.0, 10.0),
        ("heartbeat_interval_s = 4", 4.0, 20.0),
        ("heartbeat_timeout_s = 3", 0.6, 3.0),
        ("heartbeat_timeout_s = 60", 2.0, 60.0),
        ("heartbeat_interval_s = 1\nheartbeat_timeout_s = 3", 1.0, 3.0),
    ],
)
def test_the_interval_and_the_scaled_timeout(
    tmp_path: Any, text: str, interval: float, timeout: float
) -> None:
    c = _cluster(tmp_path, text)
    assert (c.interval_s, c.timeout_s) == (interval, timeout)
    assert (c.heartbeat_interval_s, c.heartbeat_timeout_s) == (interval, timeout)


@pytest.mark.parametrize(
    "text",
    [
        "heartbeat_interval_s = 0",
        "heartbeat_interval_s = -1",
        "heartbeat_interval_s = 5\nheartbeat_timeout_s = 5",
    ],
)
def test_bad_intervals(tmp_path: Any, text: str) -> None:
    with pytest.raises(ConfigError, match="heartbeat_"):
        _cluster(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # below what the SDSs and SDCs follow: they would keep 2 s and all be down
        ("heartbeat_interval_s = 0.01", r"interval_s \(set: 0.01 s\) must be between 0.05 and 300"),
        ("heartbeat_timeout_s = 0.2", r"interval_s \(derived from heartbeat_timeout_s: 0.04 s\)"),
        ("heartbeat_interval_s = 400", r"interval_s \(set: 400 s\) must be between"),
        # one hiccup would flap the component
        (
            "heartbeat_interval_s = 2\nheartbeat_timeout_s = 2.1",
            r"timeout_s \(2.1 s\) must be at least 3",
        ),
        (
            "heartbeat_interval_s = 2\nheartbeat_timeout_s = 5.9",
            r"at least 3 heartbeat intervals \(6 s\)",
        ),
    ],
)
def test_intervals_the_components_would_not_follow(tmp_path: Any, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cluster(tmp_path, text)
    _cluster(tmp_path, "heartbeat_interval_s = 0.1\nheartbeat_timeout_s = 0.3")  # at the bounds
    _cluster(tmp_path, "heartbeat_interval_s = 300\nheartbeat_timeout_s = 900")


def test_components_take_the_interval_the_mdm_says() -> None:
    assert heartbeat_interval(0.5, 2.0) == 0.5
    for odd in (None, "1", True, 0, -1, 1e9, json.loads("NaN")):
        assert heartbeat_interval(odd, 2.0) == 2.0


class _FailingSession:
    """A session whose every statement fails, as in a database blip."""

    def __init__(self) -> None:
        self.info: dict[str, object] = {}  # no fence (a tool's session)

    def begin(self) -> _FailingSession:
        return self

    async def __aenter__(self) -> _FailingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, *args: object, **kwargs: object) -> object:
        raise OSError("connection lost")


def test_a_failed_reconcile_pass_keeps_the_reported_epochs() -> None:
    """SDSs report their map epochs only when they change: a pass that fails gives back
    what it took, and the next one still raises the pools' epochs."""
    r = Reported()
    r.sds(3, 40, [(1, 900)])
    was = r.taken()

    @contextlib.asynccontextmanager
    async def gate() -> AsyncIterator[None]:
        yield

    purger = Purger(
        cast(Any, _FailingSession),
        cast(Any, gate),
        cast(Any, None),
        cast(Any, None),
        r,
    )
    with pytest.raises(OSError):  # the purge's own transaction fails too
        asyncio.run(purger.once())
    r.sds(4, None, [(2, 5)])  # a report that came meanwhile is kept as well
    assert r.map_epochs == {1: 900, 2: 5}
    assert r.cluster_epoch == 40 and r.reporters == {3, 4}
    assert not r.restored and was.map_epochs == {1: 900}


def test_after_a_restart_a_full_heartbeat_zeroes_the_volumes_it_does_not_name(
    tmp_path: Any,
) -> None:
    """A volume an SDS dropped (a deleting volume's chunks freed, a move completed)
    while the MDM was restarting: the SDS's full heartbeat to the new MDM omits it and
    the MDM has no earlier state to name it gone, so its count stayed in volume_usage
    (the deleting volume's chunks_left, a thin volume's allocated bytes) until the SDS
    held it again. Now its full heartbeat's volumes are its whole set (review of the
    delta heartbeats, M2)."""
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from meshblock.mdm.api.volumes import volume_docs
    from meshblock.mdm.db import WriteGate, create_engine, migrate, session_factory
    from meshblock.mdm.models import (
        ProtectionDomain,
        Sds,
        StoragePool,
        Volume,
        VolumeState,
        VolumeType,
        VolumeUsage,
    )

    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
        try:
            await migrate(engine)
            sessions, gate = session_factory(engine), WriteGate()
            async with sessions() as s, s.begin():
                pd = ProtectionDomain(name="pd")
                s.add(pd)
                await s.flush()
                pool = StoragePool(
                    name="p", protection_domain_id=pd.id, allocation_granularity_bytes=1 << 20
                )
                a, b = (Sds(name=n, protection_domain_id=pd.id, address="h") for n in "ab")
                s.add_all([pool, a, b])
                await s.flush()
                v1, v2 = (
                    Volume(name=n, pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 30)
                    for n in ("v1", "v2")
                )
                s.add_all([v1, v2])
                await s.flush()
                ids = a.id, b.id, v1.id, v2.id
            sa, sb, i1, i2 = ids
            before = Liveness(10.0)  # the MDM before its restart
            before.beat("sds", sa, (), [(i1, 5), (i2, 3)], whole=True)
            before.beat("sds", sb, (), [(i2, 2)], whole=True)
            await before.flush(sessions, gate)
            async with sessions() as s, s.begin():  # v2 deleted; SDS a frees its chunks
                vol = await s.get(Volume, i2)
                assert vol is not None
                vol.state = VolumeState.DELETING
            # the restarted MDM: no views; SDS a's full heartbeat holds v1 only, then a
            # delta in the same batch
            views: dict[int, heartbeats.SdsView] = {}
            live = Liveness(10.0)
            for beat in (
                dict(seq=1, full=True, volumes=[{"id": i1, "chunks": 5}]),
                dict(seq=2, base=1, volumes=[{"id": i1, "chunks": 6}]),
            ):
                applied = heartbeats.apply(views, sa, heartbeats.decode_sds(beat))
                assert applied is not None
                live.beat("sds", sa, applied.devices, applied.volumes, whole=applied.whole)
            await live.flush(sessions, gate)
            async with sessions() as s:
                usage = {
                    (r.sds_id, r.volume_id): r.chunks
                    for r in (await s.execute(select(VolumeUsage))).scalars()
                }
                vol = await s.get(Volume, i2, options=[selectinload(Volume.mappings)])
                assert vol is not None
                (doc,) = await volume_docs(s, [vol])
            assert usage == {(sa, i1): 6, (sa, i2): 0, (sb, i2): 2}
            assert doc["chunks_left"] == 2  # SDS b's; 5 with SDS a's stale count
        finally:
            await engine.dispose()

    asyncio.run(main())
