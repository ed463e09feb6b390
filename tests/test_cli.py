"""meshctl, the operator CLI.

The first part checks what needs no MDM: the command tree and its help, parsing of
operator values, tables and trees, where the address and token come from, and how
API errors become exit codes. The second part runs the real ``meshctl`` as a process
(``python -m meshblock.cli``) against the real MDM of the ``mdm`` fixture (SQLite
and PostgreSQL): it builds a cluster the way an operator would and checks what
``topology`` shows, then the exit code of each kind of failure.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _mdm import MdmDaemon
from _ports import free_port
from _wait import wait_until
from meshblock.cli import values
from meshblock.cli.__main__ import main
from meshblock.cli.client import MdmClient, describe, error_from_response
from meshblock.cli.commands import build_parser, impact
from meshblock.cli.commands.cluster import topology_tree, unhealthy_components
from meshblock.cli.errors import CliError, ExitCode, InvalidInput
from meshblock.cli.output import TreeNode, render_fields, render_table, render_tree
from meshblock.cli.settings import (
    DEFAULT_MDM,
    Settings,
    default_config_path,
    normalize_url,
    parse_mdm_urls,
    resolve,
)
from meshblock.sizes import GiB, MiB, TiB

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

# -- the command tree and its help ------------------------------------------------------


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every runnable command path, e.g. ``("volume", "map")`` (aliases skipped)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                yield from leaf_commands(sub, (*prefix, name))
            return
    yield prefix


ALL_COMMANDS = sorted(leaf_commands(build_parser()))

# What docs/api.md and docs/meshctl.md describe; a command that disappears fails here.
VERBS = {
    "pd": ["create", "list", "show", "rename", "delete"],
    "faultset": ["create", "list", "show", "delete"],
    "pool": ["create", "set", "list", "show", "delete", "pgmap"],
    "sds": ["add", "list", "show", "remove", "device-add", "device-remove", "ok-to-stop"],
    "sdc": ["add", "list", "show", "rename", "remove", "maps"],
    "volume": ["create", "list", "show", "rename", "extend", "delete", "map", "unmap",
               "set-limits", "set-access"],
    "mapping": ["list", "show"],
}  # fmt: skip
EXPECTED = {(noun, verb) for noun, verbs in VERBS.items() for verb in verbs} | {
    ("topology",),
    ("capacity",),
    ("health",),
}


def test_every_expected_command_exists() -> None:
    assert EXPECTED <= set(ALL_COMMANDS), EXPECTED - set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--help"], env={}) == 0
    out = capsys.readouterr().out
    assert "examples:\n  meshctl " + " ".join(command) in out
    assert "--json" in out  # the global options are accepted here too


def test_top_level_help_documents_exit_codes_and_connection(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"], env={}) == 0
    out = capsys.readouterr().out
    for code in ExitCode:
        assert re.search(rf"^  {int(code)}  \S", out, re.M), f"exit code {int(code)} missing"
    for word in ("MESHCTL_MDM", "MESHCTL_TOKEN", "meshctl.toml", "XDG_CONFIG_HOME", DEFAULT_MDM):
        assert word in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volume", "create", "v", "--pool", "sp1"], env={}) == 2  # no --size
    assert main(["volume", "create", "v", "--pool", "p", "--size", "1G", "--thin", "--thick"]) == 2
    assert main(["frobnicate"], env={}) == 2
    assert main([], env={}) == 2
    assert main(["sds", "add", "s", "--pd", "p", "--address", "a", "--device", "/dev/sdb"]) == 2
    err = capsys.readouterr().err
    assert "expected PATH:CAPACITY:POOL" in err


def parse(*argv: str) -> argparse.Namespace:
    ns: argparse.Namespace = build_parser().parse_args(argv)
    return ns


def test_global_options_before_and_after_the_subcommand() -> None:
    before = parse("--json", "--mdm", "http://m:1", "--token", "t", "volume", "list")
    after = parse("volume", "list", "--json", "--mdm", "http://m:1", "--token", "t")
    middle = parse("volume", "--json", "list", "--token", "t")
    for ns in (before, after):
        assert (ns.json, ns.mdm, ns.token) == (True, "http://m:1", "t")
    assert (middle.json, middle.mdm, middle.token) == (True, None, "t")
    plain = parse("volume", "list")
    assert (plain.json, plain.mdm, plain.token, plain.timeout) == (False, None, None, 30.0)


def test_volume_create_is_thin_unless_thick() -> None:
    assert parse("volume", "create", "v", "--pool", "p", "--size", "16GiB").type == "thin"
    ns = parse("volume", "create", "v", "--pool", "p", "--size", "16GiB", "--thick")
    assert (ns.type, ns.size) == ("thick", 16 * GiB)


def test_sds_add_takes_repeated_devices() -> None:
    ns = parse(
        "sds", "add", "sds1", "--pd", "pd1", "--address", "10.0.0.1",
        "--device", "/dev/sdb:1TiB:sp1", "--device", "/dev/disk/by-path/pci-0:0:1.0:500GB:sp2",
    )  # fmt: skip
    assert ns.devices == [
        values.DeviceSpec("/dev/sdb", TiB, "sp1"),
        values.DeviceSpec("/dev/disk/by-path/pci-0:0:1.0", 500 * 1000**3, "sp2"),
    ]
    assert (ns.data_port, ns.control_port, ns.fault_set) == (None, None, None)


def test_set_limits_tells_absent_from_cleared() -> None:
    ns = parse("volume", "set-limits", "v", "--sdc", "h", "--iops-limit", "none")
    assert ns.iops_limit is None
    assert ns.bandwidth_limit is not None  # not given: left alone, not cleared


# -- operator values --------------------------------------------------------------------


def test_sizes_and_rates() -> None:
    assert values.size("16GiB") == 16 * GiB
    assert values.size_change("+8GiB").apply(16 * GiB) == 24 * GiB
    assert values.size_change("32GiB").apply(16 * GiB) == 32 * GiB
    assert values.bandwidth_mibps("200") == 200
    assert values.bandwidth_mibps("1GiB/s") == 1024
    assert values.bandwidth_limit("100MiB/s") == 100 * MiB
    assert values.bandwidth_limit("none") is None
    assert values.iops_limit("5000") == 5000
    assert values.iops_limit("unlimited") is None
    assert values.number("10") == 10 and isinstance(values.number("10"), int)
    assert values.number("12.5") == 12.5


@pytest.mark.parametrize(
    "call",
    [
        lambda: values.size("12XB"),
        lambda: values.size("-1"),
        lambda: values.bandwidth_mibps("1.5MiB/s"),
        lambda: values.iops_limit("0"),
        lambda: values.iops_limit("fast"),
    ],
)
def test_bad_values_are_invalid_input(call: Any) -> None:
    with pytest.raises(InvalidInput):
        call()


def test_bad_size_exits_7_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    # --mdm points nowhere: exit 7 (not 3) proves the value was refused locally.
    port = free_port()
    argv = ["--mdm", f"http://127.0.0.1:{port}", "volume", "create", "v", "--pool", "p"]
    assert main([*argv, "--size", "12XB"], env={}) == 7
    assert "meshctl: error: unknown size unit 'XB'" in capsys.readouterr().err


# -- tables, trees ----------------------------------------------------------------------


def test_table_aligns_columns_and_shows_missing_values_as_dash() -> None:
    text = render_table(
        ["ID", "NAME", "SIZE"],
        [[1, "vol1", "16 GiB"], [12, "database", "1 TiB"], [3, None, ""]],
        right={"ID", "SIZE"},
    )
    assert text.splitlines() == [
        "ID  NAME        SIZE",
        " 1  vol1      16 GiB",
        "12  database   1 TiB",
        " 3  -              -",
    ]
    assert render_table(["A"], [], empty="no volumes") == "no volumes"
    assert render_table(["A", "B"], []) == "A  B"
    with pytest.raises(ValueError):
        render_table(["A", "B"], [[1]])


def test_fields_align_values() -> None:
    assert render_fields([("id", 1), ("protection domain", "pd1"), ("sds", None)]) == (
        "id:                1\nprotection domain: pd1\nsds:               -"
    )


def test_tree() -> None:
    root = TreeNode("cluster")
    pd = root.add("pd1")
    pd.add("fs1").add("sds1")
    pd.add("sp1")
    root.add("SDCs").add("host1")
    assert render_tree(root).splitlines() == [
        "cluster",
        "├── pd1",
        "│   ├── fs1",
        "│   │   └── sds1",
        "│   └── sp1",
        "└── SDCs",
        "    └── host1",
    ]


def test_topology_tree_from_an_api_document() -> None:
    sds = {
        "id": 1, "name": "sds1", "address": "10.0.0.1", "data_port": 7072,
        "state": "connected",
        "devices": [{"id": 1, "pool_id": 5, "path": "/dev/sdb", "capacity_bytes": TiB,
                     "used_bytes": 0}],
    }  # fmt: skip
    doc = {
        "cluster": {"name": "c1", "epoch": 9},
        "protection_domains": [
            {
                "id": 1, "name": "pd1",
                "fault_sets": [{"id": 1, "name": "fs1", "sds": [sds]}],
                "sds_without_fault_set": [],
                "pools": [{"id": 5, "name": "sp1", "pg_count": 64, "capacity": {},
                           "volumes": [{"name": "v1", "type": "thin", "size_bytes": GiB,
                                        "mappings": [{"sdc_name": "h1",
                                                      "access_mode": "read_only",
                                                      "iops_limit": 100,
                                                      "bandwidth_limit_bps": None}]}]}],
            }
        ],
        "sdc": [{"name": "h1", "guid": "g", "address": None, "state": "disconnected"}],
    }  # fmt: skip
    text = render_tree(topology_tree(doc))
    assert text.startswith("cluster c1  (epoch 9)\n├── protection domain pd1\n")
    assert "│   │   └── sds sds1  10.0.0.1:7072  connected" in text
    assert "device /dev/sdb  1 TiB  pool sp1" in text
    assert "mapped to h1  read_only  iops 100" in text
    assert text.endswith("    └── sdc h1  -  disconnected  guid g")


def test_unhealthy_components() -> None:
    comps = [{"name": "a", "state": "connected"}, {"name": "b", "state": "disconnected"}]
    assert [c["name"] for c in unhealthy_components(comps)] == ["b"]


# -- errors -----------------------------------------------------------------------------


def error_doc(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return json.dumps({"error": err}).encode()


def test_ok_to_stop_renders_and_exits_by_safety() -> None:
    """Exit 0 when safe, 8 when not; the PGs listed by pool/PG, those with as many
    copies before the stop marked."""
    pg = {"pool_id": 1, "pool": "sp1", "pg": 3, "copies_now": 2, "already": False}
    lost = dict(pg, pg=5, copies_now=0, already=True)
    safe = {
        "safe": True,
        "sds": [{"id": 1, "name": "sds1", "state": "connected", "mode": "normal"}],
        "pgs_with_copy": 1,
        "unavailable": {"count": 0, "pgs": []},
        "single_copy": {"count": 1, "pgs": [pg]},
        "volumes_unavailable": [],
        "volumes_single_copy": ["vol1"],
        "already_unavailable": 0,
        "already_single_copy": 2,
    }
    text = impact.render_stop(safe)
    assert text.startswith("safe to stop sds1: ")
    assert "1 PG(s) left with a single copy: sp1/3\n  volumes with data in them: vol1" in text
    assert "2 PG(s) elsewhere have one copy already" in text
    unsafe = dict(safe, safe=False, unavailable={"count": 1, "pgs": [lost]})
    assert impact.render_stop(unsafe).startswith("NOT safe to stop sds1: 1 PG(s) would have")
    assert "with no up-to-date copy: sp1/5*" in impact.render_stop(unsafe)
    assert "not clean" not in text
    resyncing = impact.render_stop(dict(safe, pgs_with_copy_not_clean=1))
    assert "1 PG(s) with a copy on them not clean (a resync or rebuild" in resyncing

    class Client:
        doc: Any = safe

        def get(self, path: str, query: Any = None) -> Any:
            assert (path, query) == ("/api/v1/sds/ok-to-stop", {"names": "sds1"})
            return self.doc

    class Names:
        def sds(self, ref: str) -> Any:
            return {"name": ref}

    ctx = argparse.Namespace(names=Names(), client=Client(), emit=lambda doc, human: None)
    args = argparse.Namespace(names=["sds1"], fault_sets=[], pd=None)
    assert impact.ok_to_stop(ctx, args) == ExitCode.OK  # type: ignore[arg-type]
    Client.doc = unsafe
    assert impact.ok_to_stop(ctx, args) == ExitCode.NOT_SAFE  # type: ignore[arg-type]
    assert int(ExitCode.NOT_SAFE) == 8  # documented in docs/meshctl.md


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [
        (400, "bad_request", 7),
        (401, "unauthorized", 6),
        (403, "forbidden", 6),
        (404, "not_found", 4),
        (409, "conflict", 5),
        (409, "insufficient_capacity", 5),
        (422, "invalid", 7),
        (500, "internal", 1),
    ],
)
def test_api_errors_map_to_exit_codes(status: int, code: str, exit_code: int) -> None:
    err = error_from_response(status, error_doc(code, "boom"))
    assert (err.exit_code, err.code, err.message) == (exit_code, code, "boom")


def test_a_404_that_is_not_the_mdm_is_a_generic_error() -> None:
    err = error_from_response(404, b"<html>nginx</html>", "Not Found")
    assert err.exit_code == ExitCode.ERROR
    assert "is this the MDM's address?" in err.message


def test_insufficient_capacity_message_has_sizes() -> None:
    details = {
        "requested_bytes": 200 * GiB, "free_bytes": 21 * GiB + GiB // 2,
        "usable_bytes": 27 * GiB, "spare_bytes": 3 * GiB,
    }  # fmt: skip
    err = error_from_response(409, error_doc("insufficient_capacity", "does not fit", details))
    assert err.message == "does not fit (requested 200 GiB, free 21.5 GiB, usable 27 GiB)"
    assert describe("invalid", "out of range", {"field": "spare_percent"}) == (
        "out of range (field 'spare_percent')"
    )


def test_unreachable_mdm_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    ports = [free_port(), free_port()]
    mdm = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    assert main(["--mdm", mdm, "pd", "list"], env={}) == 3
    err = capsys.readouterr().err
    assert err.startswith("meshctl: error: cannot reach the MDM at ")
    assert all(f"127.0.0.1:{p} (connection refused)" in err for p in ports)


# -- where the address and the token come from ------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def settings(env: dict[str, str], **flags: str | None) -> Settings:
    return resolve(
        mdm_flag=flags.get("mdm"),
        token_flag=flags.get("token"),
        config_flag=flags.get("config"),
        env=env,
    )


def test_config_precedence_flag_env_file_default(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    write_config(xdg / "meshblock" / "meshctl.toml", 'mdm = "http://file:1"\ntoken = "tf"\n')
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path / "home")}

    s = settings(env)
    assert (s.mdm_urls, s.token) == (("http://file:1",), "tf")
    assert s.mdm_source == s.token_source == str(xdg / "meshblock" / "meshctl.toml")

    env_set = {**env, "MESHCTL_MDM": "http://env:2", "MESHCTL_TOKEN": "te"}
    s = settings(env_set)
    assert (s.mdm_urls, s.token, s.mdm_source) == (("http://env:2",), "te", "MESHCTL_MDM")

    s = settings(env_set, mdm="http://flag:3", token="tt")
    assert (s.mdm_urls, s.token, s.token_source) == (("http://flag:3",), "tt", "--token")

    # Each setting on its own: a flag for one, the file for the other.
    s = settings(env, token="tt")
    assert (s.mdm_urls, s.token) == (("http://file:1",), "tt")

    s = settings({"HOME": str(tmp_path / "nohome")})
    assert (s.mdm_urls, s.token, s.mdm_source) == ((DEFAULT_MDM,), None, "default")


def test_config_file_location(tmp_path: Path) -> None:
    assert default_config_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path(
        "/x/meshblock/meshctl.toml"
    )
    assert default_config_path({"HOME": "/h"}) == Path("/h/.config/meshblock/meshctl.toml")
    # A relative XDG_CONFIG_HOME is ignored, as the XDG spec says.
    assert default_config_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.config/meshblock/meshctl.toml"
    )
    # --config wins over the default file, and must exist.
    home = tmp_path / "h"
    write_config(home / ".config" / "meshblock" / "meshctl.toml", 'token = "home"\n')
    other = write_config(tmp_path / "other.toml", 'mdm = ["m1", "m2:7000"]\ntoken = "other"\n')
    s = settings({"HOME": str(home)}, config=str(other))
    assert (s.mdm_urls, s.token) == (("http://m1:6611", "http://m2:7000"), "other")
    assert settings({"HOME": str(home)}).token == "home"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mdm = "http://a:1"\nendpoint = "x"\n', "unknown configuration key(s): endpoint"),
        ("token = 12\n", "token: expected"),
        ("token = \n", "not valid TOML"),
    ],
)
def test_bad_config_file(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "meshctl.toml", text)
    assert main(["--config", str(path), "config", "show"], env={}) == 1
    assert message in capsys.readouterr().err


def test_missing_config_file_named_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "pd", "list"], env={}) == 1
    assert "nope.toml does not exist" in capsys.readouterr().err


def test_the_token_is_never_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "tok-5f0c1e7a9b"
    s = settings({"HOME": str(tmp_path)}, token=secret)
    assert secret not in repr(s)
    assert secret not in repr(MdmClient(s.mdm_urls, s.token))
    for args in (["config", "show"], ["config", "show", "--json"]):
        assert main(["--token", secret, *args], env={"HOME": str(tmp_path)}) == 0
        out = capsys.readouterr().out
        assert secret not in out and "--token" in out


def test_a_token_on_the_command_line_warns_and_a_token_file_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """argv is readable by every user of the host: --token warns and names the better
    places; --token-file (mode 600) reads the token from a file and does not warn."""
    secret = "tok-3c9e1d"
    s = settings({"HOME": str(tmp_path)}, token=secret)
    err = capsys.readouterr().err
    assert s.token == secret and "warning: --token puts the token in the command line" in err
    assert "MESHCTL_TOKEN" in err and "--token-file" in err and secret not in err
    path = tmp_path / "token"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    s = resolve(mdm_flag=None, token_flag=None, config_flag=None, env={}, token_file_flag=str(path))
    assert (s.token, s.token_source) == (secret, str(path))
    assert capsys.readouterr().err == ""
    assert main(["--token-file", str(path), "config", "show"], env={"HOME": str(tmp_path)}) == 0
    out, err = capsys.readouterr()
    assert err == "" and secret not in out and str(path) in out
    path.chmod(0o644)  # readable by others: warned, still used
    assert (
        resolve(
            mdm_flag=None, token_flag=None, config_flag=None, env={}, token_file_flag=str(path)
        ).token
        == secret
    )
    assert "readable by other users" in capsys.readouterr().err
    with pytest.raises(CliError, match="--token-file"):
        resolve(
            mdm_flag=None,
            token_flag=None,
            config_flag=None,
            env={},
            token_file_flag=str(tmp_path / "missing"),
        )


def test_world_readable_config_with_a_token_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "meshctl.toml", 'token = "t"\n')
    path.chmod(0o644)
    settings({}, config=str(path))
    assert "readable by other users" in capsys.readouterr().err


def test_mdm_addresses() -> None:
    assert normalize_url("10.0.0.5") == "http://10.0.0.5:6611"
    assert normalize_url("mdm1:7000") == "http://mdm1:7000"
    assert normalize_url("https://mdm.example/") == "https://mdm.example"
    assert parse_mdm_urls("m1, m2:1 ,") == ("http://m1:6611", "http://m2:1")


# -- end to end, against the real MDM ---------------------------------------------------


@dataclass
class Meshctl:
    """Runs the real ``meshctl`` against ``mdm``; fails a test that leaks a credential."""

    mdm: MdmDaemon
    xdg: Path

    def __call__(
        self, *args: str, token: str | None = None, expect: int | None = 0, **env: str
    ) -> subprocess.CompletedProcess[str]:
        full_env = self.mdm.env()
        full_env["XDG_CONFIG_HOME"] = str(self.xdg)  # no operator's config file leaks in
        if token is not None:
            full_env["MESHCTL_TOKEN"] = token
        full_env.update(env)
        proc = subprocess.run(
            [sys.executable, "-m", "meshblock.cli", *args],
            env=full_env,
            stdin=subprocess.DEVNULL,  # no terminal: `volume delete` needs --yes
            capture_output=True,
            text=True,
            timeout=60,
        )
        for secret in (self.mdm.admin_token, self.mdm.readonly_token, self.mdm.cluster_secret):
            assert secret not in proc.stdout + proc.stderr, f"meshctl {args} printed a token"
        if expect is not None:
            assert proc.returncode == expect, (
                f"meshctl {' '.join(args)} exited {proc.returncode}, not {expect}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        if proc.returncode != 0:
            # exit 1 (health) and 8 (ok-to-stop) are answers on stdout, not errors
            assert proc.stderr.startswith("meshctl: error: ") or proc.returncode in (1, 8)
        return proc

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self(*args, "--json", **kw).stdout)


@pytest.fixture(scope="module")
def meshctl(mdm: MdmDaemon, tmp_path_factory: pytest.TempPathFactory) -> Meshctl:
    return Meshctl(mdm, tmp_path_factory.mktemp("xdg"))


THIN, THICK, HOST = "vol-thin", "vol-thick", "host1"
GUID = "5b0e7c1e-3f2a-4d6b-9c8e-0a1b2c3d4e5f"


@dataclass
class Built:
    devices: dict[str, Path]  # SDS name -> its device file


@pytest.fixture(scope="module")
def cluster(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The issue's "done" topology, built with meshctl as an operator would."""
    devdir = tmp_path_factory.mktemp("devices")
    meshctl("pd", "create", "pd1")
    for i in (1, 2, 3):
        meshctl("faultset", "create", f"fs{i}", "--pd", "pd1")
    meshctl(
        "pool", "create", "sp1", "--pd", "pd1", "--pg-count", "64", "--spare-percent", "10",
        "--granularity", "1GiB", "--alert-high", "80", "--alert-critical", "90",
    )  # fmt: skip
    devices = {}
    for i in (1, 2, 3):
        dev = devdir / f"sds{i}.img"
        with open(dev, "wb") as f:
            f.truncate(20 * GiB)  # sparse: a real file device, no real space
        devices[f"sds{i}"] = dev
        meshctl(
            "sds", "add", f"sds{i}", "--pd", "pd1", "--fault-set", f"fs{i}",
            "--address", f"127.0.0.{i}", "--data-port", str(7072 + 10 * i),
            "--device", f"{dev}:20GiB:sp1",
        )  # fmt: skip
    meshctl("volume", "create", THIN, "--pool", "sp1", "--size", "16GiB")
    meshctl("volume", "create", THICK, "--pool", "sp1", "--size", "4GiB", "--thick")
    meshctl("sdc", "add", HOST, "--guid", GUID, "--address", "127.0.0.9")
    meshctl("volume", "map", THIN, "--sdc", HOST, "--iops-limit", "5000",
            "--bandwidth-limit", "100MiB")  # fmt: skip
    meshctl("volume", "map", THICK, "--sdc", HOST, "--read-only")
    return Built(devices)


