"""Login throttling, per account and per client address.

Each failed login counts against the user name tried and against the client's
address. Once one of them has ``max_failures`` failures within ``window_s``, it is
locked for a backoff: ``backoff_s`` the first time, doubled at each lock that
follows, at most ``max_backoff_s``. While either is locked, a login is refused with
429 and ``Retry-After`` before the password is even checked (so a locked account
costs the server no hashing). A successful login clears both the account's and the
address's record. A record left alone for longer than the window and the longest
backoff starts over (its next lock is ``backoff_s`` again). Records live in memory
only (a restart forgets them); with more than 100,000 of them, those left alone that
long are dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MAX_RECORDS = 100_000  # above this, records that no longer matter are dropped


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locks: int = 0  # locks since the last success: the next backoff doubles
    locked_until: float = 0.0
    last_seen: float = 0.0


@dataclass(frozen=True)
class Limit:
    """The ``[auth] login_*`` settings, the same for accounts and addresses."""

    max_failures: int
    window_s: float
    backoff_s: float
    max_backoff_s: float


class LoginThrottle:
    """The records of the accounts and addresses (``("user", name)``, ``("addr", ip)``)."""

    def __init__(self, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._records: dict[tuple[str, str], _Record] = {}

    @staticmethod
    def keys(user: str, address: str) -> list[tuple[str, str]]:
        return [("user", user.lower()), ("addr", address)]

    def retry_after(self, user: str, address: str) -> float:
        """Seconds until a login for ``user`` from ``address`` is heard (0: now)."""
        now = self._clock()
        wait = 0.0
        for key in self.keys(user, address):
            record = self._records.get(key)
            if record is not None:
                wait = max(wait, record.locked_until - now)
        return wait

    def failed(self, user: str, address: str) -> float:
        """Count a failure; the seconds the account or address is now locked (0: none)."""
        now = self._clock()
        self._prune(now)
        wait = 0.0
        limit = self._limit
        for key in self.keys(user, address):
            record = self._records.setdefault(key, _Record())
            if record.last_seen < now - limit.window_s - limit.max_backoff_s:
                record.locks = 0  # quiet for long enough: start again from backoff_s
            record.last_seen = now
            record.failures.append(now)
            while record.failures and record.failures[0] <= now - limit.window_s:
                record.failures.popleft()
            if len(record.failures) >= limit.max_failures:
                backoff = min(limit.backoff_s * 2**record.locks, limit.max_backoff_s)
                record.locks += 1
                record.locked_until = now + backoff
                record.failures.clear()
            wait = max(wait, record.locked_until - now)
        return wait

    def succeeded(self, user: str, address: str) -> None:
        for key in self.keys(user, address):
            self._records.pop(key, None)

    def _prune(self, now: float) -> None:
        if len(self._records) < MAX_RECORDS:
            return
        limit = self._limit
        for key, record in list(self._records.items()):
            if record.last_seen < now - limit.window_s - limit.max_backoff_s:
                del self._records[key]


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))


class PasswordChecks:
    """At most ``limit`` password hashes computed at once (``[auth]
    max_password_checks``).

    An argon2id check takes 64 MiB of memory and about a tenth of a second of a core
    (meshblock.mgmt.accounts): unbounded, a burst of logins (or of guesses, before
    the throttle locks their account or address) would run as many at once as the
    default thread pool has threads and take memory in proportion. The checks beyond
    ``limit`` wait their turn, in order; ``running`` and ``peak`` say how many run.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.running = 0
        self.peak = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, once a slot is free."""
        async with self._slots:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await asyncio.to_thread(fn, *args)
            finally:
                self.running -= 1
