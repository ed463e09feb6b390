"""Bearer-token credentials shared by the daemons' HTTP APIs.

A :class:`TokenTable` maps secret tokens to roles and answers in constant time, so
that a wrong guess learns nothing from the response time. Tokens are never logged.
"""

from __future__ import annotations

import enum
import hmac


class Role(enum.IntEnum):
    """What a credential may do; a higher role includes the lower ones' reads."""

    NONE = 0
    COMPONENT = 1  # an SDS or SDC holding the cluster secret
    READONLY = 2
    ADMIN = 3


class TokenTable:
    def __init__(self, tokens: dict[Role, str]) -> None:
        self._entries = [(role, tok.encode()) for role, tok in tokens.items() if tok]

    def role_of(self, token: str | None) -> Role:
        if not token:
            return Role.NONE
        presented = token.encode()
        found = Role.NONE
        for role, secret in self._entries:  # no early exit: constant work per call
            if hmac.compare_digest(presented, secret):
                found = role
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
