"""MGMT's defences that need no running service: where ``next=`` may send a browser
after login, the depth limit of the JSON bodies of MGMT's and the MDM's APIs
(meshblock.json_body), and the password hashes (argon2id; an earlier release's scrypt
replaced at login) on an SQLite file. The same defences are tested through the running
services in ``test_mgmt.py`` and ``test_api.py``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

import _tls
from meshblock.config import ConfigError
from meshblock.http_errors import BadRequest
from meshblock.json_body import MAX_DEPTH, parse_object, too_deep
from meshblock.mgmt import accounts, db
from meshblock.mgmt.app import server_tls
from meshblock.mgmt.config import AuthConfig, HttpConfig, MgmtConfig
from meshblock.mgmt.models import User, UserRole
from meshblock.mgmt.pages import safe_next
from meshblock.mgmt.throttle import Limit, LoginThrottle, PasswordChecks, retry_after_header
from meshblock.tls import TlsConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "target",
    [
        "/\t/evil.example",  # browsers drop the TAB: //evil.example
        "/\n/evil.example",
        "/\r/evil.example",
        "//evil.example",
        "/\\evil.example",  # browsers read \ as /
        "\\\\evil.example",
        "https://evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/\x00/evil.example",
        "/\x7f",
        "/\x85/evil.example",
        "",
        None,
    ],
)
def test_next_refuses_anything_but_a_local_path(target: str | None) -> None:
    assert safe_next(target) == "/health"


@pytest.mark.parametrize(
    "target", ["/alerts", "/alerts?status=active&offset=50#alert-3", "/health/x%2F%2Fy", "/"]
)
def test_next_keeps_a_local_path(target: str) -> None:
    assert safe_next(target) == target


def test_json_depth_limit() -> None:
    at_limit = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert not too_deep(parse_object(b'{"a": ' + at_limit[2:-2] + b"}")["a"])
    assert too_deep([[1]], limit=1) and not too_deep([1, {"a": 2}], limit=2)
    for raw in (
        b"[" * 10_000,  # the decoder's recursion limit: RecursionError inside json
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a": ' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1),  # decodes, too deep
    ):
        with pytest.raises(BadRequest, match=f"nested deeper than {MAX_DEPTH} levels"):
            parse_object(raw)
    assert parse_object(b'{"a": ' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH)
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_object(b"[1]")
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_object(b"{nope")
    assert parse_object(b"  ") == {}


def scrypt_hash(password: str, salt: bytes = b"0123456789abcdef") -> str:
    """A hash as releases before argon2id stored it (scrypt, N=2^14, r=8, p=1)."""
    key = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    return f"scrypt$16384$8$1${b64(salt)}${b64(key)}"


def test_password_hashes_are_argon2id() -> None:
    stored = accounts.hash_password("correct horse")
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), stored
    assert accounts.verify_password("correct horse", stored)
    assert not accounts.verify_password("correct horsE", stored)
    assert not accounts.needs_rehash(stored)
    weaker = stored.replace("m=65536,t=3", "m=65536,t=2")  # another setting: re-hashed
    assert accounts.needs_rehash(weaker)
    legacy = scrypt_hash("correct horse")
    assert accounts.verify_password("correct horse", legacy)
    assert not accounts.verify_password("correct horsE", legacy)
    assert accounts.needs_rehash(legacy)
    for junk in ("", "scrypt$x", "$argon2id$nope", "plain"):
        assert not accounts.verify_password("correct horse", junk)


def test_a_scrypt_hash_is_replaced_by_argon2id_at_the_next_login(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, str, bool]:
        engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mgmt.db'}")
        sessions = db.session_factory(engine)

        async def stored() -> str:
            async with sessions() as s:
                return str((await s.execute(select(User.password_hash))).scalar_one())

        try:
            await db.migrate(engine)
            async with sessions() as s, s.begin():
                s.add(
                    User(name="old", password_hash=scrypt_hash("pw-of-2025"), role=UserRole.ADMIN)
                )
            async with sessions() as s:  # a wrong password changes nothing
                assert await accounts.authenticate(s, "old", "wrong password") is None
            before = await stored()
            async with sessions() as s:
                user = await accounts.authenticate(s, "old", "pw-of-2025")
                assert user is not None and user.name == "old"
            after = await stored()
            async with sessions() as s:
                again = await accounts.authenticate(s, "old", "pw-of-2025") is not None
            return before, after, await stored(), again
        finally:
            await engine.dispose()

    before, after, last, again = asyncio.run(main())
    assert before.startswith("scrypt$")
    assert after.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), after
    assert again and last == after  # verified as argon2id, not re-hashed again


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_logins_run_at_most_max_password_checks_argon2_checks_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve logins at once (right and wrong passwords, a user that does not exist)
    with a limit of 2: never more than 2 argon2id checks (64 MiB each) run, and every
    login gets its answer. Unbounded, they ran as many as the thread pool's threads."""
    limit = 2
    running = peak = 0
    lock = threading.Lock()
    real_verify = accounts.verify_password

    def counting_verify(password: str, stored: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real_verify(password, stored)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(accounts, "verify_password", counting_verify)

    async def main() -> tuple[list[bool], PasswordChecks]:
        engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mgmt.db'}")
        sessions = db.session_factory(engine)
        checks = PasswordChecks(limit)
        try:
            await db.migrate(engine)
            async with sessions() as s, s.begin():
                await accounts.create_user(s, "alice", "right password", UserRole.ADMIN)

            async def login(name: str, password: str) -> bool:
                async with sessions() as s:
                    return await accounts.authenticate(s, name, password, checks) is not None

            tries = [("alice", "right password"), ("alice", "wrong"), ("nobody", "x")] * 4
            return list(await asyncio.gather(*(login(n, p) for n, p in tries))), checks
        finally:
            await engine.dispose()

    answers, checks = asyncio.run(main())
    assert answers == [True, False, False] * 4
    assert peak == limit == checks.peak, (peak, checks.peak)
    assert checks.running == 0


def test_login_throttle_backs_off_per_account_and_per_address() -> None:
    clock = Clock()
    t = LoginThrottle(Limit(5, 300.0, 60.0, 3600.0), clock)
    for _ in range(4):
        assert t.failed("admin", "10.0.0.1") == 0
        clock.now += 10
    assert t.retry_after("admin", "10.0.0.1") == 0
    assert t.failed("admin", "10.0.0.1") == 60  # the fifth in 5 minutes
    assert t.retry_after("admin", "10.0.0.1") == 60
    assert t.retry_after("ADMIN", "10.0.0.9") == 60  # the account, from anywhere
    assert t.retry_after("viewer", "10.0.0.1") == 60  # the address, for any account
    assert t.retry_after("viewer", "10.0.0.9") == 0
    clock.now += 60
    assert t.retry_after("admin", "10.0.0.1") == 0
    waits = []
    for _ in range(3):  # each lock after the first doubles
        for _ in range(5):
            wait = t.failed("admin", "10.0.0.1")
        waits.append(wait)
        clock.now += wait
    assert waits == [120, 240, 480]
    t.succeeded("admin", "10.0.0.1")  # a success clears account and address
    assert [t.failed("admin", "10.0.0.1") for _ in range(5)][-1] == 60


def test_login_throttle_forgets_old_failures_and_caps_the_backoff() -> None:
    clock = Clock()
    t = LoginThrottle(Limit(3, 300.0, 60.0, 100.0), clock)
    for _ in range(10):  # one failure every 2 minutes never makes 3 in 5 minutes
        assert t.failed("admin", "10.0.0.1") == 0
        clock.now += 151
    waits = []
    for _ in range(4):
        for _ in range(3):
            wait = t.failed("admin", "10.0.0.1")
        waits.append(wait)
        clock.now += wait
    assert waits == [60, 100, 100, 100]
    clock.now += 300 + 100 + 1  # left alone longer than window and longest backoff
    assert [t.failed("admin", "10.0.0.1") for _ in range(3)][-1] == 60
    assert retry_after_header(0.2) == "1" and retry_after_header(59.1) == "60"


def test_mgmt_serves_https_unless_plain_http_is_set() -> None:
    files = _tls.component_identity("mgmt:mgmt")
    tls = TlsConfig(cert=str(files.cert), key=str(files.key), ca=str(files.ca))
    https = MgmtConfig(tls=tls)
    context = server_tls(https)
    assert context is not None and context.verify_mode == ssl.CERT_NONE  # no client certs
    assert https.secure_cookies
    assert MgmtConfig(tls=tls, auth=AuthConfig(secure_cookies=False)).secure_cookies
    with pytest.raises(ConfigError, match=r"MGMT serves HTTPS: set \[tls\] cert"):
        server_tls(MgmtConfig())
    with pytest.raises(ConfigError, match=r"MGMT serves HTTPS: set \[tls\] cert"):
        server_tls(MgmtConfig(tls=TlsConfig(ca=str(files.ca))))  # the CA alone
    plain = MgmtConfig(http=HttpConfig(plain_http=True))
    assert server_tls(plain) is None and not plain.secure_cookies
    behind_proxy = MgmtConfig(
        http=HttpConfig(plain_http=True), auth=AuthConfig(secure_cookies=True)
    )
    assert server_tls(behind_proxy) is None and behind_proxy.secure_cookies
