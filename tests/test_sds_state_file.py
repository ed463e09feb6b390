"""The SDS's state.json (meshblock.sds.mdm_client): saved in a thread, never on the
event loop (two fsyncs per new map), and the newest state wins whatever order the
writer threads run in; a failed device is saved at once, on the event loop, or the
SDS stops (docs/sds.md, "Device errors")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meshblock import files
from meshblock.sds import mdm_client
from meshblock.sds.config import DeviceConfig, SdsConfig
from meshblock.sds.maps import MapCache
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec

pytestmark = pytest.mark.unit

SECRET = "s" * 32


def link(state_dir: Path, store: ChunkStore | None = None) -> mdm_client.MdmLink:
    device = DeviceConfig(str(state_dir / "dev0.img"), "64MiB", "p1")
    config = SdsConfig(
        name="s1",
        protection_domain="pd1",
        address="127.0.0.1",
        state_dir=str(state_dir),
        devices=(device,),
        cluster_secret=SECRET,
    )
    sds = SdsState(store or ChunkStore([]), MapCache(), Peers(SECRET, 1.0), SdsStats())
    return mdm_client.MdmLink(config, SECRET, sds, Resync(sds))


def test_saved_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writers: list[threading.Thread] = []
    real = files.write_atomic

    def spy(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
        writers.append(threading.current_thread())
        real(path, data, mode=mode)

    monkeypatch.setattr(mdm_client, "write_atomic", spy)

    async def save() -> None:
        lk = link(tmp_path)
        lk._sds.set_identity(7, {})
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


def test_a_failed_device_is_saved_before_the_error_is_answered(tmp_path: Path) -> None:
    """The failure is in state.json when ``ChunkStore.fail`` returns (the request that
    hit the error is answered after it), and a save in a thread taken before it,
    finishing later, does not bring back a state without it."""
    store = ChunkStore([DeviceSpec(str(tmp_path / "dev0.img"), 64 << 20, "p1")])
    store.open()
    (dev,) = store.devices
    path = tmp_path / mdm_client.STATE_FILE

    async def run() -> None:
        lk = link(tmp_path, store)
        lk._sds.set_identity(7, {})
        older = asyncio.create_task(lk._save_state())  # taken now, runs later
        await asyncio.sleep(0)
        store.fail(dev, "fdatasync: Input/output error")
        saved = json.loads(path.read_text())  # no await in between
        assert dev.path in saved["failed_devices"], saved
        await older
        assert dev.path in json.loads(path.read_text())["failed_devices"]

    try:
        asyncio.run(run())
    finally:
        store.close()


def test_an_sds_that_cannot_save_a_failed_device_stops(tmp_path: Path) -> None:
    """state.json cannot be replaced (a directory in its place): the process ends at
    once with exit code 4 and says why, instead of serving on."""
    script = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_sds_state_file import link
from meshblock.sds.store import ChunkStore, DeviceSpec
tmp = Path({str(tmp_path)!r})
store = ChunkStore([DeviceSpec(str(tmp / "dev0.img"), 64 << 20, "p1")])
store.open()
(tmp / "state.json").mkdir()
async def run():
    lk = link(tmp, store)
    store.fail(store.devices[0], "pwrite: Input/output error")
    print("still serving")
asyncio.run(run())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == mdm_client.EXIT_FAILURE_NOT_SAVED == 4, proc
    assert "still serving" not in proc.stdout, proc
    assert "cannot be saved" in proc.stderr and "dev0.img" in proc.stderr, proc.stderr
