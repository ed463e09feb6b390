"""``meshblock-mdm backup PATH`` / ``restore PATH`` with the real daemon and tools.

- A backup taken while the MDM runs, restored after a change, brings the database back
  to the backup (SQLite's online backup API; pg_dump/pg_restore on PostgreSQL).
- Restore refuses while the MDM answers, a backup never overwrites a file, a backup of
  one engine is refused by the other; a refused command changes nothing.
- Restored into a running cluster (SDSs and an SDC kept running, the MDM stopped,
  restored, started), the volume of the backup serves IO again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _cluster import small_cluster
from _mdm import MdmDaemon
from _pg import PgServer
from _wait import wait_until
from conftest import BACKENDS, new_database_url
from test_nbd_server import qemu_io

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def mdm_command(daemon: MdmDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshblock.mdm", "--config", str(daemon.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pd_names(daemon: MdmDaemon) -> list[str]:
    status, body = daemon.api().get("/api/v1/protection-domains")
    assert status == 200, body
    return sorted(pd["name"] for pd in body["protection_domains"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backup_while_running_then_restore_brings_the_state_back(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    daemon = MdmDaemon(tmp_path / "mdm", new_database_url(backend, request, tmp_path))
    backup = tmp_path / "mdm.backup"
    try:
        daemon.start()
        assert daemon.api().post("/api/v1/protection-domains", {"name": "pd1"}).status == 201
        # The MDM keeps committing, one protection domain after the other, while the
        # backup runs: the backup holds a prefix of them, with no gap.
        stop = threading.Event()
        written: list[str] = []

        def writer() -> None:
            while not stop.is_set():
                name = f"w{len(written):04d}"
                if daemon.api().post("/api/v1/protection-domains", {"name": name}).status != 201:
                    return
                written.append(name)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_until(lambda: len(written) >= 3, 30, "the MDM taking writes")
            done = mdm_command(daemon, "backup", str(backup))
        finally:
            stop.set()
            thread.join()
        assert done.returncode == 0, done.stderr
        assert str(backup) in done.stdout
        assert daemon.api().post("/api/v1/protection-domains", {"name": "pd2"}).status == 201

        again = mdm_command(daemon, "backup", str(backup))
        assert again.returncode == 1
        assert "exists" in again.stderr
        refused = mdm_command(daemon, "restore", str(backup))
        assert refused.returncode == 1
        assert "stop it before restoring" in refused.stderr
        assert pd_names(daemon) == sorted(["pd1", "pd2", *written]), "refused: no change"

        assert daemon.stop() == 0
        restored = mdm_command(daemon, "restore", str(backup))
        assert restored.returncode == 0, restored.stderr
        daemon.start()
        names = pd_names(daemon)
        assert names[0] == "pd1" and "pd2" not in names, names
        kept = names[1:]
        assert kept == written[: len(kept)], "the backup is a prefix of the commits"
        # The restored database takes writes.
        status, pd = daemon.api().post("/api/v1/protection-domains", {"name": "pd3"})
        assert status == 201, pd
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    daemon.assert_no_secrets_in_log()


def test_a_backup_of_one_engine_is_refused_by_the_other(
    pg_server: PgServer, tmp_path: Path
) -> None:
    lite = MdmDaemon(tmp_path / "lite", f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
    pg = MdmDaemon(tmp_path / "pg", pg_server.create_database())
    try:
        for daemon, name in ((lite, "lite.backup"), (pg, "pg.backup")):
            migrated = mdm_command(daemon, "--migrate-only")
            assert migrated.returncode == 0, migrated.stderr
            done = mdm_command(daemon, "backup", str(tmp_path / name))
            assert done.returncode == 0, done.stderr
        wrong = mdm_command(pg, "restore", str(tmp_path / "lite.backup"))
        assert wrong.returncode == 1
        assert "is a sqlite backup" in wrong.stderr
        wrong = mdm_command(lite, "restore", str(tmp_path / "pg.backup"))
        assert wrong.returncode == 1
        assert "is a postgresql backup" in wrong.stderr
        (tmp_path / "junk").write_bytes(b"not a backup")
        junk = mdm_command(lite, "restore", str(tmp_path / "junk"))
        assert junk.returncode == 1
        assert "not a backup" in junk.stderr
        missing = mdm_command(lite, "restore", str(tmp_path / "nothing-here"))
        assert missing.returncode == 1
        assert "is not a file" in missing.stderr
    finally:
        lite.kill()
        pg.kill()


def test_restore_into_a_running_cluster(tmp_path: Path) -> None:
    """Backup, then a new volume written, then MDM stopped, restored, started: the
    SDSs and the SDC, which ran throughout, serve the backup's volume again.

    What the MDM does about the newer epochs and ids the SDSs and the SDC saw (vol2's
    chunks and export) is its reconciliation after a restore (docs/mdm.md, "Backup
    and restore"), tested with it."""
    with small_cluster(tmp_path, "vol1", "64MiB", {}) as c:
        qemu_io(c.sdc.uri("vol1"), "write -P 0xa1 0 2M", "flush")
        backup = tmp_path / "mdm.backup"
        done = mdm_command(c.mdm, "backup", str(backup))
        assert done.returncode == 0, done.stderr

        api = c.mdm.api()
        sdc_id = c.sdc.health()["sdc_id"]
        status, vol2 = api.post(
            "/api/v1/volumes",
            {"name": "vol2", "pool_id": c.pool_id, "size": "64MiB", "type": "thin"},
        )
        assert status == 201, vol2
        status, body = api.post("/api/v1/mappings", {"volume_id": vol2["id"], "sdc_id": sdc_id})
        assert status == 201, body
        c.sdc.wait_for("vol2's export", lambda h: "vol2" in {e["name"] for e in h["exports"]})
        qemu_io(c.sdc.uri("vol2"), "write -P 0xb2 0 2M", "flush")

        assert c.mdm.stop() == 0
        # The order of operations of docs/mdm.md: IO goes on while the MDM is down.
        qemu_io(c.sdc.uri("vol1"), "read -P 0xa1 0 2M", read_only=True)
        restored = mdm_command(c.mdm, "restore", str(backup))
        assert restored.returncode == 0, restored.stderr
        c.mdm.start()

        status, body = api.get("/api/v1/volumes")
        assert status == 200, body
        assert [v["name"] for v in body["volumes"]] == ["vol1"]
        wait_until(
            lambda: all(s.health()["mdm_reachable"] for s in c.sds),
            30,
            "every SDS reconnected to the restored MDM",
        )
        qemu_io(c.sdc.uri("vol1"), "read -P 0xa1 0 2M", read_only=True)
        qemu_io(c.sdc.uri("vol1"), "write -P 0xc3 1M 2M", "flush")
        qemu_io(c.sdc.uri("vol1"), "read -P 0xa1 0 1M", "read -P 0xc3 1M 2M", read_only=True)
