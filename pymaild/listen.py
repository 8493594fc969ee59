# -*- test-case-name: tests.test_listen -*-
"""
Listening sockets, connection limits and graceful shutdown, shared by every protocol.

Sockets are bound by L{bindAll} while the configuration is checked, before anything listens
and before twistd drops privileges: a port in use stops start-up with one line, and a
privileged port can be served by an unprivileged process.  L{ListenerService} hands the bound
socket to the reactor in C{privilegedStartService}.

Each accepted connection is wrapped by L{TrackedConnection}, which sets C{TCP_NODELAY} (see
../shared/TESTING.md: without it small replies wait ~40 ms for delayed ACKs), counts the
connection in the L{ConnectionRegistry} (global and per-address limits) and logs one event when
it opens and one when it closes.

The protocols take part in shutdown through two optional methods on the protocol instance:
C{isBusy()} (a transaction is in flight: let it finish) and C{goodbye()} (say the protocol's
farewell, such as SMTP C{421} or IMAP C{* BYE}, and close).
"""

from __future__ import annotations

import socket
import time

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from pymaild.config import ListenAddress
from pymaild.errors import ConfigError

log = Logger()


def bindSocket(address: ListenAddress, backlog: int) -> socket.socket:
    """
    Bind and listen on one address, non-blocking.  IPv6 sockets are IPv6-only, so that
    C{0.0.0.0:25} and C{[::]:25} can be listed side by side.

    @raise OSError: from C{bind} (address in use, permission denied, not available).
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bindAll(wanted, backlog: int, where: str) -> dict[str, list[socket.socket]]:
    """
    Bind every listener's addresses, or none: on the first failure every socket bound so far
    is closed and a L{ConfigError} names the listener and the address.

    @param wanted: C{(name, [ListenAddress, ...])} pairs.
    @return: C{{name: [socket, ...]}}.
    """
    bound: dict[str, list[socket.socket]] = {}
    try:
        for name, addresses in wanted:
            bound[name] = []
            for address in addresses:
                try:
                    bound[name].append(bindSocket(address, backlog))
                except OSError as e:
                    reason = e.strerror or str(e)
                    if e.errno == 98:
                        reason = "address already in use"
                    elif e.errno == 13:
                        reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                    raise ConfigError(f"{where}: [listen] {name}: cannot listen on {address}: {reason}") from None
    except BaseException:
        for socks in bound.values():
            for s in socks:
                s.close()
        raise
    return bound


def innermost(protocol):
    """
    The application protocol under any wrappers (connection tracking, TLS).
    """
    while getattr(protocol, "wrappedProtocol", None) is not None:
        protocol = protocol.wrappedProtocol
    return protocol


class ConnectionRegistry:
    """
    Every open connection, with the limits on how many there may be.

    @ivar goodbyeGrace: seconds a connection told goodbye at shutdown may take to close.
    """

    goodbyeGrace = 2.0

    def __init__(self, maxConnections: int, maxPerAddress: int, clock=None):
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        self.connections: set[TrackedConnection] = set()
        #: connections served by worker processes, by key: their client's address
        self.remote: dict = {}
        self._perAddress: dict[str, int] = {}
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock

    def allow(self, host: str) -> str | None:
        """
        @return: C{None} if one more connection from C{host} is allowed, else the reason.
        """
        if len(self.connections) + len(self.remote) >= self.maxConnections:
            return "max_connections"
        if self._perAddress.get(host, 0) >= self.maxPerAddress:
            return "max_connections_per_ip"
        return None

    def addRemote(self, key, host: str) -> None:
        """A connection another process serves (L{pymaild.handoff}): it counts, by C{key}."""
        self.remote[key] = host
        self._perAddress[host] = self._perAddress.get(host, 0) + 1

    def removeRemote(self, key) -> None:
        host = self.remote.pop(key, None)
        if host is not None:
            self._forget(host)

    def add(self, connection: TrackedConnection) -> None:
        self.connections.add(connection)
        self._perAddress[connection.peerHost] = self._perAddress.get(connection.peerHost, 0) + 1

    def remove(self, connection: TrackedConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self._forget(connection.peerHost)

    def _forget(self, host: str) -> None:
        left = self._perAddress[host] - 1
        if left:
            self._perAddress[host] = left
        else:
            del self._perAddress[host]

    def drain(self, timeout: float, interval: float = 0.1) -> defer.Deferred:
        """
        Close every connection as soon as it is idle; after C{timeout} seconds abort the rest.

        @return: a Deferred that fires when no connection is left.
        """
        deadline = self._clock.seconds() + timeout
        said: dict[TrackedConnection, float] = {}
        done = defer.Deferred()

        def sweep():
            if not self.connections:
                loop.stop()
                return
            late = self._clock.seconds() >= deadline
            for connection in list(self.connections):
                app = innermost(connection)
                if late:
                    log.warn(
                        "shutdown: aborting {protocol} connection from {peer} after {timeout}s",
                        protocol=connection.factory.name,
                        peer=connection.peerHost,
                        timeout=timeout,
                    )
                    connection.transport.abortConnection()
                    self.remove(connection)
                elif connection in said:
                    # A TLS close waits for the peer's close_notify: do not wait for long.
                    if self._clock.seconds() - said[connection] > self.goodbyeGrace:
                        connection.transport.abortConnection()
                        self.remove(connection)
                else:
                    isBusy = getattr(app, "isBusy", None)
                    if isBusy is not None and isBusy():
                        continue
                    said[connection] = self._clock.seconds()
                    goodbye = getattr(app, "goodbye", None)
                    if goodbye is not None:
                        goodbye()
                    else:
                        connection.transport.loseConnection()

        loop = task.LoopingCall(sweep)
        loop.clock = self._clock
        loop.start(interval, now=True).addBoth(lambda _: done.callback(None))
        return done


class TrackedConnection(ProtocolWrapper):
    """
    The outermost protocol of every accepted connection: counts it, logs it, sets TCP_NODELAY.
    """

    peerHost = ""

    @property
    def disconnected(self):
        """The transport's, asked for at every held IMAP answer: without it, Twisted's
        C{__getattr__} was reached only after a failed lookup and its C{AttributeError}."""
        return getattr(self.transport, "disconnected", False)

    def makeConnection(self, transport):
        peer = transport.getPeer()
        self.peerHost = getattr(peer, "host", "")
        self.openedAt = time.monotonic()
        try:
            transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self.factory.registry.add(self)
        local = transport.getHost()
        log.info(
            "{protocol} connect from {peer}:{peerPort} to {local}",
            event="connect",
            protocol=self.factory.name,
            peer=self.peerHost,
            peerPort=getattr(peer, "port", 0),
            local=f"{getattr(local, 'host', '')}:{getattr(local, 'port', '')}",
        )
        super().makeConnection(transport)

    def connectionLost(self, reason):
        self.factory.registry.remove(self)
        log.info(
            "{protocol} disconnect {peer} after {seconds:.1f}s",
            event="disconnect",
            protocol=self.factory.name,
            peer=self.peerHost,
            seconds=time.monotonic() - self.openedAt,
        )
        super().connectionLost(reason)


class _Refusal(Protocol):
    """
    Says the protocol's "too many connections" line and hangs up.
    """

    def __init__(self, message: bytes):
        self.message = message

    def connectionMade(self):
        if self.message:
            self.transport.write(self.message)
        self.transport.loseConnection()


class ListenerFactory(WrappingFactory):
    """
    Wraps a protocol factory with connection tracking and limits, and with TLS from the first
    byte for the implicit-TLS listeners.

    @ivar name: the listener's name (C{"smtp"}, C{"imaps"} ...), as in C{[listen]}.
    """

    protocol = TrackedConnection

    noisy = False

    def __init__(self, name: str, appFactory, registry: ConnectionRegistry, tls=None):
        self.name = name
        self.registry = registry
        self.implicitTLS = tls is not None
        self.refusal = getattr(appFactory, "tooManyConnections", b"")
        inner = TLSMemoryBIOFactory(tls, False, appFactory) if tls is not None else appFactory
        super().__init__(inner)

    def refused(self, host: str) -> bytes | None:
        """
        C{None} if one more connection from C{host} is allowed; else (logged) what to say
        before hanging up: the protocol's "too many connections" line, nothing over implicit
        TLS (the refusal would need a handshake first).
        """
        reason = self.registry.allow(host)
        if reason is None:
            return None
        log.warn(
            "{protocol} refused connection from {peer}: {limit} reached",
            event="refused",
            protocol=self.name,
            peer=host,
            limit=reason,
        )
        return b"" if self.implicitTLS else self.refusal

    def buildProtocol(self, addr):
        refusal = self.refused(getattr(addr, "host", ""))
        if refusal is not None:
            return _Refusal(refusal)
        return super().buildProtocol(addr)

    # WrappingFactory keeps its own dict of protocols; the registry does that job.
    def registerProtocol(self, p):
        pass

    def unregisterProtocol(self, p):
        pass


class ListenerService(Service):
    """
    Serves one already-bound socket.
    """

    def __init__(self, name: str, sock: socket.socket, factory: ListenerFactory, reactor=None):
        self.setName(f"listen-{name}-{sock.getsockname()[1]}")
        self.sock = sock
        self.family = sock.family
        self.factory = factory
        self.port = None
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        self.port = self._reactor.adoptStreamPort(self.sock.fileno(), self.family, self.factory)
        log.info(
            "{protocol} listening on {address}",
            event="listen",
            protocol=self.factory.name,
            address=self.address,
        )
        self.sock.close()

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
