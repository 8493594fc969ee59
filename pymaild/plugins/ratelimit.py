# -*- test-case-name: tests.plugins.test_builtin_plugins -*-
"""
C{ratelimit}: at most so many messages and recipients per client address, per sender address
and per logged-in user, in any C{window} seconds (a sliding window).

A message counts at MAIL FROM, a recipient at RCPT TO; past a limit the command gets
C{451 4.7.1} (the client tries again later, when older ones have left the window).  The window
is kept as 60 counts (one per sixtieth of it), so a key costs the same memory at any limit and
an event leaves the window up to a sixtieth of it early.  A limit of
0 is no limit.  Clients in C{exempt_networks} are not counted.  What was counted is kept in
C{<data_dir>/plugins/ratelimit/ratelimit.sqlite}, so a restart does not reset the limits.

A compromised account that starts sending spam over submission is what C{messages_per_user}
and C{recipients_per_user} are for; C{messages_per_ip} and C{recipients_per_ip} hold back a
single noisy client on port 25.
"""

from __future__ import annotations

import ipaddress

from zope.interface import implementer

from pymaild.interfaces import IMailHook, IRcptHook
from pymaild.pipeline import Plugin, keys, tempfail
from pymaild.plugins._state import PersistentTable

LIMITS = ("messages_per_ip", "recipients_per_ip", "messages_per_sender", "messages_per_user", "recipients_per_user")


@implementer(IMailHook, IRcptHook)
class RateLimit:
    def __init__(self, settings, context):
        self.window = settings["window"]
        if self.window <= 0:
            raise ValueError("window must be more than 0 seconds")
        self.limits = {name: settings[name] for name in LIMITS}
        self.exempt = settings["exempt_networks"]
        self.clock = context.clock
        self.table = PersistentTable(context, "ratelimit")
        self._nextSweep = 0.0

    def _isExempt(self, session) -> bool:
        try:
            ip = ipaddress.ip_address(session.peer)
        except ValueError:
            return False
        return any(ip in network for network in self.exempt)

    #: the window is counted in this many slots: exact to a sixtieth of it, in constant memory
    SLOTS = 60

    def _take(self, counters) -> str | None:
        """Count one event against each C{(limit name, key)}; the name of a limit it would pass."""
        now = self.clock.seconds()
        width = self.window / self.SLOTS
        slot = int(now // width)
        oldest = slot - self.SLOTS + 1  # (the slots still in the window)
        if now >= self._nextSweep:  # (forget whoever has nothing left in the window)
            self._nextSweep = now + self.window
            for key, slots in list(self.table.data.items()):
                if not slots or slots[-1][0] < oldest:
                    del self.table.data[key]
                    self.table.changed(key)
        checked = []
        for name, who in counters:
            limit = self.limits[name]
            if not limit or not who:
                continue
            key = f"{name}\0{who}"
            slots = [pair for pair in self.table.data.get(key, ()) if pair[0] >= oldest]
            if sum(count for _, count in slots) >= limit:
                return name
            checked.append((key, slots))
        for key, slots in checked:  # (counted only when no limit refuses it)
            if slots and slots[-1][0] == slot:
                slots[-1] = [slot, slots[-1][1] + 1]
            else:
                slots.append([slot, 1])
            self.table.data[key] = slots
            self.table.changed(key)
        return None

    def _refuse(self, what: str):
        return tempfail(451, "4.7.1", f"Rate limit reached ({what.replace('_', ' ')} in {int(self.window)} s), "
                                      f"try again later")

    def mailFrom(self, session, transaction):
        if self._isExempt(session):
            return None
        over = self._take([("messages_per_ip", session.peer), ("messages_per_sender", transaction.sender.lower()),
                           ("messages_per_user", session.user)])
        return self._refuse(over) if over else None

    def rcptTo(self, session, transaction, recipient):
        if self._isExempt(session):
            return None
        over = self._take([("recipients_per_ip", session.peer), ("recipients_per_user", session.user)])
        return self._refuse(over) if over else None

    def close(self):
        return self.table.close()


ratelimit = Plugin("ratelimit", RateLimit, keys={
    "window": keys.Key(keys.duration, 3600.0, "the sliding window, in seconds (or 30m, 1h, 1d)"),
    "messages_per_ip": keys.Key(keys.integer(0, 10**9), 0, "messages from one client address (0: no limit)"),
    "recipients_per_ip": keys.Key(keys.integer(0, 10**9), 0, "recipients from one client address"),
    "messages_per_sender": keys.Key(keys.integer(0, 10**9), 0, "messages from one sender address"),
    "messages_per_user": keys.Key(keys.integer(0, 10**9), 0, "messages from one logged-in user"),
    "recipients_per_user": keys.Key(keys.integer(0, 10**9), 0, "recipients from one logged-in user"),
    "exempt_networks": keys.Key(keys.listOf(keys.network, "networks"), (), "clients that are never counted"),
}, description="messages and recipients per address, sender and user, per time window")
