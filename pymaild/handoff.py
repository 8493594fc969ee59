# -*- test-case-name: tests.pop3.test_pop3_processes -*-
"""
A protocol's sessions served by several processes (C{[pop3] processes}): one reactor thread
uses one core; a machine with more serves more sessions at once with more processes.

The main process still accepts every connection of the listeners concerned, so that the
connection limits (L{pymaild.listen.ConnectionRegistry}) count all of them.  It serves each new
connection itself or hands the socket to a worker process, whichever serves the fewest of these
sessions (a worker on a tie: the main process has the other protocols to serve).  The socket
travels over a UNIX socket pair (C{SCM_RIGHTS}, AMP's C{Descriptor}) and the worker serves it
from its first byte, TLS handshake included; it tells the main process when the connection
closes (L{Closed}).  What must hold across processes the protocol asks of the main process over
the same channel with commands of its own (POP3's logins: L{pymaild.pop3.remote}).

Workers start when the first connection arrives (a server nobody uses that way pays nothing),
get connections once they say they are ready (L{Ready}), and are started again when one ends
(after a pause that grows while they keep failing); the sessions it served end with it.  On
SIGHUP they re-read the certificate (L{Reload}); at shutdown they close their sessions as the
main process closes its own (L{Stop}), and are killed if they outlast it.

Each worker is C{python -m pymaild.worker}: it reads its settings (pickled, from the main
process) on standard input, talks AMP on descriptor 3 and writes its log events as JSON lines on
standard output, which the main process logs as its own (system C{pop3-worker-N}).

Security: workers run as the user the main process runs as when it starts them (twistd has
dropped its privileges by then); the TLS key comes from the main process's memory, not the file.
Nothing but the two processes of the server hold the socket pair.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import socket
import sys
import time

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from zope.interface import implementer

from pymaild.listen import ListenerFactory, ListenerService, TrackedConnection

log = Logger()

#: connections accepted per turn of the reactor (then other sockets get their turn)
ACCEPTS_PER_TURN = 64
#: seconds before a worker that ended is started again; doubled (up to L{MAX_RESTART_DELAY})
#: while workers end within L{STABLE} seconds of their start
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE = 10.0
#: seconds a worker may take to stop after the shutdown timeout before it is killed
STOP_GRACE = 3.0
#: seconds a worker may take to answer L{Adopt} before it is taken for hung and killed
ADOPT_TIMEOUT = 10.0
#: the largest certificate or key L{Reload} carries (an AMP value holds at most 65,535 bytes)
MAX_PEM = 60000


class Adopt(amp.Command):
    """main -> worker: serve this connection of listener C{listener}; C{id} names it."""

    arguments = [(b"fd", amp.Descriptor()), (b"id", amp.Integer()), (b"listener", amp.Unicode())]
    response = []


class Closed(amp.Command):
    """worker -> main: connection C{id} is closed."""

    arguments = [(b"id", amp.Integer())]
    requiresAnswer = False


class Ready(amp.Command):
    """worker -> main: serving."""

    arguments = [(b"pid", amp.Integer())]
    response = []


class Reload(amp.Command):
    """main -> worker: SIGHUP: the certificate and key the main process holds now (PEM)."""

    arguments = [(b"cert", amp.String()), (b"key", amp.String())]
    requiresAnswer = False


class Stop(amp.Command):
    """main -> worker: close every session as soon as it is idle, after C{timeout} seconds
    abort the rest, then exit."""

    arguments = [(b"timeout", amp.Float())]
    requiresAnswer = False


# --- the main process ------------------------------------------------------------------------


class _MainSide(amp.CommandLocator):
    """The main process's end of one worker's channel (and the protocol's own commands)."""

    def __init__(self, worker, extra):
        super().__init__()
        self.worker, self.extra = worker, extra

    @Ready.responder
    def ready(self, pid):
        self.worker.pool._ready(self.worker)
        return {}

    @Closed.responder
    def closed(self, id):
        self.worker.pool._closed(self.worker, id)
        return {}

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if responder is None and self.extra is not None:
            responder = self.extra.locateResponder(name)
        return responder


class _Channel(amp.AMP):
    """The main process's end of a worker's channel: a lost channel is a worker that takes no
    more connections (its process ending is seen by L{Worker.processEnded})."""

    worker = None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self.worker is not None:
            self.worker.ready = False


class Worker(ProcessProtocol):
    """
    One worker process as the main process sees it.

    @ivar sessions: the connections it serves: id -> client address.
    """

    def __init__(self, pool, number: int):
        self.pool, self.number = pool, number
        self.system = f"{pool.name}-worker-{number}"
        self.channel: amp.AMP | None = None
        self.extra = None
        self.ready = False
        self.sessions: dict[int, str] = {}
        self.pid: int | None = None
        self.startedAt = time.monotonic()
        self.ended = defer.Deferred()
        #: the certificate it was given (at its start, or by the last L{Reload})
        self.pem = pool.tls.pem if pool.tls is not None else None
        self._out = b""
        self._err = b""

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.write(self.pool.settings())
        self.transport.closeStdin()

    def outReceived(self, data: bytes):
        """Log events, one JSON object per line: published as the main process's own."""
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            text = line.strip(b"\x1e \r").decode("utf-8", "replace")
            if not text:
                continue
            try:
                event = eventFromJSON(text)
            except ValueError:
                log.warn("{system}: {line}", system=self.system, line=text)
                continue
            event["log_system"] = self.system
            # formatted again from its fields here: Twisted's flattening drops format specs
            event.pop("log_flattened", None)
            globalLogPublisher(event)

    def errReceived(self, data: bytes):
        """Whatever a worker writes to its standard error (a crash before its logging began)."""
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.warn("{system} (stderr): {line}", system=self.system, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.pool._ended(self, reason)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass


@implementer(IReadDescriptor)
class _Acceptor:
    """Accepts the connections of one listening socket and gives them to the pool."""

    def __init__(self, sock: socket.socket, factory: ListenerFactory, pool: WorkerPool):
        self.sock, self.factory, self.pool = sock, factory, pool

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return f"{self.factory.name}-accept"

    def connectionLost(self, reason):
        pass

    def doRead(self):
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                # out of descriptors or memory, or worse: said, and tried again at the next turn
                # (raising would make the reactor drop this listener for good)
                log.warn("{protocol}: cannot accept a connection: {error}", protocol=self.factory.name,
                         error=e.strerror or str(e))
                return
            refusal = self.factory.refused(addr[0])
            if refusal is not None:
                try:
                    conn.setblocking(False)
                    if refusal:
                        conn.send(refusal)
                except OSError:
                    pass
                conn.close()
                continue
            try:
                self.pool.take(conn, addr[0], self.factory)
            except Exception:  # (never out of doRead: the reactor would drop this listener)
                log.failure("{protocol}: placing a connection from {peer}", protocol=self.factory.name, peer=addr[0])
                conn.close()


class HandOffListenerService(ListenerService):
    """A listener whose connections a L{WorkerPool} places (here or in a worker)."""

    def __init__(self, name, sock, factory, pool: WorkerPool, reactor=None):
        super().__init__(name, sock, factory, reactor)
        self.pool = pool
        self._acceptor = None

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        if self._acceptor is None:
            self.sock.setblocking(False)
            self._acceptor = _Acceptor(self.sock, self.factory, self.pool)
            self.port = self._acceptor
            self._reactor.addReader(self._acceptor)
            log.info("{protocol} listening on {address} ({processes} processes)", event="listen",
                     protocol=self.factory.name, address=self.address, processes=self.pool.count + 1)

    def stopService(self):
        Service.stopService(self)
        if self._acceptor is not None:
            self._reactor.removeReader(self._acceptor)
            self._acceptor = self.port = None
            self.sock.close()


class WorkerPool:
    """
    The worker processes of one protocol (C{count} of them besides the main process).

    @param settings: C{settings()} -> what a worker reads on its standard input
        (L{pymaild.worker}), made when it starts.
    @param tls: the main process's L{pymaild.tls.ServerTLS}: its certificate goes to every
        worker on SIGHUP, and to one that started before a SIGHUP it did not hear.
    @param desk: C{desk(worker)} -> an C{amp.CommandLocator} answering the protocol's own
        commands from that worker, or None; its C{workerLost()}, if any, is called when the
        worker ends.
    """

    def __init__(self, name: str, count: int, settings, registry, reactor, desk=None,
                 argv: list[str] | None = None, tls=None):
        self.name, self.count, self.settings = name, count, settings
        self.registry, self.reactor, self.desk, self.tls = registry, reactor, desk, tls
        self.argv = argv or [sys.executable, "-m", "pymaild.worker"]
        self.workers: list[Worker | None] = [None] * count
        self.listenerNames: set[str] = set()
        self._started = False
        self._stopping = False
        self._ids = itertools.count(1)
        self._delays = [RESTART_DELAY] * count
        self._restarts: dict[int, object] = {}

    # placing connections

    def take(self, conn: socket.socket, host: str, factory: ListenerFactory) -> None:
        """Serve accepted connection C{conn} here or in the least busy worker."""
        if not self._started:
            self._started = True
            for number in range(self.count):
                self._spawn(number)
        here = sum(1 for c in self.registry.connections if c.factory.name in self.listenerNames)
        ready = [w for w in self.workers if w is not None and w.ready]
        best = min(ready, key=lambda w: len(w.sessions), default=None)
        if best is None or len(best.sessions) > here:
            self._serveHere(conn, host, factory)
            return
        id = next(self._ids)
        best.sessions[id] = host
        self.registry.addRemote((best.number, id), host)
        try:
            d = best.channel.callRemote(Adopt, fd=conn.fileno(), id=id, listener=factory.name)
        except Exception:
            self._closed(best, id)
            raise
        late = self.reactor.callLater(ADOPT_TIMEOUT, self._hung, best)

        def notAdopted(failure):
            self._closed(best, id)
            if failure.check(error.ConnectionLost, error.ConnectionDone) and conn.fileno() >= 0:
                # the worker is gone (its descriptors with it): this process still has the socket
                log.warn("{system} is gone: serving a connection from {peer} here", system=best.system, peer=host)
                self._serveHere(conn, host, factory)
                return
            log.warn("{system}: a connection from {peer} was not handed over: {error}", system=best.system,
                     peer=host, error=failure.getErrorMessage())

        def answered(result):
            if late.active():
                late.cancel()
            return result

        d.addBoth(answered)
        d.addErrback(notAdopted)
        d.addBoth(lambda _: conn.close())

    def _serveHere(self, conn: socket.socket, host: str, factory: ListenerFactory) -> None:
        try:
            self.reactor.adoptStreamConnection(conn.fileno(), conn.family, factory)
        except OSError as e:  # (reset before it was accepted, or out of descriptors)
            log.info("{protocol}: a connection from {peer} ended before it was served: {error}",
                     protocol=factory.name, peer=host, error=e.strerror or str(e))
        finally:
            conn.close()

    def _hung(self, worker: Worker) -> None:
        """A worker that did not answer L{Adopt} in time: killed (and started again)."""
        log.warn("{system} (pid {pid}) did not take a connection in {timeout}s: killed", system=worker.system,
                 pid=worker.pid, timeout=ADOPT_TIMEOUT)
        worker.ready = False
        worker.signal("KILL")

    def _closed(self, worker: Worker, id: int) -> None:
        if worker.sessions.pop(id, None) is not None:
            self.registry.removeRemote((worker.number, id))

    def _ready(self, worker: Worker) -> None:
        worker.ready = True
        log.info("{system} (pid {pid}) ready", system=worker.system, pid=worker.pid)
        if self.tls is not None and self.tls.pem != worker.pem:  # (a SIGHUP while it started)
            self._reload(worker)

    # the processes

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        worker = Worker(self, number + 1)
        worker.extra = self.desk(worker) if self.desk is not None else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            channel = _Channel(locator=_MainSide(worker, worker.extra))
            channel.worker = worker
            worker.channel = channel
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel))
            env = dict(os.environ)
            self.reactor.spawnProcess(worker, self.argv[0], self.argv, env=env,
                                      childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()})
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.ENOENT, errno.ENOEXEC, errno.EPERM):
                log.failure("{system}: cannot start", system=worker.system)
                self._restartLater(number, worker)
                return
            # a setup problem, not a passing one: said once, and not tried again
            log.error("{system}: cannot start {program} ({error}): it must be executable by the user the "
                      "server runs as; the main process serves these sessions", system=worker.system,
                      program=self.argv[0], error=e.strerror or str(e))
            return
        except Exception:
            log.failure("{system}: cannot start", system=worker.system)
            self._restartLater(number, worker)
            return
        finally:
            ours.close()
            theirs.close()
        self.workers[number] = worker

    def _ended(self, worker: Worker, reason) -> None:
        number = worker.number - 1
        if self.workers[number] is worker:
            self.workers[number] = None
        for id in list(worker.sessions):
            self._closed(worker, id)
        if worker.extra is not None and hasattr(worker.extra, "workerLost"):
            worker.extra.workerLost()
        if worker.channel is not None and worker.channel.transport is not None:
            worker.channel.transport.loseConnection()
        if self._stopping:
            log.info("{system} (pid {pid}) stopped", system=worker.system, pid=worker.pid)
            return
        self._restartLater(number, worker, reason.getErrorMessage())

    def _restartLater(self, number: int, worker: Worker, why: str = "") -> None:
        if time.monotonic() - worker.startedAt >= STABLE:
            self._delays[number] = RESTART_DELAY
        delay = self._delays[number]
        self._delays[number] = min(MAX_RESTART_DELAY, delay * 2)
        log.warn("{system} (pid {pid}) ended ({why}); starting it again in {delay}s", system=worker.system,
                 pid=worker.pid, why=why or "did not start", delay=delay)
        self._restarts[number] = self.reactor.callLater(delay, self._spawn, number)

    def reload(self) -> None:
        for worker in self.workers:
            if worker is not None and worker.ready:
                self._reload(worker)

    def _reload(self, worker: Worker) -> None:
        cert, key = self.tls.pem if self.tls is not None else (b"", b"")
        if len(cert) > MAX_PEM or len(key) > MAX_PEM:
            log.error("{system}: the certificate is too large to hand over ({size} bytes): the worker reads "
                      "the files itself", system=worker.system, size=max(len(cert), len(key)))
            cert = key = b""
        worker.pem = self.tls.pem if self.tls is not None else None
        worker.channel.callRemote(Reload, cert=cert, key=key)

    def __repr__(self) -> str:
        return f"the {self.name} worker processes"

    def stop(self, timeout: float) -> defer.Deferred:
        """Stop every worker: their sessions close as the main process's do; a Deferred."""
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = []
        for worker in self.workers:
            if worker is None:
                continue
            ended.append(worker.ended)
            if worker.ready:
                worker.channel.callRemote(Stop, timeout=timeout)
            else:
                worker.signal("TERM")
        if not ended:
            return defer.succeed(None)
        late = self.reactor.callLater(timeout + STOP_GRACE, self._kill)
        d = defer.gatherResults(ended)
        d.addBoth(lambda _: late.cancel() if late.active() else None)
        return d

    def _kill(self) -> None:
        for worker in self.workers:
            if worker is not None:
                log.warn("{system} (pid {pid}) did not stop: killed", system=worker.system, pid=worker.pid)
                worker.signal("KILL")


