"""fio's nbd engine against an SDC export, run in the background, judged from its JSON.

>>> job = Fio(uri, "w1", workdir, offset=0, size="32M", rate_iops=1000).start()
>>> ...                                  # faults while it runs
>>> job.result(timeout=90).assert_clean()  # zero IO errors, zero verify errors

A job writes its region with random 4 KiB writes, each block carrying a crc32c
header (``--verify=crc32c``), then reads the whole region back and checks every block
(``--do_verify=1``, ``--verify_fatal=1``); ``verify_only=True`` runs just the check,
with the same parameters, e.g. from a fresh connection after a fault. fio's JSON
(``--output-format=json``) goes to a file; its stderr, where fio reports IO errors
(``io_u error``) and bad blocks (``verify: bad header``, ``crc32c: verify failed``),
to another. :meth:`FioResult.assert_clean` fails with both counts, fio's exit code
and what it printed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERIFY_ERROR = re.compile(r"verify|bad magic|bad header|crc32c", re.IGNORECASE)
IO_ERROR = re.compile(r"io_u error|err=\s*[1-9]|Input/output error|No space|error=", re.IGNORECASE)


def fio_binary() -> str:
    path = shutil.which("fio")
    assert path is not None, "fio is not installed (make deps)"
    return path


@dataclass
class FioResult:
    name: str
    returncode: int
    doc: dict[str, Any] | None
    stderr: str
    seconds: float

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return list(self.doc["jobs"]) if self.doc else []

    @property
    def job_errors(self) -> list[int]:
        """fio's ``error`` (errno of the first error) of each job."""
        return [int(j["error"]) for j in self.jobs]

    @property
    def io_error_lines(self) -> list[str]:
        return [
            line
            for line in self.stderr.splitlines()
            if IO_ERROR.search(line) and not VERIFY_ERROR.search(line)
        ]

    @property
    def verify_error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if VERIFY_ERROR.search(line)]

    @property
    def written(self) -> int:
        return sum(int(j["write"]["io_bytes"]) for j in self.jobs)

    @property
    def read(self) -> int:
        return sum(int(j["read"]["io_bytes"]) for j in self.jobs)

    def max_latency_s(self, op: str) -> float:
        """The longest completion latency of ``op`` (``read`` or ``write``) over every
        job, from fio's ``clat_ns`` max: the longest any one IO waited."""
        return max(
            (j[op]["clat_ns"]["max"] / 1e9 for j in self.jobs if j[op]["total_ios"]), default=0.0
        )

    def summary(self) -> str:
        return (
            f"fio {self.name}: exit {self.returncode}, job errors {self.job_errors}, "
            f"{len(self.io_error_lines)} IO error line(s), "
            f"{len(self.verify_error_lines)} verify error line(s), "
            f"{self.written} bytes written, {self.read} read, {self.seconds:.1f} s"
        )

    def assert_clean(self, context: str = "") -> None:
        """Zero IO errors and zero verify errors, exit code 0."""
        ok = (
            self.returncode == 0
            and self.doc is not None
            and self.jobs
            and all(e == 0 for e in self.job_errors)
            and not self.io_error_lines
            and not self.verify_error_lines
        )
        if not ok:
            raise AssertionError(
                f"{self.summary()}\nstderr:\n{self.stderr[-4000:]}\n{context}".rstrip()
            )


class Fio:
    """One fio process (``--ioengine=nbd``) over a region of one export."""

    def __init__(
        self,
        uri: str,
        name: str,
        workdir: Path,
        *,
        offset: int = 0,
        size: str = "32M",
        bs: str = "4k",
        iodepth: int = 8,
        rate_iops: int | None = None,
        randseed: int = 4242,
        verify_only: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        suffix = "-verify" if verify_only else ""
        self.out_path = workdir / f"fio-{name}{suffix}.json"
        self.err_path = workdir / f"fio-{name}{suffix}.stderr"
        self.args = [
            fio_binary(),
            f"--name={name}",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            f"--bs={bs}",
            f"--offset={offset}",
            f"--size={size}",
            f"--iodepth={iodepth}",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            f"--randseed={randseed}",
            "--verify_state_save=0",  # no state file in the working directory
            "--output-format=json",
            f"--output={self.out_path}",
        ]
        if rate_iops is not None:
            self.args.append(f"--rate_iops={rate_iops}")
        if verify_only:
            self.args.append("--verify_only")
        self.args += list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0

    def start(self) -> Fio:
        self.t0 = time.monotonic()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.workdir,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def result(self, timeout: float) -> FioResult:
        """Wait for fio to finish (killed, and an AssertionError, after ``timeout``)."""
        assert self.proc is not None, "not started"
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            res = self._collect(-9)
            raise AssertionError(
                f"fio {self.name} did not finish within {timeout:.0f} s (killed): "
                f"{res.summary()}\nstderr:\n{res.stderr[-3000:]}"
            ) from None
        return self._collect(rc)

    def _collect(self, rc: int) -> FioResult:
        seconds = time.monotonic() - self.t0
        stderr = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        doc: dict[str, Any] | None = None
        text = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        if "{" in text:
            try:
                doc = json.loads(text[text.index("{") :])
            except json.JSONDecodeError:
                stderr += f"\n(fio's JSON output could not be parsed: {text[:2000]!r})"
        return FioResult(self.name, rc, doc, stderr, seconds)

    def run(self, timeout: float) -> FioResult:
        return self.start().result(timeout)
