"""Bad input to the NBD server: malformed, truncated and oversized handshakes and
requests, and random bytes.

For each, the server either answers with an error and keeps the connection (a request
error), or drops that connection with a logged reason (a protocol error); in every
case it keeps serving a connection that was open before, never crashes, and applies
no partial write.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from _wait import wait_until
from meshblock.nbd.protocol import (
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_REQUEST_SIZE,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Magic,
    Opt,
    Rep,
)
from meshblock.nbd.server import Export
from test_nbd_server import MemoryBackend, ServerThread

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1024 * 1024
SIZE = 4 * MiB
LOGGER = "meshblock.nbd.server"


class Client:
    """A hand-written NBD client that can also misbehave."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None
        )

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def greeting(self, flags: int = 3) -> None:
        magic, opt, hs = struct.unpack(">QQH", self.recv(18))
        assert magic == Magic.NBDMAGIC and opt == Magic.IHAVEOPT and hs & 1
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", Magic.IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == Magic.OPTION_REPLY
        return opt, rep, self.recv(length)

    def go(self, name: str, infos: tuple[int, ...] = ()) -> tuple[int, int]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        self.option(Opt.GO, data)
        size = flags = -1
        while True:
            _, rep, payload = self.reply()
            if rep == Rep.ACK:
                return size, flags
            assert rep == Rep.INFO, rep
            if struct.unpack(">H", payload[:2])[0] == Info.EXPORT:
                _, size, flags = struct.unpack(">HQH", payload)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        data: bytes = b"",
        flags: int = 0,
        handle: int = 7,
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", Magic.REQUEST, flags, cmd, handle, offset, length) + data
        )

    def simple_reply(self, payload_len: int = 0) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == Magic.SIMPLE_REPLY
        return err, handle, self.recv(payload_len) if err == 0 else b""

    def read(self, offset: int, length: int) -> bytes:
        self.request(Cmd.READ, offset, length, handle=99)
        err, handle, data = self.simple_reply(length)
        assert (err, handle) == (0, 99)
        return data


@pytest.fixture(scope="module")
def nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("nbdfuzz"), handshake_timeout=1.0)
    srv.start()
    srv.add(Export("disk", MemoryBackend(SIZE, fill=0x42), SIZE))
    srv.add(Export("ro", MemoryBackend(SIZE, fill=0x17), SIZE, read_only=True))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def bystander(nbd: ServerThread) -> Iterator[Client]:
    """A well-behaved connection opened before the bad one; must keep working."""
    c = Client(nbd.port)
    c.greeting()
    c.go("disk")
    yield c
    assert c.read(0, 4096) == bytes([0x42]) * 4096, "the other connection stopped working"
    c.request(Cmd.DISC)
    assert c.closed_by_server()
    c.close()


def data(nbd: ServerThread) -> bytes:
    b = nbd.server.exports["disk"].backend
    assert isinstance(b, MemoryBackend)
    return bytes(b.data)


def dropped(nbd: ServerThread, c: Client, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """The server closed ``c`` and logged ``reason``."""
    assert c.closed_by_server(), "the server kept a connection that broke the protocol"
    c.close()
    wait_until(
        lambda: reason in caplog.text,
        2,
        f"the log to say {reason!r}",
        interval=0.02,
        detail=lambda: caplog.text,
    )
    assert reason in caplog.text, caplog.text


BAD_HANDSHAKES = {
    "unknown client flags": lambda c: c.sock.sendall(struct.pack(">I", 0x80)),
    "bad option magic": lambda c: c.sock.sendall(struct.pack(">I", 3) + b"X" * 16),
    "carries": lambda c: c.sock.sendall(
        struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, Opt.GO, MAX_OPTION_DATA + 1)
    ),
    "unknown export": lambda c: c.sock.sendall(
        struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, Opt.EXPORT_NAME, 4) + b"nope"
    ),
    "not UTF-8": lambda c: c.sock.sendall(
        struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, Opt.EXPORT_NAME, 2) + b"\xff\xfe"
    ),
    "more than": lambda c: c.sock.sendall(
        struct.pack(">I", 3) + struct.pack(">QII", Magic.IHAVEOPT, 99, 0) * (MAX_OPTIONS + 1)
    ),
    "no export chosen": lambda c: c.sock.sendall(struct.pack(">I", 3)),  # then silence
    "middle of a request": lambda c: c.sock.sendall(struct.pack(">I", 3) + b"IHAVE"),
}


