"""meshblock.files.write_atomic: a state file is old or new after a crash, never torn,
and every daemon's state file goes through it."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

import meshblock
from meshblock.files import write_atomic

pytestmark = pytest.mark.unit

PACKAGE = Path(meshblock.__file__).parent
# Renames that are not of a state file written whole:
NOT_STATE_FILES = {
    Path("sdc/attach.py"),  # the SDC's /dev/meshblock/<volume> links: gone at a reboot
    Path("mdm/backup.py"),  # restore moves database files, fsynced there (by copy)
}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_write_atomic_syncs_file_then_renames_then_syncs_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", _fd_path(fd)))
        real_fsync(fd)

    def replace(src: str, dst: str | Path) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(target, '{"new": 1}')
    monkeypatch.undo()

    assert target.read_text() == '{"new": 1}'
    assert len(events) == 3, events
    (kind0, synced0), (kind1, renamed), (kind2, synced2) = events
    assert kind0 == "fsync" and Path(synced0).parent == tmp_path
    assert Path(synced0).name.endswith(".tmp"), "the new bytes are synced before the rename"
    assert (kind1, renamed) == ("replace", str(target))
    assert (kind2, synced2) == ("fsync", str(tmp_path)), "the rename itself is made durable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "maps.json"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    monkeypatch.undo()

    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.json"], "no temp file left"


def test_write_atomic_creates_the_file_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "guid"
    write_atomic(target, "abc\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, "def\n", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == "def\n"


def test_no_daemon_replaces_a_file_by_hand() -> None:
    """Every rename-over of a state file in the package goes through write_atomic:
    a hand-written temp-and-rename elsewhere would miss one of the fsyncs."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"replace", "rename"}
                and node.args  # datetime.replace(tzinfo=...) takes keywords only
                and not any(isinstance(a, ast.Constant) for a in node.args)  # str.replace
            ):
                where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                if path.relative_to(PACKAGE) not in NOT_STATE_FILES:
                    offenders.append(where)
    assert offenders == [], "use meshblock.files.write_atomic instead: " + ", ".join(offenders)