def test_topology_json_shows_the_built_cluster(meshctl: Meshctl, cluster: Built) -> None:
    topo = meshctl.json("topology")
    (pd,) = [p for p in topo["protection_domains"] if p["name"] == "pd1"]
    assert sorted(fs["name"] for fs in pd["fault_sets"]) == ["fs1", "fs2", "fs3"]
    (sp1,) = [p for p in pd["pools"] if p["name"] == "sp1"]
    assert sp1["pg_count"] == 64 and sp1["spare_percent"] == 10
    for fs in pd["fault_sets"]:
        n = fs["name"].removeprefix("fs")
        (sds,) = fs["sds"]
        assert (sds["name"], sds["address"], sds["data_port"]) == (
            f"sds{n}",
            f"127.0.0.{n}",
            7072 + 10 * int(n),
        )
        (dev,) = sds["devices"]
        assert dev["path"] == str(cluster.devices[sds["name"]])
        assert (dev["capacity_bytes"], dev["pool_id"]) == (20 * GiB, sp1["id"])
    assert pd["sds_without_fault_set"] == []
    vols = {v["name"]: v for v in sp1["volumes"]}
    assert (vols[THIN]["type"], vols[THIN]["size_bytes"]) == ("thin", 16 * GiB)
    assert (vols[THICK]["type"], vols[THICK]["size_bytes"]) == ("thick", 4 * GiB)
    (m_thin,) = vols[THIN]["mappings"]
    assert (m_thin["sdc_name"], m_thin["access_mode"]) == (HOST, "read_write")
    assert (m_thin["iops_limit"], m_thin["bandwidth_limit_bps"]) == (5000, 100 * MiB)
    (m_thick,) = vols[THICK]["mappings"]
    assert (m_thick["sdc_name"], m_thick["access_mode"]) == (HOST, "read_only")
    assert [(s["name"], s["guid"]) for s in topo["sdc"]] == [(HOST, GUID)]
    # The thick volume reserves two copies; the pool shows it.
    assert sp1["capacity"]["thick_reserved_bytes"] == 2 * 4 * GiB
    # --json before the subcommand prints the same document.
    assert json.loads(meshctl("--json", "topology").stdout)["sdc"] == topo["sdc"]


