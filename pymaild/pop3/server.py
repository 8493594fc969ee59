# -*- test-case-name: tests.integration.test_pop3 -*-
"""
The POP3 front-end on Twisted's C{POP3}: port 110 (STLS) and 995 (implicit TLS).

RFC 1939 (USER, PASS, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL) over the INBOX of
L{pymaild.pop3.mailbox}, RFC 2449 CAPA (exactly what works in the session's state) with
RESP-CODES and PIPELINING, RFC 2595 STLS, RFC 5034 AUTH PLAIN and LOGIN (with an initial
response), RFC 3206 codes ([AUTH], [SYS/TEMP], [SYS/PERM], [IN-USE]).

Twisted's C{POP3} answers most of this wrongly (joke CAPA tokens, no STLS, exception names
sent to the client, QUIT not waiting for the mailbox, commands read while one is in flight
only partly held); this subclass keeps its greeting, timeout and line framing and does the
command handling itself.  Its line receiver is C{LineReceiver}, whose C{pauseProducing} holds
pipelined commands while a command waits for the store or the password check (in its buffer,
L{pymaild.flow.LazyPause}: the socket stops being read only when 64 KiB of them wait); answers
go out at once (L{pymaild.flow.LazyPause.answer}) unless more commands are pipelined behind them.

Security: reads commands from anyone who connects; no password is accepted (USER/PASS, AUTH)
over a connection without TLS unless the client's address is in C{[auth] plaintext_networks};
plaintext pipelined after STLS is discarded; failed logins are slowed down and limited per
address and user (L{pymaild.throttle}); APOP is refused (it needs the cleartext password on the
server); one session per mailbox (C{[IN-USE]}).  L{Logins} decides all of that for every POP3
session of the server, also those its worker processes serve (L{pymaild.pop3.remote}).
"""

from __future__ import annotations

import base64
import binascii
import re

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import imap4, pop3
from twisted.protocols import basic

from pymaild.envelope import inNetworks
from pymaild.errors import TemporaryFailure
from pymaild.throttle import LoginBlocked
from pymaild.pipeline.runner import RefusedByPlugin, checkedLogin
from pymaild.pipeline.stages import Session
from pymaild.flow import Backpressure, Closing, LazyPause, sendNow
from pymaild.sasl import MECHANISMS
from pymaild.pop3.mailbox import Gone

log = Logger()

_NUMBER = re.compile(rb"[0-9]{1,10}")

_MECHANISMS = MECHANISMS

#: the answer to a refused login, by L{Refused.result}
_REFUSALS = {
    "blocked": b"[SYS/TEMP] Too many failed logins, try again later",
    "failed": b"[AUTH] Authentication failed",
    "tempfail": b"[SYS/TEMP] Temporary authentication failure, try again later",
    "in-use": b"[IN-USE] The mailbox is in use by another POP3 session",
    "error": b"[SYS/TEMP] Internal error, try again later",
}


class Refused(Exception):
    """
    A login that did not get the mailbox.

    @ivar result: C{"blocked"} (too many failures lately), C{"failed"} (wrong password, or a
        plugin said no), C{"tempfail"} (the directory is unreachable, or a plugin said later),
        C{"in-use"} (another POP3 session holds the mailbox) or C{"error"}.
    @ivar delay: seconds to wait before answering (a growing delay after failures).
    """

    def __init__(self, result: str, delay: float = 0.0):
        super().__init__(result)
        self.result, self.delay = result, delay


