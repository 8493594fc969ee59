"""
Flow control shared by the protocols that write much more than they read (IMAP FETCH, POP3 RETR)
and by the line protocols that answer one command at a time (SMTP, POP3, IMAP).

L{Backpressure} is registered with a transport as a streaming producer, so a client that reads
slowly pauses the writer instead of filling the server's memory.  L{writeNow} and L{sendNow}
send an answer the client waits for at once; L{LazyPause} holds pipelined commands without
stopping the socket's reading.  These two spare the system calls Twisted's transports make for
every answer and every held command (registering the socket for writing, then for reading
again): with one reactor thread and the store's threads wanting the same interpreter lock,
each system call on the reactor thread is also a chance to wait for the lock.
"""

from __future__ import annotations

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

#: the most pipelined input a held protocol (L{LazyPause}) keeps before its transport stops
#: reading
HELD_INPUT = 64 << 10


@implementer(IPushProducer)
class Backpressure:
    """
    Registered with the transport while a FETCH or a RETR writes, so that a client that reads slowly
    pauses the writer instead of filling the server's memory.
    """

    def __init__(self, transport):
        self.transport = transport
        self.paused = False
        self.stopped = False
        self._waiting = None
        self._registered = False
        self.register()

    def register(self):
        if not self._registered and not self.stopped:
            self.transport.registerProducer(self, True)
            self._registered = True

    def unregister(self):
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
            self.paused = False

    def wait(self):
        self.register()
        if not self.paused or self.stopped:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback(None)

    def stopProducing(self):
        self.stopped = True
        self.resumeProducing()


def sendNow(transport) -> None:
    """
    Send what was just written to C{transport} at once, instead of at the reactor's next turn.

    Twisted's TCP transport only buffers in C{write} and sends when the reactor next finds the
    socket writable: one more trip round the reactor (two C{epoll_ctl} and an C{epoll_wait})
    for every answer.  A protocol whose client waits for each answer before the next command
    (POP3 RETR, one message at a time) calls this after writing the whole answer; it calls the
    descriptor's own C{doWrite} (L{twisted.internet.interfaces.IWriteDescriptor}), on the
    reactor thread, as the reactor would.  What cannot be sent now stays buffered, and errors
    are left for the reactor to find on its next turn (the descriptor is still registered for
    writing).  Wrappers (TLS, connection tracking) are looked through by their C{transport}.
    """
    fd = transport
    for _ in range(6):
        if fd is None:
            return
        if hasattr(fd, "doWrite") and hasattr(fd, "fileno"):
            break
        fd = getattr(fd, "transport", None)
    else:
        return
    if not getattr(fd, "connected", False) or getattr(fd, "disconnecting", True):
        return
    if not getattr(fd, "_tempDataBuffer", True) and len(getattr(fd, "dataBuffer", b"x")) <= getattr(fd, "offset", 0):
        return  # nothing buffered (L{writeNow} sent it)
    fd.doWrite()


def _plainConnection(transport):
    """
    The TCP connection under C{transport} when the bytes written reach it unchanged: no TLS,
    and only wrappers that pass writes on as they are (L{ProtocolWrapper}s that do not
    override C{write}, as the listener's connection tracking).  C{None} otherwise.
    """
    t = transport
    for _ in range(4):
        if isinstance(t, tcp.Connection):
            return None if t.TLS else t
        if not isinstance(t, ProtocolWrapper) or type(t).write is not ProtocolWrapper.write:
            return None
        t = t.transport
    return None


def writeNow(transport, data: bytes, conn=False) -> bool:
    """
    C{transport.write(data)}, sent with one C{send} right away when nothing is waiting to go out
    before it: the answer a client waits for, without Twisted's registering the socket for
    writing and unregistering it after the next turn (two C{epoll_ctl} per answer, and a turn of
    the reactor; these are most of the system calls of a POP3 RETR or an SMTP transaction).
    What the socket does not take now is written the usual way, and so is everything over TLS
    and everything behind data already buffered (order is kept).  An error from C{send} is
    left for the reactor to find: the data goes to C{transport.write}, which registers the
    socket, and its C{doWrite} meets the error as it would have.  C{conn}: the transport's
    L{_plainConnection} if the caller knows it already.  True when all of C{data} was sent
    (nothing is left for L{sendNow} to do), False when some went to C{transport.write}.
    """
    if conn is False:
        conn = _plainConnection(transport)
    if not data or not _idle(conn):
        transport.write(data)
        return False
    try:
        sent = conn.socket.send(data)
    except OSError:  # EAGAIN, or an error the reactor reports on its next turn
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
        return False
    return True


