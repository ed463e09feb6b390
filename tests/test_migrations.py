"""Schema migrations of the MDM's metadata store, on SQLite and on PostgreSQL.

``meshblock.mdm.db.migrate`` brings an empty database to the head revision, does
nothing the second time, refuses a schema written by a newer release, and leaves a
schema that matches the ORM models exactly (Alembic's autogenerate finds no diff).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from _mdm import MdmDaemon
from conftest import BACKENDS, new_database_url
from meshblock.mdm.db import SchemaError, alembic_config, create_engine, migrate
from meshblock.mdm.models import Base
from meshblock.mgmt.db import VERSION_TABLE as MGMT_VERSION_TABLE
from meshblock.mgmt.db import migrate as mgmt_migrate
from meshblock.sqlstore import KILL_AFTER_DDL_ENV

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

T = TypeVar("T")

FUTURE_REVISION = "9999_from_the_future"


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def with_engine(url: str, fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``fn(engine)`` on a fresh engine in a fresh event loop; dispose of it."""

    async def main() -> T:
        engine = create_engine(url)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def run_sync(url: str, fn: Callable[[Connection], T]) -> T:
    """Run the synchronous ``fn(connection)`` in a transaction on database ``url``."""

    async def go(engine: AsyncEngine) -> T:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)

    return with_engine(url, go)


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def schema_snapshot(conn: Connection) -> dict[str, Any]:
    """Tables, columns, keys and indexes as the database reports them."""
    insp = inspect(conn)
    snap: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        snap[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)
            ],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"])
                for fk in insp.get_foreign_keys(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "indexes": sorted(i["name"] or "" for i in insp.get_indexes(table)),
        }
    return snap


def stamp(url: str, revision: str) -> None:
    def write(conn: Connection) -> None:
        conn.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": revision})

    run_sync(url, write)


