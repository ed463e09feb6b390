"""The table of what SDS and SDC certificates may call (meshblock.mdm.authz.BINDINGS)
against the MDM's routes: in-process, no server."""

from __future__ import annotations

import re

import pytest

from meshblock.auth import Role
from meshblock.mdm.app import ROUTE_TABLES
from meshblock.mdm.authz import BINDINGS, CERT_ROLES, NOT_FOR_SECRET
from meshblock.pki import Kind

pytestmark = pytest.mark.unit

SPECS = {(s.method, s.openapi_path): s for table in ROUTE_TABLES for s in table.specs}


def test_every_component_route_says_whose_it_is() -> None:
    """A component route without a binding would be refused to every SDS and SDC
    certificate; a binding without its route would guard nothing."""
    component = {key for key, spec in SPECS.items() if spec.role == Role.COMPONENT}
    assert component == set(BINDINGS)


@pytest.mark.parametrize("key", sorted(BINDINGS), ids=lambda k: f"{k[0]} {k[1]}")
def test_a_binding_names_a_path_parameter_or_body_field_of_its_route(
    key: tuple[str, str],
) -> None:
    binding, spec = BINDINGS[key], SPECS[key]
    assert binding.kinds <= {Kind.SDS, Kind.SDC}
    if binding.path is not None:
        assert binding.path in re.findall(r"\{(\w+)\}", spec.openapi_path)
    if binding.body is not None:
        assert spec.body is not None and binding.body in spec.body["required"]
    assert binding.path is None or binding.body is None


def test_only_admin_certificates_change_the_topology() -> None:
    assert {k for k, r in CERT_ROLES.items() if r == Role.ADMIN} == {Kind.ADMIN}
    assert set(CERT_ROLES) == set(Kind)


def test_the_routes_refused_to_the_cluster_secret_are_component_routes_sdss_read() -> None:
    """The mappings are an SDS certificate's (docs/security.md): the cluster secret,
    on every SDC host, may not read them."""
    assert ("GET", "/api/v1/pools/{id}/mappings") in NOT_FOR_SECRET
    for key in NOT_FOR_SECRET:
        assert SPECS[key].role == Role.COMPONENT and BINDINGS[key].kinds == {Kind.SDS}