#: the most buffers one C{sendmsg} takes (Linux's IOV_MAX)
_IOV_MAX = 1024


def writeSequenceNow(transport, pieces: list[bytes], conn=False) -> bool:
    """
    L{writeNow} for a list of C{bytes} (a FETCH's batch of answers): sent with C{sendmsg}, which
    gathers them in the kernel, when nothing is waiting to go out before them, so that they are
    not joined into one string first (a copy of every body of the batch); what the socket does
    not take goes to C{transport.writeSequence}.  True when all was sent.
    """
    if conn is False:
        conn = _plainConnection(transport)
    if not pieces or not _idle(conn):
        if pieces:
            transport.writeSequence(pieces)
        return False
    send = conn.socket.sendmsg
    for i in range(0, len(pieces), _IOV_MAX):
        group = pieces[i : i + _IOV_MAX]
        try:
            sent = send(group)
        except OSError:  # EAGAIN, or an error the reactor reports on its next turn
            sent = 0
        for j, piece in enumerate(group):
            if sent < len(piece):
                rest = pieces[i + j :]
                if sent:
                    rest[0] = piece[sent:]
                transport.writeSequence(rest)
                return False
            sent -= len(piece)
    return True


def _idle(conn) -> bool:
    """Whether bytes may go to the plain TCP connection C{conn} (L{_plainConnection}) at once:
    connected, not closing, and nothing buffered to go out before them."""
    return not (conn is None or conn.TLS or not conn.connected or conn.disconnecting or conn._writeDisconnected
                or conn._tempDataBuffer or len(conn.dataBuffer) > conn.offset)


class LazyPause:
    """
    C{pauseProducing} for a C{LineReceiver} that holds its input while an answer is pending
    (pipelining with asynchronous answers), without stopping the transport's reading: what
    arrives meanwhile waits in the receiver's buffer, as it would in the kernel's.  Stopping
    and restarting the reading cost two C{epoll_ctl} for every held command; here the
    transport stops reading only when L{HELD_INPUT} bytes wait, so a client that pipelines
    without end is still bounded.  Put it before C{LineReceiver} in the bases.
    """

    _readingStopped = False

    def pauseProducing(self):
        self.paused = True
        if len(self._buffer) >= HELD_INPUT:
            self._stopReading()

    def _stopReading(self):
        if not self._readingStopped:
            self._readingStopped = True
            self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        if self._readingStopped:
            self._readingStopped = False
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def dataReceived(self, data):
        if self.paused and len(self._buffer) + len(data) >= HELD_INPUT:
            self._stopReading()
        return super().dataReceived(data)

    _plain = False  # the TCP connection under the transport (L{_plainConnection}), once known

    def answer(self, data: bytes) -> None:
        """An answer: sent at once (L{writeNow}) unless more commands are pipelined behind
        it, whose answers then go out together at the reactor's next turn."""
        if self._buffer:
            self.transport.write(data)
            return
        conn = self._plain
        if conn is False:  # (found once: the wrappers stay; STLS later sets its TLS, checked)
            conn = self._plain = _plainConnection(self.transport)
        writeNow(self.transport, data, conn)


class Closing:
    """
    Closing a line-based session (a mixin for C{LineReceiver} protocols with a L{Backpressure}
    in C{_flow} and a clock in C{factory.clock}).

    The transport must go on reading while it closes: over TLS, C{loseConnection} sends the
    TLS close and waits for the client's, and a transport that no longer reads never sees it
    (the connection, its descriptor and its slot stayed forever).  So closing resumes reading
    (the protocol ignores what arrives, C{_closing}), unregisters the flow control (TLS also
    waits for its producer to go), and aborts the connection if the client has not closed its
    side within L{CLOSE_GRACE} seconds.
    """

    CLOSE_GRACE = 10.0
    _closing = False
    _closeTimer = None

    def _close(self, abort: bool = False) -> None:
        if self._closing and not abort:
            return
        self._closing = True
        self._held = False
        if self._flow is not None:
            self._flow.unregister()
        if self.paused:
            self.resumeProducing()  # (lines still buffered are dropped: _closing)
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._closeTimer = self.factory.clock.callLater(self.CLOSE_GRACE, self._closeLate)

    def _closeLate(self) -> None:
        self._closeTimer = None
        self.transport.abortConnection()

    def _closed(self) -> None:
        """Call from C{connectionLost}."""
        timer, self._closeTimer = self._closeTimer, None
        if timer is not None and timer.active():
            timer.cancel()
