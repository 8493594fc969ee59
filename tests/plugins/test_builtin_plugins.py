"""
The built-in plugins through pymaild.testing's harness (the same public API any plugin has):
headers (add/remove/rewrite by rules), greylist and ratelimit on a fake clock, their state
surviving a restart, and dnsbl against a real twisted.names DNS server.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymaild.errors import ConfigError
from pymaild.plugins import dnsbl, greylist, headers, ratelimit
from pymaild.testing import PluginHarness

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "queue"))
from fakedns import startDNSServer  # noqa: E402

H = PluginHarness
MAIL = b"From: a@example.net\r\nSubject: Quarterly report\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"


# --- headers -----------------------------------------------------------------------------------

def test_headers_rules_by_origin(tmp_path):
    h = H(headers.headers, {
        "add": [{"name": "X-External", "value": "yes", "when": "external"},
                {"name": "X-Site", "value": "pymaild"}],
        "remove": ["X-Spam-Flag", {"name": "X-Internal-Only", "when": "external"}],
        "rewrite": [{"name": "Subject", "match": "^", "replace": "[EXT] ", "when": "external"}],
    }, tmp_path)
    v = h.call("endOfData", h.session(), h.transaction(), h.message(MAIL))
    assert v.action == "continue"
    assert v.headers == (("X-External", "yes"), ("X-Site", "pymaild"), ("Subject", "[EXT] Quarterly report"))
    assert v.remove == ("X-Spam-Flag", "X-Internal-Only", "Subject")
    inside = h.call("endOfData", h.session(user="me@example.com"), h.transaction(), h.message(MAIL))
    assert inside.headers == (("X-Site", "pymaild"),) and inside.remove == ("X-Spam-Flag",)


def test_headers_configuration_errors(tmp_path):
    for settings, message in [({"add": [{"name": "Bad Name", "value": "x"}]}, "not a header field name"),
                              ({"rewrite": [{"name": "Subject", "match": "("}]}, "not a regular expression"),
                              ({"add": [{"name": "X", "when": "sometimes"}]}, "must be one of"),
                              ({"add": [{"value": "x"}]}, "needs a name")]:
        with pytest.raises((ConfigError, ValueError), match=message):
            H(headers.headers, settings, tmp_path)


# --- greylist ----------------------------------------------------------------------------------

def test_greylist_delays_a_new_triplet_then_lets_it_through(tmp_path):
    h = H(greylist.greylist, {"delay": 300}, tmp_path)
    session, t, r = h.session("198.51.100.7"), h.transaction("news@shop.example"), h.recipient("bob@example.com")
    first = h.call("rcptTo", session, t, r)
    assert first.action == "tempfail" and (first.code, first.status) == (451, "4.7.1")
    h.advance(100)
    assert h.call("rcptTo", h.session("198.51.100.200"), t, r).action == "tempfail"  # (same /24, too early)
    h.advance(201)
    passed = h.call("rcptTo", session, t, r)
    assert passed.action == "continue" and passed.headers[0][0] == "X-Greylist"
    assert h.call("rcptTo", session, t, r).headers == ()  # (passed before: no field again)
    assert h.call("rcptTo", session, t, h.recipient("carol@example.com")).action == "tempfail"  # (a new triplet)


def test_greylist_exemptions(tmp_path):
    h = H(greylist.greylist, {"whitelist_networks": ["203.0.113.0/24"], "whitelist_domains": ["bank.example"]}, tmp_path)
    r = h.recipient("bob@example.com")
    assert h.call("rcptTo", h.session("203.0.113.9"), h.transaction(), r).action == "continue"
    assert h.call("rcptTo", h.session(), h.transaction("alerts@bank.example"), r).action == "continue"
    assert h.call("rcptTo", h.session(user="me@example.com"), h.transaction(), r).action == "continue"
    assert h.call("rcptTo", h.session(trusted=True), h.transaction(), r).action == "continue"
    assert h.call("rcptTo", h.session(), h.transaction(), h.recipient("postmaster@example.com")).action == "continue"
    assert h.call("rcptTo", h.session(), h.transaction(), r).action == "tempfail"


def test_greylist_retry_window_and_restart(tmp_path):
    h = H(greylist.greylist, {"delay": 60, "retry_window": 3600}, tmp_path)
    s, t, r = h.session(), h.transaction(), h.recipient("bob@example.com")
    h.call("rcptTo", s, t, r)
    h.advance(4000)  # (came back too late: starts over)
    assert h.call("rcptTo", s, t, r).action == "tempfail"
    h.advance(61)
    assert h.call("rcptTo", s, t, r).action == "continue"
    out = []
    h.close().addBoth(out.append)
    assert out == [None]
    again = H(greylist.greylist, {"delay": 60, "retry_window": 3600}, tmp_path)  # (a restart)
    again.clock.advance(h.clock.seconds())
    assert again.call("rcptTo", s, t, r).action == "continue"


# --- ratelimit ---------------------------------------------------------------------------------

def test_ratelimit_per_user_and_window(tmp_path):
    h = H(ratelimit.ratelimit, {"window": 60, "messages_per_user": 3, "recipients_per_user": 4}, tmp_path)
    me = h.session(user="me@example.com", protocol="submission")
    for _ in range(3):
        assert h.call("mailFrom", me, h.transaction("me@example.com")).action == "continue"
    refused = h.call("mailFrom", me, h.transaction("me@example.com"))
    assert refused.action == "tempfail" and refused.code == 451 and "messages per user" in refused.text
    assert h.call("mailFrom", h.session(user="you@example.com"), h.transaction()).action == "continue"
    for i in range(4):
        assert h.call("rcptTo", me, h.transaction(), h.recipient(f"x{i}@example.net", "remote")).action == "continue"
    assert h.call("rcptTo", me, h.transaction(), h.recipient("x@example.net", "remote")).action == "tempfail"
    h.advance(61)
    assert h.call("mailFrom", me, h.transaction("me@example.com")).action == "continue"


def test_ratelimit_per_ip_and_sender_exemptions_and_restart(tmp_path):
    settings = {"window": "1h", "messages_per_ip": 2, "messages_per_sender": 5, "exempt_networks": ["10.0.0.0/8"]}
    h = H(ratelimit.ratelimit, settings, tmp_path)
    for _ in range(2):
        assert h.call("mailFrom", h.session("192.0.2.9"), h.transaction()).action == "continue"
    assert h.call("mailFrom", h.session("192.0.2.9"), h.transaction()).action == "tempfail"
    for _ in range(5):
        assert h.call("mailFrom", h.session("10.1.2.3"), h.transaction()).action == "continue"  # (exempt)
    out = []
    h.close().addBoth(out.append)
    again = H(ratelimit.ratelimit, settings, tmp_path)
    again.clock.advance(h.clock.seconds() + 10)
    assert again.call("mailFrom", again.session("192.0.2.9"), again.transaction()).action == "tempfail"
    again.advance(3600)
    assert again.call("mailFrom", again.session("192.0.2.9"), again.transaction()).action == "continue"


# --- dnsbl against a real twisted.names server ------------------------------------------------

class DnsblCase(unittest.TestCase):
    def setUp(self):
        from twisted.names import client

        port, stop = startDNSServer({
            "2.0.0.127.zen.test": [("A", "127.0.0.2")],
            "9.2.0.192.zen.test": [("A", "127.0.0.4")],  # (listed with a code the config does not count)
            "2.0.0.127.cop.test": [("A", "127.0.0.2")],
            "3.0.0.127.zen.test": [("A", "127.255.255.254")],  # (a resolver's "query refused" answer)
            "spammer.example.dbl.test": [("A", "127.0.1.2")],
            "4.0.0.127.zen.test": "TIMEOUT",
        })
        self.addCleanup(stop)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def harness(self, **settings):
        base = {"zones": [{"zone": "zen.test", "weight": 2, "answers": ["127.0.0.2", "127.0.0.3"]},
                          {"zone": "cop.test"}],
                "domain_zones": [{"zone": "dbl.test"}], "threshold": 3, "dns_timeout": 1}
        base.update(settings)
        h = H(dnsbl.dnsbl, base, self.tmp, resolver=self.resolver)
        h.context.clock = reactor
        h.hooks.clock = reactor
        return h

    @defer.inlineCallbacks
    def rcpt(self, h, peer, sender="someone@example.net"):
        session = h.session(peer)
        h.hooks.connect(session)
        t = h.transaction(sender)
        h.hooks.mailFrom(session, t)
        verdict = yield h.hooks.rcptTo(session, t, h.recipient("bob@example.com"))
        return verdict, session, t

    @defer.inlineCallbacks
    def test_weighted_scores_and_reject(self):
        h = self.harness()
        verdict, _, _ = yield self.rcpt(h, "127.0.0.2")  # (zen 2 + cop 1 = 3)
        self.assertEqual((verdict.action, verdict.code, verdict.status), ("reject", 554, "5.7.1"))
        self.assertIn("client [127.0.0.2] blocked using zen.test", verdict.text)
        verdict, _, _ = yield self.rcpt(h, "192.0.2.9")  # (127.0.0.4: not a counted answer)
        self.assertIsNone(verdict)
        verdict, _, _ = yield self.rcpt(h, "127.0.0.3")  # (127.255.255.254 never counts)
        self.assertIsNone(verdict)
        verdict, _, _ = yield self.rcpt(h, "192.0.2.1", "x@spammer.example")  # (dbl 1 < 3)
        self.assertIsNone(verdict)
        h = self.harness(threshold=1)
        verdict, _, _ = yield self.rcpt(h, "192.0.2.1", "x@spammer.example")
        self.assertEqual(verdict.action, "reject")

    @defer.inlineCallbacks
    def test_tag_instead_of_reject_and_a_silent_server(self):
        h = self.harness(action="tag")
        verdict, session, t = yield self.rcpt(h, "127.0.0.2")
        self.assertIsNone(verdict)
        tag = yield h.hooks.endOfData(session, t, h.message(MAIL))
        self.assertEqual(tag.headers, (("X-DNSBL", "score=3 listed in zen.test, cop.test (over the threshold)"),))
        started = reactor.seconds()
        verdict, _, _ = yield self.rcpt(h, "127.0.0.4")  # (no answer: not listed, after dns_timeout)
        self.assertIsNone(verdict)
        self.assertLess(reactor.seconds() - started, 3)

    @defer.inlineCallbacks
    def test_logged_in_and_trusted_clients_are_not_looked_up(self):
        h = self.harness()
        for session in (h.session("127.0.0.2", user="me@example.com"), h.session("127.0.0.2", trusted=True)):
            h.hooks.connect(session)
            verdict = yield h.hooks.rcptTo(session, h.transaction(), h.recipient("bob@example.com"))
            self.assertIsNone(verdict)
            self.assertNotIn("dnsbl", session.data)

    def test_ipv6_names(self):
        self.assertEqual(dnsbl.reversedName("2001:db8::1"),
                         "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2")
        self.assertEqual(dnsbl.reversedName("192.0.2.1"), "1.2.0.192")
        self.assertIsNone(dnsbl.reversedName("not an address"))
