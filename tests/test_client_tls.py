"""``[tls]`` of the SDS, SDC and MGMT (meshblock.tls): which MDM URLs may be HTTPS or
plain, and whose certificate each may present. In-process: files in a temporary
directory, no connection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshblock import pki
from meshblock.config import ConfigError, from_mapping
from meshblock.mgmt.app import mdm_tls_of as mgmt_tls
from meshblock.mgmt.config import MgmtConfig
from meshblock.sdc.config import SdcConfig, sdc_guid
from meshblock.sdc.mdm_client import mdm_tls_of as sdc_tls
from meshblock.sds.config import from_dict as sds_config
from meshblock.sds.mdm_client import mdm_tls_of as sds_tls
from meshblock.tls import TlsConfig, mdm_tls

pytestmark = pytest.mark.unit

GUID = "4f1c2a7e-0b6d-4c1e-9a55-3f2b8e7d1c90"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> pki.Ca:
    return pki.Ca.init(tmp_path_factory.mktemp("pki") / "ca")


def files(ca: pki.Ca, text: str) -> dict[str, str]:
    """``[tls]`` for identity ``text`` of ``ca`` (issued once per module and text)."""
    ident = pki.Identity.parse(text)
    out = ca.root.parent / text.replace(":", "-")
    paths = pki.identity_paths(out, ident)
    if not paths["cert"].exists():
        cert, key = ca.issue(ident)
        pki.write_identity(out, ident, cert, key, ca.load()[0])
    return {
        "cert": str(paths["cert"]),
        "key": str(paths["key"]),
        "ca": str(ca.cert_path),
        "crl": str(ca.crl_path),
    }


def sds(url: str, tls: dict[str, str] | None = None, name: str = "sds1") -> Any:
    doc: dict[str, Any] = {
        "name": name,
        "protection_domain": "pd1",
        "address": "127.0.0.1",
        "cluster_secret": "s",
        "mdm_urls": [url],
        "devices": [{"path": "/dev/null", "capacity": "64MiB", "pool": "p"}],
    }
    if tls is not None:
        doc["tls"] = tls
    return sds_config(doc)


def sdc(url: str, tls: dict[str, str] | None = None, **sdc_keys: str) -> SdcConfig:
    doc: dict[str, Any] = {"mdm": {"urls": [url], "cluster_secret": "s"}, "sdc": sdc_keys}
    if tls is not None:
        doc["tls"] = tls
    return from_mapping(SdcConfig, doc)


def mgmt(url: str, tls: dict[str, str] | None = None) -> MgmtConfig:
    doc: dict[str, Any] = {"mdm": {"url": url}}
    if tls is not None:
        doc["tls"] = tls
    return from_mapping(MgmtConfig, doc)


def test_the_default_mdm_urls_are_https() -> None:
    """Plain HTTP only when a URL says so: a config that names no MDM means HTTPS."""
    assert sds_config(
        {
            "name": "a",
            "protection_domain": "p",
            "address": "x",
            "cluster_secret": "s",
            "devices": [{"path": "/d", "capacity": "64MiB", "pool": "p"}],
        }
    ).mdm_urls == ("https://127.0.0.1:6611",)
    assert from_mapping(SdcConfig, {"mdm": {"cluster_secret": "s"}}).mdm.urls == [
        "https://127.0.0.1:6611"
    ]
    assert MgmtConfig().mdm.url == "https://127.0.0.1:6611"


Check = Callable[[str, dict[str, str] | None], Any]
CHECKS: list[tuple[str, Check, str]] = [
    ("sds", lambda url, tls: sds_tls(sds(url, tls)), "sds:sds1"),
    ("sdc", lambda url, tls: sdc_tls(sdc(url, tls)), f"sdc:{GUID}"),
    ("mgmt", lambda url, tls: mgmt_tls(mgmt(url, tls)), "mgmt:mgmt1"),
]


@pytest.mark.parametrize(("kind", "check", "who"), CHECKS, ids=[c[0] for c in CHECKS])
def test_https_with_the_cluster_ca_and_a_certificate_of_its_own(
    ca_dir: pki.Ca, kind: str, check: Check, who: str
) -> None:
    link = check("https://mdm1:6611", files(ca_dir, who))
    assert link.context is not None and link.identity == pki.Identity.parse(who)
    # The CA alone: the MDM's certificate is checked, the client has none (a token).
    link = check("https://mdm1:6611", {"ca": str(ca_dir.cert_path)})
    assert link.context is not None and link.identity is None
    # Plain HTTP, written out, without [tls].
    link = check("http://mdm1:6611", None)
    assert link.context is None and link.identity is None


@pytest.mark.parametrize(("kind", "check", "who"), CHECKS, ids=[c[0] for c in CHECKS])
def test_no_silent_plain_http_and_no_https_without_the_ca(
    ca_dir: pki.Ca, kind: str, check: Check, who: str
) -> None:
    with pytest.raises(ConfigError, match="needs \\[tls\\] ca"):
        check("https://mdm1:6611", None)
    with pytest.raises(ConfigError, match="is plain HTTP, but \\[tls\\] is set"):
        check("http://mdm1:6611", files(ca_dir, who))


@pytest.mark.parametrize(("kind", "check", "who"), CHECKS, ids=[c[0] for c in CHECKS])
def test_a_certificate_of_another_kind_is_refused(
    ca_dir: pki.Ca, kind: str, check: Check, who: str
) -> None:
    other = "admin:alice" if kind != "sds" else "sdc:" + GUID
    with pytest.raises(ConfigError, match=f"not an identity of kind {kind}"):
        check("https://mdm1:6611", files(ca_dir, other))


def test_an_sds_certificate_must_name_this_sds(ca_dir: pki.Ca) -> None:
    with pytest.raises(ConfigError, match="names sds:sds2, but this SDS is sds:sds1"):
        sds_tls(sds("https://mdm1:6611", files(ca_dir, "sds:sds2")))


def test_the_sdc_takes_its_guid_from_its_certificate(ca_dir: pki.Ca, tmp_path: Path) -> None:
    """The GUID is the certificate's, kept in the state directory; a configured GUID
    or one kept there that differs is refused (the SDC would lose its mappings)."""
    tls = files(ca_dir, f"sdc:{GUID}")
    config = sdc("https://m:1", tls, state_dir=str(tmp_path / "a"))
    assert sdc_guid(config, GUID) == GUID
    assert (tmp_path / "a" / "guid").read_text().strip() == GUID
    with pytest.raises(ConfigError, match="but \\[sdc\\] guid is other-guid"):
        sdc_guid(sdc("https://m:1", tls, guid="other-guid"), GUID)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "guid").write_text("older-guid\n")
    with pytest.raises(ConfigError, match="issue it a certificate for sdc:older-guid"):
        sdc_guid(sdc("https://m:1", tls, state_dir=str(tmp_path / "b")), GUID)


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"cert": "/c"}, "tls.cert and tls.key go together"),
        ({"cert": "/c", "key": "/k"}, "need tls.ca"),
        ({"crl": "/crl"}, "need tls.ca"),
    ],
)
def test_an_incomplete_tls_section_is_refused(tls: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        from_mapping(SdcConfig, {"mdm": {"cluster_secret": "s"}, "tls": tls})


def test_missing_files_and_foreign_urls_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        mdm_tls(TlsConfig(ca=str(tmp_path / "none.crt")), ["https://m:1"], pki.Kind.SDS)
    with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
        mdm_tls(TlsConfig(), ["ftp://m:1"], pki.Kind.SDS)
