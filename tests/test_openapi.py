"""The OpenAPI document: in step with the routes, valid, and fuzzed by schemathesis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _http import Api
from _mdm import MdmDaemon
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, MdmConfig

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def mdm_overrides() -> dict[str, dict[str, Any]]:
    # Long-polls give up after a second, so that the fuzzer does not wait on them.
    return {"cluster": {"longpoll_max_s": 1.0}}


def app_routes() -> set[tuple[str, str]]:
    app = create_app(MdmConfig(auth=AuthConfig(admin_token="t")))
    out = set()
    for route in app.router.routes():
        if route.method in METHODS and route.resource is not None:
            path = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.resource.canonical)
            out.add((route.method, path))
    return out


def test_document_matches_routes(api: Api) -> None:
    status, doc = api("GET", "/api/v1/openapi.json", token=None)
    assert status == 200
    assert doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = app_routes()
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations that no route serves"


def test_document_is_complete(api: Api) -> None:
    _, doc = api("GET", "/api/v1/openapi.json", token=None)
    schemas = doc["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', repr(doc).replace("'", '"')))
    assert refs <= set(schemas), f"dangling $refs: {refs - set(schemas)}"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), f"{method} {path} has no summary"
            assert op["responses"], f"{method} {path} documents no response"
            if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
                assert op["security"] == [{"bearer": []}], f"{method} {path} is not protected"
                assert "401" in op["responses"]


def test_schemathesis_finds_no_server_error(mdm: MdmDaemon, tmp_path: Path) -> None:
    """Fuzz every operation with the admin token: no 5xx, responses match the document,
    schema-violating requests are refused."""
    cmd = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{mdm.url}/api/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {mdm.admin_token}",
        "--checks",
        ",".join(
            [
                "not_a_server_error",
                "status_code_conformance",
                "content_type_conformance",
                "response_schema_conformance",
                "negative_data_rejection",
                "unsupported_method",
                "allow_header_conformance",
            ]
        ),
        "--max-examples",
        "8",
        "--workers",
        "2",
        "--seed",
        "1",
        "--request-timeout",
        "20",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = proc.stdout[-12000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"schemathesis found problems:\n{report}"
    assert "Tested:" in proc.stdout
    assert mdm.admin_token not in mdm.log_text()
    # aiohttp logs the malformed HTTP it refuses; the MDM's own code must not fail.
    assert "unhandled error" not in mdm.log_text(), mdm.log_text()[-5000:]