@pytest.mark.parametrize("reason", list(BAD_HANDSHAKES))
def test_bad_handshake_drops_connection(
    nbd: ServerThread, bystander: Client, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    c = Client(nbd.port)
    c.recv(18)
    BAD_HANDSHAKES[reason](c)
    if reason == "middle of a request":
        c.sock.shutdown(socket.SHUT_WR)  # truncated: EOF inside an option header
    dropped(nbd, c, caplog, reason)


def test_option_errors_keep_the_connection(nbd: ServerThread, bystander: Client) -> None:
    c = Client(nbd.port)
    c.greeting()
    c.option(99)
    assert c.reply()[1] == Rep.ERR_UNSUP
    c.option(Opt.STRUCTURED_REPLY)
    assert c.reply()[1] == Rep.ERR_UNSUP
    c.option(Opt.STARTTLS)
    assert c.reply()[1] == Rep.ERR_UNSUP
    c.option(Opt.LIST, b"junk")
    assert c.reply()[1] == Rep.ERR_INVALID
    c.option(Opt.GO, b"\x00\x00")  # too short
    assert c.reply()[1] == Rep.ERR_INVALID
    c.option(Opt.GO, struct.pack(">I", 100) + b"disk" + b"\x00\x00")  # name length lies
    assert c.reply()[1] == Rep.ERR_INVALID
    c.option(Opt.INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3))  # info count lies
    assert c.reply()[1] == Rep.ERR_INVALID
    c.option(Opt.GO, struct.pack(">I", 4) + b"nope" + b"\x00\x00")
    opt, rep, msg = c.reply()
    assert (opt, rep) == (Opt.GO, Rep.ERR_UNKNOWN) and b"nope" in msg
    # INFO does not end the negotiation; the block size comes even unrequested.
    raw = struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, Info.NAME)
    c.option(Opt.INFO, raw)
    seen = {}
    while True:
        _, rep, payload = c.reply()
        if rep == Rep.ACK:
            break
        seen[struct.unpack(">H", payload[:2])[0]] = payload[2:]
    assert seen[Info.NAME] == b"disk"
    assert struct.unpack(">III", seen[Info.BLOCK_SIZE]) == (1, 4096, MAX_REQUEST_SIZE)
    assert c.go("disk") == (SIZE, struct.unpack(">QH", seen[Info.EXPORT])[1])
    assert c.read(4096, 16) == b"\x42" * 16
    c.close()


def test_abort_is_acknowledged(nbd: ServerThread) -> None:
    c = Client(nbd.port)
    c.greeting()
    c.option(Opt.ABORT)
    assert c.reply()[:2] == (Opt.ABORT, Rep.ACK)
    assert c.closed_by_server()
    c.close()


def test_export_name_without_zeroes(nbd: ServerThread) -> None:
    for flags, tail in ((3, 0), (1, 124)):
        c = Client(nbd.port)
        c.greeting(flags)
        c.option(Opt.EXPORT_NAME, b"disk")
        size, tflags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and tflags & 1
        assert c.recv(tail) == bytes(tail)
        assert c.read(0, 8) == b"\x42" * 8
        c.close()


def test_request_errors_keep_the_connection(nbd: ServerThread, bystander: Client) -> None:
    before = data(nbd)
    c = Client(nbd.port)
    c.greeting()
    c.go("disk")
    cases = [
        (dict(cmd=Cmd.READ, offset=SIZE - 10, length=11), Errno.EINVAL),
        (dict(cmd=Cmd.READ, offset=0, length=MAX_REQUEST_SIZE + 1), Errno.EINVAL),
        (dict(cmd=Cmd.READ, offset=2**64 - 1, length=1), Errno.EINVAL),
        (dict(cmd=Cmd.READ, offset=0, length=4, flags=CmdFlag.FUA), Errno.EINVAL),
        (dict(cmd=Cmd.TRIM, offset=SIZE, length=1), Errno.EINVAL),
        (dict(cmd=Cmd.WRITE_ZEROES, offset=SIZE - 1, length=2), Errno.ENOSPC),
        (dict(cmd=Cmd.WRITE_ZEROES, offset=0, length=2, flags=0x8000), Errno.EINVAL),
        (dict(cmd=Cmd.BLOCK_STATUS, offset=0, length=4096), Errno.EINVAL),
        (dict(cmd=Cmd.CACHE, offset=0, length=4096), Errno.EINVAL),
        (dict(cmd=77, offset=0, length=0), Errno.EINVAL),
        # A write past the end: its payload is read and dropped, nothing applied.
        (dict(cmd=Cmd.WRITE, offset=SIZE - 2, length=4, data=b"\xee" * 4), Errno.ENOSPC),
        (
            dict(cmd=Cmd.WRITE, offset=0, length=4, data=b"\xee" * 4, flags=CmdFlag.NO_HOLE),
            Errno.EINVAL,
        ),
    ]
    for i, (req, errno) in enumerate(cases):
        c.request(handle=1000 + i, **req)  # type: ignore[arg-type]
        err, handle, _ = c.simple_reply()
        assert (err, handle) == (errno, 1000 + i), req
    assert c.read(0, 4) == b"\x42" * 4  # still in step after the dropped payloads
    assert data(nbd) == before
    c.close()


