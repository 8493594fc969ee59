"""
A fake DNS server for tests: a real C{twisted.names} server on a loopback port, UDP and TCP,
answering from a small table of zones.

In a test (trial-style, Twisted's global reactor)::

    port, stop = startDNSServer({
        "example.com": [("MX", 10, "mx1.example.com"), ("MX", 20, "mx2.example.com")],
        "mx1.example.com": [("A", "127.0.0.2"), ("AAAA", "::1")],
        "nullmx.test": [("MX", 0, ".")],
        "servfail.test": "SERVFAIL",
        "slow.test": "TIMEOUT",
    })
    self.addCleanup(stop)

A name maps to a list of records or to one of C{"SERVFAIL"}, C{"REFUSED"}, C{"NXDOMAIN"},
C{"TIMEOUT"} (no answer at all) for every query of that name.  Records:
C{("MX", preference, exchange)} (C{"."} is a null MX), C{("A", address)},
C{("AAAA", address)}, C{("CNAME", target)} (followed within the table, as a recursive server
does), C{("TXT", text, ...)}; C{(TYPE, "SERVFAIL")} (or another of the words above) makes
only the queries of that type fail.  A name not in the table answers NXDOMAIN; a name in it
without records of the asked type answers NOERROR with an empty answer.  Names are compared
case-insensitively, without a trailing dot, Unicode ones IDNA-encoded.

From another process (a pymaild subprocess resolving through it)::

    python tests/queue/fakedns.py zones.json [HOST]

serves the zones of the JSON file (records as lists) and prints the port on stdout, then runs
until killed.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer
from twisted.names import dns, server

FAILURES = {"SERVFAIL": dns.ESERVER, "REFUSED": dns.EREFUSED, "NXDOMAIN": dns.ENAME, "TIMEOUT": None}
TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "CNAME": dns.CNAME, "TXT": dns.TXT}


def _name(name: str) -> bytes:
    name = name[:-1] if name.endswith(".") else name
    return name.lower().encode("idna").lower() if name else b""


def _payload(record) -> tuple[int, object]:
    kind, *values = record
    kind = kind.upper()
    if kind == "A":
        return dns.A, dns.Record_A(values[0], ttl=60)
    if kind == "AAAA":
        return dns.AAAA, dns.Record_AAAA(values[0], ttl=60)
    if kind == "MX":
        return dns.MX, dns.Record_MX(int(values[0]), _name(values[1]), ttl=60)
    if kind == "CNAME":
        return dns.CNAME, dns.Record_CNAME(_name(values[0]), ttl=60)
    if kind == "TXT":
        return dns.TXT, dns.Record_TXT(*[v.encode() for v in values], ttl=60)
    raise ValueError(f"fakedns: unknown record type {kind!r}")


class FakeZones:
    """
    The table, compiled: name -> failure word, or name -> list of C{(type, payload)} and
    C{(type, failure word)}.

    @ivar queries: C{(name, type name)} of every query received, in order.
    """

    def __init__(self, zones: dict):
        self.table: dict[bytes, object] = {}
        self.queries: list[tuple[str, str]] = []
        for name, records in zones.items():
            if isinstance(records, str):
                if records.upper() not in FAILURES:
                    raise ValueError(f"fakedns: unknown failure {records!r} for {name}")
                self.table[_name(name)] = records.upper()
                continue
            compiled = []
            for record in records:
                if len(record) == 2 and isinstance(record[1], str) and record[1].upper() in FAILURES:
                    compiled.append((TYPES[record[0].upper()], record[1].upper()))
                else:
                    compiled.append(_payload(record))
            self.table[_name(name)] = compiled

    def answer(self, name: bytes, rrtype: int) -> tuple[str | None, list]:
        """
        The failure word (or C{None}) and the answer records for a query.
        """
        answers = []
        name = name.lower()
        for _ in range(8):  # CNAME hops
            entry = self.table.get(name)
            if entry is None:
                return "NXDOMAIN", answers
            if isinstance(entry, str):
                return entry, answers
            for kind, payload in entry:
                if kind == rrtype and isinstance(payload, str):
                    return payload, answers
            matching = [(k, p) for k, p in entry if k == rrtype or rrtype == dns.ALL_RECORDS]
            cname = [p for k, p in entry if k == dns.CNAME]
            if matching or not cname:
                answers += [_header(name, k, p) for k, p in matching]
                return None, answers
            answers.append(_header(name, dns.CNAME, cname[0]))
            name = cname[0].name.name
        return "SERVFAIL", answers


def _header(name: bytes, rrtype: int, payload) -> dns.RRHeader:
    return dns.RRHeader(name=name, type=rrtype, cls=dns.IN, ttl=60, payload=payload, auth=True)


class FakeDNSFactory(server.DNSServerFactory):
    """
    A DNS server answering from L{FakeZones}, with the rcode the table asks for.
    """

    def __init__(self, zones: FakeZones):
        super().__init__()
        self.zones = zones
        self._allClosed: list[defer.Deferred] = []

    def connectionLost(self, protocol):
        super().connectionLost(protocol)
        if not self.connections:
            waiting, self._allClosed = self._allClosed, []
            for d in waiting:
                d.callback(None)

    def closeAll(self) -> defer.Deferred:
        """
        Close every TCP connection; the L{Deferred} fires when they are all closed.
        """
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._allClosed.append(d)
        for connection in list(self.connections):
            connection.transport.loseConnection()
        return d

    def handleQuery(self, message, protocol, address):
        query = message.queries[0]
        self.zones.queries.append(
            (query.name.name.decode("ascii", "replace"), dns.QUERY_TYPES.get(query.type, str(query.type)))
        )
        failure, answers = self.zones.answer(query.name.name, query.type)
        if failure == "TIMEOUT":
            return
        rCode = dns.OK if failure is None else FAILURES[failure]
        response = self._responseFromMessage(message=message, rCode=rCode, answers=answers)
        response.auth = True
        self.sendReply(protocol, response, address)


def startDNSServer(zones: dict, reactor=None, host: str = "127.0.0.1", queries: list | None = None):
    """
    Serve C{zones} on UDP and TCP on the same free port of C{host}.

    @param zones: the table described in the module docstring.
    @param queries: if given, C{(name, type)} of every query received is appended to it.
    @return: C{(port, stop)}; C{stop()} closes both ports and any TCP connection and returns a
        L{Deferred} that fires when they are closed.
    """
    if reactor is None:
        from twisted.internet import reactor
    table = FakeZones(zones)
    if queries is not None:
        table.queries = queries
    factory = FakeDNSFactory(table)
    factory.noisy = False
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=host)
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface=host)
        except Exception:
            udp.stopListening()
            continue
        break
    else:
        raise RuntimeError("fakedns: no port free for both UDP and TCP")

    def stop():
        return defer.gatherResults(
            [defer.maybeDeferred(udp.stopListening), defer.maybeDeferred(tcp.stopListening), factory.closeAll()]
        )

    return port, stop


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    if len(argv) not in (2, 3):
        sys.exit("usage: fakedns.py zones.json [HOST]")
    with open(argv[1]) as f:
        zones = json.load(f)
    port, _ = startDNSServer(zones, reactor, host=argv[2] if len(argv) == 3 else "127.0.0.1")
    print(port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
