# -*- test-case-name: tests.integration.test_startup -*-
"""
The IMAP front-end on Twisted's C{IMAP4Server}: port 143 (STARTTLS) and 993 (implicit TLS).

Status: greeting with capabilities, STARTTLS, LOGIN and AUTHENTICATE PLAIN/LOGIN through the
portal, refused before TLS except from C{[auth] plaintext_networks}.  Mailboxes come with the
store and IMAP issues (see L{pymaild.imap.account}).

Security: reads commands from anyone who connects; no password is accepted over a connection
without TLS unless the client's address is in C{[auth] plaintext_networks}.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.internet.protocol import ServerFactory

from pymaild.envelope import inNetworks
from pymaild.errors import TemporaryFailure

log = Logger()


class PymaildIMAP4Server(imap4.IMAP4Server):
    """
    pymaild's IMAP4rev1 server protocol.
    """

    def connectionMade(self):
        self.peerHost = getattr(self.transport.getPeer(), "host", "")
        self.plaintextAllowed = inNetworks(self.peerHost, self.factory.plaintextNetworks)
        if self.factory.implicitTLS or self.plaintextAllowed:
            self._allowPasswords()
        if self.factory.implicitTLS:
            self.startedTLS = True
        super().connectionMade()

    def _allowPasswords(self):
        self.challengers = dict(self.challengers)
        self.challengers.setdefault(b"PLAIN", imap4.PLAINCredentials)
        self.challengers.setdefault(b"LOGIN", imap4.LOGINCredentials)

    def capabilities(self):
        cap = super().capabilities()
        if self.plaintextAllowed:
            cap.pop(b"LOGINDISABLED", None)
        return cap

    def sendServerGreeting(self):
        msg = b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] pymaild ready"
        self.sendPositiveResponse(message=msg)

    def do_LOGIN(self, tag, user, passwd):
        if b"LOGINDISABLED" in self.capabilities():
            # RFC 3501 6.2.3, RFC 5530 PRIVACYREQUIRED
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS (or port 993) before LOGIN")
            return
        name = user.decode("utf-8", "replace")
        d = maybeDeferred(self.authenticateLogin, user, passwd)
        d.addCallbacks(self._loginSucceeded, self._loginFailed, (tag, name), None, (tag, name))

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    def _loginSucceeded(self, result, tag, name):
        iface, avatar, logout = result
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        log.info("imap login {user} from {peer}: ok", event="login", protocol="imap", user=name, peer=self.peerHost, result="ok")
        self.sendPositiveResponse(tag, b"Logged in")

    def _loginFailed(self, failure, tag, name):
        if failure.check(UnauthorizedLogin):
            result, answer = "failed", b"[AUTHENTICATIONFAILED] Authentication failed"
        elif failure.check(TemporaryFailure):
            result, answer = "tempfail", b"[UNAVAILABLE] Temporary authentication failure, try again later"
        else:
            log.failure("imap login {user} from {peer}", failure, user=name, peer=self.peerHost)
            result, answer = "error", b"[SERVERBUG] Internal error, try again later"
        log.info("imap login {user} from {peer}: {result}", event="login", protocol="imap", user=name, peer=self.peerHost, result=result)
        self.sendNegativeResponse(tag, answer)

    def isBusy(self) -> bool:
        return self._pendingLiteral is not None

    def goodbye(self) -> None:
        self.sendUntaggedResponse(b"BYE Server shutting down")
        self.transport.loseConnection()


class IMAPFactory(ServerFactory):
    tooManyConnections = b"* BYE Too many connections, try again later\r\n"

    noisy = False

    def __init__(self, portal, tls, plaintextNetworks=(), implicitTLS: bool = False):
        self.portal = portal
        self.tls = tls
        self.plaintextNetworks = tuple(plaintextNetworks)
        self.implicitTLS = implicitTLS

    def buildProtocol(self, addr):
        p = PymaildIMAP4Server(contextFactory=self.tls)
        p.factory = self
        p.portal = self.portal
        return p
