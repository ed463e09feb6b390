"""Which devices an SDS reports unclean at start (meshblock.sds.app.needs_full_copy;
docs/sds.md, "Power cuts"): a restart of the machine (a new or unreadable boot id)
after an unclean stop, and the fact kept in state_dir across any number of restarts,
killed or clean, until the MDM accepted a registration carrying it."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshblock.sds import device_io
from meshblock.sds.app import BOOT_FILE, needs_full_copy
from meshblock.sds.mdm_client import UNCLEAN_FILE, pending_unclean, record_pending_unclean
from meshblock.sds.store import StoreError

pytestmark = pytest.mark.unit

D, E = "/dev/d", "/dev/e"


def registered(state: Path) -> None:
    """What the MDM link does once the MDM accepted the unclean devices."""
    record_pending_unclean(state, [])


def test_the_boot_id_is_read_or_none(tmp_path: Path) -> None:
    assert device_io.boot_id(str(tmp_path / "missing")) is None
    (tmp_path / "empty").write_text("\n")
    assert device_io.boot_id(str(tmp_path / "empty")) is None
    real = device_io.boot_id()
    assert real, "this machine's boot id is readable"


def test_an_unreadable_boot_id_counts_as_a_restart_every_time(tmp_path: Path) -> None:
    # a readable boot id: the same boot twice is a process crash only
    assert needs_full_copy(tmp_path / "a", [D], [D], "b1") == [D]
    registered(tmp_path / "a")
    assert needs_full_copy(tmp_path / "a", [D], [D], "b1") == []
    # unreadable: it may have been a power cut each time
    assert needs_full_copy(tmp_path / "u", [D], [D], None) == [D]
    registered(tmp_path / "u")
    assert needs_full_copy(tmp_path / "u", [D], [D], None) == [D]
    assert not (tmp_path / "u" / BOOT_FILE).exists()


def test_the_fact_survives_restarts_until_registered(tmp_path: Path) -> None:
    (tmp_path / BOOT_FILE).write_text("b1")
    assert needs_full_copy(tmp_path, [D], [D, E], "b2") == [D]  # power cut of b1
    assert pending_unclean(tmp_path) == [D]
    assert (tmp_path / BOOT_FILE).read_text() == "b2"
    assert needs_full_copy(tmp_path, [D], [D, E], "b2") == [D]  # killed, same boot
    assert needs_full_copy(tmp_path, [], [D, E], "b2") == [D]  # stopped cleanly: CLEAN
    registered(tmp_path)
    assert not (tmp_path / UNCLEAN_FILE).exists()
    assert needs_full_copy(tmp_path, [], [D, E], "b2") == []
    assert needs_full_copy(tmp_path, [E], [D, E], "b3") == [E]  # the next power cut


def test_a_device_no_longer_configured_is_dropped(tmp_path: Path) -> None:
    record_pending_unclean(tmp_path, [D, E])
    assert needs_full_copy(tmp_path, [], [E], "b1") == [E]
    assert pending_unclean(tmp_path) == [E]


def test_an_unreadable_record_means_every_device(tmp_path: Path) -> None:
    (tmp_path / UNCLEAN_FILE).write_text("{not json")
    assert needs_full_copy(tmp_path, [], [D, E], "b1") == [D, E]
    assert pending_unclean(tmp_path) == [D, E]


def test_a_record_that_cannot_be_written_refuses_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the state directory should be")
    with pytest.raises(StoreError, match="need a full copy"):
        needs_full_copy(state, [D], [D], "b1")
