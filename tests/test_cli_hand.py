"""meshctl fitting the hand (issue 20): sizes with units, --version, completion,
confirmation of deletes, what a token error says, errors as JSON, 'unlimited' rates,
`rebuild status` waiting out rebuild_delay_s.

In process: ``main(argv, env)`` runs against :class:`FakeMdm`, which stands in for the
MDM's client (no socket) and records what meshctl asked of it.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import meshblock.cli.__main__ as cli_main
from meshblock.cli import lab, values
from meshblock.cli.__main__ import main
from meshblock.cli.errors import ApiError, InvalidInput
from meshblock.sizes import GiB, MiB, parse_size

pytestmark = pytest.mark.unit

POOL = {
    "id": 1,
    "name": "sp1",
    "protection_domain_id": 1,
    "allocation_granularity_bytes": GiB,
    "rebuild_bandwidth_mibps": 0,  # the MDM's default: 0 = unlimited
    "rebuild_concurrency": 4,
    "rebalance_bandwidth_mibps": 50,
    "rebalance_concurrency": 2,
}

Route = Callable[[Any], Any]


class FakeMdm:
    """The MDM's answers by ``(method, path)``; ``calls`` lists every request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.volumes: dict[int, dict[str, Any]] = {}
        self.pools: list[dict[str, Any]] = [dict(POOL)]
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/api/v1/pools"): lambda _: {"pools": self.pools},
            ("GET", "/api/v1/pools/1"): lambda _: self.pools[0],
            ("GET", "/api/v1/volumes"): lambda _: {"volumes": list(self.volumes.values())},
            ("POST", "/api/v1/volumes"): self._create,
            ("GET", "/api/v1/sds"): lambda _: {"sds": []},
            ("GET", "/api/v1/protection-domains"): lambda _: {
                "protection_domains": [{"id": 1, "name": "pd1"}]
            },
        }

    def _rounded(self, n: int) -> int:
        g = int(self.pools[0]["allocation_granularity_bytes"])
        return -(-n // g) * g

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        vid = len(self.volumes) + 1
        vol = {
            "id": vid,
            "name": body["name"],
            "pool_id": body["pool_id"],
            "type": body["type"],
            "size_bytes": self._rounded(body["size"]),
        }
        self.volumes[vid] = vol
        self.routes[("GET", f"/api/v1/volumes/{vid}")] = lambda _: self.volumes[vid]
        self.routes[("PATCH", f"/api/v1/volumes/{vid}")] = lambda b: self._patch(vid, b)
        self.routes[("DELETE", f"/api/v1/volumes/{vid}")] = lambda _: self.volumes.pop(vid) and None
        return vol

    def _patch(self, vid: int, body: dict[str, Any]) -> dict[str, Any]:
        self.volumes[vid] = {**self.volumes[vid], "size_bytes": self._rounded(body["size"])}
        return self.volumes[vid]

    def client(self, urls: Any, token: Any, timeout: float = 30.0, tls: Any = None) -> FakeMdm:
        self.token = token
        return self

    def request(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((method, path, body))
        if self.token not in ("admin", "readonly"):
            raise ApiError(
                401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required"
            )
        if self.token == "readonly" and method != "GET":
            raise ApiError(403, "forbidden", f"this token (readonly) may not {method} {path}")
        route = self.routes.get((method, path))
        if route is None:
            raise ApiError(404, "not_found", f"no route {method} {path}")
        return route(body)

    def get(self, path: str, query: Any = None, timeout: float | None = None) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def changes(self) -> list[tuple[str, str, Any]]:
        return [c for c in self.calls if c[0] != "GET"]


@pytest.fixture
def mdm(monkeypatch: pytest.MonkeyPatch) -> FakeMdm:
    fake = FakeMdm()
    monkeypatch.setattr(cli_main, "MdmClient", fake.client)

    def no_lab(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test started a lab")

    monkeypatch.setattr(lab.Lab, "up", no_lab)  # lab up must stop at its options
    return fake


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A token, and no operator's config file."""
    return {"MESHCTL_TOKEN": "admin", "XDG_CONFIG_HOME": str(tmp_path)}


# -- 1. sizes need a unit; rounding is told -------------------------------------------

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "KB", "MB", "GB", "TB", "PB", "4096B")

BARE_SIZES = [
    ["volume", "create", "v", "--pool", "sp1", "--size", "10"],
    ["volume", "extend", "v", "--size", "+10"],
    ["volume", "extend", "v", "--size", "1073741824"],
    ["volume", "map", "v", "--sdc", "h", "--bandwidth-limit", "100"],
    ["volume", "set-limits", "v", "--sdc", "h", "--bandwidth-limit", "100"],
    ["pool", "create", "sp2", "--pd", "pd1", "--granularity", "1073741824"],
    ["sds", "add", "s", "--pd", "pd1", "--address", "a", "--device", "/dev/sdb:1000:sp1"],
    ["sds", "device-add", "s", "--device", "/dev/sdb:1000:sp1"],
    ["lab", "up", "--volume-size", "4"],
    ["lab", "up", "--device-size", "64"],
]


@pytest.mark.parametrize("argv", BARE_SIZES, ids=" ".join)
def test_a_size_without_a_unit_is_refused_naming_every_unit(
    argv: list[str], mdm: FakeMdm, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv, env=env) == 7
    err = capsys.readouterr().err
    assert err.startswith("meshctl: error: a size needs a unit: "), err
    for unit in UNITS:
        assert unit in err, f"{unit} not named in {err!r}"
    assert mdm.calls == []  # refused before anything was sent


def test_units_are_accepted_and_config_sizes_stay_bytes() -> None:
    assert values.size("4096B") == 4096
    assert values.size("1.5GiB") == 3 * GiB // 2
    assert values.size("1G") == GiB
    assert values.size("500GB") == 500 * 10**9
    assert values.bandwidth_limit("100MiB") == 100 * MiB
    assert values.bandwidth_mibps("200") == 200  # a pool throttle's unit is MiB/s
    with pytest.raises(InvalidInput, match="needs a unit"):
        values.size(" 10 ")
    # Config files and the REST API still read a bare number as bytes.
    assert parse_size("10") == 10
    assert parse_size("1073741824") == GiB


def test_create_and_extend_say_when_the_mdm_rounded_up(
    mdm: FakeMdm, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["volume", "create", "v", "--pool", "sp1", "--size", "1.5GiB"], env=env) == 0
    out = capsys.readouterr().out
    assert out == (
        "created thin volume 'v' of 2 GiB in pool 'sp1' (rounded up from 1.5 GiB to 2 GiB, "
        "a multiple of the pool's allocation granularity (1 GiB))\n"
    )
    assert mdm.changes()[0][2]["size"] == 3 * GiB // 2  # the request was as typed

    assert main(["volume", "extend", "v", "--size", "+100MiB"], env=env) == 0
    out = capsys.readouterr().out
    assert out == (
        "volume 'v' is now 3 GiB (was 2 GiB; rounded up from 2.1 GiB to 3 GiB, "
        "a multiple of the pool's allocation granularity (1 GiB))\n"
    )

    # A size the pool holds as is: nothing to tell.
    assert main(["volume", "create", "w", "--pool", "sp1", "--size", "2GiB"], env=env) == 0
    assert capsys.readouterr().out == "created thin volume 'w' of 2 GiB in pool 'sp1'\n"
    assert main(["volume", "extend", "w", "--size", "4GiB"], env=env) == 0
    assert capsys.readouterr().out == "volume 'w' is now 4 GiB (was 2 GiB)\n"

    # --json: the MDM's document only (its size_bytes shows the rounding).
    argv = ["volume", "create", "x", "--pool", "sp1", "--size", "1MiB", "--json"]
    assert main(argv, env=env) == 0
    assert json.loads(capsys.readouterr().out)["size_bytes"] == GiB


def test_rounding_that_formats_alike_is_shown_in_bytes() -> None:
    from meshblock.cli.commands.volumes import rounding

    assert rounding(2 * GiB - 1, {"size_bytes": 2 * GiB}) == (
        f"rounded up from {2 * GiB - 1} B to {2 * GiB} B"
    )
    assert rounding(2 * GiB, {"size_bytes": 2 * GiB}) == ""


# -- 2. --version, and bare meshctl -----------------------------------------------------


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.M)
    assert version is not None
    assert main(["--version"], env={}) == 0
    assert capsys.readouterr().out == f"meshctl {version.group(1)}\n"


def test_bare_meshctl_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], env={}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: meshctl ")
    for word in ("volume", "pool", "exit codes:", "--version", "MESHCTL_TOKEN"):
        assert word in captured.err, f"{word!r} not in the help"


