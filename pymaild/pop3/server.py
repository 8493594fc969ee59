# -*- test-case-name: tests.integration.test_startup -*-
"""
The POP3 front-end on Twisted's C{POP3}: port 110 and 995 (implicit TLS).

Status: greeting, USER/PASS through the portal (refused without TLS except from
C{[auth] plaintext_networks}), then Twisted's transaction commands over the read-only inbox of
L{pymaild.pop3.mailbox}.  STLS, CAPA without joke tokens, SASL, and deletion at QUIT come with
the POP3 issue.

Security: reads commands from anyone who connects; no password is accepted over a connection
without TLS unless the client's address is in C{[auth] plaintext_networks}.  APOP is refused:
it needs the cleartext password on the server.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import pop3

from pymaild.envelope import inNetworks
from pymaild.errors import TemporaryFailure

log = Logger()


class PymaildPOP3(pop3.POP3):
    """
    pymaild's POP3 server protocol.
    """

    magic = b"pymaild ready"

    def connectionMade(self):
        self.peerHost = getattr(self.transport.getPeer(), "host", "")
        self.secure = self.factory.implicitTLS
        self.plaintextAllowed = inNetworks(self.peerHost, self.factory.plaintextNetworks)
        self.successResponse(self.magic)
        self.setTimeout(self.timeOut)

    def do_APOP(self, user, digest):
        self.failResponse(b"[AUTH] APOP is not supported")

    def do_USER(self, user):
        if not (self.secure or self.plaintextAllowed):
            self.failResponse(b"[AUTH] Plaintext authentication disallowed on non-secure connections")
            return
        super().do_USER(user)

    def do_PASS(self, password, *words):
        if self._userIs is None:
            self.failResponse(b"USER required before PASS")
            return
        user, self._userIs = self._userIs, None
        password = b" ".join((password,) + words)
        name = user.decode("utf-8", "replace")
        if self.factory.throttle.blocked(self.peerHost, name.lower()):
            self.failResponse(b"[SYS/TEMP] Too many failed logins, try again later")
            return
        d = maybeDeferred(self.factory.portal.login, UsernamePassword(user, password), None, pop3.IMailbox)
        d.addCallbacks(self._loginSucceeded, self._loginFailed, (name,), None, (name,))
        # Hold pipelined commands until the answer is out (Twisted's own mechanism).
        self._longOperation(d)

    def _loginSucceeded(self, result, name):
        _, self.mbox, self._onLogout = result
        self.factory.throttle.succeeded(self.peerHost, name.lower())
        log.info("pop3 login {user} from {peer}: ok", event="login", protocol="pop3", user=name, peer=self.peerHost, result="ok")
        self.successResponse(b"Logged in")

    def _loginFailed(self, failure, name):
        if failure.check(UnauthorizedLogin):
            result, answer = "failed", b"[AUTH] Authentication failed"
        elif failure.check(TemporaryFailure):
            result, answer = "tempfail", b"[SYS/TEMP] Temporary authentication failure, try again later"
        else:
            log.failure("pop3 login {user} from {peer}", failure, user=name, peer=self.peerHost)
            result, answer = "error", b"[SYS/TEMP] Internal error, try again later"
        log.info("pop3 login {user} from {peer}: {result}", event="login", protocol="pop3", user=name, peer=self.peerHost, result=result)
        delay = self.factory.throttle.failed(self.peerHost, name.lower()) if result == "failed" else 0
        d = Deferred()
        self.factory.clock.callLater(delay, d.callback, None)
        return d.addCallback(lambda _: self.failResponse(answer))

    def goodbye(self) -> None:
        self.failResponse(b"[SYS/TEMP] Server shutting down")
        self.transport.loseConnection()


class POP3Factory(ServerFactory):
    tooManyConnections = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    noisy = False

    def __init__(self, portal, plaintextNetworks=(), implicitTLS: bool = False, throttle=None, clock=None):
        from pymaild.throttle import LoginThrottle

        self.portal = portal
        self.plaintextNetworks = tuple(plaintextNetworks)
        self.implicitTLS = implicitTLS
        self.throttle = throttle if throttle is not None else LoginThrottle()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock

    def buildProtocol(self, addr):
        p = PymaildPOP3()
        p.factory = self
        p.portal = self.portal
        return p
