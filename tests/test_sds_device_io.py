"""The chunk store's test-only fault hook (meshblock.sds.device_io): what a simulated
power cut loses, EIO on demand, the Linux behaviour of a failed fdatasync, and that
the hook is off (the plain os functions) unless both switches are on."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshblock.sds import device_io
from meshblock.sds.__main__ import main as sds_main

pytestmark = pytest.mark.unit

PAGE = device_io.PAGE


@pytest.fixture
def hook() -> Iterator[device_io.FaultHook]:
    h = device_io.install_fault_hook()
    yield h
    device_io.uninstall_fault_hook()


def _page(fd: int, n: int) -> bytes:
    return os.pread(fd, PAGE, n * PAGE)


def test_off_by_default_the_store_calls_the_plain_os_functions() -> None:
    assert device_io.installed_hook() is None
    assert device_io.pwrite is os.pwrite
    assert device_io.pread is os.pread
    assert device_io.preadv is os.preadv
    assert device_io.fdatasync is os.fdatasync
    assert device_io.fsync is os.fsync
    assert device_io.open_device is os.open


def test_a_power_cut_loses_exactly_the_pages_written_since_the_last_sync(
    tmp_path: Path, hook: device_io.FaultHook
) -> None:
    path = str(tmp_path / "dev")
    fd = device_io.open_device(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 * PAGE)
        device_io.pwrite(fd, b"a" * PAGE, 0)
        device_io.pwrite(fd, b"b" * (2 * PAGE), PAGE)
        device_io.fdatasync(fd)  # pages 0-2 durable
        device_io.pwrite(fd, b"c" * 100, 10)  # page 0 again
        device_io.pwrite(fd, b"d" * PAGE, 5 * PAGE)  # a new page
        assert hook.state()["unsynced_pages"] == {path: 2}
        assert hook.restore_unsynced("all") == 2
        assert _page(fd, 0) == b"a" * PAGE
        assert _page(fd, 1) == _page(fd, 2) == b"b" * PAGE
        assert _page(fd, 5) == bytes(PAGE)
    finally:
        os.close(fd)


def test_eio_on_demand_and_a_failed_fdatasync_drops_the_pages(
    tmp_path: Path, hook: device_io.FaultHook
) -> None:
    path = str(tmp_path / "dev")
    fd = device_io.open_device(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4 * PAGE)
        device_io.pwrite(fd, b"a" * PAGE, 0)
        device_io.fdatasync(fd)

        hook.fail(path, "pwrite", count=1)
        with pytest.raises(OSError) as exc:
            device_io.pwrite(fd, b"x" * PAGE, 0)
        assert exc.value.errno == errno.EIO
        assert _page(fd, 0) == b"a" * PAGE  # the failed write wrote nothing
        device_io.pwrite(fd, b"b" * PAGE, 0)  # count=1: the next one works

        hook.fail(path, "pread")
        for _ in range(2):  # no count: every call until cleared
            with pytest.raises(OSError):
                device_io.pread(fd, PAGE, 0)
            with pytest.raises(OSError):
                device_io.preadv(fd, [bytearray(PAGE)], 0)
        hook.clear()
        assert device_io.pread(fd, PAGE, 0) == b"b" * PAGE

        hook.fail(path, "fdatasync", count=1)
        with pytest.raises(OSError):
            device_io.fdatasync(fd)
        device_io.fdatasync(fd)  # succeeds, as on Linux, without saving the pages
        assert hook.state()["dropped_pages"] == {path: 1}
        assert hook.state()["injected"] == {path: {"pwrite": 1, "pread": 4, "fdatasync": 1}}
        assert _page(fd, 0) == b"b" * PAGE  # still in the page cache...
        assert hook.evict() == 1
        assert _page(fd, 0) == b"a" * PAGE  # ...but never reached the disk
    finally:
        os.close(fd)


def test_bad_fault_requests_are_refused(tmp_path: Path, hook: device_io.FaultHook) -> None:
    with pytest.raises(ValueError):
        hook.fail("/x", "fsync")
    with pytest.raises(ValueError):
        hook.fail("/x", "pwrite", count=0)
    assert hook.state()["faults"] == []


def test_the_config_key_alone_does_not_start_the_sds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "sds.toml"
    cfg.write_text(
        'name = "s"\nprotection_domain = "pd"\naddress = "127.0.0.1"\n'
        'cluster_secret = "x"\ntest_faults = true\nmdm_urls = ["http://127.0.0.1:6611"]\n'
        f'[[devices]]\npath = "{tmp_path}/d"\ncapacity = "8MiB"\npool = "p"\n'
    )
    monkeypatch.delenv(device_io.ENV_VAR, raising=False)
    assert sds_main(["--config", str(cfg), "--check-config"]) == 2
    assert "test-only" in capsys.readouterr().err
    monkeypatch.setenv(device_io.ENV_VAR, "1")
    assert sds_main(["--config", str(cfg), "--check-config"]) == 0
    assert device_io.installed_hook() is None  # checking the config installs nothing
