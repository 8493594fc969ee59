# -*- test-case-name: tests.queue.test_queue_mx -*-
"""
Where to deliver mail for a domain: the MX hosts of RFC 5321 section 5.1, in the order to try
them, each with its IP addresses, looked up with C{twisted.names}.

Twisted's own C{twisted.mail.relaymanager.MXCalculator} cannot be used for this: it returns one
MX instead of the ordered list, raises C{TypeError} on two MX records of equal preference
(C{Record_MX} cannot be compared), returns an RFC 7505 null MX as a host named C{""}, and falls
back to IPv4 only when a domain has no MX (../shared/TWISTED_MAIL.md).

L{MXResolver.resolve} answers with a list of L{Host}s, best first: the MX records sorted by
preference, records of equal preference shuffled (RFC 5321 5.1 asks for spreading the load),
each host's IPv4 then IPv6 addresses, an address shared by several hosts given to the first
only.  A domain without MX records is its own implicit MX (its A and AAAA records, preference
0).  A domain literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) needs no DNS.

Failures are L{DNSProblem}s that say whether to try again later and what to write in a DSN:
L{NullMX} (the domain accepts no mail), L{NoSuchDomain} (NXDOMAIN, or a domain with neither MX
nor address records, or MX hosts that do not exist) and L{TemporaryDNSError} (SERVFAIL, REFUSED,
a timeout, or MX hosts that could not be resolved now; Postfix defers these too).

L{makeResolver} builds the C{IResolver} to use: given name servers, or the system's.
"""

from __future__ import annotations

import importlib
import ipaddress
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