def test_topology_tree_names_everything(meshctl: Meshctl, cluster: Built) -> None:
    out = meshctl("topology").stdout
    lines = out.splitlines()
    assert lines[0].startswith("cluster test  (epoch ")
    for label in (
        "protection domain pd1", "fault set fs1", "fault set fs2", "fault set fs3",
        "sds sds1  127.0.0.1:7082", "sds sds3  127.0.0.3:7102",
        f"device {cluster.devices['sds2']}  20 GiB  pool sp1",
        "pool sp1  64 PGs", f"volume {THIN}  thin  16 GiB", f"volume {THICK}  thick  4 GiB",
        f"mapped to {HOST}  read_write  iops 5000  bandwidth 100 MiB/s",
        f"mapped to {HOST}  read_only", f"sdc {HOST}  127.0.0.9",
    ):  # fmt: skip
        assert label in out, f"{label!r} not in:\n{out}"
    # The tree nests: an SDS under its fault set, a device under its SDS.
    i = next(n for n, line in enumerate(lines) if "fault set fs1" in line)
    assert "sds sds1" in lines[i + 1] and "device " in lines[i + 2]
    assert lines[i + 2].index("device") > lines[i + 1].index("sds sds1")


def test_lists_and_shows(meshctl: Meshctl, cluster: Built) -> None:
    out = meshctl("volume", "list").stdout.splitlines()
    header = ["ID", "NAME", "POOL", "TYPE", "SIZE", "ALLOCATED", "STATE", "MAPPED", "TO"]
    assert out[0].split() == header
    row = next(line for line in out if f" {THIN} " in line)
    assert re.search(rf"{THIN}\s+sp1\s+thin\s+16 GiB\s+0 B\s+active\s+{HOST}$", row)
    # Columns are aligned: every row is as wide as the widest.
    assert len({line.index(" sp1 ") for line in out[1:] if " sp1 " in line}) == 1

    sds_list = meshctl("sds", "list").stdout
    assert re.search(r"sds2\s+pd1\s+fs2\s+127\.0\.0\.2:7092\s+\w+\s+1\s+20 GiB", sds_list)
    assert "sds1" in meshctl("faultset", "show", "fs1").stdout
    assert "vol-thin, vol-thick" in meshctl("sdc", "list").stdout
    pool = meshctl("pool", "show", "sp1").stdout
    assert re.search(r"^thick reserved:\s+8 GiB$", pool, re.M)
    assert re.search(r"^spare:\s+10\.0%$", pool, re.M)
    cap = meshctl("capacity").stdout
    assert re.search(r"^sp1\s+60 GiB\s+6 GiB\s+54 GiB\s+8 GiB\s+0 B\s+8 GiB\s+46 GiB", cap, re.M)
    capacity = meshctl.json("capacity")
    assert capacity["pools"][0]["usable_bytes"] == 54 * GiB

    vol = meshctl.json("volume", "show", THIN)
    assert meshctl.json("volume", "show", str(vol["id"]))["name"] == THIN  # an id works too
    mappings = meshctl.json("mapping", "list", "--volume", THIN)["mappings"]
    assert [m["volume_id"] for m in mappings] == [vol["id"]]
    assert meshctl.json("mapping", "show", str(mappings[0]["id"]))["iops_limit"] == 5000
    pgmap = meshctl.json("pool", "pgmap", "sp1")
    assert pgmap["pg_count"] == 64 and len(pgmap["pgs"]) == 64
    human = meshctl("pool", "pgmap", "sp1").stdout
    assert re.search(r"^\s+0  sds\d:\S+sds\d\.img\s+sds\d:\S+\.img$", human, re.M)
    maps = meshctl.json("sdc", "maps", HOST)
    assert sorted(v["name"] for v in maps["volumes"]) == sorted([THIN, THICK])


