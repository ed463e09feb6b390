"""``meshctl completion bash``: the script that shtab generates from meshctl's parser
is valid bash (``bash -n``) and completes meshctl's commands when bash runs it.

Cluster tier: it runs bash. The zsh script and the error without shtab are checked
in process in tests/test_cli_hand.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshblock.cli.__main__ import main

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


@pytest.fixture
def script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["completion", "bash"], env={"XDG_CONFIG_HOME": str(tmp_path)}) == 0
    path = tmp_path / "meshctl.bash"
    path.write_text(capsys.readouterr().out)
    return path


def bash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "--norc", "--noprofile", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bash_accepts_the_script(script: Path) -> None:
    proc = bash("-n", str(script))
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "complete " in text and " meshctl" in text
    for word in ("volume", "set-limits", "ok-to-stop", "completion", "--bandwidth-limit"):
        assert word in text, f"{word!r} not in the script"


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for ``meshctl WORDS`` (the last word being typed)."""
    quoted = " ".join(f"'{w}'" for w in ("meshctl", *words))
    proc = bash(
        "-c",
        f"source '{script}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
        'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; '
        '_shtab_meshctl; printf "%s\\n" "${COMPREPLY[@]}"',
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completes_commands_subcommands_and_options(script: Path) -> None:
    assert complete(script, "vol") == ["volume", "vol"]
    assert complete(script, "volume", "set-") == ["set-limits", "set-access"]
    assert "--size" in complete(script, "volume", "create", "--")
    assert {"--yes", "-y"} <= set(complete(script, "volume", "delete", "-"))
    assert complete(script, "completion", "") == ["bash", "zsh"]
