"""MGMT's defences that need no running service: where ``next=`` may send a browser
after login, and the depth limit of the JSON bodies of MGMT's and the MDM's APIs
(meshblock.json_body). The same defences are tested through the running services in
``test_mgmt.py`` and ``test_api.py``."""

from __future__ import annotations

import pytest

from meshblock.http_errors import BadRequest
from meshblock.json_body import MAX_DEPTH, parse_object, too_deep
from meshblock.mgmt.pages import safe_next

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "target",
    [
        "/\t/evil.example",  # browsers drop the TAB: //evil.example
        "/\n/evil.example",
        "/\r/evil.example",
        "//evil.example",
        "/\\evil.example",  # browsers read \ as /
        "\\\\evil.example",
        "https://evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/\x00/evil.example",
        "/\x7f",
        "/\x85/evil.example",
        "",
        None,
    ],
)
def test_next_refuses_anything_but_a_local_path(target: str | None) -> None:
    assert safe_next(target) == "/health"


@pytest.mark.parametrize(
    "target", ["/alerts", "/alerts?status=active&offset=50#alert-3", "/health/x%2F%2Fy", "/"]
)
def test_next_keeps_a_local_path(target: str) -> None:
    assert safe_next(target) == target


def test_json_depth_limit() -> None:
    at_limit = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert not too_deep(parse_object(b'{"a": ' + at_limit[2:-2] + b"}")["a"])
    assert too_deep([[1]], limit=1) and not too_deep([1, {"a": 2}], limit=2)
    for raw in (
        b"[" * 10_000,  # the decoder's recursion limit: RecursionError inside json
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1),  # decodes, too deep
    ):
        with pytest.raises(BadRequest, match=f"nested deeper than {MAX_DEPTH} levels"):
            parse_object(raw)
    assert parse_object(b'{"a": ' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH)
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_object(b"[1]")
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_object(b"{nope")
    assert parse_object(b"  ") == {}
