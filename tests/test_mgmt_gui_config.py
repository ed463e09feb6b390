"""The cluster pages' settings, in process: how MGMT authenticates its actions to the
MDM (``[mdm] admin_cert``/``admin_key`` or ``admin_token_file``, none by default) and
how a size typed in a form is read (docs/mgmt.md, "Cluster pages")."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import _tls
from meshblock.config import ConfigError
from meshblock.mgmt.config import MdmConfig, MgmtConfig
from meshblock.mgmt.errors import Invalid
from meshblock.mgmt.inventory import actions_link, size_of
from meshblock.tls import TlsConfig

pytestmark = pytest.mark.unit

GIB = 1 << 30
MDM_URL = "https://127.0.0.1:6611"


def config(tls: TlsConfig | None = None, **mdm: Any) -> MgmtConfig:
    return MgmtConfig(mdm=replace(MdmConfig(url=MDM_URL), **mdm), tls=tls or TlsConfig())


def mgmt_tls() -> TlsConfig:
    files = _tls.identity("mgmt:mgmt")
    return TlsConfig(cert=str(files.cert), key=str(files.key), ca=str(files.ca))


def test_no_admin_credential_by_default() -> None:
    assert actions_link(config(mgmt_tls())) is None
    assert actions_link(MgmtConfig(tls=mgmt_tls())) is None


def test_an_admin_certificate_acts_as_its_identity() -> None:
    admin = _tls.identity("admin:mgmt")
    found = actions_link(config(mgmt_tls(), admin_cert=str(admin.cert), admin_key=str(admin.key)))
    assert found is not None
    link, headers, who = found
    assert who == "admin:mgmt" and str(link.identity) == "admin:mgmt"
    assert link.context is not None
    assert "Authorization" not in headers  # the certificate decides, no token is sent


def test_the_admin_token_file_is_sent_as_a_bearer_token(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("adm-secret\n")
    token.chmod(0o600)
    found = actions_link(config(TlsConfig(ca=mgmt_tls().ca), admin_token_file=str(token)))
    assert found is not None
    link, headers, who = found
    assert headers == {"Authorization": "Bearer adm-secret"}
    assert link.identity is None and "adm-secret" not in who


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"admin_cert": "/x.pem"}, r"admin_cert and admin_key go together"),
        ({"admin_key": "/x.key"}, r"admin_cert and admin_key go together"),
        (
            {"admin_cert": "/x.pem", "admin_key": "/x.key", "admin_token_file": "/t"},
            r"exclude each other",
        ),
        ({"admin_token_file": "/nonexistent/admin.token"}, r"mdm.admin_token_file"),
    ],
)
def test_bad_admin_settings_are_refused(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        actions_link(config(mgmt_tls(), **settings))


def test_the_admin_certificate_must_name_an_admin() -> None:
    other = _tls.identity("mgmt:other")
    with pytest.raises(ConfigError, match=r"\[mdm\] admin_cert .*not an identity of kind admin"):
        actions_link(config(mgmt_tls(), admin_cert=str(other.cert), admin_key=str(other.key)))
    admin = _tls.identity("admin:mgmt")
    with pytest.raises(ConfigError, match=r"admin_cert needs \[tls\] ca"):
        actions_link(config(admin_cert=str(admin.cert), admin_key=str(admin.key)))


@pytest.mark.parametrize(
    ("typed", "size"),
    [("4", 4 * GIB), (" 16 ", 16 * GIB), ("1.5", 3 * GIB // 2), ("512MiB", 512 << 20)],
)
def test_a_size_without_a_unit_is_gib(typed: str, size: int) -> None:
    assert size_of(typed) == size


@pytest.mark.parametrize("typed", ["", "0", "-1", "4 parsecs", "9" * 5000])
def test_a_size_that_cannot_be_read_is_invalid(typed: str) -> None:
    with pytest.raises(Invalid, match="size"):
        size_of(typed)
