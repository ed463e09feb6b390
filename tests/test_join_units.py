"""Join tokens in the small: their shape, what the MDM keeps of them, the SDS's
``join_token``/``join_token_file`` and meshctl's ``--ttl`` (docs/security.md,
"Joining the cluster"). The MDM's behaviour is in tests/test_sds_join.py."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from meshblock.cli.commands.sds_join import duration
from meshblock.config import ConfigError
from meshblock.mdm.api import join
from meshblock.sds import config as sds_config

pytestmark = pytest.mark.unit

SDS_TOML = """
name = "sds1"
protection_domain = "pd1"
address = "127.0.0.1"
cluster_secret = "s"
{extra}
[[devices]]
path = "/tmp/dev0"
capacity = "64MiB"
pool = "p1"
"""


def test_a_token_is_an_id_and_a_long_random_secret() -> None:
    made = {join.new_token() for _ in range(200)}
    assert len({token for _, token in made}) == 200 and len({i for i, _ in made}) > 190
    for token_id, token in made:
        assert join.TOKEN_RE.match(token) and token.partition(".")[0] == token_id
        assert len(token.partition(".")[2]) == 32


def test_only_the_sha256_of_the_secret_is_kept() -> None:
    token_id, token = join.new_token()
    secret = token.partition(".")[2]
    digest = join.secret_digest(token)
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in digest and token_id not in digest
    assert join.secret_digest(token_id + "." + "x" * 32) != digest


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("365d", 31536000)],
)
def test_ttl_durations(text: str, seconds: int) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0h", "366d", "1w", "-5m", "1.5h", "h", ""])
def test_a_ttl_out_of_range_or_malformed_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def load(tmp_path: Path, extra: str) -> sds_config.SdsConfig:
    path = tmp_path / "sds.toml"
    path.write_text(SDS_TOML.format(extra=extra))
    return sds_config.load(path)


def test_the_sds_reads_its_join_token_from_the_config_or_a_file(tmp_path: Path) -> None:
    assert load(tmp_path, "").token() is None
    assert load(tmp_path, 'join_token = "abc123.x"').token() == "abc123.x"
    file = tmp_path / "join.token"
    cfg = load(tmp_path, f'join_token_file = "{file}"')
    assert cfg.token() is None  # no file yet: no token (a registered SDS needs none)
    file.write_text("  abc123.y\n")
    assert cfg.token() == "abc123.y"
    file.write_text("\n")
    with pytest.raises(ConfigError, match=r"^join_token_file .* is empty$"):
        cfg.token()
    with pytest.raises(ConfigError, match="at most one of join_token and join_token_file"):
        load(tmp_path, f'join_token = "a"\njoin_token_file = "{file}"')
    assert "abc123" not in repr(load(tmp_path, 'join_token = "abc123.x"'))
