"""meshblock.config (TOML into frozen dataclasses, [logging], secret files) and the MDM's
MdmConfig."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from meshblock.config import ConfigError, LoggingConfig, from_mapping, load, read_secret_file
from meshblock.mdm.config import MdmConfig
from meshblock.mgmt.config import MgmtConfig
from meshblock.sdc.config import SdcConfig
from meshblock.sdc.config import cluster_secret as sdc_cluster_secret
from meshblock.sds import config as sds_config

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Inner:
    port: int = 7000
    ratio: float = 0.5


@dataclass(frozen=True)
class Sample:
    name: str = "default"
    enabled: bool = False
    tags: tuple[str, ...] = ()
    sizes: list[int] = field(default_factory=list)
    note: str | None = None
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Required:
    host: str
    port: int = 1

    def __post_init__(self) -> None:
        if self.port <= 0:
            raise ValueError("port must be positive")


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- meshblock.config -------------------------------------------------------------------


def test_defaults_for_an_empty_file(tmp_path: Path) -> None:
    cfg = load(Sample, write(tmp_path, ""))
    assert cfg == Sample()
    assert cfg.inner.port == 7000


def test_defaults_without_a_file() -> None:
    assert load(Sample, None) == Sample()


def test_values_are_loaded(tmp_path: Path) -> None:
    text = """
