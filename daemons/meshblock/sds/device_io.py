"""The chunk store's device IO calls, and a fault hook that only tests enable.

:mod:`meshblock.sds.store` opens, reads, writes, punches and syncs its devices only
through the names of this module. In production they *are* the plain functions
(``pwrite is os.pwrite``): nothing is wrapped, nothing costs.

:func:`install_fault_hook` rebinds them to the wrappers of a :class:`FaultHook`. The
SDS installs it only when its config says ``test_faults = true`` **and** its
environment has ``MESHBLOCK_SDS_TEST_FAULTS=1`` (the daemon refuses to start with the
key alone; no unit file or role sets the variable), and then serves
``/test/faults`` on its control port (:mod:`meshblock.sds.app`, ``docs/sds.md``).
The hook can:

- **cut the power** (:meth:`FaultHook.power_cut`): every 4 KiB page written (or
  punched) since its device's last completed sync gets back the contents it had at
  that sync (all of them, or a random half), then the process kills itself with
  SIGKILL. What a power cut can lose, and nothing else: a page written before an
  fdatasync that *completed* is kept. The next start sees a new :func:`boot_id`, as
  after a real power cut.
- **fail calls with EIO** (:meth:`FaultHook.fail`): the next ``count`` (or every)
  ``pwrite`` / ``pread`` / ``fdatasync`` on a chosen device. An injected fdatasync
  failure does what Linux does: the pages it should have written are marked clean
  without reaching the disk, so a later sync succeeds and does not save them; they
  are lost at a power cut, or at once with :meth:`FaultHook.evict` (the kernel
  dropping them from its cache).

:func:`pwrite_durable` is a write that is on the disk when it returns (``RWF_DSYNC``:
the range written is flushed, not the file's other dirty pages): the store's
write-intent marks. The hook treats its pages as synced.

The durable contents of a page are read from the file just before the first write
to it after a sync: the hook must be installed before the store opens its devices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

log = logging.getLogger(__name__)

#: The environment variable that, with ``test_faults = true``, enables the hook.
ENV_VAR: Final = "MESHBLOCK_SDS_TEST_FAULTS"
PAGE: Final = 4096
OPS: Final = ("pwrite", "pread", "fdatasync")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _pwrite_durable(fd: int, data: bytes | memoryview, offset: int) -> int:
    """``pwrite`` that returns once the bytes are on stable storage: ``RWF_DSYNC``
    flushes the range written (and the device's cache), not the file's other dirty
    pages. pwrite + fdatasync where the kernel does not know the flag."""
    try:
        return os.pwritev(fd, [data], offset, os.RWF_DSYNC)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    n = os.pwrite(fd, data, offset)
    os.fdatasync(fd)
    return n


# The store's IO calls. Rebound only by install_fault_hook / uninstall_fault_hook.
open_device: Callable[..., int] = os.open
pwrite: Callable[[int, bytes | memoryview, int], int] = os.pwrite
#: A write that is durable when it returns (:func:`_pwrite_durable`).
pwrite_durable: Callable[[int, bytes | memoryview, int], int] = _pwrite_durable
pread: Callable[[int, int, int], bytes] = os.pread
preadv: Callable[[int, Sequence[bytearray | memoryview], int], int] = os.preadv
fdatasync: Callable[[int], None] = os.fdatasync
fsync: Callable[[int], None] = os.fsync
#: ``fallocate(2)``: returns 0, or -1 with the error in ``ctypes.get_errno()``.
fallocate: Callable[[int, int, int, int], int] = _fallocate

_hook: FaultHook | None = None
_BOOT_ID: Final = "/proc/sys/kernel/random/boot_id"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR) == "1"


def boot_id(source: str = _BOOT_ID) -> str | None:
    """The kernel's boot id: it changes when the machine restarts (and with it the page
    cache is gone); with the fault hook, each simulated power cut changes it too.
    None when it cannot be read (callers must take that as a restart)."""
    try:
        with open(source) as f:
            real: str | None = f.read().strip() or None
    except OSError:
        real = None
    return real if _hook is None or real is None else _hook.boot_id(real)


def install_fault_hook(cuts_file: str | None = None) -> FaultHook:
    """Route the store's IO through a new :class:`FaultHook` (tests only).
    ``cuts_file`` counts the simulated power cuts across restarts (:func:`boot_id`)."""
    global _hook, open_device, pwrite, pwrite_durable, pread, preadv, fdatasync, fsync, fallocate
    hook = FaultHook(cuts_file)
    _hook = hook
    open_device, pwrite, pread, preadv = hook.open, hook.pwrite, hook.pread, hook.preadv
    pwrite_durable = hook.pwrite_durable
    fdatasync, fsync, fallocate = hook.fdatasync, hook.fsync, hook.fallocate
    log.warning("TEST FAULT HOOK INSTALLED: device IO can be failed and power-cut on demand")
    return hook


def uninstall_fault_hook() -> None:
    """Bind the plain functions again (for in-process tests)."""
    global _hook, open_device, pwrite, pwrite_durable, pread, preadv, fdatasync, fsync, fallocate
    _hook = None
    open_device, pwrite, pread, preadv = os.open, os.pwrite, os.pread, os.preadv
    pwrite_durable = _pwrite_durable
    fdatasync, fsync, fallocate = os.fdatasync, os.fsync, _fallocate


def installed_hook() -> FaultHook | None:
    return _hook


Pages = dict[int, bytes | None]  # page number -> durable contents (None: zeroes)


@dataclass
class _File:
    path: str
    unsynced: Pages = field(default_factory=dict)
    # Syncs in progress: (sequence number, the pages they make durable).
    syncing: list[tuple[int, Pages]] = field(default_factory=list)
    # Pages an injected fdatasync failure marked clean without writing them.
    dropped: Pages = field(default_factory=dict)

    def durable(self) -> Pages:
        """Every page not known durable, with its durable contents (oldest record)."""
        out = dict(self.unsynced)
        for _, pages in reversed(self.syncing):
            out.update(pages)
        out.update(self.dropped)
        return out


class FaultHook:
    """Power cuts and EIO on demand for the store's devices (see the module doc)."""

    def __init__(self, cuts_file: str | None = None) -> None:
        self._cuts_file = cuts_file
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}
        self._faults: dict[tuple[str, str], int] = {}  # (path, op) -> calls left (-1: all)
        self._seq = 0
        self.injected: dict[str, dict[str, int]] = {}  # path -> op -> EIOs raised
        self._flips = 0  # write payloads still to damage
        self.flipped = 0  # write payloads damaged

    def flip_payloads(self, count: int = 1) -> None:
        """Flip one byte of each of the next ``count`` write payloads the SDS receives
        (:meth:`corrupt_payload`, called by the IO path before it checks them)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._flips = count
        log.warning("test fault: the next %d write payload(s) get a byte flipped", count)

    def corrupt_payload(self, payload: memoryview) -> None:
        """Flip the first byte of ``payload`` (in the receive buffer) if armed."""
        with self._lock:
            if not self._flips:
                return
            self._flips -= 1
            self.flipped += 1
        payload[0] ^= 0xFF
        log.warning("test fault: a byte of a received write payload flipped")

    # -- control ----------------------------------------------------------------------

    def fail(self, path: str, op: str, count: int | None = None) -> None:
        """Fail the next ``count`` calls of ``op`` on device ``path`` (None: every one,
        until :meth:`clear`) with EIO."""
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults[(path, op)] = -1 if count is None else count
        log.warning("test fault: %s on %s fails with EIO (%s)", op, path, count or "always")

    def clear(self) -> None:
        """Stop failing calls (pages already dropped stay dropped)."""
        with self._lock:
            self._faults.clear()
            self._flips = 0

    def state(self) -> dict[str, object]:
        with self._lock:
            return {
                "unsynced_pages": {f.path: len(f.durable()) for f in self._files.values()},
                "dropped_pages": {f.path: len(f.dropped) for f in self._files.values()},
                "faults": [
                    {"device": p, "op": op, "count": None if n < 0 else n}
                    for (p, op), n in sorted(self._faults.items())
                ],
                "injected": {p: dict(ops) for p, ops in self.injected.items()},
                "payload_flips": {"armed": self._flips, "flipped": self.flipped},
            }

    def restore_unsynced(self, lose: Literal["all", "random"] = "all", seed: int = 0) -> int:
        """Give every page written since its device's last sync back its durable
        contents (``random``: each page with probability 1/2); return how many pages.
        The lock stays held: no IO of this process reaches the devices any more."""
        self._lock.acquire()
        rng = random.Random(seed)
        lost = 0
        for fd, f in self._files.items():
            for page, old in sorted(f.durable().items()):
                if lose == "random" and rng.random() < 0.5:
                    continue
                _restore(fd, page, old)
                lost += 1
        return lost

    def _cuts(self) -> int:
        try:
            with open(self._cuts_file or "") as f:
                return int(f.read() or 0)
        except (OSError, ValueError):
            return 0

    def boot_id(self, real: str) -> str:
        """``real``, marked with the number of simulated power cuts: a power cut is a
        new boot for whoever compares boot ids."""
        n = self._cuts()
        return f"{real}+{n}" if n else real

    def power_cut(self, lose: Literal["all", "random"] = "all", seed: int = 0) -> None:
        """Lose the unsynced pages and die at once (SIGKILL, no cleanup)."""
        if self._cuts_file is not None:
            fd = os.open(self._cuts_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, str(self._cuts() + 1).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        lost = self.restore_unsynced(lose, seed)
        log.warning("test fault: power cut, %d unsynced page(s) lost", lost)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def evict(self) -> int:
        """Drop the pages an injected fdatasync failure marked clean: they read as the
        disk holds them (as when the kernel evicts them). Returns how many."""
        with self._lock:
            n = 0
            for fd, f in self._files.items():
                for page, old in f.dropped.items():
                    _restore(fd, page, old)
                    n += 1
                f.dropped.clear()
            return n

    # -- the wrappers -----------------------------------------------------------------

    def _check(self, fd: int, op: str) -> None:
        """Raise EIO when a fault is armed for ``op`` on ``fd``'s device (lock held)."""
        f = self._files.get(fd)
        if f is None:
            return
        left = self._faults.get((f.path, op))
        if left is None:
            return
        if left > 0:
            if left == 1:
                del self._faults[(f.path, op)]
            else:
                self._faults[(f.path, op)] = left - 1
        counts = self.injected.setdefault(f.path, {})
        counts[op] = counts.get(op, 0) + 1
        if op == "fdatasync":
            # Linux marks the pages clean although they did not reach the disk.
            for _, pages in self._take_syncing(f, None):
                _merge_older(f.dropped, pages)
            _merge_older(f.dropped, f.unsynced)
            f.unsynced = {}
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected)", f.path)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        with self._lock:
            self._files[fd] = _File(path)
        return fd

    def _record(self, fd: int, offset: int, length: int) -> None:
        f = self._files.get(fd)
        if f is None:
            f = self._files[fd] = _File(f"fd {fd}")
        for page in range(offset // PAGE, (offset + max(length, 1) - 1) // PAGE + 1):
            if page not in f.unsynced:
                old = os.pread(fd, PAGE, page * PAGE)
                f.unsynced[page] = old if old.strip(b"\0") else None

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        with self._lock:
            self._check(fd, "pwrite")
            self._record(fd, offset, len(data))
            return os.pwrite(fd, data, offset)

    def pwrite_durable(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """A durable write: its pages (whole, with what earlier writes put in them)
        are on the disk, whatever happens to the other unsynced pages."""
        with self._lock:
            self._check(fd, "pwrite")
            n = _pwrite_durable(fd, data, offset)
            f = self._files.get(fd)
            if f is not None:
                for page in range(offset // PAGE, (offset + max(len(data), 1) - 1) // PAGE + 1):
                    f.unsynced.pop(page, None)
                    f.dropped.pop(page, None)
                    for _, pages in f.syncing:
                        pages.pop(page, None)
            return n

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> int:
        with self._lock:
            try:
                self._check(fd, "pwrite")
            except OSError as exc:
                ctypes.set_errno(exc.errno or errno.EIO)
                return -1
            self._record(fd, offset, length)
            return int(_fallocate(fd, mode, offset, length))

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        with self._lock:
            self._check(fd, "pread")
        return os.pread(fd, length, offset)

    def preadv(self, fd: int, buffers: Sequence[bytearray | memoryview], offset: int) -> int:
        with self._lock:
            self._check(fd, "pread")
        return os.preadv(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, os.fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync(fd, os.fsync)

    def _sync(self, fd: int, real: Callable[[int], None]) -> None:
        with self._lock:
            self._check(fd, "fdatasync")
            f = self._files.get(fd)
            self._seq += 1
            seq = self._seq
            if f is not None:
                f.syncing.append((seq, f.unsynced))
                f.unsynced = {}
        try:
            real(fd)
        except BaseException:
            with self._lock:
                if f is not None:  # nothing known durable: back to unsynced
                    for _, pages in self._take_syncing(f, seq):
                        f.unsynced.update(pages)
            raise
        with self._lock:
            if f is not None:
                # A sync that began after another's writes makes them durable too.
                self._take_syncing(f, seq)

    @staticmethod
    def _take_syncing(f: _File, upto: int | None) -> list[tuple[int, Pages]]:
        done = [s for s in f.syncing if upto is None or s[0] <= upto]
        f.syncing = [s for s in f.syncing if not (upto is None or s[0] <= upto)]
        return done


def _merge_older(into: Pages, pages: Pages) -> None:
    """Add ``pages`` to ``into``; a page already there keeps its (older) contents."""
    for page, old in pages.items():
        into.setdefault(page, old)


def _restore(fd: int, page: int, old: bytes | None) -> None:
    if old is None:
        if _fallocate(fd, 0x02 | 0x01, page * PAGE, PAGE) == 0:  # PUNCH_HOLE | KEEP_SIZE
            return
        old = bytes(PAGE)
    os.pwrite(fd, old, page * PAGE)