class _Names:
    """
    A module of C{twisted.names}, imported at its first use: importing them takes about 20 ms
    of the server's start-up, and nothing needs DNS before the first delivery.  Once imported,
    the module takes this stand-in's place among this module's globals.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        module = importlib.import_module(f"twisted.names.{self._name}")
        globals()[self._name] = module
        return getattr(module, attribute)


client, dns, error, hosts, resolve = (_Names(n) for n in ("client", "dns", "error", "hosts", "resolve"))


@implementer(IResolver)
class ResolverOnFirstUse:
    """
    The resolver C{make()} returns, made at the first lookup (see L{_Names}).
    """

    def __init__(self, make: Callable[[], object]):
        self._make = make
        self._resolver = None

    def __getattr__(self, attribute: str):
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._resolver is None:
            self._resolver = self._make()
        return getattr(self._resolver, attribute)


@dataclass(frozen=True)
class Host:
    """
    One place to deliver to.

    @ivar name: the MX host name in ASCII (A-label) form, lower case; for an implicit MX the
        domain itself; for a domain literal the literal (C{"[192.0.2.1]"},
        C{"[IPv6:2001:db8::1]"}).
    @ivar preference: the MX preference (0 for an implicit MX or a literal).
    @ivar addresses: the IP addresses to try, in order: IPv4 ones first, then IPv6.
    """

    name: str
    preference: int
    addresses: tuple[str, ...]


class DNSProblem(Exception):
    """
    The destination of a domain cannot be found.

    @cvar temporary: whether the lookup may succeed later (defer), or never will (bounce).
    @cvar status: the RFC 3463 enhanced status code for the DSN.
    @ivar text: what went wrong, for the log and the DSN.
    @ivar domain: the domain that was looked up, as given.
    """

    temporary = True
    status = "4.4.3"

    def __init__(self, text: str, domain: str = ""):
        super().__init__(text)
        self.text = text
        self.domain = domain


class NullMX(DNSProblem):
    """
    The domain publishes an RFC 7505 null MX: it accepts no mail.
    """

    temporary = False
    status = "5.1.10"


class NoSuchDomain(DNSProblem):
    """
    The domain does not exist (NXDOMAIN), has neither MX nor address records, or all its MX
    hosts do not exist; or the name is not a valid domain or domain literal.
    """

    temporary = False
    status = "5.1.2"


class TemporaryDNSError(DNSProblem):
    """
    The lookup failed in a way that may not last: SERVFAIL, REFUSED, a timeout, or MX hosts
    that could not be resolved now.
    """

    temporary = True
    status = "4.4.3"


class _Answer:
    """
    The outcome of one address lookup.

    @ivar addresses: the addresses found (possibly none).
    @ivar nxdomain: the name does not exist.
    @ivar problem: why the lookup failed temporarily, or C{None}.
    """

    def __init__(self, addresses: list[str], nxdomain: bool = False, problem: str | None = None):
        self.addresses = addresses
        self.nxdomain = nxdomain
        self.problem = problem


class MXResolver:
    """
    Finds the hosts to deliver a domain's mail to.

    @ivar resolver: the L{twisted.internet.interfaces.IResolver} asked.
    @ivar shuffle: called with each list of MX hosts of equal preference (two or more), to
        reorder it in place; L{random.shuffle} unless a test injects another.
    """

    def __init__(self, resolver, shuffle: Callable[[list], None] = random.shuffle):
        self.resolver = resolver
        self.shuffle = shuffle

    def resolve(self, domain: str) -> Deferred[list[Host]]:
        """
        Look up where to deliver mail for C{domain}.

        @param domain: a domain name (Unicode or ASCII, any case, with or without a trailing
            dot) or a domain literal.
        @return: a L{Deferred} firing with the L{Host}s to try, in order (never empty), or
            failing with a L{DNSProblem}; it never fails with another exception.
        """
        return self._resolve(domain).addErrback(self._unexpected, domain)

    def _unexpected(self, failure, domain):
        if failure.check(DNSProblem, defer.CancelledError):
            return failure
        log.failure("MX lookup of {domain} failed unexpectedly", failure, domain=domain)
        return defer.fail(TemporaryDNSError(f"DNS lookup for {domain} failed: internal error", domain))

    @defer.inlineCallbacks
    def _resolve(self, domain):
        if isinstance(domain, bytes):
            domain = domain.decode("utf-8", "replace")
        shown = domain[:-1] if domain.endswith(".") else domain
        if domain.startswith("["):
            return [_literal(domain)]
        name = _asciiName(domain)
        try:
            result = yield self.resolver.lookupMailExchange(name)
        except defer.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, error.DNSNameError):
                raise NoSuchDomain(f"Domain {shown} not found (NXDOMAIN)", shown)
            raise TemporaryDNSError(f"DNS lookup of MX records for {shown} failed: {_why(e)}", shown)
        answers, _, _ = result
        records = _records(answers, name, dns.MX)
        if not records:
            return (yield self._implicit(name, shown))
        exchanges = self._order(records, shown)
        found = yield defer.gatherResults(
            [self._addresses(exchange) for _, exchange in exchanges], consumeErrors=True
        )
        hosts, seen, failed = [], set(), []
        for (preference, exchange), answer in zip(exchanges, found):
            addresses = tuple(a for a in answer.addresses if a not in seen)
            seen.update(addresses)
            if addresses:
                hosts.append(Host(exchange, preference, addresses))
            elif not answer.addresses:
                failed.append((exchange, answer))
                log.debug("MX host {host} of {domain} has no address", host=exchange, domain=shown)
        if hosts:
            return hosts
        detail = "; ".join(f"{exchange}: {_problem(answer)}" for exchange, answer in failed)
        if all(answer.nxdomain for _, answer in failed):
            raise NoSuchDomain(f"No MX host of {shown} exists ({detail})", shown)
        raise TemporaryDNSError(f"No MX host of {shown} has an address ({detail})", shown)

    def _order(self, records, shown: str) -> list[tuple[int, str]]:
        """
        The MX records as C{(preference, exchange)}, best first, equal preferences shuffled,
        each exchange once (at its best preference).

        @raise NullMX: if every record is a null MX (exchange C{"."}).
        @raise NoSuchDomain: if no record names a host at all (names that are not ASCII).
        """
        byPreference: dict[int, list[str]] = {}
        seen = set()
        nulls = 0
        for record in sorted(records, key=lambda r: r.preference):
            exchange = _hostName(record.name.name)
            if not exchange:  # a null MX (or a name no host can have) beside real ones is ignored
                nulls += exchange == ""
                continue
            if exchange not in seen:
                seen.add(exchange)
                byPreference.setdefault(record.preference, []).append(exchange)
        if not byPreference:
            if nulls:
                raise NullMX(f"Domain {shown} does not accept mail (null MX)", shown)
            raise NoSuchDomain(f"Domain {shown} has no usable MX record", shown)
        ordered = []
        for preference in sorted(byPreference):
            group = byPreference[preference]
            if len(group) > 1:
                self.shuffle(group)
            ordered.extend((preference, exchange) for exchange in group)
        return ordered

    @defer.inlineCallbacks
    def _implicit(self, name: str, shown: str):
        """
        No MX records: the domain itself is the host (RFC 5321 5.1), preference 0.
        """
        answer = yield self._addresses(name)
        if answer.addresses:
            return [Host(name, 0, tuple(answer.addresses))]
        if answer.problem is not None:
            raise TemporaryDNSError(f"DNS lookup of addresses of {shown} failed: {answer.problem}", shown)
        if answer.nxdomain:
            raise NoSuchDomain(f"Domain {shown} not found (NXDOMAIN)", shown)
        raise NoSuchDomain(f"Domain {shown} has no MX and no address records", shown)

    def _addresses(self, name: str) -> Deferred[_Answer]:
        """
        Look up the A and AAAA records of C{name} at the same time.

        @return: a L{Deferred} that never fails, firing with an L{_Answer}: the IPv4 addresses
            then the IPv6 ones (each once); C{nxdomain} if both lookups answered NXDOMAIN;
            C{problem} if either failed otherwise.
        """
        lookups = [
            self._lookup(self.resolver.lookupAddress, name, dns.A),
            self._lookup(self.resolver.lookupIPV6Address, name, dns.AAAA),
        ]

        def combine(answers):
            addresses = list(dict.fromkeys(a for answer in answers for a in answer.addresses))
            problems = [answer.problem for answer in answers if answer.problem is not None]
            return _Answer(
                addresses,
                nxdomain=all(answer.nxdomain for answer in answers),
                problem=problems[0] if problems else None,
            )

        return defer.gatherResults(lookups, consumeErrors=True).addCallback(combine)

    def _lookup(self, method, name: str, rrtype: int) -> Deferred[_Answer]:
        try:
            d = method(name)
        except Exception as e:  # an IResolver should not raise, but one that does fails one lookup
            d = defer.fail(e)

        def found(result):
            answers, _, _ = result
            return _Answer([_address(record) for record in _records(answers, name, rrtype)])

        def failed(failure):
            if failure.check(defer.CancelledError):
                return failure
            if failure.check(error.DNSNameError):
                return _Answer([], nxdomain=True)
            return _Answer([], problem=_why(failure.value))

        return d.addCallbacks(found, failed)


def _asciiName(domain: str) -> str:
    """
    C{domain} as it is asked in DNS: IDNA-encoded, lower case, without the trailing dot.

    @raise NoSuchDomain: if it is not a valid domain name.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    try:
        encoded = name.lower().encode("idna").decode("ascii").lower()
    except UnicodeError:
        encoded = ""
    if not encoded or encoded.startswith(".") or encoded.endswith(".") or len(encoded) > 253:
        raise NoSuchDomain(f"Invalid domain name {domain!r}", domain)
    return encoded


