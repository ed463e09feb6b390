"""The privileged attach helper (meshblock.sdc.nbd_helper): what it accepts and refuses.

In-process: the helper's nbd-client runner is replaced by a recorder, sysfs and /dev
are directories under tmp_path, and the SDC's NBD socket a socket file made by mknod
(no socket is opened: tests/test_nbd_helper_socket.py has the helper on its socket)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshblock.sdc.nbd_helper import MAX_REQUEST, Helper, Refused, Request, parse_request

pytestmark = pytest.mark.unit

UID = 990  # the SDC's user in these tests


def connect(device: object = "/dev/nbd1", export: object = "vol1", **kw: object) -> bytes:
    doc: dict[str, object] = {
        "op": "connect",
        "device": device,
        "export": export,
        "read_only": False,
        "connections": 1,
    }
    doc.update(kw)
    return json.dumps(doc).encode()


def disconnect(device: str = "/dev/nbd1", export: str = "vol1") -> bytes:
    return json.dumps({"op": "disconnect", "device": device, "export": export}).encode()


def test_well_formed_requests_parse() -> None:
    assert parse_request(connect(read_only=True, connections=16)) == Request(
        "connect", "/dev/nbd1", 1, "vol1", True, 16
    )
    assert parse_request(disconnect("/dev/nbd0", "db.2_x-y")) == Request(
        "disconnect", "/dev/nbd0", 0, "db.2_x-y"
    )
    assert parse_request(connect("/dev/nbd1023", "a" * 64)).index == 1023


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "not JSON"),
        (b"connect /dev/nbd1 vol1", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"op": "rm"}', "op must be"),
        (json.dumps({"op": "connect", "device": "/dev/nbd1", "export": "v"}).encode(), "exactly"),
        (connect(nbd_socket="/tmp/evil.sock"), "exactly"),  # the socket is the helper's own
        (connect(extra_args=["-nofork"]), "exactly"),
        (disconnect()[:-1] + b', "read_only": false}', "exactly"),
        (connect("/dev/sda"), "device must be"),
        (connect("/dev/nbd1 "), "device must be"),
        (connect("/dev/nbd1\n"), "device must be"),
        (connect("/dev/nbd01"), "device must be"),
        (connect("/dev/nbd12345"), "device must be"),
        (connect("/dev/../dev/nbd1"), "device must be"),
        (connect("nbd1"), "device must be"),
        (connect(1), "device must be"),
        (connect(export="-readonly"), "volume name"),
        (connect(export="../etc"), "volume name"),
        (connect(export="a/b"), "volume name"),
        (connect(export="vol 1"), "volume name"),
        (connect(export="vol1\n"), "volume name"),
        (connect(export=""), "volume name"),
        (connect(export="a" * 65), "volume name"),
        (connect(export=["vol1"]), "volume name"),
        (connect(read_only="no"), "read_only"),
        (connect(read_only=0), "read_only"),
        (connect(connections=0), "connections"),
        (connect(connections=17), "connections"),
        (connect(connections=True), "connections"),
        (connect(connections=2.0), "connections"),
        (connect(connections="2"), "connections"),
        (b" " * (MAX_REQUEST + 1), "too long"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_requests_are_refused(line: bytes, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        parse_request(line)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd: list[str]) -> None:
        self.calls.append(cmd)
        if self.fail:
            raise Refused("nbd-client exited with 1: Error: Socket failed")


@pytest.fixture
def helper(tmp_path: Path) -> Helper:
    for n in range(3):
        (tmp_path / "sys" / "block" / f"nbd{n}").mkdir(parents=True)
    (tmp_path / "sys" / "block" / "nbd2" / "pid").write_text("123\n")  # in use
    (tmp_path / "dev").mkdir()
    # The SDC's NBD socket: a socket file of the SDC's user (this test's own uid).
    os.mknod(tmp_path / "nbd.sock", stat.S_IFSOCK | 0o600)
    return Helper(
        nbd_socket=str(tmp_path / "nbd.sock"),
        uid=os.getuid(),
        nbd_client="/usr/sbin/nbd-client",
        state_dir=tmp_path / "state",
        sys_root=tmp_path / "sys",
        dev_root=tmp_path / "dev",
        run=Recorder(),
    )


def calls(helper: Helper) -> list[list[str]]:
    assert isinstance(helper.run, Recorder)
    return helper.run.calls


def test_connect_and_disconnect_run_nbd_client_on_the_sdc_socket_only(
    helper: Helper, tmp_path: Path
) -> None:
    me = os.getuid()
    dev = tmp_path / "dev"
    assert helper.answer(me, connect(read_only=True, connections=4)) == {"ok": True}
    assert calls(helper) == [
        [
            "/usr/sbin/nbd-client", "-unix", str(tmp_path / "nbd.sock"), str(dev / "nbd1"),
            "-name", "vol1", "-block-size", "4096", "-timeout", "60", "-connections", "4",
            "-readonly",
        ]
    ]  # fmt: skip
    link = dev / "disk" / "by-meshblock" / "vol1"
    assert os.readlink(link) == str(dev / "nbd1")
    assert (tmp_path / "state" / "nbd1").read_text() == "vol1\n"
    # another volume may not disconnect it, nor a device the helper did not attach
    refused = helper.answer(me, disconnect("/dev/nbd1", "vol2"))
    assert refused["ok"] is False and "not attached to 'vol2'" in str(refused["error"])
    assert helper.answer(me, disconnect("/dev/nbd0", "vol1"))["ok"] is False
    assert len(calls(helper)) == 1 and link.is_symlink()
    assert helper.answer(me, disconnect("/dev/nbd1", "vol1")) == {"ok": True}
    assert calls(helper)[1] == ["/usr/sbin/nbd-client", "-d", str(dev / "nbd1")]
    assert not link.is_symlink() and not (tmp_path / "state" / "nbd1").exists()
    # once detached it is no longer the helper's to detach
    assert helper.answer(me, disconnect("/dev/nbd1", "vol1"))["ok"] is False


def test_other_callers_are_refused(helper: Helper) -> None:
    other = os.getuid() + 1 if os.getuid() else 12345
    reply = helper.answer(other, connect())
    assert reply == {"ok": False, "error": f"uid {other} may not use the attach helper"}
    assert calls(helper) == []
    helper.check_peer(0)  # root may (it could run nbd-client itself)
    helper.check_peer(os.getuid())


def test_devices_that_are_missing_or_busy_are_refused(helper: Helper) -> None:
    me = os.getuid()
    assert "in use" in str(helper.answer(me, connect("/dev/nbd2"))["error"])
    assert "does not exist" in str(helper.answer(me, connect("/dev/nbd7"))["error"])
    assert calls(helper) == []


def test_the_nbd_socket_must_be_the_sdc_users_socket(helper: Helper, tmp_path: Path) -> None:
    me = os.getuid()
    os.unlink(helper.nbd_socket)
    assert "No such file" in str(helper.answer(me, connect())["error"])
    Path(helper.nbd_socket).write_text("")  # a plain file is no socket
    assert "not a socket of the SDC's user" in str(helper.answer(me, connect())["error"])
    os.unlink(helper.nbd_socket)
    os.symlink(tmp_path / "elsewhere.sock", helper.nbd_socket)  # nor a link to one
    assert "not a socket" in str(helper.answer(me, connect())["error"])
    assert calls(helper) == []
    helper.uid = UID  # a socket, but of another user
    os.unlink(helper.nbd_socket)
    os.mknod(helper.nbd_socket, stat.S_IFSOCK | 0o600)
    assert "not a socket of the SDC's user" in str(helper.answer(me, connect())["error"])
    assert calls(helper) == []


def test_a_failing_nbd_client_leaves_no_record_or_link(helper: Helper, tmp_path: Path) -> None:
    helper.run = Recorder(fail=True)
    reply = helper.answer(os.getuid(), connect())
    assert reply["ok"] is False and "Socket failed" in str(reply["error"])
    assert not (tmp_path / "state" / "nbd1").exists()
    assert not (tmp_path / "dev" / "disk").exists()


def test_a_state_directory_that_cannot_be_written_is_an_error_reply(
    helper: Helper, tmp_path: Path
) -> None:
    (tmp_path / "state").write_text("")  # a file where the directory should be
    reply = helper.answer(os.getuid(), connect())
    assert reply["ok"] is False and "helper error" in str(reply["error"])
