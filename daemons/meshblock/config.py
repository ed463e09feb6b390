"""Loading daemon configuration from TOML into frozen dataclasses.

Every daemon describes its configuration as a frozen dataclass (nested dataclasses
for TOML tables). :func:`load` reads a TOML file, rejects unknown keys and values of
the wrong type with a :class:`ConfigError` that names the offending key, and fills
in defaults for what the file leaves out. What every daemon's configuration has the
same way is here too: the ``[logging]`` table (:class:`LoggingConfig`) and the reading
of a file that holds a secret (:func:`read_secret_file`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``[logging]`` of every daemon: ``level`` is DEBUG, INFO, WARNING or ERROR, in any
    case (DEBUG applies to meshblock's own loggers: :func:`meshblock.daemon.setup_logging`)."""

    level: str = "INFO"

    def __post_init__(self) -> None:
        if self.level.upper() not in LOG_LEVELS:
            raise ValueError(f"level must be DEBUG, INFO, WARNING or ERROR, got {self.level!r}")


def read_secret_file(path: str | Path, key: str) -> str:
    """The secret held in the file at ``path``, without surrounding whitespace.

    ``key`` names the setting that gave the path (``cluster_secret_file``), for the
    errors: a file that cannot be read (missing, not allowed, a directory), is not
    UTF-8 text or holds nothing but whitespace is a :class:`ConfigError` naming
    ``key`` and the path, never the content. The file's mode is not checked.
    """
    p = Path(path)
    try:
        value = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {key} {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key} {p} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{key} {p} is empty")
    return value


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


_SECRET_KEY = re.compile(r"token|secret|password|url", re.IGNORECASE)


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def from_mapping(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown configuration key(s): {names}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_mapping(hint, value, key)  # type: ignore[arg-type]
            continue
        if not _type_ok(value, hint):
            shown = "" if _SECRET_KEY.search(name) else f" {value!r}"
            raise ConfigError(
                f"{key}: expected {_hint_name(hint)}, got {type(value).__name__}{shown}"
            )
        if typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    return obj


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML document at ``path``; unreadable or invalid files raise."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def load(cls: type[T], path: str | Path | None) -> T:
    """Load ``cls`` from the TOML file at ``path`` (defaults only when ``None``)."""
    if path is None:
        return from_mapping(cls, {})
    return from_mapping(cls, read_toml(path))
