# -*- test-case-name: tests.test_throttle -*-
"""
Failed logins: a growing delay before each "no", and a limit per client address and per user.

Every protocol asks the same L{LoginThrottle} (one per server), so a password guesser gains
nothing by switching from IMAP to POP3 to SMTP AUTH.  Failures are forgotten after C{window}
seconds; a success clears the user's count (not the address's, which may be shared by a
guesser and a real user behind one NAT).
"""

from __future__ import annotations

import time
from collections import deque

from twisted.internet import defer
from twisted.python.failure import Failure


class LoginBlocked(Exception):
    """Too many failed logins from this address or for this user lately."""


class LoginThrottle:
    """
    @ivar maxFailures: failures per address, and per user, within C{window} seconds; beyond it
        logins are refused without checking the password.
    """

    def __init__(self, maxFailures: int = 10, window: float = 300.0, baseDelay: float = 0.5,
                 maxDelay: float = 10.0, clock=time.monotonic):
        self.maxFailures = maxFailures
        self.window = window
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self.clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        #: password checks under way, by address and by user: they count as failures until
        #: they end (L{checking}), so that many at once (from parallel connections) cannot
        #: pass the limit
        self._checking: dict[tuple[str, str], int] = {}
        #: checks waiting for a slot, in arrival order: C{(keys, attempt, Deferred)}
        self._waiting: list = []

    def _recent(self, key) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        cutoff = self.clock() - self.window
        while times and times[0] < cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, host: str, user: str) -> bool:
        """
        Whether this address or this user has failed too often lately.
        """
        return any(self._recent(key) >= self.maxFailures for key in (("ip", host), ("user", user)))

    def checking(self, host: str, user: str, attempt):
        """
        Run the password check C{attempt()} (which returns a value or a Deferred) of C{user}
        from C{host}; a Deferred of its result.

        Until it ends it counts against both limits as if it had failed (L{blocked}), so that
        many checks at once (parallel connections) cannot pass the limit.  A check that would
        take the last slots waits for one of the checks under way to end (a mail client opening
        several connections at once, or an office behind one address, all with the right
        password, only wait their turn); if the checks it waited for failed and the limit is
        reached, it fails with L{LoginBlocked} without being tried.
        """
        keys = (("ip", host), ("user", user))
        d = defer.Deferred()
        self._waiting.append((keys, attempt, d))
        self._admit()
        return d

    def _admit(self) -> None:
        waiting, self._waiting = self._waiting, []
        for keys, attempt, d in waiting:
            if any(self._recent(key) >= self.maxFailures for key in keys):
                d.errback(LoginBlocked())
            elif any(self._recent(key) + self._checking.get(key, 0) >= self.maxFailures for key in keys):
                self._waiting.append((keys, attempt, d))  # (a check under way holds the last slot)
            else:
                for key in keys:
                    self._checking[key] = self._checking.get(key, 0) + 1
                defer.maybeDeferred(attempt).addBoth(self._ended, keys, d)

    def _ended(self, result, keys, d) -> None:
        for key in keys:
            left = self._checking.get(key, 1) - 1
            if left > 0:
                self._checking[key] = left
            else:
                self._checking.pop(key, None)
        # the caller's callbacks run now, and count a failure (L{failed}) before the checks
        # that waited are looked at again
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
        if self._waiting:
            self._admit()

    def failed(self, host: str, user: str) -> float:
        """
        Count a failure; return how many seconds to wait before answering it.
        """
        now = self.clock()
        for key in (("ip", host), ("user", user)):
            self._failures.setdefault(key, deque()).append(now)
        n = max(self._recent(("ip", host)), self._recent(("user", user)))
        return min(self.maxDelay, self.baseDelay * (2 ** (n - 1)))

    def succeeded(self, host: str, user: str) -> None:
        self._failures.pop(("user", user), None)
