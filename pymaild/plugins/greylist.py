# -*- test-case-name: tests.plugins.test_builtin_plugins -*-
"""
C{greylist}: triplet greylisting (client network, sender, recipient), as postgrey does.

The first time a triplet is seen, RCPT gets C{451 4.7.1}; a real mail server tries again
later, and once C{delay} seconds have passed the triplet passes, and keeps passing for
C{lifetime} seconds after it was last used.  A retry later than C{retry_window} after the first
attempt starts over.  The client's address counts by network (C{/24} for IPv4, C{/64} for IPv6:
a provider's outbound servers take turns).

Not greylisted: logged-in clients, C{[smtp] trusted_networks}, C{whitelist_networks}, senders in
C{whitelist_domains}, recipients in C{whitelist_recipients} (postmaster@ and abuse@ by
default: RFC 2142 addresses should take mail at once).  The triplets are kept in
C{<data_dir>/plugins/greylist/greylist.sqlite} across restarts.
"""

from __future__ import annotations

import ipaddress

from zope.interface import implementer

from pymaild.interfaces import IRcptHook
from pymaild.pipeline import Plugin, addHeaders, keys, tempfail
from pymaild.plugins._state import PersistentTable


def clientNetwork(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@implementer(IRcptHook)
class Greylist:
    def __init__(self, settings, context):
        self.delay = settings["delay"]
        self.retryWindow = settings["retry_window"]
        self.lifetime = settings["lifetime"]
        if self.retryWindow <= self.delay:
            raise ValueError("retry_window must be longer than delay")
        self.networks = settings["whitelist_networks"]
        self.domains = set(settings["whitelist_domains"])
        self.recipients = {r.lower() for r in settings["whitelist_recipients"]}
        self.header = settings["header"]
        self.clock = context.clock
        self.table = PersistentTable(context, "greylist")
        self._expire()

    def _expire(self) -> None:
        now = self.clock.seconds()
        for key, (first, passed, last) in list(self.table.data.items()):
            if (passed and now - last > self.lifetime) or (not passed and now - first > self.retryWindow):
                del self.table.data[key]
                self.table.changed(key)
        self._nextExpiry = now + 3600

    def _exempt(self, session, transaction, recipient) -> bool:
        if session.user or session.trusted:
            return True
        try:
            ip = ipaddress.ip_address(session.peer)
        except ValueError:
            return False
        if any(ip in network for network in self.networks):
            return True
        sender = transaction.sender.lower()
        if sender and sender.rpartition("@")[2] in self.domains:
            return True
        return recipient.address.lower() in self.recipients or recipient.address.lower().partition("@")[0] in self.recipients

    def rcptTo(self, session, transaction, recipient):
        if self._exempt(session, transaction, recipient):
            return None
        now = self.clock.seconds()
        if now > self._nextExpiry:
            self._expire()
        key = "\0".join((clientNetwork(session.peer), transaction.sender.lower(), recipient.address.lower()))
        first, passed, last = self.table.data.get(key, (None, False, None))
        if first is None or (not passed and now - first > self.retryWindow):
            self.table.data[key] = (now, False, now)
            self.table.changed(key)
            return tempfail(451, "4.7.1", f"Greylisted, please try again in {int(self.delay)} seconds")
        if not passed and now - first < self.delay:
            return tempfail(451, "4.7.1", f"Greylisted, please try again in {int(self.delay - (now - first)) + 1} seconds")
        self.table.data[key] = (first, True, now)
        self.table.changed(key)
        if self.header and not passed:
            return addHeaders(("X-Greylist", f"delayed {int(now - first)} seconds by pymaild greylist"))
        return None

    def close(self):
        return self.table.close()


greylist = Plugin("greylist", Greylist, keys={
    "delay": keys.Key(keys.duration, 300.0, "seconds before a retried triplet passes"),
    "retry_window": keys.Key(keys.duration, 2 * 86400.0, "a retry later than this after the first attempt starts over"),
    "lifetime": keys.Key(keys.duration, 35 * 86400.0, "a triplet that passed keeps passing this long after its last use"),
    "whitelist_networks": keys.Key(keys.listOf(keys.network, "networks"), (), "clients never greylisted"),
    "whitelist_domains": keys.Key(keys.listOf(keys.domain, "domains"), (), "sender domains never greylisted"),
    "whitelist_recipients": keys.Key(keys.listOf(keys.string, "addresses or local parts"), ("postmaster", "abuse"),
                                     "recipients never greylisted (an address, or a local part in every domain)"),
    "header": keys.Key(keys.boolean, True, "add X-Greylist to a message that was delayed"),
}, description="triplet greylisting")
