# -*- test-case-name: tests.plugins.test_builtin_plugins -*-
"""
C{dnsbl}: DNS blocklists, for the client's address (e.g. Spamhaus ZEN) and for the sender's
domain (e.g. Spamhaus DBL), looked up with C{twisted.names}.

Each listing adds its zone's C{weight} to the client's score; a score of C{threshold} or more
is C{action}: C{reject} (RCPT gets C{554 5.7.1 Service unavailable; client [IP] blocked using
ZONE}, as Postfix answers) or C{tag} (the message gets an C{X-DNSBL} field naming the zones, for
a filter further on).  The client's lookups start when it connects and are waited for at the
first RCPT (at most C{dns_timeout} seconds: a lookup that fails or times out counts as not
listed); the sender's domain is looked up at MAIL FROM.

Logged-in clients and C{[smtp] trusted_networks} are never checked.

Configuration::

    [plugins.dnsbl]
    zones = [{zone = "zen.spamhaus.org", weight = 2, answers = ["127.0.0.2", "127.0.0.3"]},
             {zone = "bl.spamcop.net"}]
    domain_zones = [{zone = "dbl.spamhaus.org"}]
    threshold = 2
    action = "reject"

C{answers}: only these A records count as a listing (empty: any 127.0.0.0/8 answer; other
answers, such as a resolver's "blocked query" codes 127.255.255.x, never count).
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymaild.interfaces import IConnectHook, IDataHook, IMailHook, IRcptHook
from pymaild.pipeline import Plugin, addHeaders, keys, reject

log = Logger()

def _weight(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1000:
        raise ValueError(f"expected a weight from 0 to 1000, got {value!r}")
    return float(value)


_ZONE = keys.table({
    "zone": keys.Key(keys.domain, "", "the blocklist's DNS zone"),
    "weight": keys.Key(_weight, 1.0, "what a listing adds to the score"),
    "answers": keys.Key(keys.listOf(keys.string, "addresses"), (), "the A records that mean listed (empty: any 127.x)"),
})


def reversedName(address: str) -> str | None:
    """The DNSBL query name of an address (without the zone): 4.3.2.1 or IPv6 nibbles."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


@implementer(IConnectHook, IMailHook, IRcptHook, IDataHook)
class Blocklists:
    def __init__(self, settings, context):
        self.zones = settings["zones"]
        self.domainZones = settings["domain_zones"]
        if not self.zones and not self.domainZones:
            raise ValueError("no zones or domain_zones: nothing to look up")
        for zone in self.zones + self.domainZones:
            if not zone["zone"]:
                raise ValueError("every zone needs a zone name")
        self.threshold = settings["threshold"]
        self.action = settings["action"]
        self.timeout = settings["dns_timeout"]
        self.resolver = context.resolver
        self.clock = context.clock
        self.name = context.name

    def _skip(self, session) -> bool:
        return bool(session.user) or session.trusted

    def _listed(self, name: str, zone: dict):
        """A Deferred of the zone (dict) if C{name} is listed in it, else None; never fails."""
        d = self.resolver.lookupAddress(f"{name}.{zone['zone']}", timeout=(self.timeout,))
        d.addTimeout(self.timeout, self.clock)

        def answered(result):
            answers, _, _ = result
            for record in answers:
                payload = getattr(record, "payload", None)
                address = getattr(payload, "dottedQuad", lambda: None)()
                if address is None:
                    continue
                if zone["answers"] and address in zone["answers"]:
                    return zone
                if not zone["answers"] and address.startswith("127.") and not address.startswith("127.255.255."):
                    return zone
            return None

        def failed(failure):
            from twisted.names.error import DomainError

            if not failure.check(DomainError):  # (NXDOMAIN: not listed; anything else is logged)
                log.warn("dnsbl {name}.{zone}: {error}", name=name, zone=zone["zone"], error=failure.getErrorMessage())
            return None

        return d.addCallbacks(answered, failed)

    def _state(self, session) -> dict:
        """Per session: the client's lookups, and the sender domains', each a Deferred until answered."""
        return session.data.setdefault(self.name, {"client": None, "sender": {}})

    @staticmethod
    def _keep(state: dict, key, domain=None):
        """Replace a lookup's Deferred by its list of zones once it answers (read without waiting)."""
        def done(result):
            listed = [z for z in result if z is not None]
            if domain is None:
                state["client"] = listed
            else:
                state["sender"][domain] = listed
            return listed

        return done

    def connect(self, session):
        if self._skip(session) or not self.zones:
            return None
        name = reversedName(session.peer)
        if name is not None:
            state = self._state(session)
            state["client"] = defer.gatherResults([self._listed(name, zone) for zone in self.zones])
            state["client"].addCallback(self._keep(state, "client"))
        return None

    def mailFrom(self, session, transaction):
        if self._skip(session) or not self.domainZones:
            return None
        domain = transaction.sender.rpartition("@")[2].lower()
        state = self._state(session)
        if domain and domain not in state["sender"]:
            state["sender"] = {domain: defer.gatherResults([self._listed(domain, zone) for zone in self.domainZones])}
            state["sender"][domain].addCallback(self._keep(state, "sender", domain))
        return None

    def _score(self, session, transaction):
        """C{(score, zones)}, or a Deferred of it while a lookup is still under way."""
        state = self._state(session)
        domain = transaction.sender.rpartition("@")[2].lower()
        parts = [state.get("client") or [], state["sender"].get(domain) or []]
        pending = [p for p in parts if isinstance(p, defer.Deferred)]
        if pending:
            # (the Deferred's own callback replaced it in the state; ask again when it has)
            waits = [defer.Deferred() for _ in pending]
            for p, w in zip(pending, waits):
                p.addBoth(lambda r, w=w: (w.callback(None), r)[1])
            return defer.gatherResults(waits).addCallback(lambda _: self._score(session, transaction))
        listed = parts[0] + parts[1]
        return sum(z["weight"] for z in listed), [z["zone"] for z in listed]

    @staticmethod
    def _then(value, f):
        return value.addCallback(f) if isinstance(value, defer.Deferred) else f(value)

    def rcptTo(self, session, transaction, recipient):
        if self._skip(session):
            return None

        def decide(scored):
            score, zones = scored
            if zones and score >= self.threshold and self.action == "reject":
                return reject(554, "5.7.1", f"Service unavailable; client [{session.peer}] blocked using {zones[0]}")
            return None

        return self._then(self._score(session, transaction), decide)

    def endOfData(self, session, transaction, message):
        if self._skip(session) or self.action != "tag":
            return None

        def decide(scored):
            score, zones = scored
            if zones:
                return addHeaders(("X-DNSBL", f"score={score:g} listed in {', '.join(zones)}"
                                              f"{' (over the threshold)' if score >= self.threshold else ''}"))
            return None

        return self._then(self._score(session, transaction), decide)


dnsbl = Plugin("dnsbl", Blocklists, keys={
    "zones": keys.Key(keys.listOf(_ZONE, "tables"), (), "blocklists of client addresses: {zone, weight, answers}"),
    "domain_zones": keys.Key(keys.listOf(_ZONE, "tables"), (), "blocklists of sender domains: {zone, weight, answers}"),
    "threshold": keys.Key(_weight, 1.0, "the score at which the action applies"),
    "action": keys.Key(keys.choice("reject", "tag"), "reject", "reject at RCPT, or tag with an X-DNSBL field"),
    "dns_timeout": keys.Key(keys.seconds, 5.0, "seconds to wait for a blocklist's answer"),
}, description="DNS blocklists for client addresses and sender domains")
