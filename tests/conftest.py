"""Fixtures shared by the test suite: a real PostgreSQL server, the real MDM daemon
(on SQLite and on PostgreSQL) and a small HTTP client.

- ``pg_server`` (session): a PostgreSQL cluster the tests start themselves;
  ``pg_server.create_database()`` returns the URL of a new empty database.
- ``db_url`` (module, ``sqlite`` / ``postgres``): an empty database for one module.
- ``mdm`` (module, ``sqlite`` / ``postgres``): a running ``meshblock.mdm`` process;
  see :class:`_mdm.MdmDaemon`. A module changes its config by overriding the
  ``mdm_overrides`` fixture, e.g. ``{"cluster": {"heartbeat_timeout_s": 1.0}}``.
- ``api`` (module): ``api(method, path, json=None, token=...) -> (status, body)``
  against ``mdm`` with the admin token by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _http import Api
from _mdm import MdmDaemon
from _pg import PgServer, PgUnavailable
from _process import started

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (fails if not installed)."""
    try:
        server = PgServer()
        server.start()
    except PgUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def new_database_url(backend: str, request: pytest.FixtureRequest, tmp_dir: Path) -> str:
    """The URL of a new, empty database of ``backend`` (``sqlite`` or ``postgres``)."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_dir / 'mdm.db'}"
    if backend == "postgres":
        server: PgServer = request.getfixturevalue("pg_server")
        return server.create_database()
    raise ValueError(f"unknown database backend {backend!r}")


@pytest.fixture(scope="module", params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty database for this module, SQLite and PostgreSQL in turn."""
    return new_database_url(request.param, request, tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
def mdm_overrides() -> dict[str, dict[str, Any]]:
    """Extra ``mdm.toml`` settings for the ``mdm`` fixture; override it in a module."""
    return {}


@pytest.fixture(scope="module", params=BACKENDS)
def mdm(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mdm_overrides: dict[str, dict[str, Any]],
) -> Iterator[MdmDaemon]:
    """A running MDM on a fresh database; must exit 0 on SIGTERM and leak no secret."""
    workdir = tmp_path_factory.mktemp(f"mdm-{request.param}")
    url = new_database_url(request.param, request, workdir)
    with started(MdmDaemon(workdir, url, mdm_overrides)) as daemon:
        yield daemon
    daemon.assert_no_secrets_in_log()


@pytest.fixture(scope="module")
def api(mdm: MdmDaemon) -> Api:
    """HTTP client for ``mdm``, sending the admin token unless told otherwise."""
    return Api(mdm.url, mdm.admin_token)