# -- 3. shell completion ----------------------------------------------------------------


def test_zsh_completion_is_generated_from_the_parser(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["completion", "zsh"], env=env) == 0
    out = capsys.readouterr().out
    assert out.startswith("#compdef meshctl")
    for word in ("volume", "set-limits", "ok-to-stop", "completion", "--bandwidth-limit"):
        assert word in out, f"{word!r} not in the zsh script"
    assert main(["completion", "fish"], env=env) == 2  # bash and zsh only


def test_completion_without_shtab_says_what_to_install(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab raises ImportError
    assert main(["completion", "bash"], env=env) == 1
    assert "pip install 'shtab>=1.7,<2'" in capsys.readouterr().err
    assert main(["--version"], env=env) == 0  # nothing else needs it


# -- 4. volume delete asks ----------------------------------------------------------------


class Terminal(io.StringIO):
    """A stdin that is a terminal, whose operator types ``answer``."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def vol(mdm: FakeMdm, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["volume", "create", "v", "--pool", "sp1", "--size", "2GiB"], env=env) == 0
    capsys.readouterr()
    return "v"


def deleted(mdm: FakeMdm) -> bool:
    return any(method == "DELETE" for method, _, _ in mdm.calls)


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "yes please\n"])
def test_delete_on_a_terminal_asks_and_anything_but_yes_keeps_it(
    answer: str,
    vol: str,
    mdm: FakeMdm,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    assert main(["volume", "delete", vol], env=env) == 1
    err = capsys.readouterr().err
    assert err.startswith("delete volume 'v' (2 GiB)? Its data cannot be read again. [y/N] ")
    assert err.endswith("meshctl: error: not confirmed: did not delete volume 'v'\n")
    assert not deleted(mdm)


@pytest.mark.parametrize("answer", ["y\n", "YES\n", " yes \n"])
def test_delete_on_a_terminal_deletes_on_yes(
    answer: str,
    vol: str,
    mdm: FakeMdm,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    assert main(["volume", "delete", vol], env=env) == 0
    assert capsys.readouterr().out.startswith("deleted volume 'v'")
    assert deleted(mdm)


@pytest.mark.parametrize("stdin", ["pipe", "none"])
def test_delete_without_a_terminal_needs_yes(
    stdin: str,
    vol: str,
    mdm: FakeMdm,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n") if stdin == "pipe" else None)
    assert main(["volume", "delete", vol], env=env) == 2
    assert capsys.readouterr().err == (
        "meshctl: error: not confirmed: stdin is not a terminal to ask on; add --yes (-y) "
        "to delete volume 'v' without asking\n"
    )
    assert not deleted(mdm)
    assert main(["vol", "rm", vol, "-y"], env=env) == 0
    assert deleted(mdm)


def test_delete_with_yes_does_not_ask_on_a_terminal(
    vol: str,
    mdm: FakeMdm,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    terminal = Terminal("n\n")
    monkeypatch.setattr(sys, "stdin", terminal)
    assert main(["volume", "delete", vol, "--yes"], env=env) == 0
    assert terminal.tell() == 0 and capsys.readouterr().err == ""  # nothing read or asked
    assert deleted(mdm)


# -- 5. what a refused credential says; errors as JSON ------------------------------------


def test_no_token_names_where_to_put_one(
    mdm: FakeMdm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pd", "list"], env={"XDG_CONFIG_HOME": str(tmp_path)}) == 6
    err = capsys.readouterr().err
    assert err.startswith("meshctl: error: a valid 'Authorization: Bearer <token>' header")
    assert "no API token was given: set MESHCTL_TOKEN, or pass --token-file PATH" in err
    assert str(tmp_path / "meshblock" / "meshctl.toml") in err


def test_a_wrong_token_names_where_it_came_from(
    mdm: FakeMdm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xdg = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert main(["volume", "list"], env={**xdg, "MESHCTL_TOKEN": "wrong"}) == 6
    assert "the MDM does not know the token from MESHCTL_TOKEN: " in capsys.readouterr().err

    token_file = tmp_path / "token"
    token_file.write_text("wrong\n")
    token_file.chmod(0o600)
    assert main(["volume", "list", "--token-file", str(token_file)], env=xdg) == 6
    assert f"token from --token-file {token_file}: " in capsys.readouterr().err

    config = tmp_path / "meshblock" / "meshctl.toml"
    config.parent.mkdir()
    config.write_text('token = "wrong"\n')
    config.chmod(0o600)
    assert main(["volume", "list"], env=xdg) == 6
    assert f"token from the config file {config}: " in capsys.readouterr().err


def test_a_read_only_token_is_told_to_use_an_admin_token(
    mdm: FakeMdm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "MESHCTL_TOKEN": "readonly"}
    assert main(["volume", "create", "v", "--pool", "sp1", "--size", "1GiB"], env=env) == 6
    err = capsys.readouterr().err
    assert err.startswith("meshctl: error: this token (readonly) may not POST /api/v1/volumes; ")
    assert "the token from MESHCTL_TOKEN may not do this" in err and "admin token" in err


def json_error(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()  # one JSON object, nothing else
    doc: dict[str, Any] = json.loads(line)
    return doc


@pytest.mark.parametrize(
    ("argv", "exit_code", "kind", "error"),
    [
        (["volume", "show", "nope"], 4, "not_found", "no volume named 'nope'"),
        (["volume", "create", "v", "--pool", "sp1"], 2, "usage", "the following arguments are "
         "required: --size"),
        (["volume", "create", "v", "--pool", "sp1", "--size", "10"], 7, "invalid",
         "a size needs a unit: '10'; use KiB"),
        (["frobnicate"], 2, "usage", "argument COMMAND: invalid choice: 'frobnicate'"),
        (["volume", "delete", "nope", "--yes"], 4, "not_found", "no volume named 'nope'"),
    ],
)  # fmt: skip
def test_errors_under_json_are_json_on_stderr_with_the_same_exit_code(
    argv: list[str],
    exit_code: int,
    kind: str,
    error: str,
    mdm: FakeMdm,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(argv, env=env) == exit_code  # as text, as before
    assert "error: " + error in capsys.readouterr().err
    assert main([*argv, "--json"], env=env) == exit_code
    doc = json_error(capsys)
    assert doc["error"].startswith(error) and (doc["exit_code"], doc["kind"]) == (exit_code, kind)
    assert main(["--json", *argv], env=env) == exit_code  # before the command too
    assert json_error(capsys)["exit_code"] == exit_code


def test_an_mdm_refusal_under_json_carries_its_status_and_code(
    mdm: FakeMdm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pd", "list", "--json"], env={"XDG_CONFIG_HOME": str(tmp_path)}) == 6
    doc = json_error(capsys)
    assert (doc["exit_code"], doc["kind"], doc["status"], doc["code"]) == (
        6, "auth", 401, "unauthorized",
    )  # fmt: skip
    assert "set MESHCTL_TOKEN" in doc["error"]
    # --help and --version under --json print as they do without it.
    assert main(["volume", "--json", "--help"], env={}) == 0
    assert capsys.readouterr().out.startswith("usage: meshctl volume")


# -- 6. an unthrottled pool says unlimited --------------------------------------------------


def test_pool_show_says_unlimited_for_a_zero_or_missing_throttle(
    mdm: FakeMdm, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pool", "show", "sp1"], env=env) == 0
    out = capsys.readouterr().out
    assert re.search(r"^rebuild: +unlimited, concurrency 4$", out, re.M), out
    assert re.search(r"^rebalance: +50 MiB/s per device, concurrency 2$", out, re.M), out
    del mdm.pools[0]["rebalance_bandwidth_mibps"]  # an MDM that does not say: no throttle
    assert main(["pool", "show", "sp1"], env=env) == 0
    assert re.search(r"^rebalance: +unlimited, concurrency 2$", capsys.readouterr().out, re.M)
    assert main(["pool", "show", "sp1", "--json"], env=env) == 0  # the document, unchanged
    assert json.loads(capsys.readouterr().out)["rebuild_bandwidth_mibps"] == 0


@pytest.mark.parametrize("text", ["0", "unlimited", "none", "off", "Unlimited"])
def test_a_pool_throttle_can_be_set_to_unlimited(text: str) -> None:
    assert values.bandwidth_mibps(text) == 0


# -- 7. lab up honours MESHBLOCK_BASE_PORT (README) ------------------------------------------


@pytest.fixture
def lab_ports(mdm: FakeMdm, monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The base port each ``lab up`` was started with (no lab is started)."""
    started: list[int | None] = []

    def up(self: lab.Lab, *, base_port: int | None = None, **kwargs: Any) -> dict[str, Any]:
        started.append(base_port)
        return {"started": True}

    monkeypatch.setattr(lab.Lab, "up", up)
    return started


def test_lab_up_takes_its_base_port_from_the_flag_else_the_environment(
    lab_ports: list[int | None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    up = ["lab", "up", "--dir", str(tmp_path / "lab"), "--json"]
    assert main(up, env={}) == 0
    assert main(up, env={"MESHBLOCK_BASE_PORT": "20000"}) == 0
    assert main([*up, "--base-port", "21000"], env={"MESHBLOCK_BASE_PORT": "20000"}) == 0
    assert main(up, env={"MESHBLOCK_BASE_PORT": ""}) == 0  # empty: unset
    assert lab_ports == [None, 20000, 21000, None]
    capsys.readouterr()

    assert main(up, env={"MESHBLOCK_BASE_PORT": "lots"}) == 7
    assert "MESHBLOCK_BASE_PORT='lots': not a whole number" in capsys.readouterr().err
    assert main([*up, "--base-port", "70000"], env={}) == 2
    assert lab_ports == [None, 20000, 21000, None]  # refused ones started nothing


# -- 8. rebuild status says when a rebuild waits out rebuild_delay_s ----------------------


def pool_rebuild(
    *,
    degraded: int = 0,
    rebuilding: int = 0,
    left: int = 0,
    rate: float = 0.0,
    delay_left: float | None = None,
) -> dict[str, Any]:
    """One pool of ``GET /api/v1/rebuild`` as the MDM answers it."""
    eta = round(left / rate, 1) if left and rate else None
    return {
        "pool_id": 1, "name": "sp1", "protection_domain": "pd1",
        "pgs": {"clean": 64 - degraded - rebuilding, "degraded": degraded,
                "rebuilding": rebuilding, "resyncing": 0, "inactive": 0},
        "pgs_moving": 0, "rebuild_concurrency": 4, "rebuild_bandwidth_mibps": 0,
        "rebuild_delay_left_s": delay_left,
        "rebuild": {"active": bool(rebuilding), "remaining_bytes": left, "copied_bytes": 0,
                    "rate_bytes_per_s": rate, "eta_s": eta},
        "rebalance": {"active": False, "remaining_bytes": 0, "copied_bytes": 0,
                      "rate_bytes_per_s": 0.0, "eta_s": None},
    }  # fmt: skip


WAITING = pool_rebuild(degraded=20, delay_left=11.3)
REBUILDING = pool_rebuild(rebuilding=20, left=3 * GiB // 2, rate=96.0 * MiB)
CLEAN = pool_rebuild()


def test_rebuild_status_says_when_the_rebuild_starts(
    mdm: FakeMdm, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    mdm.routes[("GET", "/api/v1/rebuild")] = lambda _: {"pools": [WAITING]}
    assert main(["rebuild", "status"], env=env) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sp1 +pd1 +rebuild +44 +20 +0 +0 +0 B +0 B/s +-$", out, re.M), out
    assert out.endswith(
        "\nsp1: waiting out rebuild_delay_s: starts in 12 s unless the lost SDS comes back\n"
    ), out
    assert main(["rebuild", "status", "--json"], env=env) == 0  # passed through as is
    assert json.loads(capsys.readouterr().out)["pools"][0]["rebuild_delay_left_s"] == 11.3

    # Running: the bytes the SDSs still have to copy, the rate and an ETA; no wait.
    mdm.routes[("GET", "/api/v1/rebuild")] = lambda _: {"pools": [REBUILDING]}
    assert main(["rebuild", "status"], env=env) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sp1 +pd1 +rebuild .* 1\.5 GiB +96 MiB/s +16s$", out, re.M), out
    assert "rebuild_delay_s" not in out
    # Long waits read as minutes and hours.
    mdm.routes[("GET", "/api/v1/rebuild")] = lambda _: {
        "pools": [pool_rebuild(degraded=1, delay_left=3725.0)]
    }
    assert main(["rebuild", "status"], env=env) == 0
    assert "starts in 1 h 02 min unless" in capsys.readouterr().out


def test_rebuild_status_watch_shows_the_wait_then_the_copy(
    mdm: FakeMdm,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import meshblock.cli.progress as progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every poll a line on stderr
    answers = iter([WAITING, REBUILDING, CLEAN])
    mdm.routes[("GET", "/api/v1/rebuild")] = lambda _: {"pools": [next(answers)]}
    argv = ["rebuild", "status", "--watch", "--interval", "0.01", "--max-wait", "30"]
    assert main(argv, env=env) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 3, captured.err
    assert lines[0].endswith(
        "20 PG(s) left, 0 B to copy at 0 B/s, ETA --; "
        "sp1 waiting out rebuild_delay_s: starts in 12 s"
    ), lines
    assert lines[1].endswith("20 PG(s) left, 1.5 GiB to copy at 96 MiB/s, ETA 16s"), lines
    assert "100.0%" in lines[2] and "rebuild_delay_s" not in captured.out, captured
