"""Users, their passwords (argon2id) and their API tokens.

A password hash is argon2id in the PHC string format that the reference
implementation writes (``$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>``), made and
checked by argon2-cffi: 64 MiB of memory, 3 passes, 4 lanes, a 16-byte salt and a
32-byte hash (RFC 9106's second recommended setting, argon2-cffi's default). The
parameters are in the string, so raising them later keeps old hashes valid; a hash
made with other parameters, or a ``scrypt$<n>$<r>$<p>$<salt>$<key>`` hash of an
earlier release, still verifies and is replaced by an argon2id hash of this release's
parameters at the user's next successful login (:func:`authenticate`).

An API token is ``mbt_`` followed by 32 random bytes; only its SHA-256 is stored, and
it acts with its user's role.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

import argon2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mgmt.errors import Conflict, Invalid, NotFound
from meshblock.mgmt.models import ApiToken, User, UserRole, utcnow
from meshblock.mgmt.throttle import PasswordChecks

log = logging.getLogger(__name__)

ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 4
ARGON2_HASH_BYTES = 32
ARGON2_SALT_BYTES = 16
HASHER = argon2.PasswordHasher(
    time_cost=ARGON2_TIME_COST,
    memory_cost=ARGON2_MEMORY_KIB,
    parallelism=ARGON2_PARALLELISM,
    hash_len=ARGON2_HASH_BYTES,
    salt_len=ARGON2_SALT_BYTES,
    type=argon2.Type.ID,
)
SCRYPT_PREFIX = "scrypt$"  # hashes of releases before argon2id: verified, then replaced
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
TOKEN_PREFIX = "mbt_"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def _verify_scrypt(password: str, stored: str) -> bool:
    _scheme, n, r, p, salt, key = stored.split("$")
    got = hashlib.scrypt(
        password.encode(),
        salt=_unb64(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(_unb64(key)),
        maxmem=64 << 20,
    )
    return hmac.compare_digest(got, _unb64(key))


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (argon2id, or an earlier release's scrypt)."""
    try:
        if stored.startswith(SCRYPT_PREFIX):
            return _verify_scrypt(password, stored)
        return HASHER.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
    except ValueError:  # a malformed scrypt string
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` is not argon2id with this release's parameters."""
    if stored.startswith(SCRYPT_PREFIX):
        return True
    try:
        return HASHER.check_needs_rehash(stored)
    except argon2.exceptions.InvalidHashError:
        return True


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the user does not exist, so that a wrong name costs as
    much time as a wrong password and the response time does not tell which exist."""
    return hash_password(secrets.token_urlsafe(16))


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise Invalid(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise Invalid(f"a password has at most {MAX_PASSWORD_CHARS} characters")


def check_user_name(name: str) -> None:
    if not USER_NAME.match(name):
        raise Invalid(
            "a user name is 1 to 64 letters, digits or . _ @ -, starting with a letter or digit"
        )


#: Used where no MGMT app runs (the user commands): one check at a time.
SOLO = PasswordChecks(1)


async def create_user(
    session: AsyncSession,
    name: str,
    password: str,
    role: UserRole,
    checks: PasswordChecks = SOLO,
) -> User:
    check_user_name(name)
    check_password_rules(password)
    if (await session.execute(select(User.id).where(User.name == name))).scalar() is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, password_hash=await checks.run(hash_password, password), role=role)
    session.add(user)
    await session.flush()
    return user


async def authenticate(
    session: AsyncSession, name: str, password: str, checks: PasswordChecks = SOLO
) -> User | None:
    """The user with this name and password, or None (in about constant time). The
    hashing runs in ``checks`` (at most its limit at once)."""
    if len(password) > MAX_PASSWORD_CHARS:
        return None
    user = (await session.execute(select(User).where(User.name == name))).scalar_one_or_none()
    stored = user.password_hash if user is not None else _dummy_hash()
    ok = await checks.run(verify_password, password, stored)
    if not ok or user is None:
        return None
    if needs_rehash(stored):
        user.password_hash = await checks.run(hash_password, password)
        await session.commit()
        log.info("the password hash of user %s was replaced by argon2id", user.name)
    return user


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewToken:
    id: int
    name: str
    user: str
    token: str  # shown once, never stored


async def create_token(session: AsyncSession, user_name: str, token_name: str) -> NewToken:
    check_user_name(token_name)
    user = (await session.execute(select(User).where(User.name == user_name))).scalar_one_or_none()
    if user is None:
        raise NotFound(f"no user {user_name!r}")
    taken = await session.execute(
        select(ApiToken.id).where(ApiToken.user_id == user.id, ApiToken.name == token_name)
    )
    if taken.scalar() is not None:
        raise Conflict(f"user {user_name!r} already has a token named {token_name!r}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=token_name, token_hash=token_hash(secret))
    session.add(row)
    await session.flush()
    return NewToken(row.id, token_name, user.name, secret)


async def user_of_token(session: AsyncSession, token: str) -> tuple[User, str] | None:
    """The user an API token belongs to and the token's name (and note its use), or None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = (
        await session.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == token_hash(token))
        )
    ).first()
    if row is None:
        return None
    api_token, user = row
    api_token.last_used_at = utcnow()
    return user, api_token.name