def test_changes_and_their_refusals(meshctl: Meshctl, cluster: Built) -> None:
    meshctl("volume", "create", "grow", "--pool", "sp1", "--size", "2GiB")
    out = meshctl("volume", "extend", "grow", "--size", "+2GiB").stdout
    assert out.strip() == "volume 'grow' is now 4 GiB (was 2 GiB)"

    shrink = meshctl("volume", "extend", "grow", "--size", "1GiB", expect=5)
    assert "shrink" in shrink.stderr
    assert meshctl.json("volume", "show", "grow")["size_bytes"] == 4 * GiB

    meshctl("volume", "rename", "grow", "grown")
    meshctl("volume", "show", "grow", expect=4)
    meshctl("volume", "map", "grown", "--sdc", HOST)
    refused = meshctl("volume", "delete", "grown", "--yes", expect=5)
    assert refused.stderr.startswith("meshctl: error: ")
    meshctl("volume", "set-limits", "grown", "--sdc", HOST, "--iops-limit", "100")
    m = meshctl.json("volume", "set-access", "grown", "--sdc", HOST, "--read-only")
    assert (m["access_mode"], m["iops_limit"]) == ("read_only", 100)
    m = meshctl.json("volume", "set-limits", "grown", "--sdc", HOST, "--iops-limit", "none")
    assert m["iops_limit"] is None
    meshctl("volume", "unmap", "grown", "--sdc", HOST)
    meshctl("volume", "unmap", "grown", "--sdc", HOST, expect=4)
    meshctl("volume", "delete", "grown", expect=2)  # no terminal to ask on, no --yes
    meshctl("volume", "delete", "grown", "-y")
    meshctl("volume", "show", "grown", expect=4)

    updated = meshctl.json("pool", "set", "sp1", "--rebuild-bandwidth", "400MiB/s")
    assert updated["rebuild_bandwidth_mibps"] == 400

    meshctl("pd", "delete", "pd1", expect=5)  # it has pools, fault sets, SDSs
    meshctl("faultset", "delete", "fs1", "--pd", "pd1", expect=5)  # sds1 is in it
    meshctl("sdc", "remove", HOST, expect=5)  # volumes are mapped to it

    meshctl("sds", "device-add", "sds3", "--device", f"{cluster.devices['sds3']}.b:10GiB:sp1")
    assert len(meshctl.json("sds", "show", "sds3")["devices"]) == 2
    meshctl("sds", "device-remove", "sds3", f"{cluster.devices['sds3']}.b")
    assert len(meshctl.json("sds", "show", "sds3")["devices"]) == 1

    meshctl("pd", "create", "pd-tmp")
    meshctl("pd", "rename", "pd-tmp", "pd-tmp2")
    meshctl("faultset", "create", "fs1", "--pd", "pd-tmp2")  # the name is per PD
    ambiguous = meshctl("faultset", "show", "fs1", expect=2)
    assert "--pd" in ambiguous.stderr
    meshctl("faultset", "delete", "fs1", "--pd", "pd-tmp2")
    meshctl("pd", "delete", "pd-tmp2")
    meshctl("sdc", "add", "host-tmp", "--guid", "g-tmp")
    meshctl("sdc", "rename", "g-tmp", "host-tmp2")  # named by GUID
    meshctl("sdc", "remove", "host-tmp2")