name = "x"
enabled = true
tags = ["a", "b"]
sizes = [1, 2]
note = "hi"
[inner]
port = 9000
ratio = 2
"""
    cfg = load(Sample, write(tmp_path, text))
    assert cfg == Sample(
        name="x", enabled=True, tags=("a", "b"), sizes=[1, 2], note="hi", inner=Inner(9000, 2)
    )
    assert isinstance(cfg.tags, tuple)
    # What the file leaves out of a table keeps its default.
    assert load(Sample, write(tmp_path, "[inner]\nport = 1\n")).inner == Inner(port=1, ratio=0.5)


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(Sample, write(tmp_path, 'name = "x"'))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("nmae = 'x'", "nmae"),
        ("[inner]\nprot = 1", "inner.prot"),
        ("[other]\nx = 1", "other"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown") as exc:
        load(Sample, write(tmp_path, text))
    assert key in str(exc.value)


def test_all_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Sample, write(tmp_path, "zzz = 1\naaa = 2\n"))
    assert "aaa" in str(exc.value)
    assert "zzz" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name = 5", "name"),
        ("enabled = 'yes'", "enabled"),
        ("enabled = 1", "enabled"),
        ("tags = 'a'", "tags"),
        ("tags = [1]", "tags"),
        ("sizes = ['1']", "sizes"),
        ("sizes = [true]", "sizes"),
        ("note = 3", "note"),
        ("[inner]\nport = '7000'", "inner.port"),
        ("[inner]\nport = 1.5", "inner.port"),
        ("[inner]\nport = true", "inner.port"),
        ("[inner]\nratio = 'half'", "inner.ratio"),
        ("[inner]\nratio = false", "inner.ratio"),
    ],
)
def test_wrong_types_are_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Sample, write(tmp_path, text))
    assert str(exc.value).startswith(f"{key}:")


def test_a_table_where_a_value_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inner"):
        load(Sample, write(tmp_path, "inner = 5"))


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match="host"):
        from_mapping(Required, {"port": 2})


def test_post_init_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="port must be positive"):
        from_mapping(Required, {"host": "h", "port": 0})


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load(Sample, missing)
    assert str(missing) in str(exc.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(Sample, tmp_path)


@pytest.mark.parametrize("text", ["name = ", "[inner", "name = 'a'\nname = 'b'", "x = [1,"])
def test_bad_toml(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid TOML") as exc:
        load(Sample, p)
    assert str(p) in str(exc.value)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(Sample, p)


# -- what every daemon's configuration shares: [logging], secret files ------------------


class HasLogging(Protocol):
    @property
    def logging(self) -> LoggingConfig: ...


DAEMON_CONFIGS: dict[str, tuple[str, Callable[[Path], HasLogging]]] = {
    # the least each daemon's file needs, and how the daemon loads it
    "mdm": ('[auth]\nadmin_token = "a"\n', lambda p: load(MdmConfig, p)),
    "mgmt": ("", lambda p: load(MgmtConfig, p)),
    "sdc": ('[mdm]\ncluster_secret = "s"\n', lambda p: load(SdcConfig, p)),
    "sds": (
        'name = "s1"\nprotection_domain = "pd"\naddress = "127.0.0.1"\n'
        'cluster_secret = "s"\n[[devices]]\npath = "/d"\ncapacity = "8MiB"\npool = "p"\n',
        sds_config.load,
    ),
}


@pytest.mark.parametrize("daemon", sorted(DAEMON_CONFIGS))
def test_every_daemon_has_the_same_logging_table(daemon: str, tmp_path: Path) -> None:
    text, loader = DAEMON_CONFIGS[daemon]
    cfg = loader(write(tmp_path, text + '[logging]\nlevel = "debug"\n'))
    assert isinstance(cfg.logging, LoggingConfig)
    assert cfg.logging.level == "debug"
    with pytest.raises(ConfigError) as exc:
        loader(write(tmp_path, text + '[logging]\nlevel = "TRACE"\n'))
    assert str(exc.value) == "logging: level must be DEBUG, INFO, WARNING or ERROR, got 'TRACE'"
    with pytest.raises(ConfigError, match=r"unknown configuration key\(s\): logging.file"):
        loader(write(tmp_path, text + '[logging]\nfile = "/x"\n'))


def test_a_secret_file_is_read_without_surrounding_whitespace(tmp_path: Path) -> None:
    secret = write(tmp_path, "\n  s3cret-value \n", "secret")
    assert read_secret_file(secret, "cluster_secret_file") == "s3cret-value"
    assert read_secret_file(str(secret), "cluster_secret_file") == "s3cret-value"


def test_a_secret_file_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as exc:
        read_secret_file(missing, "cluster_secret_file")
    assert str(exc.value) == f"cannot read cluster_secret_file {missing}: No such file or directory"
    with pytest.raises(ConfigError, match=f"cannot read mdm.cluster_secret_file {tmp_path}: "):
        read_secret_file(tmp_path, "mdm.cluster_secret_file")  # a directory
    for blank in ("", " \n\t\n"):
        empty = write(tmp_path, blank, "empty")
        with pytest.raises(ConfigError) as exc:
            read_secret_file(empty, "cluster_secret_file")
        assert str(exc.value) == f"cluster_secret_file {empty} is empty"
    binary = tmp_path / "binary"
    binary.write_bytes(b"s3cret\xff\xfe")
    with pytest.raises(ConfigError) as exc:
        read_secret_file(binary, "cluster_secret_file")
    assert str(exc.value) == f"cluster_secret_file {binary} is not UTF-8 text"


def test_sds_and_sdc_read_their_secret_file_the_same_way(tmp_path: Path) -> None:
    """Both daemons name their own key in the error, and read the same value."""
    secret = write(tmp_path, "s3cret\n", "secret")
    sds_text, _ = DAEMON_CONFIGS["sds"]
    sds_text = sds_text.replace('cluster_secret = "s"', f'cluster_secret_file = "{secret}"')
    sds = sds_config.load(write(tmp_path, sds_text))
    sdc = load(SdcConfig, write(tmp_path, f'[mdm]\ncluster_secret_file = "{secret}"\n'))
    assert sds.secret() == sdc_cluster_secret(sdc) == "s3cret"
    secret.write_bytes(b"\xff")
    with pytest.raises(ConfigError, match=r"^cluster_secret_file .* is not UTF-8 text$"):
        sds.secret()
    with pytest.raises(ConfigError, match=r"^mdm\.cluster_secret_file .* is not UTF-8 text$"):
        sdc_cluster_secret(sdc)


def test_sdc_nbd_tls_min_version_is_1_3_or_1_2(tmp_path: Path) -> None:
    """``[nbd] tls_min_version``: "1.3" by default, "1.2" admitted; anything else is
    an error naming the key."""
    text = '[mdm]\ncluster_secret = "s"\n[nbd]\n'
    assert load(SdcConfig, write(tmp_path, text)).nbd.tls_min_version == "1.3"
    config = load(SdcConfig, write(tmp_path, text + 'tls_min_version = "1.2"\n'))
    assert config.nbd.tls_min_version == "1.2"
    for bad in ('"1.1"', '"1.0"', '"TLSv1.2"', '"1.4"', '""'):
        with pytest.raises(ConfigError) as exc:
            load(SdcConfig, write(tmp_path, text + f"tls_min_version = {bad}\n"))
        assert str(exc.value) == (
            'config: nbd.tls_min_version must be "1.3" (the default) or "1.2" (TLS 1.2 '
            f"admitted too, for nbd-client), not {bad[1:-1]!r}"
        )
    with pytest.raises(ConfigError, match=r"^nbd\.tls_min_version: expected str, got float 1\.2$"):
        load(SdcConfig, write(tmp_path, text + "tls_min_version = 1.2\n"))


# -- MdmConfig --------------------------------------------------------------------------

ADMIN = "admin-Secret-1"
READONLY = "readonly-Secret-2"
CLUSTER = "cluster-Secret-3"

FULL_MDM = f"""
[api]
host = "0.0.0.0"
port = 7611

[auth]
admin_token = "{ADMIN}"
readonly_token = "{READONLY}"
cluster_secret = "{CLUSTER}"

[database]
url = "postgresql+asyncpg://mdm:pw@db/mdm"
echo = true

[cluster]
name = "lab"
heartbeat_timeout_s = 3
longpoll_max_s = 20.0