def _literal(literal: str) -> Host:
    """
    A domain literal (RFC 5321 4.1.3) as its one host.

    @raise NoSuchDomain: if it is not an IPv4 literal or a tagged IPv6 one.
    """
    inner = literal[1:-1] if literal.endswith("]") else None
    try:
        if inner is None:
            raise ValueError(literal)
        if inner[:5].lower() == "ipv6:":
            address = ipaddress.IPv6Address(inner[5:])
            if address.scope_id:
                raise ValueError(literal)
            return Host(f"[IPv6:{address}]", 0, (str(address),))
        address = ipaddress.IPv4Address(inner)
        return Host(f"[{address}]", 0, (str(address),))
    except ValueError:
        raise NoSuchDomain(f"Invalid address literal {literal}", literal) from None


def _records(answers, name: str, rrtype: int) -> list:
    """
    The payloads of the C{rrtype} records for C{name} in an answer section, following the
    CNAME chain a recursive server includes.
    """
    names = {name.encode("ascii").lower()}
    changed = True
    while changed:
        changed = False
        for rr in answers:
            if rr.type == dns.CNAME and rr.name.name.lower() in names:
                target = rr.payload.name.name.lower()
                if target not in names:
                    names.add(target)
                    changed = True
    return [rr.payload for rr in answers if rr.type == rrtype and rr.name.name.lower() in names]


def _hostName(exchange: bytes) -> str | None:
    """
    An MX exchange as a host name: C{""} for a null MX, C{None} if it cannot be one.
    """
    try:
        return exchange.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None


def _address(record) -> str:
    if isinstance(record, dns.Record_A):
        return record.dottedQuad()
    return str(ipaddress.IPv6Address(record.address))


def _why(e: BaseException) -> str:
    """
    A failed lookup in a few words.
    """
    if isinstance(e, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(e, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if isinstance(e, error.DNSFormatError):
        return "format error (FORMERR)"
    if isinstance(e, error.DNSNotImplementedError):
        return "not implemented (NOTIMP)"
    if isinstance(e, defer.TimeoutError):
        return "timed out"
    if isinstance(e, error.DNSNameError):
        return "not found (NXDOMAIN)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _problem(answer: _Answer) -> str:
    if answer.problem is not None:
        return answer.problem
    if answer.nxdomain:
        return "not found (NXDOMAIN)"
    return "no address records"


def makeResolver(nameservers: Sequence[tuple[str, int]] = (), timeout: float = 5.0, reactor=None):
    """
    The L{twisted.internet.interfaces.IResolver} for L{MXResolver}.

    @param nameservers: C{(host, port)} of the name servers to ask (IPv4 or IPv6 addresses),
        in order; none: the system's, from C{/etc/resolv.conf} (re-read when it changes), after
        C{/etc/hosts}.
    @param timeout: seconds to wait for each name server's answer before asking the next one
        or giving up (one try per server: a lost answer defers the message, which is retried).
    @param reactor: the reactor for sockets and timeouts; the global one by default.
    """
    if reactor is None:
        from twisted.internet import reactor
    if nameservers:
        servers = [(host, int(port)) for host, port in nameservers]
        return client.Resolver(servers=servers, timeout=(timeout,), reactor=reactor)
    # client.createResolver(), but with our reactor and timeout (and without its CacheResolver,
    # which nothing fills outside a DNS server)
    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            client.Resolver(resolv=b"/etc/resolv.conf", timeout=(timeout,), reactor=reactor),
        ]
    )
