"""Every test has exactly one tier (tests/conftest.py): the check names the tests
that have none or two, so that a new module without ``pytestmark`` fails the run
instead of falling out of `make test-quick`."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from conftest import tier_problems

pytestmark = pytest.mark.unit


@dataclass
class FakeItem:
    nodeid: str
    marks: list[str] = field(default_factory=list)

    def iter_markers(self) -> list[pytest.Mark]:
        return [getattr(pytest.mark, name).mark for name in self.marks]


def test_each_test_needs_exactly_one_tier() -> None:
    items = [
        FakeItem("tests/test_a.py::test_unit", ["unit"]),
        FakeItem("tests/test_a.py::test_pg", ["postgres", "cluster"]),
        FakeItem("tests/test_new.py::test_forgotten", ["parametrize"]),
        FakeItem("tests/test_b.py::test_both", ["unit", "cluster", "unit"]),
    ]
    assert tier_problems(items) == [  # type: ignore[arg-type]
        "tests/test_new.py::test_forgotten: has no tier",
        "tests/test_b.py::test_both: has cluster and unit",
    ]


def test_this_suite_is_tiered(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