[logging]
level = "DEBUG"
"""


def test_mdm_config_full(tmp_path: Path) -> None:
    cfg = load(MdmConfig, write(tmp_path, FULL_MDM))
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 7611)
    assert cfg.auth.admin_token == ADMIN
    assert cfg.auth.readonly_token == READONLY
    assert cfg.auth.cluster_secret == CLUSTER
    assert cfg.database.url == "postgresql+asyncpg://mdm:pw@db/mdm"
    assert cfg.database.echo is True
    assert cfg.cluster.name == "lab"
    assert cfg.cluster.heartbeat_timeout_s == 3
    assert cfg.cluster.longpoll_max_s == 20.0
    assert cfg.logging.level == "DEBUG"


def test_mdm_config_defaults(tmp_path: Path) -> None:
    cfg = load(MdmConfig, write(tmp_path, f'[auth]\nadmin_token = "{ADMIN}"\n'))
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 6611)
    assert cfg.auth.readonly_token == ""
    assert cfg.auth.cluster_secret == ""
    assert cfg.database.url.startswith("sqlite+aiosqlite:///")
    assert cfg.database.echo is False
    assert cfg.cluster.heartbeat_timeout_s == 10.0
    assert cfg.cluster.longpoll_max_s > 0
    assert cfg.logging.level == "INFO"


@pytest.mark.parametrize("text", ["", "[auth]\n", '[auth]\nadmin_token = ""\n'])
def test_mdm_admin_token_is_required(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="admin_token"):
        load(MdmConfig, write(tmp_path, text))


def test_mdm_without_a_file_needs_an_admin_token() -> None:
    with pytest.raises(ConfigError, match="admin_token"):
        load(MdmConfig, None)


@pytest.mark.parametrize(
    ("readonly", "cluster"),
    [(ADMIN, CLUSTER), (READONLY, ADMIN), (READONLY, READONLY), (ADMIN, ADMIN)],
)
def test_mdm_tokens_must_differ(tmp_path: Path, readonly: str, cluster: str) -> None:
    text = (
        f'[auth]\nadmin_token = "{ADMIN}"\n'
        f'readonly_token = "{readonly}"\ncluster_secret = "{cluster}"\n'
    )
    with pytest.raises(ConfigError, match="differ") as exc:
        load(MdmConfig, write(tmp_path, text))
    for secret in (ADMIN, READONLY, CLUSTER):
        assert secret not in str(exc.value)


def test_mdm_unset_optional_credentials_may_both_be_empty(tmp_path: Path) -> None:
    cfg = load(MdmConfig, write(tmp_path, f'[auth]\nadmin_token = "{ADMIN}"\n'))
    assert cfg.auth.readonly_token == cfg.auth.cluster_secret == ""


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_mdm_heartbeat_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    text = f'[auth]\nadmin_token = "{ADMIN}"\n[cluster]\nheartbeat_timeout_s = {value}\n'
    with pytest.raises(ConfigError, match="heartbeat_timeout_s"):
        load(MdmConfig, write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[api]\nhots = 'x'", "api.hots"),
        ("[auth]\nadmin = 'x'", "auth.admin"),
        ("[database]\nuri = 'x'", "database.uri"),
        ("[cluster]\nheartbeat_timeout = 1", "cluster.heartbeat_timeout"),
        ("[sds]\nport = 1", "sds"),
        ("port = 6611", "port"),
    ],
)
def test_mdm_unknown_keys(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown") as exc:
        load(MdmConfig, write(tmp_path, f'{text}\n[logging]\nlevel = "INFO"\n'))
    assert key in str(exc.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[api]\nport = '6611'", "api.port"),
        ("[api]\nhost = 127", "api.host"),
        ("[database]\necho = 'yes'", "database.echo"),
        ("[cluster]\nheartbeat_timeout_s = '10s'", "cluster.heartbeat_timeout_s"),
    ],
)
def test_mdm_wrong_types(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(MdmConfig, write(tmp_path, f'[auth]\nadmin_token = "{ADMIN}"\n{text}\n'))
    assert str(exc.value).startswith(f"{key}:")


def test_mdm_repr_hides_secrets(tmp_path: Path) -> None:
    cfg = load(MdmConfig, write(tmp_path, FULL_MDM))
    for text in (repr(cfg), str(cfg), repr(cfg.auth), str(cfg.auth), f"{cfg!r}"):
        for secret in (ADMIN, READONLY, CLUSTER):
            assert secret not in text
    assert "***" in repr(cfg.auth)
    # The rest of the configuration is still shown.
    assert "7611" in repr(cfg)


def test_mdm_repr_hides_the_database_password(tmp_path: Path) -> None:
    cfg = load(MdmConfig, write(tmp_path, FULL_MDM.replace(":pw@", ":hunter2@")))
    assert "hunter2" not in repr(cfg)