def test_unknown_names_exit_4(meshctl: Meshctl, cluster: Built) -> None:
    proc = meshctl("volume", "create", "x", "--pool", "nope", "--size", "1GiB", expect=4)
    assert proc.stderr == "meshctl: error: no pool named 'nope'\n"
    proc = meshctl("pd", "show", "x", expect=4)
    assert proc.stderr == "meshctl: error: no protection domain named 'x'\n"
    meshctl("volume", "map", THIN, "--sdc", "nobody", expect=4)
    meshctl("sds", "device-remove", "sds1", "/dev/none", expect=4)
    meshctl("mapping", "show", "99999", expect=4)  # the MDM's own 404


def test_duplicate_names_exit_5(meshctl: Meshctl, cluster: Built) -> None:
    proc = meshctl("pd", "create", "pd1", expect=5)
    assert proc.stderr.startswith("meshctl: error: ") and "pd1" in proc.stderr
    meshctl("volume", "create", THIN, "--pool", "sp1", "--size", "1GiB", expect=5)


def test_insufficient_capacity_exit_5_with_sizes(meshctl: Meshctl, cluster: Built) -> None:
    proc = meshctl("volume", "create", "huge", "--pool", "sp1", "--size", "1TiB", "--thick",
                   expect=5)  # fmt: skip
    assert re.search(r"\(requested 2 TiB, free \d+(\.\d)? GiB, usable 54 GiB\)$", proc.stderr)
    meshctl("volume", "show", "huge", expect=4)  # a refused request changes nothing