def test_read_only_export_refuses_writes(nbd: ServerThread, bystander: Client) -> None:
    c = Client(nbd.port)
    c.greeting()
    _, flags = c.go("ro")
    assert flags & 2  # NBD_FLAG_READ_ONLY
    for cmd, payload in ((Cmd.WRITE, b"x" * 512), (Cmd.TRIM, b""), (Cmd.WRITE_ZEROES, b"")):
        c.request(cmd, 0, 512, payload, handle=cmd)
        assert c.simple_reply()[:2] == (Errno.EPERM, cmd)
    c.request(Cmd.FLUSH, handle=5)
    assert c.simple_reply()[:2] == (0, 5)
    assert c.read(0, 512) == b"\x17" * 512
    c.close()


BAD_REQUESTS = {
    "bad request magic": lambda: b"\x00" * 28,
    "exceeds the maximum request size": lambda: (
        struct.pack(">IHHQQI", Magic.REQUEST, 0, Cmd.WRITE, 1, 0, MAX_REQUEST_SIZE + 1)
        + b"\xee" * 4096
    ),
}


@pytest.mark.parametrize("reason", list(BAD_REQUESTS))
def test_bad_request_drops_connection(
    nbd: ServerThread, bystander: Client, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    before = data(nbd)
    c = Client(nbd.port)
    c.greeting()
    c.go("disk")
    c.sock.sendall(BAD_REQUESTS[reason]())
    dropped(nbd, c, caplog, reason)
    assert data(nbd) == before


@pytest.mark.parametrize("sent", [0, 1, 4095, 65536, 300000])
def test_truncated_write_is_not_applied(
    nbd: ServerThread, bystander: Client, caplog: pytest.LogCaptureFixture, sent: int
) -> None:
    """A write whose payload stops short (the client goes away) changes nothing."""
    caplog.set_level(logging.WARNING, LOGGER)
    before = data(nbd)
    c = Client(nbd.port)
    c.greeting()
    c.go("disk")
    c.request(Cmd.WRITE, 4096, 300001, b"\xee" * sent)
    c.sock.shutdown(socket.SHUT_WR)
    dropped(nbd, c, caplog, "partial write is discarded")
    assert data(nbd) == before


def test_truncated_request_header(
    nbd: ServerThread, bystander: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    c = Client(nbd.port)
    c.greeting()
    c.go("disk")
    c.sock.sendall(struct.pack(">IHHQQI", Magic.REQUEST, 0, Cmd.READ, 1, 0, 16)[:20])
    c.sock.shutdown(socket.SHUT_WR)
    dropped(nbd, c, caplog, "middle of a request")


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes(nbd: ServerThread, bystander: Client, seed: int) -> None:
    """Random bytes at every stage: the server survives and writes nothing."""
    rng = random.Random(seed)
    before = data(nbd)
    c = Client(nbd.port)
    stage = seed % 3
    if stage >= 1:
        c.greeting()
    if stage == 2:
        c.go("disk")
    with contextlib.suppress(OSError):  # the server may hang up before all is sent
        c.sock.sendall(rng.randbytes(rng.choice([1, 27, 28, 500, 70000])))
        c.sock.shutdown(socket.SHUT_WR)
    assert c.closed_by_server()
    c.close()
    assert data(nbd) == before


def test_many_options_then_a_good_session(nbd: ServerThread) -> None:
    """A legitimate client may send several options, up to the limit."""
    c = Client(nbd.port)
    c.greeting()
    for _ in range(MAX_OPTIONS - 1):
        c.option(Opt.LIST)
        while c.reply()[1] != Rep.ACK:
            pass
    c.go("disk")
    assert c.read(0, 1) == b"\x42"
    c.close()