class Logins:
    """
    The POP3 logins of a server: the failed-login throttle, the password check through the
    portal, the plugins' login hooks and one session per mailbox.  One per server, shared by
    its POP3 listeners (110 and 995) and, through L{pymaild.pop3.remote}, by the sessions its
    worker processes serve, so that the limits hold for all of them.

    @ivar inUse: the keys of the mailboxes with a POP3 session.
    """

    def __init__(self, portal, throttle=None, pipeline=None):
        from pymaild.throttle import LoginThrottle

        self.portal = portal
        self.throttle = throttle if throttle is not None else LoginThrottle()
        self.pipeline = pipeline
        self.inUse: set = set()

    def login(self, session: Session, name: str, credentials):
        """
        Check C{credentials} (C{IUsernamePassword}) of C{name} for the client of C{session}.

        @return: a Deferred of C{(mailbox, logout, key)}, the mailbox held for this session
            until L{release}C{(key)}; or failing with L{Refused}.
        """
        host, lower = session.peer, name.lower()
        if self.throttle.blocked(host, lower):
            return fail(Refused("blocked"))
        d = self.throttle.checking(host, lower, lambda: checkedLogin(
            self.pipeline, session, name, lambda: self.portal.login(credentials, None, pop3.IMailbox)))
        d.addCallbacks(self._granted, self._refused, (host, lower), None, (session, name))
        return d

    def _granted(self, result, host, lower):
        _, mbox, logout = result
        key = getattr(mbox, "key", lower)
        if key in self.inUse:
            logout()
            raise Refused("in-use")
        self.inUse.add(key)
        self.throttle.succeeded(host, lower)
        return mbox, logout, key

    def _refused(self, failure, session, name):
        if failure.check(LoginBlocked):  # (it waited for checks under way, and they failed)
            raise Refused("blocked")
        if failure.check(UnauthorizedLogin):
            delay = self.throttle.failed(session.peer, name.lower())
            if self.pipeline is not None and not failure.check(RefusedByPlugin):
                self.pipeline.notify("login", session, name, False)
            raise Refused("failed", delay)
        if failure.check(TemporaryFailure):
            raise Refused("tempfail")
        log.failure("pop3 login {user} from {peer}", failure, user=name, peer=session.peer)
        raise Refused("error")

    def release(self, key) -> None:
        """The session holding mailbox C{key} is over."""
        self.inUse.discard(key)


