"""Slowing down guessing: a failure counter with an injected clock, and a gate per client.

A key (a client address, a login) that fails ``max_failures`` times within
``window`` seconds is refused for ``lockout`` seconds.  A success clears the
key.  The defaults (10 failures in 5 minutes, 5 minutes refused) stop an
online guessing attack at about 3 guesses a minute while a user who mistypes
twice never notices.

Checking a password takes a while (it is hashed in a thread), so guesses
sent all at once would all be checked before the first failure counted.
:meth:`FailureLimiter.admit` therefore reserves a guess before the check
starts: the failures in the window plus the guesses being checked never
exceed ``max_failures``, whatever arrives at the same moment.  Each admitted
guess ends with :meth:`failure`, :meth:`success` or :meth:`release`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred

MAX_KEYS = 100_000


@dataclass
class _Record:
    failures: deque = field(default_factory=deque)
    blocked_until: float = 0.0
    checking: int = 0
    """Guesses admitted and not yet ended."""


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

    def admit(self, key: str, now: float) -> bool:
        """Reserve a guess for ``key``; False if the failures in the window
        and the guesses being checked already reach ``max_failures``."""
        if self.lockout <= 0:
            return True
        record = self._touch(key, now)
        if record.blocked_until > now or len(record.failures) + record.checking >= self.max_failures:
            return False
        record.checking += 1
        return True

    def failure(self, key: str, now: float) -> bool:
        """Count a failure (ending an admitted guess); return True if the key is now refused."""
        record = self._touch(key, now)
        record.checking = max(0, record.checking - 1)
        record.failures.append(now)
        if len(record.failures) >= self.max_failures and self.lockout > 0:
            record.blocked_until = now + self.lockout
            record.failures.clear()
        return record.blocked_until > now

    def success(self, key: str) -> None:
        """The key's guess was right: forget its failures (and reservations)."""
        self._records.pop(key, None)

    def release(self, key: str) -> None:
        """End an admitted guess that was neither wrong nor a reason to forget the key."""
        record = self._records.get(key)
        if record is not None and record.checking > 0:
            record.checking -= 1

    def _touch(self, key: str, now: float) -> _Record:
        """The key's record, most recently used, with the failures of the window only."""
        record = self._records.pop(key, None) or _Record()
        self._records[key] = record  # most recently used last
        while record.failures and record.failures[0] <= now - self.window:
            record.failures.popleft()
        while len(self._records) > self.max_keys:  # bounded memory under a flood
            self._records.popitem(last=False)
        return record


class KeyedGate:
    """At most ``limit`` calls running at once per key (a client address); later ones wait in order.

    For work whose outcome feeds a limit on that key: the scan detector
    counts an unknown MAC once its look-up has ended, so look-ups sent all at
    once would all run before the first was counted.  Through the gate, a
    waiting call starts only after earlier ones have ended (and been
    counted), and may check the limit again first.  At most ``max_waiting``
    calls wait per key: :meth:`run` returns None for more.
    """

    def __init__(self, limit: int, max_waiting: int):
        self.limit = limit
        self.max_waiting = max_waiting
        self._running: dict[str, int] = {}
        self._waiting: dict[str, deque[list[Any]]] = {}
        """Per key, the calls waiting: [call, the Deferred their caller holds]."""
        self._ready: deque[str] = deque()
        self._starting = False

    def run(self, key: str, call: Callable[[], Any]) -> Deferred | None:
        """``call()``'s result (a Deferred), now or once earlier calls for ``key`` end; None if too many wait.

        Cancelling a call that still waits takes it out of the queue: it never runs."""
        queue = self._waiting.get(key)
        if queue is None and self._running.get(key, 0) < self.limit:
            return self._start(key, call)
        if len(queue or ()) >= self.max_waiting:
            return None
        if queue is None:
            queue = self._waiting[key] = deque()
        entry: list[Any] = [call, None]
        entry[1] = Deferred(lambda _: self._withdraw(key, entry))
        queue.append(entry)
        return entry[1]

    def _withdraw(self, key: str, entry: list[Any]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and entry in queue:
            queue.remove(entry)
            if not queue:
                del self._waiting[key]

    def _start(self, key: str, call: Callable[[], Any]) -> Deferred:
        self._running[key] = self._running.get(key, 0) + 1
        d = maybeDeferred(call)
        d.addBoth(self._ended, key)
        return d

    def _ended(self, result: Any, key: str) -> Any:
        running = self._running[key] - 1
        if running:
            self._running[key] = running
        else:
            del self._running[key]
        self._ready.append(key)
        if not self._starting:  # a call ending at once inside _start: the loop below goes on, no recursion
            self._starting = True
            try:
                while self._ready:
                    ready = self._ready.popleft()
                    queue = self._waiting.get(ready)
                    if queue and self._running.get(ready, 0) < self.limit:
                        call, waiter = queue.popleft()
                        if not queue:
                            del self._waiting[ready]
                        self._start(ready, call).chainDeferred(waiter)
            finally:
                self._starting = False
        return result
