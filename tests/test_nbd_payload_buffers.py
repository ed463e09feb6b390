"""The NBD server's write payload buffers (meshblock.nbd.server): a large write is
received into a buffer of its own, kept for reuse once the write is answered, and
received into again only when nothing refers to it any more.

That last condition is what keeps the data of an answered write intact while the
SDC's data path still holds it: an attempt of the write given up for its deadline
stays queued on its wire connection (or in the socket's send path) after a retry
has succeeded and the write was answered. A buffer reused then would send the next
write's bytes under the old write's address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshblock.nbd.protocol import Cmd
from meshblock.nbd.server import DIRECT_RECV_THRESHOLD, Export, IoRequest
from test_nbd_fuzz import Client
from test_nbd_server import ServerThread

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

SIZE = 4 * 1024 * 1024
N = 4 * DIRECT_RECV_THRESHOLD  # received into a buffer of its own


class Holding:
    """Answers every request at once; while ``hold`` is set it keeps each write's
    payload buffer after answering, as the data path does with a write whose
    given-up attempt is still queued."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.hold = True
        self.held: list[bytearray] = []
        self.buffers: list[int] = []  # id() of each write's payload buffer, while held

    def submit(self, req: IoRequest) -> None:
        if req.cmd == Cmd.WRITE:
            assert req.data is not None
            self.data[req.offset : req.offset + req.length] = req.data
            self.buffers.append(id(req.data))
            if self.hold:
                self.held.append(req.data)
        req.reply()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Holding, Client]]:
    srv = ServerThread(tmp_path)
    srv.start()
    backend = Holding()
    srv.add(Export("disk", backend, SIZE))
    client = Client(srv.port)
    try:
        client.greeting()
        client.go("disk")
        yield backend, client
    finally:
        client.close()
        srv.stop()


def write(client: Client, handle: int, fill: int) -> None:
    client.request(Cmd.WRITE, handle * N, N, bytes([fill]) * N, handle=handle)
    assert client.simple_reply() == (0, handle, b"")


def test_a_payload_buffer_still_referred_to_is_not_received_into(
    served: tuple[Holding, Client],
) -> None:
    backend, client = served
    fills = (0x11, 0x22, 0x33)
    for handle, fill in enumerate(fills):
        write(client, handle, fill)
    assert [bytes(b) for b in backend.held] == [bytes([f]) * N for f in fills]
    assert len(set(backend.buffers)) == 3

    # Let go of, they may be received into again; the data stays right.
    backend.hold = False
    backend.held.clear()
    for handle in (3, 4):
        write(client, handle, 0x44)
    assert backend.data[: 5 * N] == b"".join(bytes([f]) * N for f in (*fills, 0x44, 0x44))
