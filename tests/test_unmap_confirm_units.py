"""The MDM's record of which mappings epoch each SDS holds (mdm/mappings.py,
Confirmations), what an unmap waits for, and meshctl's account of it
(docs/security.md, "Revoking a mapping"); the process-level test is
tests/test_unmap_confirm.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from meshblock.cli.commands import volumes
from meshblock.cli.commands.volumes import render_unmap
from meshblock.mdm import mappings
from meshblock.mdm.mappings import Confirmations, MappingDocs, revocation
from meshblock.sds import mdm_client
from meshblock.sds.resync import Resync
from meshblock.tls import TlsConfig
from test_sds_state_file import SECRET, link

pytestmark = pytest.mark.unit

SDSS = [(1, "sds1"), (2, "sds2")]


def connected(_: int) -> str:
    return "connected"


def test_an_sds_confirms_the_epoch_its_request_names() -> None:
    c = Confirmations()
    assert c.state(1, "sds1", 5)["confirmed"] is False
    assert c.state(1, "sds1", 5)["last_heard_s"] is None
    c.begin(1, "sds1", None)  # no document yet
    assert c.state(1, "sds1", 5) | {"last_heard_s": 0} == {
        "confirmed": False,
        "epoch": None,
        "last_heard_s": 0,
        "asking": True,
    }
    c.end(1, "sds1")
    c.begin(1, "sds1", 5)
    assert c.state(1, "sds1", 5)["confirmed"] is True
    assert c.state(1, "sds1", 6)["confirmed"] is False
    assert c.state(2, "sds1", 5)["confirmed"] is False  # another pool: not heard of
    # a restarted SDS with an older document: as it names it now
    c.begin(1, "sds1", 3)
    assert c.state(1, "sds1", 5)["confirmed"] is False
    assert c.state(1, "sds1", 5)["epoch"] == 3


def test_the_wait_ends_when_the_sds_asking_names_the_new_epoch() -> None:
    async def main() -> float:
        docs = MappingDocs()
        c = docs.confirmations
        c.begin(1, "sds1", 4)  # long-polls, holding 4
        c.begin(1, "sds2", 4)

        async def sds_takes_it(name: str, after: float) -> None:
            await asyncio.sleep(after)
            c.end(1, name)  # the long-poll answered with epoch 5
            c.begin(1, name, 5)  # and the next one names it

        tasks = [
            asyncio.create_task(sds_takes_it("sds1", 0.1)),
            asyncio.create_task(sds_takes_it("sds2", 0.3)),
        ]
        t0 = time.monotonic()
        report = await revocation(docs, SDSS, 1, 5, 10.0, True, connected)
        took = time.monotonic() - t0
        await asyncio.gather(*tasks)
        assert report["confirmed"] is True, report
        assert report["unconfirmed"] == []
        assert [s["epoch"] for s in report["sds"]] == [5, 5]
        return took

    took = asyncio.run(main())
    assert 0.25 < took < 2.0


def test_an_sds_not_heard_from_is_reported_without_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mappings, "HEARD_RECENTLY_S", 0.2)

    async def main() -> tuple[float, dict[str, object]]:
        docs = MappingDocs()
        c = docs.confirmations
        c.begin(1, "sds1", 5)  # has it already
        c.begin(1, "sds2", 4)  # asked, then went silent
        c.end(1, "sds2")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        report = await revocation(docs, SDSS, 1, 5, 10.0, True, connected)
        return time.monotonic() - t0, report

    took, report = asyncio.run(main())
    assert took < 1.0
    assert report["confirmed"] is False
    assert report["unconfirmed"] == ["sds2"]


def test_the_wait_is_bounded_for_an_sds_still_asking() -> None:
    async def main() -> tuple[float, dict[str, object]]:
        docs = MappingDocs()
        docs.confirmations.begin(1, "sds1", 5)
        docs.confirmations.begin(1, "sds2", 4)  # its long-poll hangs (cut off)
        t0 = time.monotonic()
        report = await revocation(docs, SDSS, 1, 5, 0.5, True, connected)
        return time.monotonic() - t0, report

    took, report = asyncio.run(main())
    assert 0.45 < took < 2.0
    assert report["unconfirmed"] == ["sds2"]


def test_an_sds_never_heard_of_is_unconfirmed_and_not_enforced_waits_for_none() -> None:
    async def main() -> tuple[dict[str, object], dict[str, object]]:
        docs = MappingDocs()
        docs.confirmations.begin(1, "sds2", 4)  # asking: would be waited for
        enforced = await revocation(docs, SDSS, 1, 5, 0.0, True, connected)
        t0 = time.monotonic()
        plain = await revocation(docs, SDSS, 1, 5, 10.0, False, connected)
        assert time.monotonic() - t0 < 0.5
        return enforced, plain

    enforced, plain = asyncio.run(main())
    assert enforced["unconfirmed"] == ["sds1", "sds2"]
    # without TLS the SDSs check nothing by the mappings: nothing to confirm
    assert plain["enforced"] is False and plain["confirmed"] is True
    assert plain["unconfirmed"] == []


def test_meshctl_names_the_sds_that_has_not_confirmed() -> None:
    doc = {
        "volume": "v1",
        "sdcs": ["host1"],
        "mappings_epoch": 7,
        "enforced": True,
        "confirmed": False,
        "unconfirmed": ["sds1"],
        "sds": [
            {"name": "sds1", "state": "connected", "confirmed": False, "epoch": 6,
             "last_heard_s": 4.5, "asking": False},
            {"name": "sds2", "state": "connected", "confirmed": True, "epoch": 7,
             "last_heard_s": 0.1, "asking": True},
        ],
    }  # fmt: skip
    text = render_unmap(doc, 5.0)
    assert "NOT confirmed within 5 s by 1 SDS(s)" in text
    assert "sds sds1 (connected): holds mappings epoch 6, last heard 4.5 s ago" in text
    assert "sds2" not in text
    confirmed = doc | {"confirmed": True, "unconfirmed": []}
    assert "every SDS of its pool confirmed" in render_unmap(confirmed, 5.0)
    assert "older release" in render_unmap(doc | {"confirmed": None}, 5.0)


@pytest.mark.parametrize(("cert", "data_tls", "follows"), [
    ("sds.crt", True, True),
    ("sds.crt", False, False),  # a certificate for the MDM, a plain-TCP data port
    ("", True, False),
])  # fmt: skip
def test_only_an_sds_that_checks_client_io_follows_the_mappings(
    tmp_path: Path, cert: str, data_tls: bool, follows: bool
) -> None:
    """An SDS whose data port has no TLS identities checks no client IO against the
    mappings: it must not follow them either, or its requests would name the epoch of
    an unmap it does not enforce, and the unmap would count it as confirmed."""
    lk = link(tmp_path)
    config = dataclasses.replace(
        lk._config,
        tls=TlsConfig(cert=cert, key=cert and "sds.key", ca=cert and "ca.crt"),
        data=dataclasses.replace(lk._config.data, tls=data_tls),
    )
    sds = lk._sds
    assert mdm_client.MdmLink(config, SECRET, sds, Resync(sds))._follows_mappings is follows


def test_unmap_all_asks_only_its_last_delete_to_wait_for_the_sdss() -> None:
    """`meshctl volume unmap --all`: the epochs of one pool only grow, so the last
    DELETE's confirmation covers the others; those ask for none (with a wait of 0 the
    MDM would report, and log, every SDS as not confirmed)."""
    sent: list[tuple[str, Any]] = []
    emitted: list[Any] = []

    class Client:
        timeout = 10.0

        def get(self, path: str, query: Any = None) -> Any:
            return {"mappings": [{"id": 1, "sdc_id": 11}, {"id": 2, "sdc_id": 12}]}

        def request(self, method: str, path: str, **kw: Any) -> Any:
            sent.append((path, kw.get("query")))
            return {"confirmed": True, "unconfirmed": []} if len(sent) == 2 else None

    names = SimpleNamespace(
        volume=lambda name: {"id": 5, "name": name}, name_of=lambda k, i: f"h{i}"
    )
    ctx = SimpleNamespace(
        client=Client(), names=names, emit=lambda doc, render: emitted.append(doc)
    )
    args = SimpleNamespace(name="v1", all=True, confirm_timeout=5.0)
    assert volumes.unmap(cast(Any, ctx), cast(Any, args)) == 0
    assert sent == [
        ("/api/v1/mappings/1", None),
        ("/api/v1/mappings/2", {"confirm_timeout": "5"}),
    ]
    assert emitted[0]["sdcs"] == ["h11", "h12"] and emitted[0]["confirmed"] is True


def test_what_the_sdss_named_is_trimmed_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The confirmations of SDSs not heard from for FORGET_S go (with a later
    request, at most every TRIM_EVERY_S), those of an SDS asking now stay; past
    MAX_HEARD the oldest idle ones go; a removed SDS's go at once."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    c = Confirmations()
    c.begin(1, "sds1", 5)
    c.end(1, "sds1")
    c.begin(2, "sds1", 7)
    c.end(2, "sds1")
    c.begin(1, "sds2", 5)  # a long-poll waiting all along
    now[0] += mappings.FORGET_S + mappings.TRIM_EVERY_S
    c.begin(1, "sds3", 5)
    c.end(1, "sds3")
    assert c.state(1, "sds1", 5)["last_heard_s"] is None  # forgotten: never heard of
    assert c.state(2, "sds1", 7)["last_heard_s"] is None
    assert c.state(1, "sds2", 5)["confirmed"] is True
    assert len(c) == 2

    monkeypatch.setattr(mappings, "MAX_HEARD", 4)
    for i in range(4, 10):
        now[0] += 1
        c.begin(1, f"sds{i}", 5)
        c.end(1, f"sds{i}")
        assert len(c) <= 4
    assert c.state(1, "sds2", 5)["confirmed"] is True  # asking: kept
    assert c.state(1, "sds9", 5)["confirmed"] is True  # the newest
    assert c.state(1, "sds3", 5)["last_heard_s"] is None  # the oldest idle: gone

    c.forget("sds9")
    assert c.state(1, "sds9", 5)["last_heard_s"] is None and len(c) == 3
