"""An SDS daemon with the store's test-only fault hook enabled (see
``meshblock.sds.device_io`` and ``docs/sds.md``), driven over its control port.

>>> with small_cluster(root, "vol1", "64MiB", settings, make_sds=make_faulty({"sds1"})) as c:
...     c.sds[0].fail_io("fdatasync", count=1)   # the next fdatasync of its device: EIO
...     c.sds[0].power_cut()                     # loses its unsynced pages, dies (SIGKILL)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import _http
from _cluster import MakeSds
from _mdm import MdmDaemon
from _process import START_TIMEOUT_S
from _sds import SdsDaemon
from meshblock.sds.device_io import ENV_VAR


class FaultySds(SdsDaemon):
    """:class:`SdsDaemon` with ``test_faults = true`` and ``MESHBLOCK_SDS_TEST_FAULTS=1``."""

    def __init__(self, workdir: Path, name: str, mdm: MdmDaemon, fault_set: str | None) -> None:
        super().__init__(workdir, name, mdm, fault_set, settings={"test_faults": True})

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        before = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = "1"  # the child's environment only (copied at spawn)
        try:
            super().start(timeout)
        finally:
            if before is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = before

    def faults(self, **command: Any) -> dict[str, Any]:
        """POST ``command`` to ``/test/faults``; the hook's state afterwards."""
        r = _http.request("POST", self.control_url + "/test/faults", command, timeout=10)
        assert r.status == 200, r.body
        return dict(r.body)

    def fault_state(self) -> dict[str, Any]:
        r = _http.request("GET", self.control_url + "/test/faults", timeout=10)
        assert r.status == 200, r.body
        return dict(r.body)

    def fail_io(self, op: str, count: int | None = None, device: str | None = None) -> None:
        """The next ``count`` (None: every) ``op`` calls on ``device`` (default: its
        one device) fail with EIO."""
        self.faults(action="fail", op=op, count=count, device=device or str(self.device))

    def power_cut(self, lose: str = "all", seed: int = 0) -> None:
        """Lose every page written since its last sync (``random``: a random half) and
        die at once; returns once the process is gone."""
        try:
            _http.request(
                "POST",
                self.control_url + "/test/faults",
                {"action": "power_cut", "lose": lose, "seed": seed},
                timeout=10,
            )
        except OSError:
            pass  # it died before answering: expected
        assert self.proc is not None
        rc = self.proc.wait(30)
        assert rc == -signal.SIGKILL, f"{self.name} exited {rc} on a power cut:\n{self.log_text()}"


def make_faulty(names: set[str]) -> MakeSds:
    """A ``make_sds`` for :func:`_cluster.small_cluster`: these SDSs get the hook."""

    def build(workdir: Path, name: str, mdm: MdmDaemon, fault_set: str | None) -> SdsDaemon:
        cls = FaultySds if name in names else SdsDaemon
        return cls(workdir, name, mdm, fault_set)

    return build
