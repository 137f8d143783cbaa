"""Slowing down password guessing: a pure failure counter with an injected clock.

A key (a client address, a login) that fails ``max_failures`` times within
``window`` seconds is refused for ``lockout`` seconds.  A success clears the
key.  The defaults (10 failures in 5 minutes, 5 minutes refused) stop an
online guessing attack at about 3 guesses a minute while a user who mistypes
twice never notices.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

MAX_KEYS = 100_000


@dataclass
class _Record:
    failures: deque = field(default_factory=deque)
    blocked_until: float = 0.0


class FailureLimiter:
    def __init__(self, max_failures: int, window: float, lockout: float, max_keys: int = MAX_KEYS):
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds the key is still refused (0 if it is not)."""
        record = self._records.get(key)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - now)

    def failure(self, key: str, now: float) -> bool:
        """Count a failure; return True if the key is now refused."""
        record = self._records.pop(key, None) or _Record()
        self._records[key] = record  # most recently used last
        while record.failures and record.failures[0] <= now - self.window:
            record.failures.popleft()
        record.failures.append(now)
        if len(record.failures) >= self.max_failures and self.lockout > 0:
            record.blocked_until = now + self.lockout
            record.failures.clear()
        while len(self._records) > self.max_keys:  # bounded memory under a flood
            self._records.popitem(last=False)
        return record.blocked_until > now

    def success(self, key: str) -> None:
        self._records.pop(key, None)