def test_ok_to_stop_exit_codes_and_dry_runs(meshctl: Meshctl, cluster: Built) -> None:
    """No SDS of this cluster heartbeats: every PG has no serving copy already, so
    stopping any SDS is not safe (exit 8, the PGs marked as so already). Unknown names
    exit 4. The dry runs print the plan and change nothing; a refused change is
    refused by its dry run too (maintenance of a disconnected SDS: exit 5)."""
    proc = meshctl("sds", "ok-to-stop", "sds1", expect=8)
    assert proc.stdout.startswith("NOT safe to stop sds1 (disconnected): "), proc.stdout
    doc = json.loads(meshctl("sds", "ok-to-stop", "sds1", "--json", expect=8).stdout)
    assert doc["safe"] is False
    assert doc["unavailable"]["count"] == doc["pgs_with_copy"] > 0
    assert all(g["already"] for g in doc["unavailable"]["pgs"])
    assert set(doc["volumes_unavailable"]) >= {THIN, THICK}
    doc = json.loads(meshctl("sds", "ok-to-stop", "--fault-set", "fs2", "--json", expect=8).stdout)
    assert [s["name"] for s in doc["sds"]] == ["sds2"]
    missing = meshctl("sds", "ok-to-stop", "sds1", "nosuch", expect=4)
    assert missing.stderr == "meshctl: error: no SDS named 'nosuch'\n"
    meshctl("sds", "ok-to-stop", expect=2)

    before = meshctl.json("pool", "show", "sp1"), meshctl.json("sds", "show", "sds1")
    rebalance = before[0]["rebalance_bandwidth_mibps"]
    plan = meshctl.json("pool", "set", "sp1", "--spare-percent", "20", "--dry-run")
    assert (plan["dry_run"], plan["changes"]) == (True, {"spare_percent": {"from": 10, "to": 20}})
    out = meshctl("pool", "set", "sp1", "--rebalance-bandwidth", "7", "--dry-run").stdout
    assert out.startswith("dry run: change pool sp1; nothing was changed\n"), out
    assert f"rebalance_bandwidth_mibps: {rebalance} -> 7" in out
    plan = meshctl.json("sds", "remove", "sds1", "--dry-run")
    assert plan["action"] == "drain" and plan["bytes_to_copy"] > 0, plan
    assert plan["pools"][0]["bandwidth_mibps"] == rebalance
    out = meshctl("sds", "remove", "sds1", "--dry-run").stdout
    assert "bytes to copy: " in out and "estimate: " in out
    refused = meshctl("sds", "maintenance", "enter", "sds1", "--dry-run", expect=5)
    assert "disconnected" in refused.stderr
    assert (meshctl.json("pool", "show", "sp1"), meshctl.json("sds", "show", "sds1")) == before


