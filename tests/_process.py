"""The one base class for the processes that tests start (the meshblock daemons,
Prometheus, Alertmanager).

:class:`ServerProcess` is a subprocess in a working directory with its output
appended to ``<log_name>.log`` there. It is started (:meth:`ServerProcess.spawn_argv`,
:meth:`ServerProcess.spawn_module` for ``python -m meshblock.X --config FILE``),
waited for (:meth:`ServerProcess.wait`: :func:`_wait.wait_until` that gives up at
once when the process exits and puts the log's tail into the failure;
:meth:`ServerProcess.wait_http` for a URL answering 200), and stopped politely
(:meth:`ServerProcess.stop`: a signal, then the exit code; killed, and a failure with
the log, when it does not exit in time) or killed (:meth:`ServerProcess.kill`).
Failures are :class:`ProcessError` (an ``AssertionError``) or the wait's own
:class:`_wait.WaitTimeout` / :class:`_wait.WaitAborted`, each with the log's tail.

:class:`DaemonProcess` is a meshblock daemon (``python -m MODULE --config NAME.toml``)
whose ``settings`` (``{"table": {"key": value}}``) are written as TOML by
:meth:`DaemonProcess.write_config`; :meth:`DaemonProcess.start` waits for
``url + ready_path`` to answer 200. :func:`started` runs one for a fixture: it fails
unless the daemon exits with code 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import _http
from _ports import free_port
from _wait import WaitAborted, WaitTimeout, wait_until

T = TypeVar("T")
D = TypeVar("D", bound="ServerProcess")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 6000


class ProcessError(AssertionError):
    """A process did not start or stop as expected (the message has its log)."""


class NotReady(Exception):
    """An HTTP probe got an answer, but not 200 (counts as "not yet" in a wait)."""


class ServerProcess:
    """A subprocess with its output in a log file, started and stopped politely.

    ``name`` names the process in messages; the log file is ``<log_name>.log`` in
    ``workdir`` (``log_name`` defaults to ``name``). ``stop_timeout`` is how long
    :meth:`stop` waits after the signal by default.
    """

    name = "server"
    stop_timeout = STOP_TIMEOUT_S

    def __init__(self, workdir: Path, *, log_name: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{log_name or self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- the log ----------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return f"--- {self.log_path} ---\n{self.log_text()[-chars:]}"

    def fail(self, what: str) -> ProcessError:
        return ProcessError(f"{what}\n{self.log_tail()}")

    # -- starting ---------------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn_argv(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (stdin closed, stdout and stderr appended to the log)."""
        assert not self.running(), f"{self.name} is already running"
        with open(self.log_path, "ab") as log:  # the child has its own descriptor
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir if cwd is None else cwd,
                env=env,
            )
        return self.proc

    def spawn_module(
        self, module: str, config: Path, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``[PREFIX...] python -W error -m MODULE --config CONFIG``, unbuffered."""
        argv = [*(prefix or []), sys.executable, "-W", "error", "-m", module]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return self.spawn_argv([*argv, "--config", str(config)], env=env)

    # -- waiting ----------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise :class:`WaitAborted` (with the log) if the process is not running."""
        if self.proc is None:
            raise WaitAborted(f"{self.name} was not started\n{self.log_tail()}")
        rc = self.proc.poll()
        if rc is not None:
            raise WaitAborted(f"{self.name} exited with code {rc}\n{self.log_tail()}")

    def wait(
        self, predicate: Callable[[], T | None], timeout: float, what: str, **options: Any
    ) -> T:
        """:func:`_wait.wait_until` (``options``: ``interval``, ``detail``) that gives up
        as soon as the process exits; ``detail`` is the log's tail unless given."""

        def alive_and(check: Callable[[], T | None] = predicate) -> T | None:
            self.check_alive()
            return check()

        options.setdefault("detail", self.log_tail)
        return wait_until(alive_and, timeout, what, **options)

    def wait_http(self, url: str, timeout: float = START_TIMEOUT_S) -> None:
        """Until ``GET url`` answers 200; killed, and a failure, if it does not in time."""
        try:
            self.wait(lambda: http_ok(url), timeout, f"{self.name} to answer GET {url}")
        except WaitTimeout:
            self.kill()
            raise

    # -- stopping ---------------------------------------------------------------------

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        assert self.proc is not None, f"{self.name} was not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"{self.name} did not exit within {timeout:g} s") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig`` (if it runs), wait for the exit and return its code; a process
        that does not exit in time is killed and fails the test with its log."""
        if self.proc is None:
            return 0
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(
                f"{self.name} did not exit within {timeout:g} s of signal {sig}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _close_log(self) -> None:
        """Nothing to do: the log is closed on this side as soon as the child has it
        (kept for subclasses written against the older helpers)."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200; :class:`NotReady` for another status (and
    ``OSError`` when nothing answers), so that a wait names what it last saw."""
    status = _http.request("GET", url, timeout=timeout).status
    if status != 200:
        raise NotReady(f"GET {url}: status {status}")
    return True


@contextmanager
def started(daemon: D, *, check_exit: bool = True) -> Iterator[D]:
    """Start ``daemon`` and yield it; on the way out SIGTERM it (killed if it hangs)
    and, with ``check_exit``, fail unless it exited with code 0."""
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            rc = daemon.stop()
        finally:
            daemon.kill()
        if check_exit:
            assert rc == 0, f"{daemon.name} exited with code {rc} on SIGTERM\n{daemon.log_tail()}"


# -- the meshblock daemons -------------------------------------------------------------


class DaemonProcess(ServerProcess):
    """``python -m MODULE --config <log_name>.toml`` in ``workdir``.

    ``settings`` is the config as ``{"table": {"key": value}}``, written by
    :meth:`write_config`; :meth:`start` spawns the daemon and, when ``ready_path`` is
    set, waits until ``GET url + ready_path`` answers 200.
    """

    module = ""
    ready_path: str | None = None

    def __init__(self, workdir: Path, *, log_name: str) -> None:
        super().__init__(workdir, log_name=log_name)
        self.config_path = workdir / f"{log_name}.toml"
        self.settings: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        raise NotImplementedError

    def configure(
        self, settings: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]] | None
    ) -> None:
        """``settings`` with ``overrides`` merged in, written to the config file."""
        self.settings = settings
        merge(self.settings, overrides or {})
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(dump_toml(self.settings))

    def exec_prefix(self) -> list[str]:
        """What runs the daemon's command (e.g. ``ip netns exec NAME``); none here."""
        return []

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        return self.spawn_module(self.module, self.config_path, self.exec_prefix())

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Spawn; with ``ready_path``, wait up to ``timeout`` for it to answer 200."""
        self.spawn()
        if self.ready_path is not None:
            self.wait_http(self.url + self.ready_path, timeout)


class HttpDaemon(DaemonProcess):
    """A daemon with a database and an HTTP API on a free loopback port (MDM, MGMT).

    Its config is :meth:`initial_settings` with ``overrides`` merged in; the log and
    config are ``mdm.log`` and ``mdm.toml`` for ``module = "meshblock.mdm"``.
    """

    def __init__(
        self, workdir: Path, db_url: str, overrides: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__(workdir, log_name=self.module.rsplit(".", 1)[-1])
        self.db_url = db_url
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.configure(self.initial_settings(), overrides)

    def initial_settings(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# -- TOML for the daemons' config files --------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML text for ``{"table": {"key": value}}`` (one level of tables)."""
    out: list[str] = []
    for table, keys in tables.items():
        out.append(f"[{table}]")
        out += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> None:
    for table, keys in extra.items():
        base.setdefault(table, {}).update(keys)
