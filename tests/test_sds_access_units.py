"""The SDS's check of client IO against the mappings (meshblock.sds.access): what a
document allows, and the fetch once more before a refusal, shared and started only
after the IO arrived."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.registry import CollectorRegistry

from meshblock import files
from meshblock.sds import access as access_module
from meshblock.sds import mdm_client
from meshblock.sds.access import REFRESH_ANY_EVERY_S, MappingsError, SdcAccess
from meshblock.sds.metrics import SdsCollector
from meshblock.sds.resync import Resync
from meshblock.sds.store import ChunkStore, DeviceSpec
from test_sds_state_file import link

pytestmark = pytest.mark.unit

GUID = "0f0e0d0c-0000-4000-8000-000000000001"


def doc(epoch: int, *volumes: tuple[int, bool], pool: int = 1) -> dict[str, Any]:
    return {
        "pool_id": pool,
        "epoch": epoch,
        "volumes": [{"id": v, "sdcs": [{"guid": GUID, "read_only": ro}]} for v, ro in volumes],
    }


def test_a_document_allows_only_its_mappings_and_reads_on_read_only_ones() -> None:
    a = SdcAccess()
    assert a.update(doc(3, (7, False), (8, True)))
    assert a.refusal(1, 7, GUID, write=True) is None
    assert a.refusal(1, 8, GUID, write=False) is None
    assert a.refusal(1, 8, GUID, write=True) == "volume 8 is mapped to it read-only"
    assert "not mapped to it" in str(a.refusal(1, 9, GUID, write=False))  # no such volume
    assert a.refusal(1, 7, "another-guid", write=False) is not None
    assert a.refusal(2, 7, GUID, write=False) is not None  # the volume is of pool 1
    # an older document is not taken; a newer one unmaps
    assert not a.update(doc(2))
    assert a.update(doc(4, (8, True)))
    assert a.refusal(1, 7, GUID, write=False) is not None
    assert a.docs() == {"1": doc(4, (8, True))}
    with pytest.raises(MappingsError):
        a.update({"pool_id": 1, "epoch": 5, "volumes": [{"id": 7}]})


def test_a_refused_io_waits_for_a_fetch_that_started_after_it_shared_by_all() -> None:
    """A mapping made after the SDS's document: the fetch that the IO starts sees it.
    IOs arriving together share one fetch; one arriving while an older fetch runs waits
    for that one and then for a fetch of its own."""
    a = SdcAccess()
    a.update(doc(1))
    served: list[int] = []  # the epoch of each document the MDM gave
    release = asyncio.Event()

    async def fetch(pool: int) -> dict[str, Any] | None:
        await release.wait()
        served.append(len(served) + 2)
        return doc(served[-1], (7, False))

    a.fetcher = fetch

    async def main() -> None:
        since = time.monotonic()
        waiting = [asyncio.create_task(a.refreshed(1, since)) for _ in range(5)]
        await asyncio.sleep(0.01)
        later = asyncio.create_task(a.refreshed(1, time.monotonic() + 0.001))
        await asyncio.sleep(0.01)
        assert served == [] and a.refreshes == 1
        release.set()
        await asyncio.gather(*waiting)
        assert a.refusal(1, 7, GUID, write=True) is None
        await later
        assert a.refreshes == 2  # the later IO did not take the older fetch's answer
        assert served == [2, 3] and a.epoch(1) == 3

    asyncio.run(main())


def test_a_failed_fetch_leaves_the_io_refused() -> None:
    a = SdcAccess()

    async def fetch(pool: int) -> dict[str, Any] | None:
        raise OSError("the MDM is away")

    a.fetcher = fetch

    async def main() -> None:
        await a.refreshed(1, time.monotonic())

    asyncio.run(main())
    assert a.refreshes == 1 and a.refusal(1, 7, GUID, write=False) is not None


def test_an_io_waits_for_the_end_of_the_fetch_it_relies_on() -> None:
    """Two IOs that arrived during a fetch started before them: on its end the first
    woken starts a newer fetch; the second waits for that one's end too, instead of
    taking its start for the end (it returned with the older document: refused)."""
    a = SdcAccess()
    a.update(doc(1))
    answers: list[asyncio.Event] = []

    async def fetch(pool: int) -> dict[str, Any] | None:
        answers.append(asyncio.Event())
        n = len(answers)
        await answers[-1].wait()
        return doc(n + 1, *([(7, False)] if n > 1 else []))  # mapped during the first

    a.fetcher = fetch

    async def main() -> None:
        first = asyncio.create_task(a.refreshed(1, time.monotonic()))
        await asyncio.sleep(0.01)
        since = time.monotonic()
        ios = [asyncio.create_task(a.refreshed(1, since)) for _ in range(2)]
        await asyncio.sleep(0.3)  # longer than REFRESH_EVERY_S: the next starts at once
        answers[0].set()
        await first
        await asyncio.sleep(0.05)
        assert len(answers) == 2
        assert not any(t.done() for t in ios), "an IO returned before its fetch ended"
        answers[1].set()
        await asyncio.gather(*ios)
        assert a.refusal(1, 7, GUID, write=True) is None

    asyncio.run(main())


def test_fetches_of_different_pools_are_spaced_too() -> None:
    """The fetches that refused IOs start are spaced across the SDS's pools, not only
    per pool: ten pools cost the MDM at most one request per REFRESH_ANY_EVERY_S."""
    a = SdcAccess()
    starts: list[float] = []

    async def fetch(pool: int) -> dict[str, Any] | None:
        starts.append(time.monotonic())
        return doc(1, pool=pool)

    a.fetcher = fetch

    async def main() -> None:
        since = time.monotonic()
        await asyncio.gather(*(a.refreshed(p, since) for p in range(1, 11)))

    asyncio.run(main())
    assert len(starts) == 10
    # Over the span, not gap by gap: a start is taken when the fetch's task first runs,
    # which on a loaded machine may be a few ms after the budget started it (a late
    # task shortens the gap after it by as much as it lengthens the one before).
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert starts[-1] - starts[0] >= 9 * REFRESH_ANY_EVERY_S * 0.9, gaps


def test_the_mdm_link_asks_for_changes_since_the_epoch_it_has(tmp_path: Path) -> None:
    """A refresh after a refused IO, and the long-poll, name the mappings epoch the SDS
    has (``since=``): the MDM answers "unchanged" in a few bytes instead of the whole
    document, which keeps the document held (before: every refresh and every
    long-poll timeout downloaded the whole document, up to ~870 KB)."""
    lk = link(tmp_path)
    access = lk._sds.access
    paths: list[str] = []
    polled = asyncio.Event()

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        paths.append(path)
        if len(paths) == 1:
            return 200, doc(3, (7, False))
        if "since=3" in path:
            if "wait_epoch" in path and len(paths) > 3:
                polled.set()
                await asyncio.Event().wait()  # the next long-poll: cancelled
            return 200, {"pool_id": 1, "epoch": 3, "unchanged": True}
        return 200, doc(3, (7, False))

    lk._call = call  # type: ignore[method-assign]

    async def main() -> None:
        await access.refreshed(1, time.monotonic())  # no document yet: the whole one
        assert access.epoch(1) == 3
        await access.refreshed(1, time.monotonic())  # since=3: unchanged, kept
        follower = asyncio.create_task(lk._follow_mappings(1))
        await asyncio.wait_for(polled.wait(), 10)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    asyncio.run(main())
    assert paths[:2] == ["/api/v1/pools/1/mappings", "/api/v1/pools/1/mappings?since=3"]
    assert all("since=3" in p and "wait_epoch=3" in p for p in paths[2:]), paths
    assert access.epoch(1) == 3 and access.refusal(1, 7, GUID, write=True) is None


def test_an_sds_without_a_certificate_does_not_follow_the_mappings(tmp_path: Path) -> None:
    """Without a certificate the SDS's data port has no identities to check IO by, and
    the MDM refuses the mappings to the cluster secret: no mappings long-poll is started
    (it would be refused 403 and retried forever); the PG maps are followed as ever."""
    store = ChunkStore([DeviceSpec(str(tmp_path / "dev0.img"), 64 << 20, "p1")])
    store.open()
    lk = link(tmp_path, store)
    lk._sds.set_identity(7, {store.devices[0].path: (3, 1)})
    started: list[str] = []

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        started.append(path.split("?")[0])
        await asyncio.Event().wait()

    lk._call = call  # type: ignore[method-assign]

    async def main() -> None:
        lk._follow_pools()
        await asyncio.sleep(0.05)
        await lk.stop()

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert started == ["/api/v1/pools/1/pgmap"]
    assert not lk._sds.access.followed  # nor exports them (meshblock.sds.metrics)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic clock of meshblock.sds.access, set by the test."""
    now = [100.0]
    monkeypatch.setattr(access_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_the_document_held_is_unconfirmed_since_the_mdm_last_said_it_is_current(
    clock: list[float],
) -> None:
    """What ``meshblock_sds_mappings_unconfirmed_seconds`` says: from the first document
    taken (a restarted SDS's from its state file: from the start) until an answer of
    the MDM at the epoch held; an answer at another epoch, or a newer document taken
    by a fetch, does not reset it. No document, no value."""
    a = SdcAccess()
    assert a.unconfirmed() == {}
    a.update(doc(3, (7, False)))
    clock[0] += 30
    assert a.unconfirmed() == {1: (3, 30.0)}
    a.confirm(1, 2)  # the MDM's answer is not of the document held
    a.confirm(2, 3)  # a pool without a document
    assert a.unconfirmed() == {1: (3, 30.0)}
    a.confirm(1, 3)
    clock[0] += 5
    assert a.unconfirmed() == {1: (3, 5.0)}
    a.update(doc(4))
    clock[0] += 5
    assert a.unconfirmed() == {1: (4, 10.0)}
    a.confirm(1, 4)
    assert a.unconfirmed() == {1: (4, 0.0)}


def test_each_answer_of_the_long_poll_confirms_the_document_held(
    tmp_path: Path, clock: list[float]
) -> None:
    """The MDM's answers: the first document, "unchanged" at the long-poll's timeout,
    the same document again, each confirm it; a document older than the one held (an
    MDM restored from an older backup) does not."""
    lk = link(tmp_path)
    access = lk._sds.access
    answers: list[Any] = [
        doc(3, (7, False)),
        {"pool_id": 1, "epoch": 3, "unchanged": True},
        doc(3, (7, False)),
        doc(2),
    ]
    seen: list[dict[int, tuple[int, float]]] = []  # at each request after the first
    done = asyncio.Event()

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        if access.epoch(1) >= 0:
            seen.append(access.unconfirmed())
        if len(seen) == len(answers):
            done.set()
            await asyncio.Event().wait()  # the next long-poll: cancelled
        clock[0] += 30  # each answer comes 30 s after the one before
        return 200, answers[len(seen)]

    lk._call = call  # type: ignore[method-assign]

    async def main() -> None:
        follower = asyncio.create_task(lk._follow_mappings(1))
        await asyncio.wait_for(done.wait(), 10)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    asyncio.run(main())
    assert seen == [{1: (3, 0.0)}, {1: (3, 0.0)}, {1: (3, 0.0)}, {1: (3, 30.0)}]


def test_the_mappings_metrics_only_of_the_pools_the_sds_follows(
    tmp_path: Path, clock: list[float]
) -> None:
    """Per pool with a document, its epoch and the seconds unconfirmed; nothing from an
    SDS that does not follow the mappings (no identities on its data port), even with
    documents in its state file from before, nor of a pool it does not follow (a
    device left it) or has no document of yet."""
    lk = link(tmp_path)
    sds = lk._sds
    registry = CollectorRegistry()
    registry.register(SdsCollector(sds, Resync(sds)))
    sds.access.update(doc(5, (7, False)))
    sds.access.update(doc(2, pool=3))
    sds.access.update(doc(9, pool=4))
    clock[0] += 42.5
    sds.access.confirm(3, 2)
    clock[0] += 1

    def value(name: str, pool_id: str) -> float | None:
        return registry.get_sample_value(name, {"pool_id": pool_id})

    assert not sds.access.followed
    for pool_id in ("1", "3", "4"):
        assert value("meshblock_sds_mappings_epoch", pool_id) is None
        assert value("meshblock_sds_mappings_unconfirmed_seconds", pool_id) is None
    sds.access.followed |= {1, 2, 3}
    assert value("meshblock_sds_mappings_epoch", "1") == 5
    assert value("meshblock_sds_mappings_unconfirmed_seconds", "1") == 43.5
    assert value("meshblock_sds_mappings_epoch", "3") == 2
    assert value("meshblock_sds_mappings_unconfirmed_seconds", "3") == 1.0
    for pool_id in ("2", "4"):  # no document of pool 2; pool 4 not followed
        assert value("meshblock_sds_mappings_epoch", pool_id) is None
        assert value("meshblock_sds_mappings_unconfirmed_seconds", pool_id) is None


def test_a_mappings_epoch_is_named_to_the_mdm_only_once_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MDM counts the epoch an SDS's request names as taken (an unmap waits for
    it): after a document whose save to the state file failed, the next request does
    not name its epoch; the SDS saves again first, and names it once that worked (an
    SDS restarted from the older file would serve by the older document)."""
    lk = link(tmp_path)
    events: list[str] = []
    real = files.write_atomic

    def write(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
        if not any(e.startswith("save") for e in events):
            events.append("save failed")
            raise OSError(28, "No space left on device")
        real(path, data, mode=mode)
        events.append("saved")

    monkeypatch.setattr(mdm_client, "write_atomic", write)
    polled = asyncio.Event()

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        events.append(path.split("?")[-1] if "?" in path else "whole")
        if events[-1] == "whole":
            return 200, doc(5, (7, False))
        polled.set()
        await asyncio.Event().wait()  # the next long-poll: cancelled
        raise AssertionError("not reached")

    lk._call = call  # type: ignore[method-assign]

    async def main() -> None:
        follower = asyncio.create_task(lk._follow_mappings(1))
        await asyncio.wait_for(polled.wait(), 10)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    asyncio.run(main())
    assert events[:3] == ["whole", "save failed", "saved"], events
    assert "since=5" in events[3], events
    assert lk._sds.access.epoch(1) == 5


def test_a_refreshed_document_whose_save_failed_is_saved_by_the_next_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh before a refusal (``_fetch_mappings``) takes a newer document, and
    its save fails (or REFRESH_TIMEOUT_S cancels it): the document is held, not
    saved, and its epoch not named. The next refresh gets the same document again,
    not newer; it still saves what was taken, so the SDS goes on to name the epoch."""
    lk = link(tmp_path)
    saves: list[str] = []
    real = files.write_atomic

    def write(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
        if not saves:
            saves.append("failed")
            raise OSError(28, "No space left on device")
        real(path, data, mode=mode)
        saves.append("saved")

    monkeypatch.setattr(mdm_client, "write_atomic", write)
    asked: list[str] = []

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        asked.append(path.split("?")[-1] if "?" in path else "whole")
        return 200, doc(5, (7, False))

    lk._call = call  # type: ignore[method-assign]

    async def main() -> None:
        assert (await lk._fetch_mappings(1)) is not None  # taken, its save failed
        assert lk._sds.access.epoch(1) == 5 and lk._named_epoch(1) == -1
        await lk._fetch_mappings(1)
        assert lk._named_epoch(1) == 5, saves
        await lk._fetch_mappings(1)

    asyncio.run(main())
    assert saves == ["failed", "saved"]
    assert asked[-1] == "since=5", asked
