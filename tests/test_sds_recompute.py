"""A real SDS started after a crash under heavy writes (docs/sds.md, "Checksums"):
the checksums of its tens of thousands of marked slots are recomputed in the
background, after it answers, and SIGTERM during that pass stops it at once, leaving
the slots not recomputed yet marked for the next start."""

from __future__ import annotations

from pathlib import Path

import pytest

from _mdm import MdmDaemon
from _sds import SdsDaemon
from meshblock.sds.store import ChunkStore, DeviceSpec
from test_sds_checksums import crash_with_marks

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
CHUNKS = 20000  # about 0.3 ms each to recompute: seconds of background pass
CAPACITY = CHUNKS * MiB + 512 * MiB


def unverified(sds: SdsDaemon) -> int:
    return int(sds.health()["devices"][0]["checksum_unverified_slots"])


def test_sigterm_during_the_background_recompute_stops_the_sds_promptly(tmp_path: Path) -> None:
    # The SDS answers /health without its MDM: none is started.
    mdm = MdmDaemon(tmp_path / "mdm", f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
    sds = SdsDaemon(
        tmp_path / "sds", "sds1", mdm, None, capacity=CAPACITY, settings={"join_token": None}
    )
    crash_with_marks(sds.device, CAPACITY, CHUNKS, length=512)
    sds.start()
    try:
        # It answers with the pass under way (before the fix: the start recomputed
        # every slot before anything, and SIGTERM waited for it). Waits until the pass
        # has done some slots and not all: stopped before its first batch, nothing
        # would be left to tell a stop in the middle from one before the start.
        left = sds.wait(
            lambda: n if sds.reachable() and 0 < (n := unverified(sds)) < CHUNKS else None,
            30,
            "the SDS to answer with the background pass under way",
        )
        assert 0 < left < CHUNKS
        rc = sds.stop(timeout=5.0)
        assert rc == 0, sds.log_tail()
    finally:
        sds.kill()
    store = ChunkStore([DeviceSpec(str(sds.device), CAPACITY, "pool1")])
    store.open()
    try:
        # Stopped in the middle: what it had not recomputed is still marked.
        assert 0 < len(store.devices[0].unverified) < CHUNKS
    finally:
        store.close()