class PymaildPOP3(Closing, LazyPause, basic.LineReceiver, pop3.POP3):
    """
    pymaild's POP3 server protocol.

    @ivar state: C{"AUTHORIZATION"}, C{"TRANSACTION"}, C{"UPDATE"} (QUIT is committing) or
        C{"CLOSED"}.
    """

    magic = b"pymaild ready"
    delimiter = b"\n"  # RFC 1939 wants CRLF; a bare LF is taken too (the CR is stripped)
    #: RFC 2449 4 allows 255 octets a command; SASL responses (RFC 5034 4) may be longer
    MAX_LENGTH = 8192
    state = "AUTHORIZATION"

    _user = None  # name given by USER
    _sasl = None  # (mechanism challenge) while AUTH is exchanging
    _lost = False
    _lockKey = None
    _committing = None
    _flow = None
    _transfer = None
    _reading = False  # a store thread is reading the transfer's next piece
    _held = False

    # --- connection ---------------------------------------------------------------------

    _pluginSession = None

    def _session(self) -> Session:
        """The plugins' view of this connection (login hooks)."""
        if self._pluginSession is None:
            self._pluginSession = Session.of(self.transport, "pop3", self.peerHost)
        self._pluginSession.tls = bool(self.secure)
        return self._pluginSession

    def connectionMade(self):
        self.peerHost = getattr(self.transport.getPeer(), "host", "")
        self.secure = self.factory.implicitTLS
        self.plaintextAllowed = inNetworks(self.peerHost, self.factory.plaintextNetworks)
        self.callLater = self.factory.clock.callLater  # TimeoutMixin's timer, on the factory's clock
        # Registered for the whole session, so that a client that does not read its answers
        # (pipelining commands, or a RETR) stops being read (L{_answered}).  It is unregistered
        # before the connection is closed: TLS waits for its producer to go before closing.
        self._flow = Backpressure(self.transport)
        self._ok(self.magic)
        self.setTimeout(self.factory.idleTimeout)

    def connectionLost(self, reason):
        self._lost = True
        self._closed()
        self.state = "CLOSED"
        self.setTimeout(None)
        transfer, self._transfer = self._transfer, None
        if transfer is not None and not self._reading:
            transfer.close()  # (a store thread reading it closes it when it is back)
        if self._flow is not None:
            self._flow.stopProducing()
        if self._committing is None:
            self._unlock()
        if self._onLogout is not None:
            self._onLogout()
            self._onLogout = None

    def timeoutConnection(self):
        if self._transfer is not None:
            # a client that stopped reading in the middle of a message: no -ERR can go
            # into the message text, and what is buffered for it need not be sent
            self._close(abort=True)
            return
        self._err(b"Disconnected for inactivity")
        self._close()

    def lineLengthExceeded(self, line):
        self._err(b"Line too long")
        self._close()

    def stopProducing(self):
        basic.LineReceiver.stopProducing(self)

    def isBusy(self) -> bool:
        return self._committing is not None

    def goodbye(self) -> None:
        self._err(b"[SYS/TEMP] Server shutting down")
        self._close()

    # --- answers --------------------------------------------------------------------------

    def _ok(self, text: bytes = b"") -> None:
        self.answer(b"+OK " + text + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text: bytes) -> None:
        self.answer(b"-ERR " + text + b"\r\n")

    def _multi(self, first: bytes, lines) -> None:
        """A multi-line answer; C{lines} are CRLF-terminated (and need no dot-stuffing)."""
        self.answer(b"+OK " + first + b"\r\n" + b"".join(lines) + b".\r\n")

    def _hold(self) -> None:
        """Read no further command until L{_release} (PIPELINING with asynchronous answers)."""
        self._held = True
        self.pauseProducing()

    def _release(self, _=None) -> None:
        if self._held and not self._lost and not self._closing:
            self._held = False
            self.resumeProducing()

    def _answered(self, _=None) -> None:
        """
        An answer is complete: read the next command, unless the client has not read what it
        was sent (the transport paused L{Backpressure}); then once it has.
        """
        if self._lost or self._closing:
            return
        if self._flow.paused:
            if not self._held:
                self._hold()
            self._flow.wait().addCallback(self._release)
        else:
            self._release()

    # --- dispatch -----------------------------------------------------------------------

    def lineReceived(self, line):
        self.resetTimeout()
        if line[-1:] == b"\r":
            line = line[:-1]
        if self.state in ("UPDATE", "CLOSED") or self._closing:
            return  # after QUIT nothing more is read
        try:
            self._dispatch(line)
        except Exception:
            log.failure("pop3 command from {peer}", peer=self.peerHost)
            self._err(b"[SYS/TEMP] Internal error")
            self._close()
            return
        if not self._held:
            self._answered()  # a flood of commands whose answers are not read stops here

    def _dispatch(self, line):
        if self._sasl is not None:
            self._saslStep(line)
            return
        command, _, rest = line.partition(b" ")
        command = command.upper()
        name = _HANDLERS.get((self.state, command))
        if name is not None:
            getattr(self, name)(rest)
        elif self.state == "AUTHORIZATION" and command in (b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP",
                                                           b"RSET", b"TOP", b"UIDL", b"LAST"):
            self._err(b"Not logged in")
        elif self.state == "TRANSACTION" and command in (b"USER", b"PASS", b"APOP", b"AUTH", b"STLS"):
            self._err(b"Already logged in")
        elif command:
            self._err(b"Unknown command")
        else:
            self._err(b"Empty command")

    # --- AUTHORIZATION ------------------------------------------------------------------

    def _capabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING"]
        if self.state == "AUTHORIZATION":
            if self._passwordsAllowed():
                caps += [b"USER", b"SASL " + b" ".join(_MECHANISMS)]
            caps.append(b"AUTH-RESP-CODE")
            if not self.secure and self.factory.tls is not None:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION pymaild")
        return caps

    def AUTHORIZATION_CAPA(self, rest):
        self._multi(b"Capability list follows", [c + b"\r\n" for c in self._capabilities()])

    TRANSACTION_CAPA = AUTHORIZATION_CAPA

    def _passwordsAllowed(self) -> bool:
        return self.secure or self.plaintextAllowed

    _CLEARTEXT = b"[AUTH] Plaintext authentication disallowed on non-secure connections: use STLS (or port 995)"

    def AUTHORIZATION_STLS(self, rest):
        if self.secure:
            self._err(b"Already using TLS")
            return
        if self.factory.tls is None:
            self._err(b"TLS is not available")
            return
        self._ok(b"Begin TLS negotiation")
        self.transport.startTLS(self.factory.tls)
        self.secure = True
        # RFC 2595 4: what the client pipelined in plaintext after STLS is not a command in
        # the TLS session; the session starts over (forget USER).
        self._buffer = b""
        self._user = None

    def AUTHORIZATION_APOP(self, rest):
        self._err(b"[AUTH] APOP is not supported")

    def AUTHORIZATION_USER(self, rest):
        if not self._passwordsAllowed():
            self._err(self._CLEARTEXT)
            return
        name = rest.strip()
        if not name or len(name) > 320:
            self._err(b"Invalid user name")
            return
        self._user = name
        self._ok(b"Send your password")

    def AUTHORIZATION_PASS(self, rest):
        if not self._passwordsAllowed():
            self._err(self._CLEARTEXT)
            return
        if self._user is None:
            self._err(b"USER first")
            return
        user, self._user = self._user, None
        name = user.decode("utf-8", "replace")
        self._login(name, UsernamePassword(user, rest))

    def AUTHORIZATION_AUTH(self, rest):
        words = rest.split()
        if not words:  # the mechanisms list, as Outlook and others ask for it
            self._multi(b"Methods supported", [m + b"\r\n" for m in _MECHANISMS] if self._passwordsAllowed() else [])
            return
        if not self._passwordsAllowed():
            self._err(self._CLEARTEXT)
            return
        mechanism = words[0].upper()
        if mechanism not in _MECHANISMS or len(words) > 2:
            self._err(b"Unsupported authentication mechanism")
            return
        challenge = _MECHANISMS[mechanism]()
        self._sasl = challenge
        if len(words) == 2:
            if mechanism == b"LOGIN":
                # RFC 5034 4 lets the client send LOGIN's first answer (the user name) here
                challenge.getChallenge()
            self._saslStep(words[1])
        else:
            self._challenge(challenge)

    def _challenge(self, challenge):
        self.transport.write(b"+ " + base64.b64encode(challenge.getChallenge()) + b"\r\n")

    def _saslStep(self, line):
        challenge = self._sasl
        line = line.strip()
        if line == b"*":
            self._sasl = None
            self._err(b"Authentication cancelled")
            return
        try:
            data = b"" if line == b"=" else base64.b64decode(line, validate=True)
            challenge.setResponse(data)
        except imap4.IllegalClientResponse as e:
            self._sasl = None
            self._err(b"[AUTH] " + str(e).encode("ascii", "replace"))
            return
        except (binascii.Error, ValueError, IndexError):
            self._sasl = None
            self._err(b"[AUTH] Malformed authentication response")
            return
        if challenge.moreChallenges():
            self._challenge(challenge)
            return
        self._sasl = None
        name = challenge.username if isinstance(challenge.username, bytes) else b""
        self._login(name.decode("utf-8", "replace"), challenge)

    def _login(self, name: str, credentials) -> None:
        self._hold()
        d = self.factory.logins.login(self._session(), name, credentials)
        d.addCallbacks(self._loginSucceeded, self._loginFailed, (name,), None, (name,))
        d.addErrback(self._bug, "login")

    def _loginSucceeded(self, result, name):
        mbox, logout, key = result
        if self._lost:  # the client left while the password was checked
            self.factory.logins.release(key)
            logout()
            return
        self._lockKey = key
        self._onLogout = logout
        d = mbox.load()
        d.addCallbacks(self._opened, self._openFailed, (mbox, name), None, (name,))
        d.addErrback(self._bug, "open")

    def _opened(self, count, mbox, name):
        if self._lost:
            return
        self.mbox = mbox
        self.state = "TRANSACTION"
        log.info("pop3 login {user} from {peer}: ok", event="login", protocol="pop3", user=name, peer=self.peerHost,
                 result="ok", messages=count)
        self._ok(b"Logged in, %d messages" % count)
        self._answered()

    def _openFailed(self, failure, name):
        log.failure("pop3 {user}: opening the INBOX", failure, user=name)
        self._unlock()
        if self._lost:
            return
        logout, self._onLogout = self._onLogout, None
        if logout is not None:
            logout()
        self._err(b"[SYS/TEMP] Cannot open the mailbox, try again later")
        self._answered()

    def _loginFailed(self, failure, name):
        if failure.check(Refused):
            result, delay = failure.value.result, failure.value.delay
        else:
            log.failure("pop3 login {user} from {peer}", failure, user=name, peer=self.peerHost)
            result, delay = "error", 0.0
        log.info("pop3 login {user} from {peer}: {result}", event="login", protocol="pop3", user=name,
                 peer=self.peerHost, result=result)
        answer = _REFUSALS.get(result, _REFUSALS["error"])
        if self._lost:
            return
        if not delay:
            self._err(answer)
            self._answered()
            return
        # the answer waits, and so does the client's next command: guessing gets slow
        d = Deferred()
        self.factory.clock.callLater(delay, d.callback, None)
        d.addCallback(lambda _: None if self._lost else self._err(answer))
        d.addCallback(self._answered)

    def _bug(self, failure, what):
        log.failure("pop3 {what}", failure, what=what)
        if not self._lost:
            self._err(b"[SYS/TEMP] Internal error")
            self._close()

    def _unlock(self) -> None:
        key, self._lockKey = self._lockKey, None
        if key is not None:
            self.factory.logins.release(key)

    def AUTHORIZATION_QUIT(self, rest):
        self._ok(b"Bye")
        self.state = "CLOSED"
        self._close()

    # --- TRANSACTION --------------------------------------------------------------------

    def _message(self, word: bytes, allowDeleted: bool = False) -> int | None:
        """The 0-based index of message number C{word}, or None after an -ERR."""
        if not _NUMBER.fullmatch(word):
            self._err(b"Invalid message number")
            return None
        number = int(word)
        if not 1 <= number <= len(self.mbox.entries):
            self._err(b"No such message")
            return None
        if self.mbox.entries[number - 1].deleted and not allowDeleted:
            self._err(b"Message is deleted")
            return None
        return number - 1

    def TRANSACTION_STAT(self, rest):
        live = [e.size for e in self.mbox.entries if not e.deleted]
        self._ok(b"%d %d" % (len(live), sum(live)))

    def TRANSACTION_LIST(self, rest):
        if rest.strip():
            i = self._message(rest.strip())
            if i is not None:
                self._ok(b"%d %d" % (i + 1, self.mbox.entries[i].size))
            return
        live = [e for e in self.mbox.entries if not e.deleted]
        self._multi(b"%d messages (%d octets)" % (len(live), sum(e.size for e in live)), [e.listLine for e in live])

    def TRANSACTION_UIDL(self, rest):
        if rest.strip():
            i = self._message(rest.strip())
            if i is not None:
                self._ok(b"%d %s" % (i + 1, self.mbox.entries[i].uidl))
            return
        self._multi(b"Unique-ID listing follows", [e.uidlLine for e in self.mbox.entries if not e.deleted])

    def TRANSACTION_DELE(self, rest):
        i = self._message(rest.strip())
        if i is not None:
            self.mbox.entries[i].deleted = True
            self._ok(b"Marked to be deleted")

    def TRANSACTION_RSET(self, rest):
        self.mbox.undeleteMessages()
        self._ok(b"%d messages" % len(self.mbox.entries))

    def TRANSACTION_NOOP(self, rest):
        self._ok()

    def TRANSACTION_RETR(self, rest):
        i = self._message(rest.strip())
        if i is None:
            return
        first = b"%d octets" % self.mbox.entries[i].size
        try:
            transfer = self.mbox.transferNow(i)
        except OSError:
            transfer = None  # the store's threads try again and report
        if transfer is None:
            self._send(i, None, first)
        else:
            self._sending(transfer, first)

    def TRANSACTION_TOP(self, rest):
        words = rest.split()
        if len(words) != 2 or not _NUMBER.fullmatch(words[1]):
            self._err(b"Usage: TOP message lines")
            return
        i = self._message(words[0])
        if i is not None:
            self._send(i, int(words[1]), b"Top of message follows")

    def _send(self, index: int, lines: int | None, first: bytes) -> None:
        self._hold()
        d = self.mbox.transfer(index, lines)
        d.addCallbacks(self._sending, self._notSent, (first,))
        d.addErrback(self._bug, "RETR")

    def _notSent(self, failure):
        if self._lost:
            return
        if failure.check(Gone):
            self._err(b"Message was deleted by another session")
        elif failure.check(OSError):
            log.failure("pop3 reading a message", failure)
            self._err(b"[SYS/TEMP] Cannot read the message")
        else:
            return failure
        self._answered()

    def _sending(self, transfer, first):
        if self._lost:
            transfer.close()
            return
        pipelined = bool(self._buffer)  # (then the answer waits in the transport: see _pump)
        self.answer(b"+OK " + first + b"\r\n" + transfer.first)
        if transfer.more is None and not pipelined:  # (all of it sent, or buffered to go)
            transfer.close()
            self._answered()
            return
        self._transfer = transfer
        self._pump()

    def _pump(self, _=None):
        """
        Write the rest of the transfer, a piece at a time read in the store's threads, while the
        client reads: a full socket buffer pauses it (L{Backpressure}), its draining resumes it.
        """
        transfer = self._transfer
        if transfer is None or self._lost or self._closing:
            return
        if transfer.more is None:
            self._transfer = None
            transfer.close()
            sendNow(self.transport)  # the client waits for this answer before its next command
            self._answered()
            return
        if self._flow.paused:
            if not self._held:
                self._hold()  # no further command until this answer is out
            self._flow.wait().addCallback(self._pump)
            return
        self._reading = True
        d = self.mbox.run(next, transfer.more, None)
        d.addCallbacks(self._piece, self._pieceFailed, (transfer,), None, (transfer,))
        d.addErrback(self._bug, "RETR")

    def _piece(self, chunk, transfer):
        self._reading = False
        if self._transfer is not transfer or self._lost:
            transfer.close()
            return
        if chunk is None:
            transfer.more = None
        else:
            self.transport.write(chunk)
            self.resetTimeout()
        self._pump()

    def _pieceFailed(self, failure, transfer):
        self._reading = False
        transfer.close()
        if self._transfer is transfer:
            self._transfer = None
            log.failure("pop3 reading a message", failure)
            if not self._lost:
                self._close(abort=True)  # the +OK is out: no honest end but cutting the line

    def TRANSACTION_QUIT(self, rest):
        self.state = "UPDATE"
        self.setTimeout(None)
        self._hold()
        self._committing = d = self.mbox.commit()
        d.addCallbacks(self._committed, self._commitFailed)
        d.addBoth(self._afterCommit)

    def _committed(self, removed):
        if not self._lost:
            self._ok(b"Logging out, %d messages deleted" % removed)

    def _commitFailed(self, failure):
        log.failure("pop3 QUIT: deleting messages", failure)
        if not self._lost:
            self._err(b"[SYS/TEMP] Some deleted messages were not removed")

    def _afterCommit(self, _):
        self._committing = None
        self._unlock()
        self.state = "CLOSED"
        if not self._lost:
            self._close()


#: (state, command) -> the name of the method answering it (AUTHORIZATION_USER answers USER
#: before login), looked up on the instance so that subclasses can override it
_HANDLERS = {
    (state, name.partition("_")[2].encode("ascii")): name
    for name in dir(PymaildPOP3)
    for state in ("AUTHORIZATION", "TRANSACTION")
    if name.startswith(state + "_")
}


class POP3Factory(ServerFactory):
    tooManyConnections = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    noisy = False

    def __init__(self, portal=None, tls=None, plaintextNetworks=(), implicitTLS: bool = False, throttle=None,
                 clock=None, idleTimeout: float = 600.0, logins: Logins | None = None, pipeline=None):
        #: who decides logins (L{Logins}, or a worker process's L{pymaild.pop3.remote.RemoteLogins}),
        #: shared by the POP3 listeners (110 and 995)
        self.logins = logins if logins is not None else Logins(portal, throttle, pipeline)
        self.tls = tls
        self.plaintextNetworks = tuple(plaintextNetworks)
        self.implicitTLS = implicitTLS
        self.idleTimeout = idleTimeout
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock

    def buildProtocol(self, addr):
        p = PymaildPOP3()
        p.factory = self
        return p