@pytest.fixture(params=BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database for one test."""
    return new_database_url(request.param, request, tmp_path)


def test_migrate_empty_database_creates_schema_at_head(empty_db: str) -> None:
    assert run_sync(empty_db, lambda c: inspect(c).get_table_names()) == []

    with_engine(empty_db, migrate)

    assert run_sync(empty_db, current_revision) == head_revision()
    tables = set(run_sync(empty_db, lambda c: inspect(c).get_table_names()))
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_migrate_twice_is_a_no_op(empty_db: str, caplog: pytest.LogCaptureFixture) -> None:
    with_engine(empty_db, migrate)
    before = run_sync(empty_db, schema_snapshot)
    run_sync(
        empty_db,
        lambda c: c.execute(text("INSERT INTO protection_domains (name) VALUES ('pd-kept')")),
    )

    caplog.set_level(logging.INFO, logger="meshblock.sqlstore")
    caplog.clear()
    with_engine(empty_db, migrate)

    assert run_sync(empty_db, schema_snapshot) == before
    assert run_sync(empty_db, current_revision) == head_revision()
    names = run_sync(
        empty_db, lambda c: c.execute(text("SELECT name FROM protection_domains")).scalars().all()
    )
    assert names == ["pd-kept"]
    assert "upgraded" not in caplog.text
    assert "current" in caplog.text


def test_newer_schema_is_refused(empty_db: str) -> None:
    with_engine(empty_db, migrate)
    stamp(empty_db, FUTURE_REVISION)
    before = run_sync(empty_db, schema_snapshot)

    with pytest.raises(SchemaError) as exc:
        with_engine(empty_db, migrate)

    message = str(exc.value)
    assert FUTURE_REVISION in message
    assert "newer" in message
    # Refusing changes nothing.
    assert run_sync(empty_db, current_revision) == FUTURE_REVISION
    assert run_sync(empty_db, schema_snapshot) == before


def test_models_match_migrations(empty_db: str) -> None:
    with_engine(empty_db, migrate)

    def diff(conn: Connection) -> list[Any]:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": False,
                "render_as_batch": conn.dialect.name == "sqlite",
            },
        )
        return list(compare_metadata(ctx, Base.metadata))

    differences = run_sync(empty_db, diff)
    assert differences == [], "the models differ from the migrations (add a migration):\n" + (
        "\n".join(map(str, differences))
    )


@pytest.fixture(params=BACKENDS)
def future_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = new_database_url(request.param, request, tmp_path)
    with_engine(url, migrate)
    stamp(url, FUTURE_REVISION)
    yield url


def test_daemon_refuses_a_newer_schema(future_db: str, tmp_path: Path) -> None:
    daemon = MdmDaemon(tmp_path / "mdm", future_db)
    daemon.spawn()
    try:
        rc = daemon.wait_exit(timeout=30)
    finally:
        daemon.kill()
    log = daemon.log_text()
    assert rc != 0, log
    assert FUTURE_REVISION in log, log
    assert "newer" in log, log
    assert "Traceback" not in log, "a refused schema is an operator error, not a crash:\n" + log
    daemon.assert_no_secrets_in_log()


def test_daemon_starts_on_a_migrated_database_and_restarts(empty_db: str, tmp_path: Path) -> None:
    daemon = MdmDaemon(tmp_path / "mdm", empty_db)
    try:
        daemon.start()
        status, _ = daemon.api()("POST", "/api/v1/protection-domains", {"name": "pd1"})
        assert status == 201
        daemon.restart()
        status, body = daemon.api()("GET", "/api/v1/protection-domains")
        assert status == 200
        assert [pd["name"] for pd in body["protection_domains"]] == ["pd1"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert run_sync(empty_db, current_revision) == head_revision()
    daemon.assert_no_secrets_in_log()


def test_upgrade_from_0001_keeps_data_and_marks_pgs_clean(empty_db: str) -> None:
    """An MDM of the first release left a pool with a PG map: the upgrade keeps it and
    every PG starts clean."""
    from alembic import command

    def to_0001(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO protection_domains (name) VALUES ('pd1')"))
        conn.execute(
            text(
                "INSERT INTO storage_pools (name, protection_domain_id, pg_count, "
                "allocation_granularity_bytes, spare_percent, rebuild_bandwidth_mibps, "
                "rebuild_concurrency, rebalance_bandwidth_mibps, rebalance_concurrency, "
                "capacity_alert_high_percent, capacity_alert_critical_percent, map_epoch) "
                "VALUES ('sp1', 1, 2, 1073741824, 10, 0, 4, 50, 2, 80, 90, 3)"
            )
        )
        conn.execute(
            text("INSERT INTO placement_groups (pool_id, pg, epoch) VALUES (1, 0, 3), (1, 1, 3)")
        )

    run_sync(empty_db, to_0001)
    assert run_sync(empty_db, current_revision) == "0001"
    with_engine(empty_db, migrate)
    assert run_sync(empty_db, current_revision) == head_revision()
    rows = run_sync(
        empty_db,
        lambda c: c.execute(text("SELECT pg, state FROM placement_groups ORDER BY pg")).all(),
    )
    assert [tuple(r) for r in rows] == [(0, "clean"), (1, "clean")]
    pools = run_sync(empty_db, lambda c: c.execute(text("SELECT name FROM storage_pools")).all())
    assert [r[0] for r in pools] == ["sp1"]


def _add_one_of_each(conn: Connection) -> dict[str, int]:
    """A row in each table whose id names data on an SDS or an SDC; their ids."""
    from sqlalchemy.orm import Session

    from meshblock.mdm.models import (
        ProtectionDomain,
        Sdc,
        Sds,
        StoragePool,
        Volume,
        VolumeType,
    )

    with Session(conn) as s:
        pd = s.scalar(select(ProtectionDomain)) or ProtectionDomain(name="pd1")
        s.add(pd)
        s.flush()
        n = s.scalar(select(func.count()).select_from(Volume)) or 0
        n += s.scalar(select(func.max(Volume.id))) or 0
        pool = StoragePool(
            name=f"sp{n}", protection_domain_id=pd.id, allocation_granularity_bytes=2**30
        )
        sds = Sds(name=f"sds{n}", protection_domain_id=pd.id, address="127.0.0.1")
        sdc = Sdc(guid=f"guid{n}", name=f"sdc{n}")
        s.add_all([pool, sds, sdc])
        s.flush()
        # The device by the columns it had at 0003: later revisions add some (0005:
        # its state), which the ORM would insert into a 0003 table too.
        dev_id = s.execute(
            text(
                "INSERT INTO devices (sds_id, pool_id, path, capacity_bytes, used_bytes) "
                "VALUES (:s, :p, :path, :c, 0) RETURNING id"
            ),
            {"s": sds.id, "p": pool.id, "path": f"/d{n}", "c": 2**30},
        ).scalar_one()
        vol = Volume(name=f"v{n}", pool_id=pool.id, type=VolumeType.THIN, size_bytes=2**30)
        s.add(vol)
        s.flush()
        ids = {
            "volumes": vol.id,
            "devices": int(dev_id),
            "sdss": sds.id,
            "storage_pools": pool.id,
            "sdcs": sdc.id,
        }
        s.commit()
    return ids


def _delete_rows(conn: Connection, ids: dict[str, int]) -> None:
    for table in ("volumes", "devices", "sdss", "storage_pools", "sdcs"):
        conn.execute(text(f"DELETE FROM {table} WHERE id = :id"), {"id": ids[table]})


def test_ids_are_never_reused_across_restarts(empty_db: str) -> None:
    """Deleting the newest volume, device, SDS, pool or SDC and creating another, on a
    new engine (an MDM restart): the new one gets a new id, never the deleted one's
    (SQLite without AUTOINCREMENT hands out max(id) + 1 again)."""
    with_engine(empty_db, migrate)
    first = run_sync(empty_db, _add_one_of_each)
    run_sync(empty_db, lambda c: _delete_rows(c, first))
    with_engine(empty_db, migrate)  # a restart: a new engine, the schema current
    second = run_sync(empty_db, _add_one_of_each)
    for table, old in first.items():
        assert second[table] > old, f"{table}: id {old} was handed out again"


def test_upgrade_from_0003_keeps_rows_and_ids_are_not_reused(empty_db: str) -> None:
    """A database of the release before 0004 (SQLite tables without AUTOINCREMENT) with
    a mapped volume and its usage: the upgrade keeps every row, the foreign keys hold,
    and from then on a deleted id is not reused."""
    from alembic import command

    def to_0003(conn: Connection) -> dict[str, int]:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        # The columns of revision 0003 (the models have more since).
        for sql in (
            "INSERT INTO protection_domains (name) VALUES ('pd1')",
            "INSERT INTO storage_pools (name, protection_domain_id, pg_count, "
            "allocation_granularity_bytes, spare_percent, rebuild_bandwidth_mibps, "
            "rebuild_concurrency, rebalance_bandwidth_mibps, rebalance_concurrency, "
            "capacity_alert_high_percent, capacity_alert_critical_percent, map_epoch) "
            "VALUES ('sp0', 1, 2, 1073741824, 10, 0, 4, 50, 2, 80, 90, 3)",
            "INSERT INTO sdss (name, protection_domain_id, address, data_port, control_port) "
            "VALUES ('sds0', 1, '127.0.0.1', 7072, 7073)",
            "INSERT INTO sdcs (guid, name) VALUES ('guid0', 'sdc0')",
            "INSERT INTO devices (sds_id, pool_id, path, capacity_bytes, used_bytes) "
            "VALUES (1, 1, '/d0', 1073741824, 0)",
            "INSERT INTO volumes (name, pool_id, type, size_bytes) VALUES ('v0', 1, 'thin', 1)",
        ):
            conn.execute(text(sql))
        ids = {t: 1 for t in ("volumes", "devices", "sdss", "storage_pools", "sdcs")}
        conn.execute(
            text(
                "INSERT INTO mappings (volume_id, sdc_id, access_mode) "
                "VALUES (:v, :s, 'read_write')"
            ),
            {"v": ids["volumes"], "s": ids["sdcs"]},
        )
        conn.execute(
            text("INSERT INTO volume_usage (sds_id, volume_id, chunks) VALUES (:s, :v, 7)"),
            {"v": ids["volumes"], "s": ids["sdss"]},
        )
        return ids

    first = run_sync(empty_db, to_0003)
    with_engine(empty_db, migrate)
    assert run_sync(empty_db, current_revision) == head_revision()
    kept = run_sync(
        empty_db,
        lambda c: (
            c.execute(text("SELECT volume_id, sdc_id FROM mappings")).all(),
            c.execute(text("SELECT sds_id, volume_id, chunks FROM volume_usage")).all(),
        ),
    )
    assert [tuple(r) for r in kept[0]] == [(first["volumes"], first["sdcs"])]
    assert [tuple(r) for r in kept[1]] == [(first["sdss"], first["volumes"], 7)]

    def delete_all(conn: Connection) -> None:
        conn.execute(text("DELETE FROM mappings"))
        conn.execute(text("DELETE FROM volume_usage"))
        _delete_rows(conn, first)

    run_sync(empty_db, delete_all)
    second = run_sync(empty_db, _add_one_of_each)
    for table, old in first.items():
        assert second[table] > old, f"{table}: id {old} was handed out again"


# -- an upgrade is all-or-nothing ---------------------------------------------------------

DAEMON_MIGRATIONS: dict[str, tuple[Callable[[AsyncEngine], Awaitable[None]], str]] = {
    "mdm": (migrate, "alembic_version"),
    "mgmt": (mgmt_migrate, MGMT_VERSION_TABLE),
}


def _migrate_and_get_killed(url: str, daemon: str, after_ddl: int) -> None:
    """In a forked child: the daemon's migration with the kill hook armed."""
    os.environ[KILL_AFTER_DDL_ENV] = str(after_ddl)
    with_engine(url, DAEMON_MIGRATIONS[daemon][0])


def drop_all_tables(conn: Connection) -> None:
    tables = MetaData()
    tables.reflect(conn)
    tables.drop_all(conn)


def revision_in(version_table: str) -> Callable[[Connection], str | None]:
    def read(conn: Connection) -> str | None:
        opts = {"version_table": version_table}
        return MigrationContext.configure(conn, opts=opts).get_current_revision()

    return read


@pytest.mark.parametrize("daemon", ["mdm", "mgmt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_after_any_ddl_statement_the_next_start_reaches_head(
    backend: str, daemon: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The process is SIGKILLed right after the 1st, 2nd, ... DDL statement of the
    upgrade from an empty database; the next start (the same migration code) brings
    the database to the head revision with the schema of an uninterrupted upgrade."""
    do_migrate, version_table = DAEMON_MIGRATIONS[daemon]
    reference_url = new_database_url(backend, request, tmp_path / "reference")
    with_engine(reference_url, do_migrate)
    head = run_sync(reference_url, revision_in(version_table))
    reference = run_sync(reference_url, schema_snapshot)

    fork = multiprocessing.get_context("fork")
    kills = 0
    url = new_database_url(backend, request, tmp_path)
    for after_ddl in itertools.count(1):
        if backend == "sqlite":  # a new file is quicker than dropping every table
            url = new_database_url(backend, request, tmp_path / str(after_ddl))
        else:
            run_sync(url, drop_all_tables)
        child = fork.Process(target=_migrate_and_get_killed, args=(url, daemon, after_ddl))
        child.start()
        child.join(timeout=120)
        if child.exitcode == 0:
            break  # fewer DDL statements than after_ddl: the upgrade ran to its end
        assert child.exitcode == -signal.SIGKILL, f"after DDL {after_ddl}: {child.exitcode}"
        kills += 1
        with_engine(url, do_migrate)
        assert run_sync(url, revision_in(version_table)) == head, f"after DDL {after_ddl}"
        assert run_sync(url, schema_snapshot) == reference, f"after DDL {after_ddl}"
    # Every table is one DDL statement at least: the hook did cut each migration.
    assert kills >= len(reference) - 1, kills


def test_mdm_killed_in_its_first_migration_starts_and_serves(empty_db: str, tmp_path: Path) -> None:
    """The issue's case with the real daemon: ``meshblock-mdm`` killed after the third
    CREATE TABLE of its first start used to crash-loop on "table ... already exists"."""
    daemon = MdmDaemon(tmp_path / "mdm", empty_db)
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshblock.mdm",
            "--config",
            str(daemon.config_path),
            "--migrate-only",
        ],
        env={**os.environ, KILL_AFTER_DDL_ENV: "3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert run_sync(empty_db, current_revision) is None, "nothing of the upgrade is kept"
    try:
        daemon.start()
        status, _ = daemon.api()("POST", "/api/v1/protection-domains", {"name": "pd1"})
        assert status == 201
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert run_sync(empty_db, current_revision) == head_revision()
    assert "already exists" not in daemon.log_text()


def test_volume_id_counter_is_raised_never_lowered(empty_db: str) -> None:
    """After a database restore the MDM raises the volume id counter above the ids the
    SDSs report (meshblock.mdm.reconcile): the next volume gets a higher id; a lower
    value changes nothing."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from meshblock.mdm.idcounters import raise_id_counter

    with_engine(empty_db, migrate)
    first = run_sync(empty_db, _add_one_of_each)["volumes"]

    def raise_to(value: int) -> None:
        async def go(engine: AsyncEngine) -> None:
            async with AsyncSession(engine) as s, s.begin():
                await raise_id_counter(await s.connection(), "volumes", value)

        with_engine(empty_db, go)

    raise_to(first + 100)
    second = run_sync(empty_db, _add_one_of_each)["volumes"]
    assert second == first + 101
    raise_to(first + 50)
    assert run_sync(empty_db, _add_one_of_each)["volumes"] == second + 1


def test_upgrade_to_volume_trees_makes_every_volume_its_own_tree(empty_db: str) -> None:
    """0015 (docs/snapshots.md): every volume of the revision before it, active or
    deleting, with gaps in the ids, gets vtree_id = its id, so placement (which hashes
    the tree id) leaves each where it was; a volume created after the upgrade is its
    own tree too."""
    from alembic import command

    before = ScriptDirectory.from_config(alembic_config()).get_revision("0015").down_revision
    assert isinstance(before, str)

    def to_before(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, before)  # (an empty head: its down path only)
        conn.execute(text("INSERT INTO protection_domains (name) VALUES ('pd1')"))
        conn.execute(
            text(
                "INSERT INTO storage_pools (name, protection_domain_id, pg_count, "
                "allocation_granularity_bytes, spare_percent, rebuild_bandwidth_mibps, "
                "rebuild_concurrency, rebalance_bandwidth_mibps, rebalance_concurrency, "
                "capacity_alert_high_percent, capacity_alert_critical_percent, map_epoch) "
                "VALUES ('sp1', 1, 2, 1073741824, 10, 0, 4, 50, 2, 80, 90, 3)"
            )
        )
        for name in ("v1", "v2", "v3", "v4"):
            conn.execute(
                text(
                    "INSERT INTO volumes (name, pool_id, type, size_bytes) "
                    "VALUES (:n, 1, 'thin', 1073741824)"
                ),
                {"n": name},
            )
        conn.execute(text("DELETE FROM volumes WHERE name = 'v2'"))
        conn.execute(text("UPDATE volumes SET state = 'deleting' WHERE name = 'v3'"))

    with_engine(empty_db, migrate)
    run_sync(empty_db, to_before)
    assert run_sync(empty_db, current_revision) == before
    with_engine(empty_db, migrate)
    assert run_sync(empty_db, current_revision) == head_revision()
    ids = run_sync(empty_db, _add_one_of_each)  # through the ORM, after the upgrade

    def trees(conn: Connection) -> list[tuple[str, int, int]]:
        rows = conn.execute(text("SELECT name, id, vtree_id FROM volumes ORDER BY id"))
        return [(r[0], r[1], r[2]) for r in rows]

    rows = run_sync(empty_db, trees)
    assert [name for name, _, _ in rows[:3]] == ["v1", "v3", "v4"]
    assert rows[3][1] == ids["volumes"]
    assert all(vtree == vid for _, vid, vtree in rows), rows


def test_upgrade_to_vtree_records_keeps_every_volume_a_tree_of_one(empty_db: str) -> None:
    """0016 (docs/snapshots.md, "The MDM's records"): the volumes of the revision before
    it, active or deleting, read and write version 0 of their own tree, have no source,
    and add no row to ``vtrees`` or ``vtree_versions``; volume ids stay never reused."""
    from alembic import command

    def to_before(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0014")
        conn.execute(text("INSERT INTO protection_domains (name) VALUES ('pd1')"))
        conn.execute(
            text(
                "INSERT INTO storage_pools (name, protection_domain_id, pg_count, "
                "allocation_granularity_bytes, spare_percent, rebuild_bandwidth_mibps, "
                "rebuild_concurrency, rebalance_bandwidth_mibps, rebalance_concurrency, "
                "capacity_alert_high_percent, capacity_alert_critical_percent, map_epoch) "
                "VALUES ('sp1', 1, 2, 1073741824, 10, 0, 4, 50, 2, 80, 90, 3)"
            )
        )
        for name in ("v1", "v2", "v3"):
            conn.execute(
                text(
                    "INSERT INTO volumes (name, pool_id, type, size_bytes, vtree_id) "
                    "VALUES (:n, 1, 'thin', 1073741824, 0)"
                ),
                {"n": name},
            )
        conn.execute(text("UPDATE volumes SET vtree_id = id"))
        conn.execute(text("UPDATE volumes SET state = 'deleting' WHERE name = 'v2'"))
        conn.execute(text("DELETE FROM volumes WHERE name = 'v3'"))

    with_engine(empty_db, migrate)
    assert head_revision() != "0014"
    run_sync(empty_db, to_before)
    assert run_sync(empty_db, current_revision) == "0014"
    with_engine(empty_db, migrate)
    assert run_sync(empty_db, current_revision) == head_revision()

    def read(conn: Connection) -> tuple[list[tuple[Any, ...]], int, int]:
        rows = conn.execute(
            text(
                "SELECT name, vtree_id = id, view_version, writable, source_volume_id "
                "FROM volumes ORDER BY id"
            )
        )
        trees = conn.execute(text("SELECT count(*) FROM vtrees")).scalar_one()
        versions = conn.execute(text("SELECT count(*) FROM vtree_versions")).scalar_one()
        return [tuple(r) for r in rows], trees, versions

    volumes, trees, versions = run_sync(empty_db, read)
    assert [(n, bool(own), view, bool(w), src) for n, own, view, w, src in volumes] == [
        ("v1", True, 0, True, None),
        ("v2", True, 0, True, None),
    ]
    assert (trees, versions) == (0, 0)
    # the volumes table, recreated on SQLite, still never hands out a deleted id
    assert run_sync(empty_db, _add_one_of_each)["volumes"] > 3


def test_a_downgrade_never_hands_out_a_deleted_volumes_id_again(empty_db: str) -> None:
    """The downgrades of 0016 and 0015 drop columns of ``volumes``, which SQLite does by
    recreating the table: its id counter must stay at the highest id ever handed out
    (volume ids are tree ids and chunk keys), not fall to the highest id left."""
    from alembic import command

    def add_volume(conn: Connection, name: str) -> int:
        return int(
            conn.execute(
                text(
                    "INSERT INTO volumes (name, pool_id, type, size_bytes) "
                    "VALUES (:n, 1, 'thin', 1073741824) RETURNING id"
                ),
                {"n": name},
            ).scalar_one()
        )

    def populate(conn: Connection) -> int:
        conn.execute(text("INSERT INTO protection_domains (name) VALUES ('pd1')"))
        conn.execute(
            text(
                "INSERT INTO storage_pools (name, protection_domain_id, pg_count, "
                "allocation_granularity_bytes, spare_percent, rebuild_bandwidth_mibps, "
                "rebuild_concurrency, rebalance_bandwidth_mibps, rebalance_concurrency, "
                "capacity_alert_high_percent, capacity_alert_critical_percent, map_epoch) "
                "VALUES ('sp1', 1, 2, 1073741824, 10, 0, 4, 50, 2, 80, 90, 3)"
            )
        )
        ids = [add_volume(conn, f"v{i}") for i in range(3)]
        conn.execute(text("DELETE FROM volumes WHERE id = :id"), {"id": ids[-1]})
        return ids[-1]

    def down_and_add(to: str, name: str) -> Callable[[Connection], int]:
        def go(conn: Connection) -> int:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, to)
            return add_volume(conn, name)

        return go

    with_engine(empty_db, migrate)
    deleted = run_sync(empty_db, populate)
    after_0016 = run_sync(empty_db, down_and_add("0014", "w1"))
    assert after_0016 > deleted, f"id {deleted} of a deleted volume handed out again"
    run_sync(
        empty_db,
        lambda c: c.execute(text("DELETE FROM volumes WHERE id = :id"), {"id": after_0016}),
    )
    after_0015 = run_sync(empty_db, down_and_add("0013", "w2"))
    assert after_0015 > after_0016, f"id {after_0015}: a deleted volume's id handed out again"
