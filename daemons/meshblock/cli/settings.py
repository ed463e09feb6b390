"""Where the MDM is and which token to present: flags, environment, config file.

Each setting is taken from the first place that has it:

1. the command line: ``--mdm URL`` and ``--token T`` or ``--token-file PATH`` (``--token``
   puts the token where every user of the host can read it, the process list: meshctl
   warns and names the better places);
2. the environment: ``MESHCTL_MDM`` and ``MESHCTL_TOKEN``;
3. the config file: ``--config PATH``, else ``$XDG_CONFIG_HOME/meshblock/meshctl.toml``
   (``~/.config/meshblock/meshctl.toml`` when ``XDG_CONFIG_HOME`` is unset), with
   the keys ``mdm`` and ``token``;
4. the default address ``http://127.0.0.1:6611`` (there is no default token).

For an MDM served over HTTPS by the cluster's own CA (docs/security.md), ``tls_ca``
names the CA certificate to trust instead of the system's, and ``tls_cert`` with
``tls_key`` an admin certificate to present (``meshctl ca issue admin:NAME``): from
``MESHCTL_TLS_CA``, ``MESHCTL_TLS_CERT``, ``MESHCTL_TLS_KEY``, else the config file.

``mdm`` may name several MDMs, comma-separated (or a TOML list in the file); the
client fails over between them in that order.
"""

from __future__ import annotations

import os
import stat
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshblock.cli.errors import CliError
from meshblock.config import ConfigError, load, read_secret_file

DEFAULT_MDM = "http://127.0.0.1:6611"
DEFAULT_PORT = 6611
ENV_MDM = "MESHCTL_MDM"
ENV_TOKEN = "MESHCTL_TOKEN"
ENV_TLS = {"tls_ca": "MESHCTL_TLS_CA", "tls_cert": "MESHCTL_TLS_CERT", "tls_key": "MESHCTL_TLS_KEY"}


@dataclass(frozen=True)
class ConfigFile:
    """The contents of ``meshctl.toml``; unknown keys are refused."""

    mdm: str | list[str] | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class Settings:
    """The effective connection settings and where each one came from."""

    mdm_urls: tuple[str, ...]
    token: str | None
    mdm_source: str
    token_source: str
    config_path: Path | None
    default_config_path: Path
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __repr__(self) -> str:  # the token never reaches a log or a traceback
        return (
            f"Settings(mdm_urls={self.mdm_urls!r}, token={'***' if self.token else None}, "
            f"mdm_source={self.mdm_source!r}, token_source={self.token_source!r})"
        )


def default_config_path(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: ignore a relative value
        base = Path(xdg)
    else:
        home = env.get("HOME")
        base = (Path(home) if home else Path.home()) / ".config"
    return base / "meshblock" / "meshctl.toml"


def resolve(
    *,
    mdm_flag: str | None,
    token_flag: str | None,
    config_flag: str | None,
    env: Mapping[str, str],
    token_file_flag: str | None = None,
) -> Settings:
    """Combine flags, environment and config file into :class:`Settings`."""
    default_path = default_config_path(env)
    path: Path | None
    if config_flag is not None:
        path = Path(config_flag)
        if not path.is_file():
            raise CliError(f"config file {config_flag} does not exist")
    else:
        path = default_path if default_path.is_file() else None
    file = _read(path) if path is not None else ConfigFile()

    mdm_value: str | list[str]
    if mdm_flag:
        mdm_value, mdm_source = mdm_flag, "--mdm"
    elif env.get(ENV_MDM):
        mdm_value, mdm_source = env[ENV_MDM], ENV_MDM
    elif file.mdm:
        mdm_value, mdm_source = file.mdm, str(path)
    else:
        mdm_value, mdm_source = DEFAULT_MDM, "default"

    token: str | None
    if token_flag:
        token, token_source = token_flag, "--token"
        print(ARGV_WARNING, file=sys.stderr)
    elif token_file_flag:
        token, token_source = _token_file(Path(token_file_flag)), token_file_flag
    elif env.get(ENV_TOKEN):
        token, token_source = env[ENV_TOKEN], ENV_TOKEN
    elif file.token:
        token, token_source = file.token, str(path)
    else:
        token, token_source = None, "none"

    tls: dict[str, Path | None] = {}
    for key, var in ENV_TLS.items():
        value = env.get(var) or getattr(file, key)
        tls[key] = Path(value) if value else None
    if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
        raise CliError(
            f"a client certificate needs its key: set both {ENV_TLS['tls_cert']} and "
            f"{ENV_TLS['tls_key']} (or tls_cert and tls_key in the config file)"
        )

    return Settings(
        mdm_urls=parse_mdm_urls(mdm_value),
        token=token,
        mdm_source=mdm_source,
        token_source=token_source,
        config_path=path,
        default_config_path=default_path,
        **tls,
    )


def parse_mdm_urls(value: str | list[str]) -> tuple[str, ...]:
    """``"mdm1,mdm2:7000"`` → ``("http://mdm1:6611", "http://mdm2:7000")``."""
    parts = value.split(",") if isinstance(value, str) else value
    urls = tuple(normalize_url(p.strip()) for p in parts if p.strip())
    if not urls:
        raise CliError("no MDM address given")
    return urls


def normalize_url(value: str) -> str:
    """Accept ``host``, ``host:port`` or a full ``http(s)://host:port`` URL."""
    raw = value if "://" in value else f"http://{value}"
    parsed = urllib.parse.urlsplit(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise CliError(f"not an MDM address: {value!r} (example: http://10.0.0.1:6611)")
    try:
        port = parsed.port
    except ValueError:
        raise CliError(f"not an MDM address: {value!r} (bad port)") from None
    netloc = parsed.netloc
    if port is None and "://" not in value:
        netloc = f"{netloc}:{DEFAULT_PORT}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path.rstrip("/"), "", ""))


ARGV_WARNING = (
    "meshctl: warning: --token puts the token in the command line, which every user of "
    f"this host can read (ps, /proc/PID/cmdline); set {ENV_TOKEN}, or keep it in a file "
    "of mode 600 given with --token-file PATH or as token = in the config file"
)


def _warn_if_readable(path: Path) -> None:
    if sys.platform != "win32" and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"meshctl: warning: {path} holds a token and is readable by other users; "
            f"chmod 600 {path}",
            file=sys.stderr,
        )


def _token_file(path: Path) -> str:
    try:
        token = read_secret_file(path, "--token-file")
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    _warn_if_readable(path)
    return token


def _read(path: Path) -> ConfigFile:
    try:
        config = load(ConfigFile, path)
    except ConfigError as exc:
        message = str(exc)
        raise CliError(message if str(path) in message else f"{path}: {message}") from None
    if config.token:
        _warn_if_readable(path)
    return config