# --- a worker process ------------------------------------------------------------------------


class _Adopted(TrackedConnection):
    """A connection the main process handed over: tells it when it closes."""

    handoffId = 0

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.side.closed(self.handoffId)


class AdoptedFactory(ListenerFactory):
    """A worker's L{ListenerFactory} for one listener's connections (no limits of its own: the
    main process applied them)."""

    protocol = _Adopted
    side = None  # the WorkerSide
    _adopting = 0

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.handoffId = self._adopting
        return p


class WorkerSide(amp.AMP):
    """
    A worker's channel to the main process: serves the connections handed to it.  (The
    responders are the channel's own: a descriptor argument is read from the protocol that
    parses the command.)

    @param listeners: L{AdoptedFactory} by listener name.
    @param onReload: called on L{Reload} with the certificate and key (PEM), or C{None}: read
        the files.
    @param stopTimeout: seconds the sessions may take to close on SIGTERM.
    """

    def __init__(self, listeners: dict, registry, reactor, onReload=None, stopTimeout: float = 5.0):
        super().__init__()
        self.listeners, self.registry, self.reactor = listeners, registry, reactor
        self.onReload = onReload
        self.stopTimeout = stopTimeout
        self.stopping = False
        for factory in listeners.values():
            factory.side = self

    @Adopt.responder
    def adopt(self, fd, id, listener):
        conn = socket.socket(fileno=fd)
        try:
            factory = self.listeners[listener]
            if self.stopping:
                return {}  # (closed below: the main process's count is told)
            factory._adopting = id
            self.reactor.adoptStreamConnection(conn.fileno(), conn.family, factory)
            id = None
        finally:
            conn.close()
            if id is not None:
                self.closed(id)
        return {}

    def closed(self, id: int) -> None:
        if self.transport is not None and not self.transport.disconnecting:
            self.callRemote(Closed, id=id)

    @Reload.responder
    def reload(self, cert: bytes, key: bytes):
        if self.onReload is not None:
            self.onReload((cert, key) if cert and key else None)
        return {}

    @Stop.responder
    def stop(self, timeout: float = 5.0):
        if not self.stopping:
            self.stopping = True
            d = self.registry.drain(timeout)
            d.addBoth(lambda _: self.reactor.stop())
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.stopping:  # the main process is gone: no login can be decided
            log.warn("the main process is gone: closing the sessions")
            self.stop(0.0)

    def serve(self, fd: int = 3) -> None:
        """Talk to the main process over descriptor C{fd}; stop on SIGTERM."""
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: self))
        os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's ^C is the main process's to act on)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: self.reactor.callFromThread(self.stop, self.stopTimeout))
