"""Under pytest-xdist, each worker hands out ports from a slice of its own
(tests/_ports.py), so that two workers never start servers on the same port."""

from __future__ import annotations

import pytest

from _ports import worker_slice

pytestmark = pytest.mark.unit


def test_outside_xdist_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert worker_slice(10000, 19999) == (10000, 19999)


def test_workers_get_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for i in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{i}")
        slices.append(worker_slice(10000, 19999))
    assert slices == [(10000, 13332), (13333, 16665), (16666, 19998)]
    ports = [set(range(lo, hi + 1)) for lo, hi in slices]
    assert not (ports[0] & ports[1]) and not (ports[1] & ports[2]) and not (ports[0] & ports[2])