def test_invalid_input_exit_7(meshctl: Meshctl, cluster: Built) -> None:
    proc = meshctl("volume", "create", "x", "--pool", "sp1", "--size", "12XB", expect=7)
    assert "unknown size unit 'XB'" in proc.stderr
    meshctl("pool", "set", "sp1", "--spare-percent", "200", expect=7)  # the MDM says 422
    meshctl("volume", "map", THIN, "--sdc", HOST, "--iops-limit", "-5", expect=7)


def test_tokens(meshctl: Meshctl, mdm: MdmDaemon, cluster: Built) -> None:
    proc = meshctl("pd", "list", token="not-the-token", expect=6)
    assert proc.stderr.startswith("meshctl: error: ")
    meshctl("pd", "list", expect=6, MESHCTL_TOKEN="")  # no token at all
    # The read-only token reads, and cannot change anything.
    assert "pd1" in meshctl("pd", "list", token=mdm.readonly_token).stdout
    meshctl("pd", "create", "pd-ro", token=mdm.readonly_token, expect=6)
    meshctl("volume", "extend", THIN, "--size", "+1GiB", token=mdm.readonly_token, expect=6)
    meshctl("pd", "show", "pd-ro", expect=4)
    # --token beats MESHCTL_TOKEN.
    meshctl("--token", mdm.admin_token, "pd", "list", token="wrong")


