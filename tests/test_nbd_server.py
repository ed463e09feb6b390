"""The NBD server (meshblock.nbd) driven by real NBD clients: qemu-io, nbdinfo, nbdcopy.

The server runs in a thread of the test process with an in-memory backend standing
for the storage (the SDC tests put the real cluster behind it). Every client is a
tool this project did not write; a missing tool fails the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from _wait import wait_until
from meshblock.nbd.access import ListenPolicy
from meshblock.nbd.protocol import Cmd, CmdFlag
from meshblock.nbd.server import Export, IoRequest, NbdServer

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

T = TypeVar("T")
MiB = 1024 * 1024


def tool(name: str) -> str:
    """The path of an external client; the test fails (not skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian packages: see APT_PACKAGES in the Makefile)")
    return path


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class MemoryBackend:
    """A volume in memory: what the storage would hold (test-only stand-in). Every
    request is answered at once, from ``submit``."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.data = bytearray([fill]) * size
        self.flushes = 0
        self.fua_writes = 0
        self.writes = 0

    def submit(self, req: IoRequest) -> None:
        start, end = req.offset, req.offset + req.length
        if req.cmd == Cmd.READ:
            req.reply([bytes(self.data[start:end])])
            return
        if req.cmd == Cmd.WRITE:
            assert req.data is not None
            self.data[start:end] = req.data
            self.writes += 1
            self.fua_writes += bool(req.flags & CmdFlag.FUA)
        elif req.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            self.data[start:end] = bytes(req.length)
        elif req.cmd == Cmd.FLUSH:
            self.flushes += 1
        req.reply()


class ServerThread:
    """An NbdServer on its own event loop in a thread, on TCP and a unix socket."""

    def __init__(
        self,
        sock_dir: Path,
        handshake_timeout: float = 30.0,
        tcp_policy: ListenPolicy | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(handshake_timeout=handshake_timeout)
        self.unix_path = str(sock_dir / "nbd.sock")
        self.port = 0
        self.tcp_policy = tcp_policy
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        addrs = self.call(self.server.listen_tcp("127.0.0.1", 0, self.tcp_policy))
        self.port = addrs[0][1]
        self.call(self.server.listen_unix(self.unix_path))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def add(self, export: Export) -> None:
        async def add() -> None:
            self.server.add_export(export)

        self.call(add())

    def remove(self, name: str) -> None:
        async def remove() -> None:
            self.server.remove_export(name, "removed by the test")

        self.call(remove())

    def stop(self) -> None:
        self.call(self.server.close(grace_s=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def uri(self, export: str, transport: str = "tcp") -> str:
        if transport == "unix":
            return f"nbd+unix:///{export}?socket={self.unix_path}"
        return f"nbd://127.0.0.1:{self.port}/{export}"


DISK_SIZE = 48 * MiB
RO_SIZE = 4 * MiB


@pytest.fixture(scope="module")
def nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("nbd"), handshake_timeout=2.0)
    srv.start()
    srv.add(Export("disk", MemoryBackend(DISK_SIZE), DISK_SIZE, multi_conn=True))
    srv.add(
        Export("ro", MemoryBackend(RO_SIZE, fill=0x5A), RO_SIZE, read_only=True, description="ro")
    )
    try:
        yield srv
    finally:
        srv.stop()


def backend(nbd: ServerThread, name: str) -> MemoryBackend:
    b = nbd.server.exports[name].backend
    assert isinstance(b, MemoryBackend)
    return b


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    args = [tool("qemu-io"), "-f", "raw"]
    if read_only:
        args.append("-r")
    for c in commands:
        args += ["-c", c]
    proc = run(*args, uri)
    out = proc.stdout + proc.stderr
    assert "failed" not in out.lower(), out
    return out


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_io_patterns_at_unaligned_offsets(nbd: ServerThread, transport: str) -> None:
    uri = nbd.uri("disk", transport)
    base = 3 * MiB if transport == "unix" else 0
    qemu_io(
        uri,
        f"write -P 0xab {base} 64k",
        f"write -P 0xcd {base + 4097} 12345",  # unaligned, inside the first write
        f"write -P 0x11 {base + MiB - 1000} 3000",  # straddles a 1 MiB boundary
        f"write -f -P 0x22 {base + 2 * MiB + 7} 1",  # FUA, one byte
        "flush",
    )
    qemu_io(
        uri,
        f"read -P 0xab {base} 4097",
        f"read -P 0xcd {base + 4097} 12345",
        f"read -P 0xab {base + 4097 + 12345} {65536 - 4097 - 12345}",
        f"read -P 0x11 {base + MiB - 1000} 3000",
        f"read -P 0x22 {base + 2 * MiB + 7} 1",
        f"read -P 0 {base + 2 * MiB + 8} 4096",
        read_only=True,
    )
    # A wrong pattern is reported (the check above can fail).
    bad = run(
        tool("qemu-io"), "-f", "raw", "-r", "-c", f"read -P 0xee {base} 512", uri, check=False
    )
    assert "Pattern verification failed" in bad.stdout + bad.stderr
    data = backend(nbd, "disk").data
    assert data[base + 4096] == 0xAB and data[base + 4097] == 0xCD
    assert data[base + 2 * MiB + 7] == 0x22
    assert backend(nbd, "disk").flushes >= 1 and backend(nbd, "disk").fua_writes >= 1


def test_qemu_io_zeroes_and_discard(nbd: ServerThread) -> None:
    uri = nbd.uri("disk")
    base = 8 * MiB
    qemu_io(
        uri,
        f"write -P 0x77 {base} 256k",
        f"write -z {base + 4096} 8192",
        f"discard {base + 65536} 65536",
    )
    qemu_io(
        uri,
        f"read -P 0x77 {base} 4096",
        f"read -P 0 {base + 4096} 8192",
        f"read -P 0x77 {base + 12288} {65536 - 12288}",
        f"read -P 0 {base + 65536} 65536",
        f"read -P 0x77 {base + 131072} 131072",
        read_only=True,
    )


def test_nbdinfo_list_and_one_export(nbd: ServerThread) -> None:
    out = run(tool("nbdinfo"), "--list", "--json", f"nbd://127.0.0.1:{nbd.port}").stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(exports) == {"disk", "ro"}
    info = json.loads(run(tool("nbdinfo"), "--json", nbd.uri("ro")).stdout)
    (e,) = info["exports"]
    assert e["export-size"] == RO_SIZE
    assert e["is_read_only"] is True
    assert e["description"] == "ro"
    assert e["can_flush"] is True and e["can_fua"] is True
    assert e["can_trim"] is True and e["can_zero"] is True
    assert e["can_multi_conn"] is False
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB
    info = json.loads(run(tool("nbdinfo"), "--json", nbd.uri("disk", "unix")).stdout)
    assert info["exports"][0]["is_read_only"] is False
    assert info["exports"][0]["can_multi_conn"] is True
    # An unknown export is refused with an error the client can show.
    bad = run(tool("nbdinfo"), nbd.uri("nosuch"), check=False)
    assert bad.returncode != 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_nbdcopy_round_trip(nbd: ServerThread, tmp_path: Path, transport: str) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(DISK_SIZE - 5 * MiB) + bytes(5 * MiB))  # zeroes too
    run(tool("nbdcopy"), str(src), nbd.uri("disk", transport))
    out = tmp_path / "out.img"
    run(tool("nbdcopy"), nbd.uri("disk", transport), str(out))
    assert sha256(out) == sha256(src)
    assert hashlib.sha256(backend(nbd, "disk").data).hexdigest() == sha256(src)


def test_read_only_export_refuses_writes(nbd: ServerThread, tmp_path: Path) -> None:
    before = bytes(backend(nbd, "ro").data)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(RO_SIZE))
    proc = run(tool("nbdcopy"), str(src), nbd.uri("ro"), check=False)
    assert proc.returncode != 0
    proc = run(tool("qemu-io"), "-f", "raw", "-c", "write -P 1 0 4096", nbd.uri("ro"), check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    qemu_io(nbd.uri("ro"), f"read -P 0x5a 0 {RO_SIZE}", read_only=True)
    assert backend(nbd, "ro").data == before


def test_removing_an_export_closes_its_connections(nbd: ServerThread) -> None:
    size = 1 * MiB
    nbd.add(Export("gone", MemoryBackend(size), size))
    proc = subprocess.Popen(
        [tool("qemu-io"), "-f", "raw", nbd.uri("gone")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("write -P 3 0 4096\n")
        proc.stdin.flush()
        wait_until(lambda: nbd.server.exports["gone"].connections, 5, "qemu-io's connection")
        assert nbd.server.exports["gone"].connections
        nbd.remove("gone")
        proc.stdin.write("read -P 3 0 4096\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "failed" in out.lower() or "error" in out.lower(), out
    assert "gone" not in nbd.server.exports
