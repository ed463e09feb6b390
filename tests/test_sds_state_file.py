"""The SDS's state.json (meshblock.sds.mdm_client): saved in a thread, never on the
event loop (two fsyncs per new map), and the newest state wins whatever order the
writer threads run in."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from meshblock import files
from meshblock.sds import mdm_client
from meshblock.sds.config import DeviceConfig, SdsConfig
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache
from meshblock.sds.metrics import SdsStats
from meshblock.sds.replication import Peers
from meshblock.sds.store import ChunkStore

pytestmark = pytest.mark.unit

SECRET = "s" * 32


def link(state_dir: Path) -> mdm_client.MdmLink:
    device = DeviceConfig(str(state_dir / "dev0.img"), "64MiB", "p1")
    config = SdsConfig(
        name="s1",
        protection_domain="pd1",
        address="127.0.0.1",
        state_dir=str(state_dir),
        devices=(device,),
        cluster_secret=SECRET,
    )
    service = DataService(ChunkStore([]), MapCache(), Peers(SECRET, 1.0), SdsStats())
    return mdm_client.MdmLink(config, SECRET, service)


def test_saved_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writers: list[threading.Thread] = []
    real = files.write_atomic

    def spy(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
        writers.append(threading.current_thread())
        real(path, data, mode=mode)

    monkeypatch.setattr(mdm_client, "write_atomic", spy)

    async def save() -> None:
        lk = link(tmp_path)
        lk._svc.set_identity(7, {})
        await lk._save_state()

    asyncio.run(save())
    assert writers and all(t is not threading.main_thread() for t in writers), writers
    assert json.loads((tmp_path / mdm_client.STATE_FILE).read_text())["sds_id"] == 7


def test_an_older_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    lk = link(tmp_path)
    lk._write_state(2, '{"sds_id": 2}')
    lk._write_state(1, '{"sds_id": 1}')  # its thread ran late
    assert json.loads((tmp_path / mdm_client.STATE_FILE).read_text())["sds_id"] == 2
    lk._write_state(3, '{"sds_id": 3}')
    assert json.loads((tmp_path / mdm_client.STATE_FILE).read_text())["sds_id"] == 3
