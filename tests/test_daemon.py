"""meshblock.daemon.main, the start of every daemon: command line, configuration,
logging, --check-config, commands, --migrate-only, serving, and the exit codes of the
errors each daemon declares. In-process: nothing is served (``web.run_app`` is
replaced), the four daemons only load and check their configuration."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshblock import daemon
from meshblock.config import ConfigError, LoggingConfig
from meshblock.mdm.__main__ import main as mdm_main
from meshblock.mgmt.__main__ import main as mgmt_main
from meshblock.sdc.__main__ import main as sdc_main
from meshblock.sds.__main__ import main as sds_main

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Cfg:
    name: str
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class Boom(Exception):
    pass


@dataclass
class Calls:
    """What the sample daemon's hooks were called with."""

    levels: list[str] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    c = Calls()
    monkeypatch.setattr(daemon, "setup_logging", c.levels.append)

    def run_app(app: web.Application, **kwargs: Any) -> None:
        c.served.append(kwargs)

    monkeypatch.setattr(web, "run_app", run_app)
    return c


def sample(calls: Calls, *, fail: Exception | None = None) -> daemon.Daemon[Cfg]:
    """A daemon whose config file holds its name (``bad``: a configuration error)."""

    def load(args: argparse.Namespace) -> Cfg:
        text = Path(args.config).read_text().strip()
        if text == "bad":
            raise ConfigError("name: bad")
        return Cfg(text, LoggingConfig("debug"))

    def server(config: Cfg) -> daemon.Server:
        if fail is not None:
            raise fail
        return daemon.Server(web.Application(), "127.0.0.1", 1234)

    def arguments(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="command")
        sub.add_parser("hello")

    def command(args: argparse.Namespace, config: Cfg) -> int:
        calls.commands.append(f"{args.command} {config.name}")
        return 7

    async def migrate(config: Cfg) -> None:
        calls.migrated.append(config.name)

    return daemon.Daemon(
        name="sample",
        description="a sample",
        epilog="",
        load=load,
        server=server,
        arguments=arguments,
        command=command,
        migrate=migrate,
        fatal=(
            daemon.Fatal(Boom, 5),
            daemon.Fatal(OSError, 1, log="cannot start: %s", echo=False),
        ),
    )


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "sample.toml"
    path.write_text("s1\n")
    return path


def test_serves_with_the_same_settings_for_every_daemon(calls: Calls, conf: Path) -> None:
    assert daemon.main(sample(calls), ["--config", str(conf)]) == 0
    assert calls.levels == ["debug"]
    assert calls.served == [
        {
            "host": "127.0.0.1",
            "port": 1234,
            "ssl_context": None,
            "print": None,
            "access_log": None,
            "shutdown_timeout": 5,
        }
    ]


