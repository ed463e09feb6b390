"""Reading the metrics and health details of the SDS, SDC and MGMT in tests.

Those need a read credential (meshblock.metrics_access): the harness gives every SDS,
SDC and MGMT it starts ``[metrics] token_file`` with :data:`METRICS_TOKEN` (one per
test process), and :func:`get` sends it. Over HTTPS the default client certificate
(``admin:tests``, ``tests/_http.py``) may read, and the token is not looked at.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import _http

METRICS_TOKEN = "mtk-" + secrets.token_urlsafe(24)
TOKEN_FILE = "metrics_token"


def token_file(workdir: Path) -> str:
    """Write :data:`METRICS_TOKEN` to ``workdir`` (mode 0600); its path, for
    ``[metrics] token_file``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / TOKEN_FILE
    path.write_text(METRICS_TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def get(base_url: str, path: str, timeout: float = 5.0) -> _http.Response:
    """``GET base_url + path`` with the read token."""
    return _http.request("GET", base_url + path, timeout=timeout, token=METRICS_TOKEN)
