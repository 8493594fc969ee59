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
