"""Fixtures shared by the test suite: a real PostgreSQL server, the real MDM daemon
(on SQLite and on PostgreSQL) and a small HTTP client.

- ``host_lab`` (session): the host lab, one per run for every ``lab`` module.
- ``pg_server`` (session): a PostgreSQL cluster the tests start themselves;
  ``pg_server.create_database()`` returns the URL of a new empty database.
- ``db_url`` (module, ``sqlite`` / ``postgres``): an empty database for one module.
- ``mdm`` (module, ``sqlite`` / ``postgres``): a running ``meshblock.mdm`` process;
  see :class:`_mdm.MdmDaemon`. A module changes its config by overriding the
  ``mdm_overrides`` fixture, e.g. ``{"cluster": {"heartbeat_timeout_s": 1.0}}``.
- ``api`` (module): ``api(method, path, json=None, token=...) -> (status, body)``
  against ``mdm`` with the admin token by default.

Every test belongs to exactly one tier, a marker registered in pyproject.toml and set
per module (``pytestmark = pytest.mark.unit``): ``unit`` (in-process only: no
subprocess, no socket), ``cluster`` (daemons, tools or servers on loopback) or
``lab`` (the host lab). A collected test with no tier, or with two, fails
(:func:`pytest_collection_modifyitems`): `make test-quick` runs ``-m unit``, and a test
without a tier must not silently fall out of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _hostlab import HostLab, LabUnavailable, shared_lab
from _http import Api
from _mdm import MdmDaemon
from _pg import PgServer, PgUnavailable
from _process import started

TIERS = ("unit", "cluster", "lab")
TIER_PROBLEM = pytest.StashKey[str]()

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def tier_problem(item: pytest.Item) -> str | None:
    """Why ``item`` has no single tier (None when it has one)."""
    tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
    if len(tiers) == 1:
        return None
    return f"{item.nodeid}: has {' and '.join(tiers)}" if tiers else f"{item.nodeid}: has no tier"


def tier_problems(items: list[pytest.Item]) -> list[str]:
    """One line per test that has no tier marker, or more than one."""
    return [p for item in items if (p := tier_problem(item)) is not None]


TIER_HELP = (
    "every test needs exactly one tier: start the module with `pytestmark = "
    "pytest.mark.unit` (no subprocess, no socket), `pytest.mark.cluster` or "
    "`pytest.mark.lab` (tests/conftest.py)"
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a single tier is given every tier, so that any tier's run
    selects it (`make test-quick` too), and fails in its setup, before its fixtures
    (under pytest-xdist a collection error would only say that a worker crashed).
    The lab's tests go last."""
    for item in items:
        problem = tier_problem(item)
        if problem is not None:
            item.stash[TIER_PROBLEM] = problem
            for tier in TIERS:
                item.add_marker(tier)
    # The lab tests last (in file order): the one lab of the run (``host_lab``) is
    # torn down when the session ends, so nothing else runs next to its hosts and VM.
    items.sort(key=lambda item: item.get_closest_marker("lab") is not None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    problem = item.stash.get(TIER_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"{problem}; {TIER_HELP}", pytrace=False)


@pytest.fixture(scope="session")
def host_lab() -> Iterator[HostLab]:
    """The host lab (tests/_hostlab.py), built once per run for every ``lab`` test
    that asks for it, and removed at the end of the run."""
    try:
        yield from shared_lab()
    except LabUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


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
