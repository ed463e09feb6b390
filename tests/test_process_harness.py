"""The tests' process base class (tests/_process.py) on tiny shell processes: a wait
gives up as soon as the process exits and shows its log, a process that ignores
SIGTERM is killed and fails the test, and :func:`_process.started` checks the exit
code."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from _process import ProcessError, ServerProcess, started
from _wait import WaitAborted, WaitTimeout

pytestmark = pytest.mark.cluster  # it starts processes


class Shell(ServerProcess):
    name = "the shell"
    stop_timeout = 2.0

    def __init__(self, workdir: Path, script: str) -> None:
        super().__init__(workdir)
        self.script = script

    def start(self) -> None:
        self.spawn_argv(["sh", "-c", self.script])


def test_a_wait_ends_when_the_process_exits_and_shows_its_log(tmp_path: Path) -> None:
    sh = Shell(tmp_path, "echo cannot open the device >&2; exit 3")
    sh.start()
    t0 = time.monotonic()
    with pytest.raises(WaitAborted) as info:
        sh.wait(lambda: False, 30, "the shell to serve")
    assert time.monotonic() - t0 < 20  # not the 30 s timeout
    assert "the shell exited with code 3" in str(info.value)
    assert "cannot open the device" in str(info.value)  # from shell.log


def test_a_timeout_names_the_wait_and_shows_the_log(tmp_path: Path) -> None:
    sh = Shell(tmp_path, "echo still starting; exec sleep 30")
    sh.start()
    try:
        with pytest.raises(WaitTimeout, match="waiting for the shell to serve") as info:
            sh.wait(lambda: False, 0.3, "the shell to serve")
        assert "still starting" in str(info.value)
    finally:
        sh.kill()


def test_stop_returns_the_exit_code_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    polite = Shell(tmp_path / "polite", "exec sleep 30")
    polite.start()
    assert polite.stop() == -signal.SIGTERM
    deaf = Shell(tmp_path / "deaf", "trap '' TERM; echo deaf; while :; do sleep 0.1; done")
    deaf.start()
    deaf.wait(lambda: "deaf" in deaf.log_text(), 10, "the trap to be set")
    try:
        with pytest.raises(ProcessError, match=r"did not exit within 0\.5 s of signal 15"):
            deaf.stop(timeout=0.5)
        assert not deaf.running()  # killed
    finally:
        deaf.kill()


def test_started_fails_unless_the_exit_code_is_zero(tmp_path: Path) -> None:
    with started(Shell(tmp_path / "ok", "trap 'exit 0' TERM; while :; do sleep 0.1; done")) as sh:
        sh.wait(lambda: sh.running(), 5, "the shell")
        time.sleep(0.3)  # the trap is set before the loop's first sleep
    with pytest.raises(AssertionError, match="the shell exited with code 7 on SIGTERM"):
        with started(Shell(tmp_path / "bad", "trap 'exit 7' TERM; while :; do sleep 0.1; done")):
            time.sleep(0.3)
