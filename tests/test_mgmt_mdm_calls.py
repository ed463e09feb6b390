"""MGMT's calls to the MDM for its cluster pages (mgmt/inventory.py, mdm_call): what a
page says when the MDM does not answer in time, against a loopback server that
accepts and never answers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from meshblock.mgmt import inventory

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def test_an_mdm_that_does_not_answer_in_time_is_said_so_not_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow MDM is a timeout, with the setting to raise and the warning that the change
    may have been made (a TimeoutError is an OSError too: it was taken for "unreachable",
    with an empty reason)."""

    async def run() -> str:
        held: list[asyncio.StreamWriter] = []

        async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accepted, never answered

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        mdm = SimpleNamespace(url=f"http://127.0.0.1:{port}", timeout_s=0.2)
        monkeypatch.setattr(
            inventory, "ctx", lambda _: SimpleNamespace(config=SimpleNamespace(mdm=mdm))
        )
        try:
            async with aiohttp.ClientSession() as http:
                with pytest.raises(inventory.MdmRefused) as refused:
                    await inventory.mdm_call(
                        cast(web.Request, None), http, "POST", "/api/v1/volumes", {"name": "v"}
                    )
        finally:
            server.close()
            for w in held:
                w.close()
        assert refused.value.status == 502
        return str(refused.value)

    message = asyncio.run(run())
    assert "did not answer within 0.2 s ([mdm] timeout_s)" in message, message
    assert "may still have been made" in message, message
