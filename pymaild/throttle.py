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
        #: they end, so that many at once (from parallel connections) cannot pass the limit
        self._checking: dict[tuple[str, str], int] = {}

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
        return any(self._recent(key) + self._checking.get(key, 0) >= self.maxFailures
                   for key in (("ip", host), ("user", user)))

    def checking(self, host: str, user: str, d):
        """
        A password check of C{user} from C{host} starts; C{d} (its Deferred) ends it.  Until
        then it counts against both limits as if it had failed (L{blocked}).  Returns C{d}.
        """
        keys = (("ip", host), ("user", user))
        for key in keys:
            self._checking[key] = self._checking.get(key, 0) + 1

        def done(result):
            for key in keys:
                left = self._checking.get(key, 1) - 1
                if left > 0:
                    self._checking[key] = left
                else:
                    self._checking.pop(key, None)
            return result

        return d.addBoth(done)

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
