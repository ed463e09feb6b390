"""The MDM daemon's garbage collector settings (``meshblock.mdm.__main__._tune_gc``):
once it is up, its startup objects are frozen out of the full collections and the
youngest generation is collected every ``GC_THRESHOLD[0]`` allocations, so that a
pool's map recomputed at every SDS registration does not set off a full pass over the
heap (docs/performance.md, "MDM"); both are undone when it stops."""

from __future__ import annotations

import asyncio
import gc

import pytest

from meshblock.mdm import __main__ as mdm_main
from meshblock.mdm.config import AuthConfig, DatabaseConfig, MdmConfig

pytestmark = pytest.mark.unit


def test_the_daemon_app_tunes_the_collector_while_it_runs_and_restores_it() -> None:
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token"),
        database=DatabaseConfig(url="sqlite+aiosqlite:///unused.db"),
    )
    app = mdm_main._server(config).app
    assert mdm_main._tune_gc in app.cleanup_ctx, "the daemon's app does not tune the collector"
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0

    async def main() -> None:
        tuned = mdm_main._tune_gc(app)
        await anext(tuned)
        try:
            assert gc.get_threshold() == mdm_main.GC_THRESHOLD
            assert gc.get_freeze_count() > 1000, "the startup objects are not frozen"
        finally:
            with pytest.raises(StopAsyncIteration):
                await anext(tuned)

    asyncio.run(main())
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
