"""
MXResolver: the hosts to deliver a domain's mail to, looked up through a real C{twisted.names}
client against the fake DNS server of C{fakedns.py} on a loopback UDP port.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns
from twisted.trial import unittest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakedns import startDNSServer  # noqa: E402

from pymaild.queue.mx import (  # noqa: E402
    DNSProblem,
    Host,
    MXResolver,
    NoSuchDomain,
    NullMX,
    TemporaryDNSError,
    makeResolver,
)

MX1 = [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")]

ZONES = {
    "example.com": [("MX", 20, "mx2.example.com"), ("MX", 10, "mx1.example.com"), ("MX", 30, "mx3.example.com")],
    "mx1.example.com": MX1,
    "mx2.example.com": [("A", "192.0.2.2")],
    "mx3.example.com": [("AAAA", "2001:db8::3")],
    "equal.test": [("MX", 10, "a.equal.test"), ("MX", 10, "b.equal.test"), ("MX", 5, "first.equal.test")],
    "a.equal.test": [("A", "192.0.2.10")],
    "b.equal.test": [("A", "192.0.2.11")],
    "first.equal.test": [("A", "192.0.2.12")],
    "nullmx.test": [("MX", 0, ".")],
    "nullmx-and-real.test": [("MX", 0, "."), ("MX", 10, "mx1.example.com")],
    "implicit.test": [("AAAA", "2001:db8::20"), ("A", "192.0.2.20")],
    "nothing.test": [("TXT", "v=spf1 -all")],
    "dual.test": [("MX", 10, "dual.example.net")],
    "dual.example.net": [
        ("AAAA", "2001:db8::30"), ("A", "192.0.2.30"), ("AAAA", "2001:db8::31"), ("A", "192.0.2.31"),
    ],
    "servfail.test": "SERVFAIL",
    "refused.test": "REFUSED",
    "slow.test": "TIMEOUT",
    "partial.test": [
        ("MX", 10, "gone.partial.test"), ("MX", 20, "noaddr.partial.test"), ("MX", 30, "mx1.example.com"),
    ],
    "noaddr.partial.test": [("TXT", "no addresses here")],
    "broken.partial.test": "SERVFAIL",
    "unresolvable.test": [("MX", 10, "noaddr.partial.test"), ("MX", 20, "broken.partial.test")],
    "nxhosts.test": [("MX", 10, "gone.partial.test"), ("MX", 20, "gone2.partial.test")],
    "halfbroken.test": [("MX", 10, "half.halfbroken.test")],
    "half.halfbroken.test": [("A", "192.0.2.40"), ("AAAA", "SERVFAIL")],
    "shared.test": [("MX", 10, "s1.shared.test"), ("MX", 20, "s2.shared.test"), ("MX", 30, "s3.shared.test")],
    "s1.shared.test": [("A", "192.0.2.50")],
    "s2.shared.test": [("A", "192.0.2.50"), ("A", "192.0.2.51")],
    "s3.shared.test": [("A", "192.0.2.51")],
    "xn--bcher-kva.example": [("MX", 10, "mx.xn--bcher-kva.example")],
    "mx.xn--bcher-kva.example": [("A", "192.0.2.60")],
    "alias.test": [("CNAME", "example.com")],
}

HOSTS = [
    Host("mx1.example.com", 10, ("192.0.2.1", "2001:db8::1")),
    Host("mx2.example.com", 20, ("192.0.2.2",)),
    Host("mx3.example.com", 30, ("2001:db8::3",)),
]


class _DNSCase(unittest.TestCase):
    """
    A fake DNS server with L{ZONES}, and an L{MXResolver} asking it.
    """

    timeout = 2.0

    def setUp(self):
        self.queries = []
        self.port, stop = startDNSServer(ZONES, reactor, queries=self.queries)
        self.addCleanup(stop)
        self.mx = self.makeMX()

    def makeMX(self, timeout=None, shuffle=random.shuffle):
        resolver = makeResolver([("127.0.0.1", self.port)], timeout=timeout or self.timeout, reactor=reactor)
        return MXResolver(resolver, shuffle=shuffle)

    @defer.inlineCallbacks
    def assertProblem(self, d, kind):
        """
        C{d} fails with a C{kind} problem; return it.
        """
        try:
            yield d
        except DNSProblem as e:
            self.assertIsInstance(e, kind)
            return e
        self.fail(f"no {kind.__name__}")


class OrderTests(_DNSCase):

    @defer.inlineCallbacks
    def test_ordered_by_preference(self):
        """
        All MX hosts come back, lowest preference first, each with its addresses.
        """
        hosts = yield self.mx.resolve("example.com")
        self.assertEqual(hosts, HOSTS)

    @defer.inlineCallbacks
    def test_equal_preference_both_orders(self):
        """
        Hosts of equal preference are shuffled (random.shuffle by default): over many lookups
        both orders occur, always after the better host.
        """
        self.assertIs(MXResolver(None).shuffle, random.shuffle)
        results = yield defer.gatherResults([self.mx.resolve("equal.test") for _ in range(40)])
        orders = {tuple(h.name for h in hosts) for hosts in results}
        self.assertEqual(
            orders,
            {
                ("first.equal.test", "a.equal.test", "b.equal.test"),
                ("first.equal.test", "b.equal.test", "a.equal.test"),
            },
        )

    @defer.inlineCallbacks
    def test_injected_shuffle(self):
        """
        The injected shuffle is called with each group of two or more equal-preference hosts,
        and its order is kept.
        """
        groups = []

        def reverse(group):
            groups.append(list(group))
            group.reverse()

        hosts = yield self.makeMX(shuffle=reverse).resolve("equal.test")
        self.assertEqual(len(groups), 1)
        self.assertEqual(sorted(groups[0]), ["a.equal.test", "b.equal.test"])
        self.assertEqual([h.name for h in hosts], ["first.equal.test"] + groups[0][::-1])
        self.assertEqual([h.preference for h in hosts], [5, 10, 10])

    @defer.inlineCallbacks
    def test_ipv4_before_ipv6(self):
        """
        A host's IPv4 addresses come first, then its IPv6 ones, each in DNS order.
        """
        hosts = yield self.mx.resolve("dual.test")
        self.assertEqual(
            hosts, [Host("dual.example.net", 10, ("192.0.2.30", "192.0.2.31", "2001:db8::30", "2001:db8::31"))]
        )

    @defer.inlineCallbacks
    def test_duplicate_addresses_tried_once(self):
        """
        An address shared by several hosts goes with the first; a host left without one is
        dropped.
        """
        hosts = yield self.mx.resolve("shared.test")
        self.assertEqual(
            hosts, [Host("s1.shared.test", 10, ("192.0.2.50",)), Host("s2.shared.test", 20, ("192.0.2.51",))]
        )

    @defer.inlineCallbacks
    def test_case_and_trailing_dot(self):
        """
        Upper case and a trailing dot make no difference; the name is asked in lower case.
        """
        hosts = yield self.mx.resolve("EXAMPLE.Com.")
        self.assertEqual(hosts, HOSTS)
        self.assertIn(("example.com", "MX"), self.queries)

    @defer.inlineCallbacks
    def test_idna(self):
        """
        A Unicode domain is asked IDNA-encoded.
        """
        hosts = yield self.mx.resolve("Bücher.example")
        self.assertEqual(hosts, [Host("mx.xn--bcher-kva.example", 10, ("192.0.2.60",))])
        self.assertEqual(self.queries[0], ("xn--bcher-kva.example", "MX"))

    @defer.inlineCallbacks
    def test_cname(self):
        """
        A domain that is a CNAME gets the MX hosts of its target (the chain in the answer).
        """
        hosts = yield self.mx.resolve("alias.test")
        self.assertEqual(hosts, HOSTS)


class NullAndImplicitTests(_DNSCase):

    @defer.inlineCallbacks
    def test_null_mx(self):
        """
        A null MX (RFC 7505) is a permanent failure with status 5.1.10.
        """
        e = yield self.assertProblem(self.mx.resolve("nullmx.test"), NullMX)
        self.assertFalse(e.temporary)
        self.assertEqual(e.status, "5.1.10")
        self.assertEqual(e.text, "Domain nullmx.test does not accept mail (null MX)")
        self.assertEqual(e.domain, "nullmx.test")

    @defer.inlineCallbacks
    def test_null_mx_beside_real_mx(self):
        """
        A null MX beside real MX records is ignored.
        """
        hosts = yield self.mx.resolve("nullmx-and-real.test")
        self.assertEqual(hosts, [HOSTS[0]])

    @defer.inlineCallbacks
    def test_implicit_mx(self):
        """
        Without MX records the domain is its own host, preference 0, its A then AAAA records.
        """
        hosts = yield self.mx.resolve("implicit.test")
        self.assertEqual(hosts, [Host("implicit.test", 0, ("192.0.2.20", "2001:db8::20"))])

    @defer.inlineCallbacks
    def test_no_mx_no_address(self):
        """
        A domain with neither MX nor address records is a permanent failure.
        """
        e = yield self.assertProblem(self.mx.resolve("nothing.test"), NoSuchDomain)
        self.assertFalse(e.temporary)
        self.assertEqual(e.status, "5.1.2")


class FailureTests(_DNSCase):

    @defer.inlineCallbacks
    def test_nxdomain(self):
        """
        NXDOMAIN for the MX query is a permanent failure, 5.1.2.
        """
        e = yield self.assertProblem(self.mx.resolve("nowhere.test"), NoSuchDomain)
        self.assertFalse(e.temporary)
        self.assertEqual(e.status, "5.1.2")
        self.assertIn("nowhere.test", e.text)

    @defer.inlineCallbacks
    def test_servfail(self):
        """
        SERVFAIL is a temporary failure, 4.4.3.
        """
        e = yield self.assertProblem(self.mx.resolve("servfail.test"), TemporaryDNSError)
        self.assertTrue(e.temporary)
        self.assertEqual(e.status, "4.4.3")
        self.assertIn("SERVFAIL", e.text)

    @defer.inlineCallbacks
    def test_refused(self):
        """
        REFUSED is a temporary failure.
        """
        e = yield self.assertProblem(self.mx.resolve("refused.test"), TemporaryDNSError)
        self.assertIn("REFUSED", e.text)

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        A server that does not answer is a temporary failure after the timeout.
        """
        start = time.monotonic()
        e = yield self.assertProblem(self.makeMX(timeout=0.2).resolve("slow.test"), TemporaryDNSError)
        self.assertLess(time.monotonic() - start, 5)
        self.assertIn("timed out", e.text)
        self.assertEqual(self.queries, [("slow.test", "MX")])

    @defer.inlineCallbacks
    def test_host_without_address_skipped(self):
        """
        MX hosts that do not exist or have no address are skipped.
        """
        hosts = yield self.mx.resolve("partial.test")
        self.assertEqual(hosts, [Host("mx1.example.com", 30, ("192.0.2.1", "2001:db8::1"))])

    @defer.inlineCallbacks
    def test_all_hosts_unresolvable(self):
        """
        When no MX host has an address and not all are NXDOMAIN, the failure is temporary.
        """
        e = yield self.assertProblem(self.mx.resolve("unresolvable.test"), TemporaryDNSError)
        self.assertIn("noaddr.partial.test: no address records", e.text)
        self.assertIn("broken.partial.test: server failure (SERVFAIL)", e.text)

    @defer.inlineCallbacks
    def test_all_hosts_nxdomain(self):
        """
        When every MX host is NXDOMAIN, the failure is permanent.
        """
        e = yield self.assertProblem(self.mx.resolve("nxhosts.test"), NoSuchDomain)
        self.assertFalse(e.temporary)

    @defer.inlineCallbacks
    def test_aaaa_failure_keeps_a(self):
        """
        A host whose AAAA lookup fails is still tried on its IPv4 addresses.
        """
        hosts = yield self.mx.resolve("halfbroken.test")
        self.assertEqual(hosts, [Host("half.halfbroken.test", 10, ("192.0.2.40",))])

    @defer.inlineCallbacks
    def test_invalid_names(self):
        """
        Names that cannot be domains fail (never raise) with a permanent problem, without DNS.
        """
        for name in ["", ".", "a..b", "x" * 64 + ".test"]:
            d = self.mx.resolve(name)
            self.assertIsInstance(d, defer.Deferred)
            yield self.assertProblem(d, NoSuchDomain)
        self.assertEqual(self.queries, [])


