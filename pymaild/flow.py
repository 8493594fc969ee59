"""
Flow control shared by the protocols that write much more than they read (IMAP FETCH, POP3 RETR).

L{Backpressure} is registered with a transport as a streaming producer, so a client that reads
slowly pauses the writer instead of filling the server's memory.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


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
    fd.doWrite()


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
