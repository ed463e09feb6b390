"""The MDM's routes and its OpenAPI document, pinned: the routes in the order they
are matched, and a digest of the document as served.

Both were taken before the MDM's routes moved from one module-level table, filled
as the API modules were imported, to one table per module that ``create_app`` adds
explicitly (``mdm/app.py`` ``ROUTE_TABLES``). A change to the API changes them on
purpose: update ``ROUTES`` and ``OPENAPI_SHA256`` with it (the failure prints the new
digest).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from aiohttp import web

from meshblock.mdm import openapi
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, MdmConfig

pytestmark = pytest.mark.unit

ROUTES = [
    ("GET", "/api/v1/pools"),
    ("POST", "/api/v1/pools"),
    ("GET", r"/api/v1/pools/(?P<id>\d+)"),
    ("PATCH", r"/api/v1/pools/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/pools/(?P<id>\d+)"),
    ("GET", r"/api/v1/pools/(?P<id>\d+)/pgmap"),
    ("GET", "/api/v1/protection-domains"),
    ("POST", "/api/v1/protection-domains"),
    ("GET", r"/api/v1/protection\-domains/(?P<id>\d+)"),
    ("PATCH", r"/api/v1/protection\-domains/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/protection\-domains/(?P<id>\d+)"),
    ("GET", "/api/v1/fault-sets"),
    ("POST", "/api/v1/fault-sets"),
    ("GET", r"/api/v1/fault\-sets/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/fault\-sets/(?P<id>\d+)"),
    ("GET", "/api/v1/rebuild"),
    ("GET", "/api/v1/scrub"),
    ("GET", r"/api/v1/pools/(?P<id>\d+)/scrub"),
    ("POST", r"/api/v1/pools/(?P<id>\d+)/scrub/start"),
    ("POST", r"/api/v1/pools/(?P<id>\d+)/scrub/pause"),
    ("GET", "/api/v1/sdc"),
    ("POST", "/api/v1/sdc"),
    ("POST", "/api/v1/sdc/register"),
    ("GET", r"/api/v1/sdc/(?P<id>\d+)"),
    ("PATCH", r"/api/v1/sdc/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/sdc/(?P<id>\d+)"),
    ("POST", r"/api/v1/sdc/(?P<id>\d+)/heartbeat"),
    ("GET", r"/api/v1/sdc/(?P<id>\d+)/maps"),
    ("GET", "/api/v1/sds"),
    ("POST", "/api/v1/sds"),
    ("POST", "/api/v1/sds/register"),
    ("GET", r"/api/v1/sds/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/sds/(?P<id>\d+)"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/devices"),
    ("DELETE", r"/api/v1/sds/(?P<id>\d+)/devices/(?P<device_id>\d+)"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/heartbeat"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/devices/(?P<device_id>\d+)/failed"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/pg\-synced"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/pgs\-synced"),
    ("GET", "/api/v1/sds/ok-to-stop"),
    ("GET", r"/api/v1/sds/(?P<id>\d+)/pg\-copies"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/maintenance"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/drain"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/clear\-flapping"),
    ("POST", r"/api/v1/sds/(?P<id>\d+)/unreachable"),
    ("POST", "/api/v1/sds/join-tokens"),
    ("GET", "/api/v1/sds/join-tokens"),
    ("DELETE", r"/api/v1/sds/join\-tokens/(?P<id>\d+)"),
    ("GET", "/api/v1/sds/join-requests"),
    ("POST", r"/api/v1/sds/join\-requests/(?P<id>\d+)/approve"),
    ("POST", r"/api/v1/sds/join\-requests/(?P<id>\d+)/reject"),
    ("DELETE", r"/api/v1/sds/join\-requests/(?P<id>\d+)"),
    ("GET", "/api/v1/volumes"),
    ("POST", "/api/v1/volumes"),
    ("GET", r"/api/v1/volumes/(?P<id>\d+)"),
    ("PATCH", r"/api/v1/volumes/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/volumes/(?P<id>\d+)"),
    ("GET", "/api/v1/mappings"),
    ("POST", "/api/v1/mappings"),
    ("GET", r"/api/v1/mappings/(?P<id>\d+)"),
    ("PATCH", r"/api/v1/mappings/(?P<id>\d+)"),
    ("DELETE", r"/api/v1/mappings/(?P<id>\d+)"),
    ("GET", r"/api/v1/pools/(?P<id>\d+)/mappings"),
    ("GET", "/api/v1/snapshot-gc"),
    ("GET", "/api/v1/topology"),
    ("GET", "/api/v1/capacity"),
    ("GET", "/health"),
    ("GET", "/health/components"),
    ("GET", "/health/metrics"),
    ("GET", "/metrics"),
    ("HEAD", "/api/v1/openapi.json"),
    ("GET", "/api/v1/openapi.json"),
]

# sha256 of the document as served (json.dumps, keys in their order), version blanked.
OPENAPI_SHA256 = "8313db233fb2ddf4035c4efbafa0cff8eeccc2c5e3e667dde929e3f21a6c34f1"


def _app() -> web.Application:
    return create_app(MdmConfig(auth=AuthConfig(admin_token="t")))


def _pattern(resource: Any) -> str:
    """The path as the router matches it: the regular expression of a path with
    parameters (``{id:\\d+}``), else the plain path."""
    info = resource.get_info()
    return str(info["pattern"].pattern) if "pattern" in info else str(info["path"])


def test_the_routes_are_the_pinned_ones_in_the_same_order() -> None:
    served = [(r.method, _pattern(r.resource)) for r in _app().router.routes()]
    assert served == ROUTES


def test_the_openapi_document_is_the_pinned_one() -> None:
    doc = json.loads(json.dumps(_app()[openapi.OPENAPI]))
    doc["info"]["version"] = "VERSION"
    digest = hashlib.sha256(json.dumps(doc).encode()).hexdigest()
    assert digest == OPENAPI_SHA256, f"the OpenAPI document changed: sha256 now {digest}"


def test_two_apps_do_not_share_routes() -> None:
    """Each app gets its own routes: building a second one registers nothing twice."""
    first, second = _app(), _app()
    assert len(first.router.routes()) == len(second.router.routes()) == len(ROUTES)