class LiteralTests(_DNSCase):

    @defer.inlineCallbacks
    def test_domain_literals(self):
        """
        Address literals are their own host, without DNS.
        """
        hosts = yield self.mx.resolve("[192.0.2.1]")
        self.assertEqual(hosts, [Host("[192.0.2.1]", 0, ("192.0.2.1",))])
        hosts = yield self.mx.resolve("[IPv6:2001:DB8:0::1]")
        self.assertEqual(hosts, [Host("[IPv6:2001:db8::1]", 0, ("2001:db8::1",))])
        self.assertEqual(self.queries, [])

    @defer.inlineCallbacks
    def test_bad_literals(self):
        """
        Malformed literals are a permanent failure.
        """
        for literal in ["[::1]", "[300.1.1.1]", "[IPv6:192.0.2.1]", "[192.0.2.1", "[foo:bar]", "[]"]:
            yield self.assertProblem(self.mx.resolve(literal), NoSuchDomain)
        self.assertEqual(self.queries, [])


class BrokenResolver:
    """
    An IResolver that raises synchronously (a bug), or fails MX lookups with C{error}.
    """

    def __init__(self, raises=True):
        self.raises = raises

    def lookupMailExchange(self, name, timeout=None):
        if self.raises:
            raise RuntimeError("boom")
        return defer.succeed(([_mx(10, "mx.example")], [], []))

    def lookupAddress(self, name, timeout=None):
        raise RuntimeError("boom")

    lookupIPV6Address = lookupAddress