def test_a_configuration_error_is_exit_code_2_before_logging(
    calls: Calls, conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf.write_text("bad")
    assert daemon.main(sample(calls), ["-c", str(conf)]) == daemon.EXIT_CONFIG == 2
    assert capsys.readouterr().err == "meshblock-sample: configuration error: name: bad\n"
    assert calls.levels == [] and calls.served == []


def test_check_config_serves_nothing(
    calls: Calls, conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.main(sample(calls), ["-c", str(conf), "--check-config", "hello"]) == 0
    assert capsys.readouterr().out == "configuration OK\n"
    assert calls.levels == ["debug"]
    assert calls.served == [] and calls.commands == calls.migrated == []


def test_a_command_comes_before_migrate_only(calls: Calls, conf: Path) -> None:
    assert daemon.main(sample(calls), ["-c", str(conf), "--migrate-only", "hello"]) == 7
    assert calls.commands == ["hello s1"] and calls.migrated == [] and calls.served == []
    assert daemon.main(sample(calls), ["-c", str(conf), "--migrate-only"]) == 0
    assert calls.migrated == ["s1"] and calls.served == []


def test_migrate_only_exists_for_a_daemon_with_a_database(
    calls: Calls, conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--migrate-only" in sample(calls).parser().format_help()
    without = dataclasses.replace(sample(calls), migrate=None)
    assert "--migrate-only" not in without.parser().format_help()
    with pytest.raises(SystemExit) as exc:
        daemon.main(without, ["-c", str(conf), "--migrate-only"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --migrate-only" in capsys.readouterr().err


def test_a_fatal_error_is_logged_printed_and_its_exit_code(
    calls: Calls,
    conf: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "meshblock.sample")
    assert daemon.main(sample(calls, fail=Boom("disk on fire")), ["-c", str(conf)]) == 5
    assert capsys.readouterr().err == "meshblock-sample: disk on fire\n"
    assert [r.getMessage() for r in caplog.records] == ["disk on fire"]
    caplog.clear()
    refused = OSError(98, "Address already in use")
    assert daemon.main(sample(calls, fail=refused), ["-c", str(conf)]) == 1
    assert capsys.readouterr().err == ""  # echo=False: logged only
    assert [r.getMessage() for r in caplog.records] == [
        "cannot start: [Errno 98] Address already in use"
    ]


def test_an_undeclared_error_is_not_hidden(calls: Calls, conf: Path) -> None:
    with pytest.raises(KeyError):
        daemon.main(sample(calls, fail=KeyError("bug")), ["-c", str(conf)])


def test_the_config_file_is_required(calls: Calls, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon.main(sample(calls), [])
    assert exc.value.code == 2
    assert "the following arguments are required: --config/-c" in capsys.readouterr().err


# -- the four daemons ------------------------------------------------------------------

SDS_TOML = """name = "s1"
protection_domain = "pd"
address = "127.0.0.1"
mdm_urls = ["http://127.0.0.1:6611"]
cluster_secret_file = "{secret}"
[[devices]]
path = "{dir}/dev0.img"
capacity = "8MiB"
pool = "p"
"""

DAEMONS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    # main, the least config that passes --check-config ({secret}: a secret file)
    "mdm": (mdm_main, '[auth]\nadmin_token = "a"\n'),
    # (MGMT serves HTTPS with a [tls] certificate, or plain HTTP when told to)
    "mgmt": (mgmt_main, '[http]\nplain_http = true\n[mdm]\nurl = "http://127.0.0.1:6611"\n'),
    "sdc": (
        sdc_main,
        '[mdm]\nurls = ["http://127.0.0.1:6611"]\ncluster_secret_file = "{secret}"\n',
    ),
    "sds": (sds_main, SDS_TOML),
}


def daemon_conf(name: str, tmp_path: Path, secret: str, extra: str = "") -> Path:
    """The config file of daemon ``name``, and its secret file holding ``secret``."""
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(secret)
    conf = tmp_path / f"{name}.toml"
    conf.write_text(DAEMONS[name][1].format(secret=secret_file, dir=tmp_path) + extra)
    return conf


@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_each_daemon_checks_its_config(
    name: str, calls: Calls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = DAEMONS[name][0]
    conf = daemon_conf(name, tmp_path, "s3cret\n", '[logging]\nlevel = "WARNING"\n')
    assert main(["--config", str(conf), "--check-config"]) == 0
    assert capsys.readouterr().out == "configuration OK\n"
    assert calls.levels == ["WARNING"]
    missing = tmp_path / "missing.toml"
    assert main(["-c", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"meshblock-{name}: configuration error: cannot read {missing}: No such file or directory\n"
    )
    assert calls.served == []


@pytest.mark.parametrize("name", ["sdc", "sds"])
def test_an_empty_secret_file_is_a_configuration_error(
    name: str, calls: Calls, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = daemon_conf(name, tmp_path, "\n")
    assert DAEMONS[name][0](["-c", str(conf), "--check-config"]) == 2
    assert f"{tmp_path / 'cluster.secret'} is empty" in capsys.readouterr().err