def test_config_file_end_to_end(
    meshctl: Meshctl, mdm: MdmDaemon, cluster: Built, tmp_path: Path
) -> None:
    xdg = tmp_path / "xdg"
    write_config(
        xdg / "meshblock" / "meshctl.toml", f'mdm = "{mdm.url}"\ntoken = "{mdm.admin_token}"\n'
    )
    run = functools.partial(meshctl, XDG_CONFIG_HOME=str(xdg), MESHCTL_MDM="")
    assert "pd1" in run("pd", "list", MESHCTL_TOKEN="").stdout
    # The environment beats the file.
    run("pd", "list", expect=6, MESHCTL_TOKEN="wrong")
    shown = run("config", "show", MESHCTL_TOKEN="").stdout
    assert mdm.url in shown and "token:       set" in shown
    other = write_config(tmp_path / "explicit.toml", f'mdm = "{mdm.url}"\ntoken = "nope"\n')
    run("--config", str(other), "pd", "list", expect=6, MESHCTL_TOKEN="")


def test_unreachable_mdm_exit_3(meshctl: Meshctl) -> None:
    proc = meshctl("--mdm", f"http://127.0.0.1:{free_port()}", "pd", "list", expect=3)
    assert "cannot reach the MDM" in proc.stderr and "connection refused" in proc.stderr


def test_failover_to_the_next_mdm_address(meshctl: Meshctl, mdm: MdmDaemon, cluster: Built) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert "pd1" in meshctl("--mdm", f"{dead},{mdm.url}", "pd", "list").stdout


class _Standby(http.server.BaseHTTPRequestHandler):
    """Answers everything with a 307 to the leader, as a standby MDM may."""

    leader = ""

    def _redirect(self) -> None:
        self.send_response(307)
        self.send_header("Location", self.leader + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _redirect

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def standby(mdm: MdmDaemon) -> Iterator[str]:
    handler = type("Standby", (_Standby,), {"leader": mdm.url})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_redirect_to_the_leader_keeps_method_body_and_token(meshctl: Meshctl, standby: str) -> None:
    created = meshctl.json("--mdm", standby, "pd", "create", "pd-via-standby")
    assert created["name"] == "pd-via-standby"
    meshctl("--mdm", standby, "pd", "delete", "pd-via-standby")
    meshctl("pd", "show", "pd-via-standby", expect=4)


def test_health_exit_code_follows_components(
    meshctl: Meshctl, mdm: MdmDaemon, cluster: Built
) -> None:
    # Nothing heartbeats yet: every SDS and the SDC are disconnected.
    # Components are read with a read credential: none is an authentication error.
    refused = meshctl("health", expect=6, MESHCTL_TOKEN="")
    assert "Authorization" in refused.stderr and not refused.stdout
    proc = meshctl("health", expect=1, MESHCTL_TOKEN=mdm.readonly_token)
    assert "UNHEALTHY" in proc.stdout and "sds1 (disconnected)" in proc.stdout
    doc = json.loads(meshctl("health", "--json", expect=1).stdout)
    assert doc["status"] == "degraded"
    assert {c["name"] for c in doc["components"]} >= {"sds1", "sds2", "sds3", HOST}

    # Components heartbeat as their daemons do (with the cluster secret, every second,
    # for as long as meshctl runs: one round alone could time out before a slow
    # meshctl start reads it): healthy.
    paths = [f"/api/v1/sds/{d['id']}/heartbeat" for d in meshctl.json("sds", "list")["sds"]]
    paths += [f"/api/v1/sdc/{d['id']}/heartbeat" for d in meshctl.json("sdc", "list")["sdc"]]
    stop = threading.Event()
    statuses: list[int] = []

    def heartbeat() -> None:
        daemons = mdm.api(mdm.cluster_secret)
        while True:
            statuses.extend(daemons.post(path, {}).status for path in paths)
            if stop.wait(1.0):
                return

    beats = threading.Thread(target=heartbeat, daemon=True)
    beats.start()
    try:
        wait_until(lambda: len(statuses) >= len(paths), 30, "a round of heartbeats")
        proc = meshctl("health", expect=0)
    finally:
        stop.set()
        beats.join(30)
    assert set(statuses) == {200}, statuses
    assert re.search(r"^sds\s+sds1\s+127\.0\.0\.1\s+7073\s+7082\s+connected", proc.stdout, re.M)
    assert proc.stdout.rstrip().endswith("healthy")


def test_output_to_a_closed_pipe_is_not_an_error(meshctl: Meshctl, cluster: Built) -> None:
    env = {**meshctl.mdm.env(), "XDG_CONFIG_HOME": str(meshctl.xdg)}
    proc = subprocess.run(
        f"{sys.executable} -m meshblock.cli topology | head -c 1 >/dev/null; "
        "exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "meshctl"
    assert script.exists(), f"meshctl is not installed next to {sys.executable}"
    proc = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: meshctl")