def _mx(preference, name):
    return dns.RRHeader(name=b"broken.example", type=dns.MX, payload=dns.Record_MX(preference, name))


class ResolverTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_resolver_raising(self):
        """
        A resolver raising synchronously gives a temporary failure, not an exception.
        """
        d = MXResolver(BrokenResolver()).resolve("broken.example")
        self.assertIsInstance(d, defer.Deferred)
        try:
            yield d
        except TemporaryDNSError as e:
            self.assertEqual(e.text, "DNS lookup of MX records for broken.example failed: RuntimeError: boom")
        else:
            self.fail("no failure")

    @defer.inlineCallbacks
    def test_unexpected_error(self):
        """
        Any other error (here a resolver answering nonsense) is logged and becomes a
        temporary failure: callers only ever see DNSProblems.
        """
        resolver = BrokenResolver()
        resolver.lookupMailExchange = lambda name, timeout=None: defer.succeed(None)
        try:
            yield MXResolver(resolver).resolve("broken.example")
        except TemporaryDNSError as e:
            self.assertEqual(e.text, "DNS lookup for broken.example failed: internal error")
        else:
            self.fail("no failure")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    @defer.inlineCallbacks
    def test_address_lookups_raising(self):
        """
        Address lookups that raise make their host unresolvable now: temporary.
        """
        try:
            yield MXResolver(BrokenResolver(raises=False)).resolve("broken.example")
        except TemporaryDNSError as e:
            self.assertIn("mx.example: RuntimeError: boom", e.text)
        else:
            self.fail("no failure")

    def test_system_resolver(self):
        """
        Without name servers, makeResolver asks /etc/hosts first, then resolv.conf's servers.
        """
        clock = task.Clock()
        resolver = makeResolver(reactor=clock)
        self.assertTrue(IResolver.providedBy(resolver))
        results = []
        resolver.lookupAddress("localhost").addCallback(results.append)
        self.assertEqual([rr.payload.dottedQuad() for rr in results[0][0]], ["127.0.0.1"])

    def test_given_servers(self):
        """
        With name servers, makeResolver asks only them, with the timeout once per server.
        """
        resolver = makeResolver([("127.0.0.1", 5353), ("::1", 53)], timeout=1.5, reactor=task.Clock())
        self.assertIsInstance(resolver, client.Resolver)
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353), ("::1", 53)])
        self.assertEqual(resolver.timeout, (1.5,))


