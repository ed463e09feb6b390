"""Users, their passwords (scrypt) and their API tokens.

A password hash is ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (salt and key in unpadded
base64), so that the cost can be raised later without breaking stored hashes. An API
token is ``mbt_`` followed by 32 random bytes; only its SHA-256 is stored, and it acts
with its user's role.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mgmt.errors import Conflict, Invalid, NotFound
from meshblock.mgmt.models import ApiToken, User, UserRole, utcnow

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
TOKEN_PREFIX = "mbt_"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=64 << 20
    )


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(got, _unb64(key))


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


async def create_user(session: AsyncSession, name: str, password: str, role: UserRole) -> User:
    check_user_name(name)
    check_password_rules(password)
    if (await session.execute(select(User.id).where(User.name == name))).scalar() is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(
        name=name, password_hash=await asyncio.to_thread(hash_password, password), role=role
    )
    session.add(user)
    await session.flush()
    return user


async def authenticate(session: AsyncSession, name: str, password: str) -> User | None:
    """The user with this name and password, or None (in about constant time)."""
    if len(password) > MAX_PASSWORD_CHARS:
        return None
    user = (await session.execute(select(User).where(User.name == name))).scalar_one_or_none()
    stored = user.password_hash if user is not None else _dummy_hash()
    ok = await asyncio.to_thread(verify_password, password, stored)
    return user if ok and user is not None else None


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


async def user_of_token(session: AsyncSession, token: str) -> User | None:
    """The user an API token belongs to (and note its use), or None."""
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
    return user
