"""The real MDM daemon as a subprocess, for tests.

:class:`MdmDaemon` writes an ``mdm.toml`` into a working directory, starts
``python -m meshblock.mdm --config mdm.toml`` on a free loopback port with its
output appended to ``mdm.log``, and waits for ``GET /health`` to answer 200. It can
be stopped and started again on the same database, and tells how it exited.

With ``tls=True`` it serves HTTPS with client certificates required, its identity
from the test CA (``tests/_tls.py``); the harness then calls it as ``admin:tests``,
and the SDSs and SDCs of ``tests/_sds.py`` and ``tests/_sdc.py`` present their own.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import _http
import _tls
from _process import START_TIMEOUT_S as START_TIMEOUT_S  # re-exported
from _process import STOP_TIMEOUT_S as STOP_TIMEOUT_S
from _process import HttpDaemon, ProcessError
from _process import dump_toml as dump_toml
from _process import merge as merge
from _process import toml_value as toml_value

MdmError = ProcessError  # the name this module gave it first


class MdmDaemon(HttpDaemon):
    """One MDM process (restartable) with its config, log and credentials:
    ``MdmDaemon(workdir, db_url, overrides=None)``; see :class:`_process.HttpDaemon`."""

    name = "the MDM"
    module = "meshblock.mdm"
    ready_path = "/health"

    def __init__(
        self,
        workdir: Path,
        db_url: str,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        tls: bool = False,
    ) -> None:
        self.tls = tls
        self.crl: Path | None = None  # with tls: a CRL file other than the test CA's
        self._join_token: str | None = None
        super().__init__(workdir, db_url, overrides)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def write_config(self) -> None:
        if self.tls:  # valid for the address it listens on (a test may change it)
            files = _tls.mdm_identity(self.host)
            self.settings.setdefault("tls", {"client_certs": "required"}).update(files.settings())
            if self.crl is not None:
                self.settings["tls"]["crl"] = str(self.crl)
        super().write_config()

    def initial_settings(self) -> dict[str, dict[str, Any]]:
        self.admin_token = "adm-" + secrets.token_urlsafe(24)
        self.readonly_token = "ro-" + secrets.token_urlsafe(24)
        self.cluster_secret = "cs-" + secrets.token_urlsafe(24)
        return {
            "api": {"host": self.host, "port": self.port},
            "auth": {
                "admin_token": self.admin_token,
                "readonly_token": self.readonly_token,
                "cluster_secret": self.cluster_secret,
            },
            "database": {"url": self.db_url},
            # No rebuild and no rebalance unless a test asks for them: API tests
            # register SDSs by hand that never heartbeat, and the failover tests
            # check the degraded state that precedes a rebuild.
            "cluster": {
                "name": "test",
                # the test SDSs' own interval, told to every SDS and SDC
                "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 5.0,
                "rebuild_delay_s": 3600.0,
                "rebalance_interval_s": 3600.0,
            },
            "logging": {"level": "INFO"},
        }

    def env(self) -> dict[str, str]:
        """The environment for ``meshctl`` against this MDM, as admin."""
        env = dict(os.environ)
        env["MESHCTL_MDM"] = self.url
        env["MESHCTL_TOKEN"] = self.admin_token
        if self.tls:
            env.update(_tls.meshctl_env())
        return env

    def api(self, token: str | None = None) -> _http.Api:
        return _http.Api(self.url, self.admin_token if token is None else token)

    def join_token(self) -> str:
        """A join token for the test's SDSs (docs/security.md, "Joining the
        cluster"): made once per MDM (a million uses, a year), with the admin token.
        The SDSs of an HTTPS MDM join by their certificates and need none."""
        if self._join_token is None:
            status, doc = self.api().post(
                "/api/v1/sds/join-tokens",
                {"uses": 1_000_000, "ttl_s": 365 * 24 * 3600, "description": "tests"},
            )
            assert status == 201, doc
            self._join_token = str(doc["token"])
        return self._join_token

    def create_pool(self, pd_name: str, name: str, pg_count: int) -> dict[str, Any]:
        """A new protection domain and a pool of ``pg_count`` PGs in it (the pool's doc)."""
        api = self.api()
        status, pd = api.post("/api/v1/protection-domains", {"name": pd_name})
        assert status == 201, pd
        status, pool = api.post(
            "/api/v1/pools", {"name": name, "protection_domain_id": pd["id"], "pg_count": pg_count}
        )
        assert status == 201, pool
        return dict(pool)

    def restart(self) -> None:
        rc = self.stop()
        if rc != 0:
            raise self.fail(f"the MDM exited with code {rc} on SIGTERM")
        self.start()

    def assert_no_secrets_in_log(self) -> None:
        log = self.log_text()
        for name in ("admin_token", "readonly_token", "cluster_secret"):
            if getattr(self, name) in log:
                raise ProcessError(f"the MDM log at {self.log_path} contains the {name}")