class FakeDNSTests(unittest.TestCase):
    """
    The fake server itself: TCP on the UDP port, and the subprocess mode.
    """

    @defer.inlineCallbacks
    def test_tcp(self):
        """
        The same port answers over TCP.
        """
        port, stop = startDNSServer(ZONES, reactor)
        self.addCleanup(stop)
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        message = yield resolver.queryTCP([dns.Query("mx1.example.com", dns.A)])
        for protocol in list(resolver.connections):
            protocol.transport.loseConnection()
        self.assertEqual([rr.payload.dottedQuad() for rr in message.answers], ["192.0.2.1"])

    @defer.inlineCallbacks
    def test_subprocess(self):
        """
        C{python fakedns.py zones.json} serves the zones and prints its port.
        """
        workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, workdir, True)
        zones = Path(workdir) / "zones.json"
        zones.write_text(json.dumps(ZONES))
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fakedns.py")), str(zones)],
            stdout=subprocess.PIPE, text=True,
        )

        def kill():
            process.terminate()
            process.wait(10)
            process.stdout.close()

        self.addCleanup(kill)
        line = yield threads.deferToThread(process.stdout.readline)
        mx = MXResolver(makeResolver([("127.0.0.1", int(line))], timeout=5, reactor=reactor))
        hosts = yield mx.resolve("example.com")
        self.assertEqual(hosts, HOSTS)


class StartUpTests(unittest.TestCase):
    """
    Nothing at start-up needs DNS: twisted.names (about 20 ms to import) waits for the first
    lookup, through ResolverOnFirstUse.
    """

    def test_service_does_not_import_twisted_names(self):
        code = ("import sys, pymaild.service; "
                "print(sorted(m for m in sys.modules if m.startswith('twisted.names') or m == 'pymaild.imap.search'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "[]")

    def test_names_modules_take_their_stand_ins_place(self):
        from pymaild.queue import mx

        mx.dns.MX  # (imported by now anyway: the tests above use twisted.names)
        self.assertIs(mx.dns, dns)
        self.assertEqual(mx._records.__globals__["dns"], dns)

    def test_resolver_made_at_the_first_lookup(self):
        from pymaild.queue.mx import ResolverOnFirstUse

        made = []

        def make():
            made.append(1)
            return makeResolver([("127.0.0.1", 5353)], timeout=1.5, reactor=task.Clock())

        resolver = ResolverOnFirstUse(make)
        self.assertTrue(IResolver.providedBy(resolver))
        self.assertEqual(made, [])
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353)])  # (an attribute of the real one)
        self.assertEqual(made, [1])
        resolver.timeout
        self.assertEqual(made, [1])
        with self.assertRaises(AttributeError):
            resolver._private
