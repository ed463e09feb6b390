"""Small files that must survive a crash or a power cut whole: old or new, never torn.

A daemon's state file (the SDS's ``state.json``, the SDC's ``guid`` and ``maps.json``,
meshctl's lab state) is replaced by :func:`write_atomic`:

1. the new bytes go to a temporary file in the same directory, created with the
   file's final mode;
2. ``fsync`` of the temporary file: its bytes are on the device;
3. ``rename`` over the old file, atomic on POSIX file systems;
4. ``fsync`` of the directory: the rename itself is on the device.

Without step 2 a power cut after the rename can leave an empty or partial file under
the final name (ext4 with ``data=writeback``, XFS); without step 4 it can bring back
the old file after the new one was acted upon.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably and atomically (see the module docstring).

    ``str`` is written as UTF-8. The file gets ``mode`` (default: readable by its
    owner only). Raises ``OSError``; on error the old file, if any, is unchanged and
    no temporary file is left behind.
    """
    payload = data.encode() if isinstance(data, str) else data
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new file) durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
