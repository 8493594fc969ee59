# -*- test-case-name: tests.integration.test_startup -*-
"""
The SMTP front-end: MX (port 25), submission (587, STARTTLS) and implicit-TLS submission (465),
on Twisted's C{ESMTP}.

Status: this module greets, answers EHLO/HELO, NOOP-free Twisted basics and STARTTLS, and takes
part in graceful shutdown.  Local delivery, AUTH, SIZE, PIPELINING and the fixes for the holes
listed in ../shared/TWISTED_MAIL.md (STARTTLS buffer, smuggling) come with the SMTP issue;
until then every recipient gets a I{temporary} 451 so that no sender bounces mail meant for us.

Security: reads commands and data from anyone who connects.  No AUTH mechanism is offered
(so no password crosses the wire) until the SMTP issue adds AUTH after TLS.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer


@implementer(IMessageDelivery)
class UnavailableDelivery:
    """
    Accepts no recipient yet: a temporary refusal, so senders keep the message and retry.
    """

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        raise smtp.SMTPBadRcpt(user, 451, "4.3.2 Local delivery is not available yet, try again later")


class PymaildESMTP(smtp.ESMTP):
    """
    pymaild's SMTP server protocol.
    """

    def connectionMade(self):
        if self.factory.implicitTLS:
            self.startedTLS = True
        self.delivery = UnavailableDelivery()
        super().connectionMade()

    def greeting(self):
        return self.host + b" ESMTP pymaild"

    def do_NOOP(self, rest):
        # RFC 5321 4.1.1.9: NOOP may carry a parameter, which is ignored.
        self.sendCode(250, b"2.0.0 OK")

    def isBusy(self) -> bool:
        """
        A transaction is in flight (between MAIL and the end of DATA): shutdown waits for it.
        """
        return self._from is not None or self.mode != smtp.COMMAND

    def goodbye(self) -> None:
        self.sendCode(421, self.host + b" 4.3.2 Service shutting down, try again later")
        self.transport.loseConnection()


class SMTPFactory(protocol.ServerFactory):
    """
    Builds L{PymaildESMTP} for one listener.

    @ivar implicitTLS: whether the listener is TLS from the first byte (465).
    """

    protocol = PymaildESMTP
    tooManyConnections = b"421 4.7.0 Too many connections, try again later\r\n"

    noisy = False

    def __init__(self, hostname: str, tls, implicitTLS: bool = False, portal=None):
        self.hostname = hostname
        self.tls = tls
        self.implicitTLS = implicitTLS
        self.portal = portal

    def buildProtocol(self, addr):
        p = self.protocol(chal={}, contextFactory=self.tls)
        p.factory = self
        p.host = self.hostname
        p.portal = self.portal
        return p
