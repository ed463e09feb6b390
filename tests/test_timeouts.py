"""The adaptive per-attempt timeout (meshblock/timeouts.py): short for an SDS that
answers quickly, longer for one whose disk is slow, never past the ceiling."""

from __future__ import annotations

import pytest

from meshblock.timeouts import RECOMPUTE_EVERY, LatencyBudgets, adaptive_timeout

pytestmark = pytest.mark.unit

KNOBS = {"floor": 1.5, "factor": 4.0, "ceiling": 10.0}


def test_without_samples_the_floor() -> None:
    assert adaptive_timeout([], **KNOBS) == 1.5
    assert adaptive_timeout([], floor=3.0, factor=4.0, ceiling=2.0) == 2.0


def test_a_fast_sds_gets_the_floor() -> None:
    assert adaptive_timeout([0.001] * 500 + [0.02] * 5, **KNOBS) == 1.5


def test_a_slow_disk_gets_factor_times_its_p99() -> None:
    samples = [0.05] * 980 + [0.8] * 20  # 2% of requests take 0.8 s: p99 is 0.8 s
    assert adaptive_timeout(samples, **KNOBS) == pytest.approx(3.2)
    # 1% is the nearest rank: the 990th of 1000 samples
    assert adaptive_timeout([0.1] * 990 + [5.0] * 10, **KNOBS) == pytest.approx(1.5)
    assert adaptive_timeout([0.1] * 989 + [0.5] * 11, **KNOBS) == pytest.approx(2.0)


def test_never_past_the_ceiling() -> None:
    assert adaptive_timeout([4.0] * 100, **KNOBS) == 10.0


def test_budgets_follow_the_recent_window_per_key() -> None:
    b = LatencyBudgets(floor=1.5, factor=4.0, ceiling=10.0, window=100)
    assert b.budget(7) == 1.5  # unknown: the floor
    for _ in range(100):
        b.record(7, 0.9)
    assert b.budget(7) == pytest.approx(3.6)
    assert b.budget(8) == 1.5  # per key
    # the disk got fast again: once the window holds only fast samples, the floor
    for _ in range(100 + RECOMPUTE_EVERY):
        b.record(7, 0.01)
    assert b.budget(7) == 1.5
    assert b.budgets() == {7: 1.5}


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(ValueError):
        LatencyBudgets(floor=0, factor=4.0, ceiling=10.0)


def test_a_silent_key_is_left_alone_for_its_budget() -> None:
    b = LatencyBudgets(floor=1.5, factor=4.0, ceiling=10.0)
    b.silence(3, now=100.0)
    assert b.silent(3, 101.4) and not b.silent(4, 101.4)
    assert not b.silent(3, 101.6)
    assert b.silent_until == {}  # forgotten once over
