"""The SDC's attacher and the privileged attach helper on a real unix socket.

The SDC (NbdAttacher with helper_socket) asks; the helper answers on the accepted
connection as systemd's Accept=yes instance would: Helper.serve per connection in a
thread (its nbd-client a recorder, sysfs and /dev under tmp_path), and the real
``meshblock-nbd-helper`` program with the connection as its stdin."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshblock.sdc.attach import NbdAttacher
from meshblock.sdc.nbd_helper import Helper, Refused

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> None:
        self.calls.append(cmd)
        if "vol-fails" in cmd:
            raise Refused("nbd-client exited with 1: Error: Socket failed")


def fake_host(root: Path) -> None:
    (root / "sys" / "module" / "nbd").mkdir(parents=True)
    for n in range(3):
        (root / "sys" / "block" / f"nbd{n}").mkdir(parents=True)
    (root / "dev").mkdir()
    os.mknod(root / "nbd.sock", stat.S_IFSOCK | 0o600)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Helper, str]]:
    """A helper serving one request per connection on tmp_path/helper.sock."""
    fake_host(tmp_path)
    helper = Helper(
        nbd_socket=str(tmp_path / "nbd.sock"),
        uid=os.getuid(),
        state_dir=tmp_path / "state",
        sys_root=tmp_path / "sys",
        dev_root=tmp_path / "dev",
        run=Recorder(),
    )
    path = str(tmp_path / "helper.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                helper.serve(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield helper, path
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(10)


def test_the_sdc_attaches_and_detaches_through_the_helper(
    served: tuple[Helper, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    helper, path = served
    dev = tmp_path / "dev"
    attacher = NbdAttacher(
        nbd_client="/not/run/by/the/sdc",
        unix_socket="/ignored/by/the/helper.sock",
        helper_socket=path,
        connections=2,
        sys_root=tmp_path / "sys",
        dev_root=dev,
    )
    caplog.set_level(logging.INFO)

    async def main() -> None:
        assert await attacher.attach("vol1", read_only=True) == str(dev / "nbd0")
        # the helper (root) made the link; the SDC has no /dev of the host to write
        assert os.readlink(dev / "disk" / "by-meshblock" / "vol1") == str(dev / "nbd0")
        assert await attacher.attach("vol-fails", read_only=False) is None
        await attacher.detach("vol1")
        assert not (dev / "disk" / "by-meshblock" / "vol1").is_symlink()

    asyncio.run(main())
    assert isinstance(helper.run, Recorder)
    assert helper.run.calls[0][:4] == [
        "nbd-client", "-unix", str(tmp_path / "nbd.sock"), str(dev / "nbd0"),
    ]  # fmt: skip
    assert helper.run.calls[0][-3:] == ["-connections", "2", "-readonly"]
    assert helper.run.calls[2] == ["nbd-client", "-d", str(dev / "nbd0")]
    assert "the attach helper refused: nbd-client exited with 1" in caplog.text
    assert "vol-fails" not in attacher.attached


def test_the_sdc_reports_an_unreachable_helper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_host(tmp_path)
    attacher = NbdAttacher(
        helper_socket=str(tmp_path / "absent.sock"),
        sys_root=tmp_path / "sys",
        dev_root=tmp_path / "dev",
    )
    caplog.set_level(logging.ERROR)
    assert asyncio.run(attacher.attach("vol1", read_only=False)) is None
    assert "cannot reach the attach helper" in caplog.text and not attacher.attached


def ask_program(tmp_path: Path, request: bytes) -> dict[str, object]:
    """Run meshblock-nbd-helper as systemd would, stdin the accepted connection."""
    program = Path(sys.executable).parent / "meshblock-nbd-helper"  # the venv's entry point
    args = ["--nbd-socket", str(tmp_path / "nbd.sock"), "--user", str(os.getuid())]
    args += ["--state-dir", str(tmp_path / "state")]
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        proc = subprocess.Popen(
            [str(program), *args],
            stdin=theirs.fileno(),
            stderr=subprocess.PIPE,
        )
        theirs.close()
        ours.sendall(request + b"\n")
        with ours.makefile("rb") as f:
            reply = f.readline()
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    doc = json.loads(reply)
    assert isinstance(doc, dict)
    return doc


def test_the_helper_program_answers_on_its_stdin_connection(tmp_path: Path) -> None:
    """The entry point reads the request from fd 0 and checks the peer (this test's
    uid, allowed by --user); this machine has no /sys/block/nbd5, so it refuses."""
    request = {"op": "connect", "device": "/dev/nbd5", "export": "v", "read_only": False}
    assert ask_program(tmp_path, json.dumps(request).encode()) == {
        "ok": False,
        "error": "connect takes exactly the fields connections, device, export, op, read_only",
    }
    request["connections"] = 1
    assert not Path("/sys/block/nbd5").exists()
    assert ask_program(tmp_path, json.dumps(request).encode()) == {
        "ok": False,
        "error": "/dev/nbd5 does not exist",
    }
