# -*- test-case-name: tests.integration.test_startup -*-
"""
The IMAP front-end on Twisted's C{IMAP4Server}: port 143 (STARTTLS) and 993 (implicit TLS).

Status: greeting with capabilities, STARTTLS (plaintext pipelined after it is discarded),
LOGIN and AUTHENTICATE PLAIN/LOGIN through the portal, refused before TLS except from
C{[auth] plaintext_networks}; folders and messages from the store (L{pymaild.imap.mailbox}):
LIST/LSUB/STATUS/CREATE/DELETE/RENAME/(UN)SUBSCRIBE, SELECT/EXAMINE with every RFC 3501
response, FETCH from the index's cached summaries and straight from the files (sections,
partial fetches, \\Seen on non-PEEK), STORE, COPY, APPEND, EXPUNGE, CLOSE and their UID forms.
The IMAP issue adds the extensions (IDLE, UIDPLUS, MOVE, CONDSTORE ...), SEARCH over the index
and abuse limits.

Security: reads commands from anyone who connects; no password is accepted over a connection
without TLS unless the client's address is in C{[auth] plaintext_networks}.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from pymaild.envelope import inNetworks
from pymaild.flow import Backpressure as _Backpressure, LazyPause, _plainConnection, sendNow, writeNow, writeSequenceNow
from pymaild.sasl import MECHANISMS, AuthorizationRefused
from pymaild.imap import fetch
from pymaild.imap import sort as sort_
from pymaild.errors import TemporaryFailure
from pymaild.throttle import LoginBlocked
from pymaild.pipeline.runner import RefusedByPlugin, checkedLogin
from pymaild.pipeline.stages import Session

log = Logger()

_SEQSET = re.compile(rb"(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*")


def parseSequenceSet(token: bytes) -> imap4.MessageSet:
    """
    An RFC 3501 sequence-set (C{1:3,5,7:*}) as Twisted's C{MessageSet}, C{*} as None, in
    O(n log n): Twisted's C{parseIdList} adds one range at a time and sorts every range so far
    after each, so 10,000 numbers in one 54 KB line held the reactor for 20 s.  Numbers are
    nz-number (1 to 4294967295); C{*:*} is the RFC's, and means C{*}.  Raises C{ValueError}.
    """
    if token.isdigit():  # one number, the commonest set (a client opening or flagging a message)
        n = int(token)
        if not 1 <= n <= 0xFFFFFFFF:
            raise ValueError(token)
        return _OrderedSet([(n, n)])
    if not _SEQSET.fullmatch(token):
        raise ValueError(token)
    ranges = []
    for item in token.split(b","):
        low, colon, high = item.partition(b":")
        low = None if low == b"*" else int(low)
        high = low if not colon else None if high == b"*" else int(high)
        for n in (low, high):
            if n is not None and not 1 <= n <= 0xFFFFFFFF:
                raise ValueError(token)
        if low is None or (high is not None and high < low):
            low, high = high, low  # None (*) sorts last, as Twisted's MessageSet keeps it
        ranges.append((low, high))
    if len(ranges) == 1 and ranges[0][1] is not None:
        return _OrderedSet(ranges)  # (one range of numbers: nothing to sort or merge)
    return imap4.MessageSet(ranges)  # one sort and merge (MessageSet.clean)


def _nextNumber(n: int) -> int:
    return n + 1


class _OrderedSet(imap4.MessageSet):
    """
    A C{MessageSet} of ranges already in the order and form C{MessageSet.clean} gives them
    (one range C{low <= high}, no C{*}): made without its sort and merge, which cost a small
    FETCH more than its answer.  It behaves as Twisted's in every other way.
    """

    def __init__(self, ranges):
        self._last = self._empty
        self.ranges = ranges
        self.getnext = _nextNumber


class PymaildIMAP4Server(LazyPause, imap4.IMAP4Server):
    """
    pymaild's IMAP4rev1 server protocol.
    """

    def connectionMade(self):
        self._heldFlags = []
        self.peerHost = getattr(self.transport.getPeer(), "host", "")
        self.plaintextAllowed = inNetworks(self.peerHost, self.factory.plaintextNetworks)
        if self.factory.implicitTLS or self.plaintextAllowed:
            self._allowPasswords()
        if self.factory.implicitTLS:
            self.startedTLS = True
        super().connectionMade()

    def _allowPasswords(self):
        self.challengers = dict(self.challengers)
        for name, mechanism in MECHANISMS.items():
            self.challengers.setdefault(name, mechanism)

    def sendServerGreeting(self):
        msg = b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] pymaild ready"
        self.sendPositiveResponse(message=msg)

    def do_LOGIN(self, tag, user, passwd):
        if b"LOGINDISABLED" in self.capabilities():
            # RFC 3501 6.2.3, RFC 5530 PRIVACYREQUIRED
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS (or port 993) before LOGIN")
            return
        self._login(tag, user.decode("utf-8", "replace"), lambda: self.authenticateLogin(user, passwd))

    def _login(self, tag, name, attempt):
        """
        LOGIN and AUTHENTICATE alike: the throttle, the portal, the per-user session limit and
        the login event.
        """
        throttle = self.factory.throttle
        if throttle.blocked(self.peerHost, name.lower()):
            log.info("imap login {user} from {peer}: blocked", event="login", protocol="imap", user=name,
                     peer=self.peerHost, result="blocked")
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins, try again later")
            return
        self._hold(tag)  # pipelined commands wait for the answer
        d = throttle.checking(self.peerHost, name.lower(),
                              lambda: checkedLogin(self.factory.pipeline, self._session(), name, attempt))
        d.addCallbacks(self._loginSucceeded, self._loginFailed, (tag, name), None, (tag, name))

    _pluginSession = None

    def _session(self) -> Session:
        """The plugins' view of this connection (login hooks)."""
        if self._pluginSession is None:
            self._pluginSession = Session.of(self.transport, "imap", self.peerHost)
        self._pluginSession.tls = bool(self.startedTLS)
        return self._pluginSession

    # --- AUTHENTICATE (RFC 3501 6.2.2) with SASL-IR (RFC 4959), on the same path as LOGIN ------

    def do_AUTHENTICATE(self, tag, mechanism, initial=b""):
        mechanism = mechanism.upper().strip()
        if mechanism not in self.challengers:
            if mechanism in (b"PLAIN", b"LOGIN") and b"LOGINDISABLED" in self.capabilities():
                self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS (or port 993) first")
            else:
                self.sendNegativeResponse(tag, b"AUTHENTICATE method unsupported")
            return
        challenge = self.challengers[mechanism]()
        if initial and initial.strip():
            if mechanism == b"LOGIN":  # server-first: it has no initial response (RFC 4959 3)
                self.sendBadResponse(tag, b"AUTHENTICATE LOGIN takes no initial response")
                return
            # SASL-IR: the first response on the command line ("=" is an empty one)
            self._authStep(initial, challenge, tag)
        else:
            self._challenge(challenge, tag)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)

    def _challenge(self, challenge, tag):
        self.parseState = "pending"
        self._pendingLiteral = defer.Deferred()
        self._pendingLiteral.addCallback(self._authStep, challenge, tag)
        self.sendLine(b"+ " + base64.b64encode(challenge.getChallenge()))

    def _authStep(self, line, challenge, tag):
        line = line.strip()
        if line == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")  # RFC 3501 6.2.2
            return
        try:
            data = b"" if line == b"=" else base64.b64decode(line, validate=True)
            challenge.setResponse(data)
        except AuthorizationRefused as e:
            self.sendNegativeResponse(tag, b"[AUTHORIZATIONFAILED] " + str(e).encode("ascii", "replace"))
            return
        except (binascii.Error, ValueError, IndexError, imap4.IllegalClientResponse):
            self.sendBadResponse(tag, b"Malformed AUTHENTICATE response")
            return
        if challenge.moreChallenges():
            self._challenge(challenge, tag)
            return
        name = challenge.username.decode("utf-8", "replace") if isinstance(challenge.username, bytes) \
            else str(challenge.username or "")
        self._login(tag, name, lambda: self.factory.portal.login(challenge, None, imap4.IAccount))

    def authenticateLogin(self, user, passwd):
        from twisted.cred.credentials import UsernamePassword

        return self.factory.portal.login(UsernamePassword(user, passwd), None, imap4.IAccount)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    _lost = False  # set by connectionLost: answers arriving later must not attach anything

    def _loginSucceeded(self, result, tag, name):
        iface, avatar, logout = result
        if self._lost:  # the client left while the password was checked: count nothing
            logout()
            return
        user = getattr(avatar, "user", None)
        key = getattr(user, "root", name)
        sessions = self.factory.sessions
        if sessions.get(key, 0) >= self.factory.maxPerUser:
            logout()
            log.info("imap login {user} from {peer}: too many sessions", event="login", protocol="imap",
                     user=name, peer=self.peerHost, result="limit")
            self.sendNegativeResponse(tag, b"[LIMIT] Too many sessions for this user")
            return
        sessions[key] = sessions.get(key, 0) + 1
        self._sessionKey = key
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.factory.throttle.succeeded(self.peerHost, name.lower())
        log.info("imap login {user} from {peer}: ok", event="login", protocol="imap", user=name, peer=self.peerHost, result="ok")
        self.sendPositiveResponse(tag, b"Logged in")

    def _loginFailed(self, failure, tag, name):
        if failure.check(LoginBlocked):  # (it waited for checks under way, and they failed)
            result, answer = "blocked", b"[UNAVAILABLE] Too many failed logins, try again later"
        elif failure.check(UnauthorizedLogin):
            result, answer = "failed", b"[AUTHENTICATIONFAILED] Authentication failed"
        elif failure.check(TemporaryFailure):
            result, answer = "tempfail", b"[UNAVAILABLE] Temporary authentication failure, try again later"
        else:
            log.failure("imap login {user} from {peer}", failure, user=name, peer=self.peerHost)
            result, answer = "error", b"[SERVERBUG] Internal error, try again later"
        log.info("imap login {user} from {peer}: {result}", event="login", protocol="imap", user=name, peer=self.peerHost, result=result)
        delay = self.factory.throttle.failed(self.peerHost, name.lower()) if result == "failed" else 0
        if result == "failed" and self.factory.pipeline is not None and not failure.check(RefusedByPlugin):
            self.factory.pipeline.notify("login", self._session(), name, False)
        # the answer waits (and so does the client's next command): guessing gets slow
        self.blocked = self.blocked if self.blocked is not None else []
        self.factory.clock.callLater(delay, self._answerLater, tag, answer)

    def _answerLater(self, tag, answer):
        if self.transport is None or self.state == "logout":
            return
        self.sendNegativeResponse(tag, answer)
        self._unblock()

    # --- limits ---------------------------------------------------------------------------------

    def lineLengthExceeded(self, line):
        self.sendUntaggedResponse(b"BYE Line too long")
        self.transport.loseConnection()

    def arg_seqset(self, line):
        """
        RFC 3501 sequence-set: numbers are nz-number (1 to 4294967295); Twisted accepts 0 and
        anything larger.  Parsed by L{parseSequenceSet}, not Twisted's quadratic C{parseIdList}.
        """
        token, _, rest = line.partition(b" ")
        try:
            return parseSequenceSet(token), rest
        except ValueError:
            raise imap4.IllegalClientResponse(f"Invalid sequence set: {token[:40]!r}") from None

    # --- LITERAL+ (RFC 7888): {n+} literals come without waiting for "+" -----------------------

    _nonSync = False

    def _literalLine(self, line):
        stripped = line.rstrip()
        if stripped.endswith(b"+}") and b"{" in stripped:
            self._nonSync = True
            return stripped[:-2] + b"}"
        return line

    def arg_astring(self, line, final=False):
        return super().arg_astring(self._literalLine(line), final)

    def arg_literal(self, line):
        return super().arg_literal(self._literalLine(line))

    def sendContinuationRequest(self, msg=b"Ready for additional command text"):
        if self._nonSync:
            self._nonSync = False  # the client sends the literal without asking
            return
        super().sendContinuationRequest(msg)

    def _refuseLiteral(self, message: str):
        if self._nonSync:
            # the client is already sending the bytes: the only safe answer is to hang up
            self._nonSync = False
            self.sendUntaggedResponse(b"BYE " + message.encode())
            self.transport.loseConnection()
        raise imap4.IllegalClientResponse(message)

    def _stringLiteral(self, size):
        if size > self._literalStringLimit:
            self._refuseLiteral(f"[TOOBIG] a {size}-octet string is over the limit of {self._literalStringLimit}")
        return super()._stringLiteral(size)

    def _fileLiteral(self, size):
        limit = self.factory.appendLimit
        if size > limit:
            # refused before a byte of it is read (RFC 7889 TOOBIG)
            self._refuseLiteral(f"[TOOBIG] {size} octets is over the limit of {limit}")
        return super()._fileLiteral(size)

    # --- pipelining: a command answered later holds the ones after it -----------------------------
    #
    # Twisted runs the next pipelined command as soon as the previous handler returns; with the
    # store answering through Deferreds that would interleave two FETCHes (Twisted's own FETCH
    # state then breaks).  Commands that answer asynchronously hold the input from the moment
    # their arguments are parsed (literals included) until their tagged response is sent.

    _ASYNC = frozenset({
        b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE", b"UID", b"SELECT", b"EXAMINE",
        b"STATUS", b"LIST", b"LSUB", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE",
        b"APPEND", b"LOGIN", b"CLOSE", b"GETQUOTA", b"GETQUOTAROOT", b"SORT", b"THREAD",
    })
    _heldTag = None
    _holdToken = 0
    #: inside a held command's handler (L{_makeEntry}), which ends the hold if it answered
    _holding = False

    #: (class, state, command) -> its entry as L{lookupCommand} gives it, made once, not per
    #: line (only commands that exist: a client's made-up names are not kept)
    _ENTRIES: dict = {}

    def lookupCommand(self, cmd):
        key = (type(self), self.state, cmd.upper())
        entry = self._ENTRIES.get(key)
        if entry is None:
            entry = self._makeEntry(cmd)
            if entry is not None:
                self._ENTRIES[key] = entry
        return entry

    #: argument parsers that answer at once and never wait for a literal: a command made only
    #: of these is dispatched without Twisted's Deferred per argument (L{dispatchCommand})
    _PLAIN_PARSERS = frozenset({"arg_seqset", "arg_fetchspec", "arg_storemod", "arg_atom", "arg_flaglist", "arg_line"})

    def dispatchCommand(self, tag, cmd, rest, uid=None):
        """
        Twisted's, except for commands whose arguments are all plain (L{_PLAIN_PARSERS}: FETCH,
        STORE, UID): those are parsed and handled in one call, not through a Deferred and a
        callback per argument (a tenth of a small FETCH's time on the reactor).  The answers to
        errors are Twisted's: L{parse_command} answers the three IMAP exceptions, anything else
        is a BAD "Server error" and logged, and the connection goes on.
        """
        entry = self.lookupCommand(cmd)
        if not entry or not all(getattr(p, "__name__", "") in self._PLAIN_PARSERS for p in entry[1:] if callable(p)):
            return super().dispatchCommand(tag, cmd, rest, uid)
        try:
            args, line = [self, tag], rest
            for parse in entry[1:]:
                if callable(parse):
                    arg, line = parse(self, line)
                    args.append(arg)
                else:
                    args.append(parse)
            if line:
                raise imap4.IllegalClientResponse("Too many arguments for command: " + repr(line))
            if uid is not None:
                entry[0](uid=uid, *args)
            else:
                entry[0](*args)
        except (imap4.IllegalClientResponse, imap4.IllegalOperation, imap4.IllegalMailboxEncoding):
            raise
        except Exception:
            self._IMAP4Server__ebDispatch(Failure(), tag)

    def _makeEntry(self, cmd):
        entry = super().lookupCommand(cmd)
        if entry is None:
            return entry
        # Command tables name Twisted's argument parsers directly: use this class's versions
        # (sequence-set checks, LITERAL+).
        entry = (entry[0],) + tuple(
            getattr(type(self), f.__name__, f) if callable(f) and getattr(f, "__name__", "").startswith(("arg_", "opt_")) else f
            for f in entry[1:]
        )
        if cmd.upper() not in self._ASYNC:
            return entry
        handler = entry[0]

        def held(this, tag, *args, **kwargs):
            this._hold(tag)
            token = this._holdToken
            this._holding = True
            try:
                return handler(this, tag, *args, **kwargs)
            finally:
                this._holding = False
                # answered before the handler returned (from the index on the reactor): the
                # hold ends here, not at the reactor's next turn, and the loop of
                # LineReceiver.dataReceived that called us goes on to the next line
                # (_releaseHold does nothing while the answer is still to come)
                this._releaseHold(token)

        return (held,) + tuple(entry[1:])

    def _hold(self, tag):
        """
        Stop reading commands until C{tag}'s tagged response: the input stays in
        LineReceiver's buffer, bytes as they came (Twisted's own C{blocked} list stores later
        input as lines, so the bytes of a LITERAL+ literal pipelined after a held command were
        replayed as commands).  C{blocked} is still set, so that unsolicited responses wait
        for the tagged one instead of landing inside a FETCH literal.
        """
        if self.blocked is None:
            self.blocked = []
        self._heldTag = tag
        self._holdToken += 1
        if not self.paused:
            self.pauseProducing()

    #: an answer's untagged part, held back by L{_answerWith} to go out with its tagged line
    _unsent = b""

    #: the TCP connection under the transport when writes reach it unchanged (flow's
    #: _plainConnection, found at the first answer: the wrappers do not change), or None
    _conn = False

    def _plainConn(self):
        """L{_plainConnection} under this session's transport, found once (the wrappers do not
        change; after STARTTLS C{writeNow} sees the connection's TLS itself)."""
        if self._conn is False:
            self._conn = _plainConnection(self.transport)
        return self._conn

    def _respond(self, state, tag, message):
        unsent, self._unsent = self._unsent, b""
        sent = False
        if tag is not None and not self._buffer and not self._queuedAsync:
            # the client waits for this and nothing is pipelined behind it: the answer goes out
            # at once, in one send when nothing waits before it (flow.writeNow: no registering
            # of the socket for writing and unregistering it after, two epoll_ctl an answer)
            sent = writeNow(self.transport, unsent + b" ".join((tag, state, message) if message else (tag, state))
                            + self.delimiter, self._plainConn())
        else:
            if unsent:
                self.transport.write(unsent)
            super()._respond(state, tag, message)
        if tag is not None:
            if tag == self._heldTag:
                self._heldTag = None
                if not self._holding:
                    self.factory.clock.callLater(0, self._releaseHold, self._holdToken)
            if not self._buffer and not sent:
                sendNow(self.transport)  # (what writeNow could not send: over TLS, behind other data)

    def _answerWith(self, data, tag, message=b"FETCH completed"):
        """A whole answer written at once: C{data} (its untagged part), then C{tag} OK C{message}."""
        self._unsent = data
        self.sendPositiveResponse(tag, message)

    def _releaseHold(self, token):
        if token != self._holdToken or self._heldTag is not None or self.transport is None:
            return
        if self.blocked is not None:
            self._unblock()  # lines Twisted itself queued (none while paused)
        if self.blocked is None:
            self._sendHeldFlags()
        queued, self._queuedAsync = self._queuedAsync, []
        for message in queued:  # what arrived since the tagged response: now, not at the next one
            self._respond(message, None, None)
        if self.paused and not getattr(self.transport, "disconnected", False):
            self.resumeProducing()

    # --- STARTTLS: nothing sent before the handshake survives it (CVE-2011-0411 class) --------

    def do_STARTTLS(self, tag):
        super().do_STARTTLS(tag)
        if self.startedTLS:
            # Commands pipelined in plaintext after STARTTLS must not run inside TLS: drop
            # what LineReceiver still holds (RFC 3501 6.2.1, RFC 7817).
            self._buffer = b""

    unauth_STARTTLS = (do_STARTTLS,)

    # --- folder commands: the store answers through Deferreds --------------------------------

    def _answer(self, d, tag, what: str):
        def ok(_):
            self.sendPositiveResponse(tag, f"{what} completed".encode())

        def no(failure):
            if failure.check(imap4.MailboxException):
                self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
            else:
                log.failure("{what} failed", failure, what=what)
                self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

        maybeDeferred(lambda: d).addCallbacks(ok, no)

    def _name(self, name) -> str:
        return imap4._parseMbox(name)  # modified UTF-7 on the wire -> Unicode

    _USE = re.compile(rb"^\(USE \(([^()]*)\)\)$", re.I)

    def do_CREATE(self, tag, name, rest=b""):
        special = None
        if rest.strip():
            m = self._USE.match(rest.strip())  # RFC 6154 CREATE-SPECIAL-USE
            if m is None:
                raise imap4.IllegalClientResponse("Expected (USE (\\attribute))")
            uses = m.group(1).split()
            if len(uses) > 1:
                self.sendNegativeResponse(tag, b"[USEATTR] One special-use attribute per folder")
                return
            special = next((u.decode("ascii", "replace") for u in uses), None)
            if special is not None:
                special = "\\" + special.lstrip("\\").capitalize()
        self._answer(maybeDeferred(self.account.create, self._name(name), special), tag, "CREATE")

    auth_CREATE = (do_CREATE, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_line)
    select_CREATE = auth_CREATE

    def do_DELETE(self, tag, name):
        self._answer(maybeDeferred(self.account.delete, self._name(name)), tag, "DELETE")

    auth_DELETE = (do_DELETE, imap4.IMAP4Server.arg_finalastring)
    select_DELETE = auth_DELETE

    def do_RENAME(self, tag, oldname, newname):
        self._answer(
            maybeDeferred(self.account.rename, self._name(oldname), self._name(newname)), tag, "RENAME"
        )

    auth_RENAME = (do_RENAME, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)
    select_RENAME = auth_RENAME

    def do_SUBSCRIBE(self, tag, name):
        self._answer(maybeDeferred(self.account.subscribe, self._name(name)), tag, "SUBSCRIBE")

    auth_SUBSCRIBE = (do_SUBSCRIBE, imap4.IMAP4Server.arg_finalastring)
    select_SUBSCRIBE = auth_SUBSCRIBE

    def do_UNSUBSCRIBE(self, tag, name):
        self._answer(maybeDeferred(self.account.unsubscribe, self._name(name)), tag, "UNSUBSCRIBE")

    auth_UNSUBSCRIBE = (do_UNSUBSCRIBE, imap4.IMAP4Server.arg_finalastring)
    select_UNSUBSCRIBE = auth_UNSUBSCRIBE

    # --- SELECT / EXAMINE: every response RFC 3501 6.3.1 lists --------------------------------

    condstore = False  # RFC 7162: MODSEQ in FETCH responses once a CONDSTORE command was used
    qresync = False  # ENABLE QRESYNC: VANISHED instead of EXPUNGE, UID in unsolicited FETCH

    def opt_selectparams(self, line):
        """
        RFC 4466 select parameters: C{(CONDSTORE)} and C{(QRESYNC (uidvalidity modseq
        [known-uids [seq-match-data]]))}.
        """
        line = line.strip()
        if not line:
            return None, b""
        if not line.startswith(b"("):
            raise imap4.IllegalClientResponse("Malformed SELECT parameters")
        try:
            params = imap4.parseNestedParens(line)
        except imap4.IllegalClientResponse:
            raise
        except Exception:
            raise imap4.IllegalClientResponse("Malformed SELECT parameters")
        if len(params) != 1 or not isinstance(params[0], list):
            raise imap4.IllegalClientResponse("Malformed SELECT parameters")
        out, items = {}, params[0]
        i = 0
        while i < len(items):
            word = items[i].upper() if isinstance(items[i], bytes) else None
            if word == b"CONDSTORE":
                out["condstore"] = True
                i += 1
            elif word == b"QRESYNC" and i + 1 < len(items) and isinstance(items[i + 1], list):
                args = items[i + 1]
                try:
                    validity, modseq = int(args[0]), int(args[1])
                    known = parseSequenceSet(args[2]) if len(args) > 2 and isinstance(args[2], bytes) else None
                except (ValueError, IndexError, TypeError):
                    raise imap4.IllegalClientResponse("Malformed QRESYNC parameters")
                if not (1 <= validity < 1 << 32 and 0 < modseq < 1 << 63):
                    raise imap4.IllegalClientResponse("QRESYNC values out of range")
                out["qresync"] = (validity, modseq, known)
                i += 2
            else:
                raise imap4.IllegalClientResponse("Unknown SELECT parameter")
        return out, b""

    def _selectWork(self, tag, name, params, rw, cmdName):
        params = params or {}
        if "qresync" in params and not self.qresync:
            self.sendBadResponse(tag, b"QRESYNC must be enabled first (ENABLE QRESYNC)")  # RFC 7162 3.2.5
            return
        if params.get("condstore"):
            self.condstore = True
        previous = self.mbox
        if previous:
            self.mbox = None
            previous.removeListener(self, detach=False)  # (closed below: _cbSelectWork, _closeMailbox)
            self.state = "auth"
            self.sendUntaggedResponse(b"OK [CLOSED] Previous mailbox closed")  # RFC 7162 3.2.11
        d = maybeDeferred(self.account.select, self._name(name), rw)
        d.addCallback(self._cbSelectWork, cmdName, tag, params.get("qresync"), previous)
        d.addErrback(self._ebSelectWork, cmdName, tag)
        if previous:
            # closed once the new one is attached if it is the same folder (a client going back
            # to its INBOX): the folder's watch stays, and with it the directory stamps this
            # process noted, so its sync lists nothing (Folder._noteOwnStamps); another folder's
            # is closed before the new one is attached (_cbSelectWork)
            d.addBoth(self._closeMailbox, previous)

    @staticmethod
    def _closeMailbox(result, mbox):
        close = getattr(mbox, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.failure("closing the previous mailbox")
        return result

    auth_SELECT = (_selectWork, imap4.IMAP4Server.arg_astring, opt_selectparams, 1, b"SELECT")
    select_SELECT = auth_SELECT
    auth_EXAMINE = (_selectWork, imap4.IMAP4Server.arg_astring, opt_selectparams, 0, b"EXAMINE")
    select_EXAMINE = auth_EXAMINE

    def _ebSelectWork(self, failure, cmdName, tag):
        log.failure("{cmd} failed", failure, cmd=cmdName)
        self.sendNegativeResponse(tag, b"[SERVERBUG] " + cmdName + b" failed")

    def _cbSelectWork(self, mbox, cmdName, tag, qresync=None, previous=None):
        if previous is not None and getattr(previous, "folder", None) is not getattr(mbox, "folder", None):
            # another folder (or the same name renamed or made anew: another Folder, whose
            # watch shares the directories' inotify watch): the previous one goes first
            self._closeMailbox(None, previous)
        if self._lost:  # the client left meanwhile: do not start listening to the folder
            close = getattr(mbox, "close", None)
            if close is not None:
                close()
            return
        if mbox is None:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox doesn't exist")
            return
        flags = " ".join(mbox.getFlags()).encode()
        self.sendUntaggedResponse(b"FLAGS (" + flags + b")")
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
        firstUnseen = getattr(mbox, "firstUnseen", None)
        if firstUnseen:
            self.sendUntaggedResponse(b"OK [UNSEEN %d] First unseen" % firstUnseen)
        permanent = flags + b" \\*" if mbox.isWriteable() else b""
        self.sendUntaggedResponse(b"OK [PERMANENTFLAGS (" + permanent + b")] Limited")
        self.sendUntaggedResponse(b"OK [UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendUntaggedResponse(b"OK [UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        # RFC 7162 3.1.2.1: a server with persistent MODSEQs sends it on every SELECT/EXAMINE
        self.sendUntaggedResponse(b"OK [HIGHESTMODSEQ %d] Highest" % mbox.info["highestmodseq"])
        mbox.addListener(self)
        mbox.onExpunge = self._expungesArrived
        self.mbox = mbox
        self.state = "select"
        access = b"[READ-WRITE]" if mbox.isWriteable() else b"[READ-ONLY]"
        done = lambda _=None: self.sendPositiveResponse(tag, access + b" " + cmdName + b" completed")
        if qresync is None or qresync[0] != mbox.getUIDValidity():
            done()  # RFC 7162 3.2.5.2: a different UIDVALIDITY means a full resync, nothing more
            # (the folder's inotify watch and listener after the answer is written, within the
            # same reactor turn: no command of this session comes between)
            mbox.attach()
            return
        mbox.attach()
        _, since, known = qresync
        self._store(mbox.resync(since, known), tag, lambda result: (self._sendResync(*result), done()))

    def _sendResync(self, gone, changed):
        if gone:
            self.sendUntaggedResponse(b"VANISHED (EARLIER) " + self._uidset(gone))
        for seq, (flags, msgUid, modseq) in changed:
            self.sendUntaggedResponse(
                b"%d FETCH (UID %d FLAGS (%b) MODSEQ (%d))" % (seq, msgUid, " ".join(flags).encode(), modseq)
            )

    # --- STATUS (Twisted's does not quote the name and passes any item through) -------------

    _STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "SIZE", "HIGHESTMODSEQ")

    def do_STATUS(self, tag, mailbox, names):
        wanted = []
        for name in names:
            item = name.decode("ascii", "replace").upper() if isinstance(name, bytes) else str(name).upper()
            if item not in self._STATUS_ITEMS:
                self.sendBadResponse(tag, b"Unknown STATUS item " + item.encode()[:40])
                return
            wanted.append(item)
        if "HIGHESTMODSEQ" in wanted:
            self.condstore = True
        name = self._name(mailbox)

        def got(mbox):
            if mbox is None:
                self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
                return
            return mbox.requestStatus(wanted).addCallback(answer)

        def answer(status):
            self.sendUntaggedResponse(self._statusLine(name, status, wanted))
            self.sendPositiveResponse(tag, b"STATUS completed")

        self._store(maybeDeferred(self.account.select, name, 0), tag, got)

    def _statusLine(self, name, status, wanted) -> bytes:
        items = b" ".join(b"%s %d" % (item.encode(), status[item]) for item in wanted)
        return b"STATUS " + imap4._quote(name.encode("imap4-utf-7")) + b" (" + items + b")"

    auth_STATUS = (do_STATUS, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_plist)
    select_STATUS = auth_STATUS

    # --- changes from other sessions: IDLE, NOOP, CHECK ----------------------------------------

    idling = False

    def _sendExpunges(self):
        mbox = self.mbox
        if mbox is not None and hasattr(mbox, "takeExpunged"):
            self._announceExpunged(mbox.takeExpunged())

    def _announceExpunged(self, pairs):
        """
        C{(sequence number, uid)} pairs leaving the view: EXPUNGE responses, or one VANISHED
        once QRESYNC is enabled (RFC 7162 3.2.10).
        """
        if not pairs:
            return
        if self.qresync:
            self.sendUntaggedResponse(b"VANISHED " + self._uidset(sorted(u for _, u in pairs)))
            return
        for number, _ in pairs:
            self.sendUntaggedResponse(b"%d EXPUNGE" % number)

    def _expungesArrived(self):
        if self.idling:
            self._sendExpunges()

    def do_NOOP(self, tag):
        self._sendExpunges()
        self.sendPositiveResponse(tag, b"NOOP completed")

    unauth_NOOP = (do_NOOP,)
    auth_NOOP = unauth_NOOP
    select_NOOP = unauth_NOOP
    logout_NOOP = unauth_NOOP

    def do_CHECK(self, tag):
        self._sendExpunges()
        self.sendPositiveResponse(tag, b"CHECK completed")

    select_CHECK = (do_CHECK,)

    def do_IDLE(self, tag):
        """
        RFC 2177: changes are pushed while idling; only DONE ends it.
        """
        self._sendExpunges()
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"
        self.idling = True

    select_IDLE = (do_IDLE,)
    auth_IDLE = select_IDLE

    def parse_idle(self, line, *args):
        self.parseState = self.lastState
        del self.lastState
        self.idling = False
        tag, self.parseTag = self.parseTag, None
        if line.strip().upper() == b"DONE":
            self.sendPositiveResponse(tag, b"IDLE terminated")
        else:
            self.sendBadResponse(tag, b"Expected DONE to end IDLE")

    # --- LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), SPECIAL-USE selection (RFC 6154) ----

    _LIST_SELECT = frozenset({b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"})

    def opt_listselect(self, line):
        line = line.lstrip()
        if not line.startswith(b"("):
            return None, line
        end = line.find(b")")
        if end < 0:
            raise imap4.IllegalClientResponse("Unbalanced LIST selection options")
        options = set(line[1:end].upper().split())
        if not options <= self._LIST_SELECT:
            raise imap4.IllegalClientResponse("Unknown LIST selection option")
        if b"RECURSIVEMATCH" in options and not options & {b"SUBSCRIBED"}:
            raise imap4.IllegalClientResponse("RECURSIVEMATCH needs SUBSCRIBED")  # RFC 5258 3.1
        return options, line[end + 1 :]

    def arg_listpatterns(self, line):
        line = line.lstrip()
        if not line.startswith(b"("):
            d = self.arg_astring(line)
            if isinstance(d, tuple):
                return [d[0]], d[1]
            return d.addCallback(lambda result: ([result[0]], result[1]))
        end = line.find(b")")
        if end < 0:
            raise imap4.IllegalClientResponse("Unbalanced LIST patterns")
        try:
            patterns = imap4.parseNestedParens(line[: end + 1])[0]
        except Exception:
            raise imap4.IllegalClientResponse("Malformed LIST patterns")
        if not patterns or any(not isinstance(p, bytes) for p in patterns):
            raise imap4.IllegalClientResponse("Malformed LIST patterns")
        return patterns, line[end + 1 :]

    def opt_listreturn(self, line):
        line = line.strip()
        if not line:
            return None, b""
        if line[:7].upper() != b"RETURN ":
            raise imap4.IllegalClientResponse("Unexpected LIST arguments")
        try:
            parsed = imap4.parseNestedParens(line[7:])
        except Exception:
            raise imap4.IllegalClientResponse("Malformed LIST RETURN options")
        if len(parsed) != 1 or not isinstance(parsed[0], list):
            raise imap4.IllegalClientResponse("Malformed LIST RETURN options")
        options, items = {}, parsed[0]
        i = 0
        while i < len(items):
            word = items[i].upper() if isinstance(items[i], bytes) else None
            if word in (b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE"):
                options[word] = True
                i += 1
            elif word == b"STATUS" and i + 1 < len(items) and isinstance(items[i + 1], list):
                wanted = [n.decode("ascii", "replace").upper() for n in items[i + 1] if isinstance(n, bytes)]
                if not wanted or len(wanted) != len(items[i + 1]) or not set(wanted) <= set(self._STATUS_ITEMS):
                    raise imap4.IllegalClientResponse("Bad STATUS items in LIST RETURN")
                options[b"STATUS"] = wanted
                i += 2
            else:
                raise imap4.IllegalClientResponse("Unknown LIST RETURN option")
        return options, b""

    def do_LIST(self, tag, select, ref, patterns, returns):
        select, returns = select or set(), returns or {}
        ref = self._name(ref) if ref else ""
        patterns = [self._name(p) if p else "" for p in patterns]
        if patterns == [""] and not select:
            # RFC 3501 6.3.8: the hierarchy delimiter and root name
            self.sendUntaggedResponse(b'LIST (\\Noselect) "/" ""')
            self.sendPositiveResponse(tag, b"LIST completed")
            return
        status = returns.get(b"STATUS")
        if status and "HIGHESTMODSEQ" in status:
            self.condstore = True
        d = self.account.listExtended(ref, [p for p in patterns if p], subscribed=b"SUBSCRIBED" in select,
                                      recursive=b"RECURSIVEMATCH" in select,
                                      specialOnly=b"SPECIAL-USE" in select, status=status)

        def answer(entries):
            for name, attributes, childinfo, items in entries:
                if not (b"SUBSCRIBED" in select or b"SUBSCRIBED" in returns):
                    attributes = [a for a in attributes if a != "\\Subscribed"]
                wire = imap4._quote(name.encode("imap4-utf-7"))
                line = b"LIST (" + " ".join(attributes).encode() + b') "/" ' + wire
                if childinfo:
                    line += b' ("CHILDINFO" ("SUBSCRIBED"))'
                self.sendUntaggedResponse(line)
                if items is not None:
                    self.sendUntaggedResponse(self._statusLine(name, items, status))
            self.sendPositiveResponse(tag, b"LIST completed")

        self._store(d, tag, answer)

    auth_LIST = (do_LIST, opt_listselect, imap4.IMAP4Server.arg_astring, arg_listpatterns, opt_listreturn)
    select_LIST = auth_LIST

    # --- LSUB (RFC 3501 6.3.9): subscribed names, gone or not; \Noselect parents for "%" -------

    def do_LSUB(self, tag, ref, pattern):
        d = self.account.listExtended(self._name(ref) if ref else "", [self._name(pattern) if pattern else ""],
                                      subscribed=True, recursive=True, lsub=True)

        def answer(entries):
            for name, attributes, childinfo, _ in entries:
                if childinfo:
                    attributes = ["\\Noselect"]
                else:
                    attributes = [a for a in attributes if a not in ("\\Subscribed", "\\NonExistent")]
                self.sendUntaggedResponse(b"LSUB (" + " ".join(attributes).encode() + b') "/" '
                                          + imap4._quote(name.encode("imap4-utf-7")))
            self.sendPositiveResponse(tag, b"LSUB completed")

        self._store(d, tag, answer)

    auth_LSUB = (do_LSUB, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_astring)
    select_LSUB = auth_LSUB

    # --- QUOTA (RFC 9208), from the store's Maildir++ quota ----------------------------------------

    def _sendQuota(self, limits):
        (usedBytes, maxBytes), (usedCount, maxCount) = limits
        resources = []
        if maxBytes:
            resources.append(b"STORAGE %d %d" % ((usedBytes + 1023) // 1024, maxBytes // 1024))
        if maxCount:
            resources.append(b"MESSAGE %d %d" % (usedCount, maxCount))
        self.sendUntaggedResponse(b'QUOTA "" (' + b" ".join(resources) + b")")

    def do_GETQUOTAROOT(self, tag, mailbox):
        name = self._name(mailbox)

        def answer(limits):
            self.sendUntaggedResponse(b"QUOTAROOT " + imap4._quote(name.encode("imap4-utf-7")) + b' ""')
            self._sendQuota(limits)
            self.sendPositiveResponse(tag, b"GETQUOTAROOT completed")

        self._store(self.account.quota(), tag, answer)

    auth_GETQUOTAROOT = (do_GETQUOTAROOT, imap4.IMAP4Server.arg_finalastring)
    select_GETQUOTAROOT = auth_GETQUOTAROOT

    def do_GETQUOTA(self, tag, root):
        if root not in (b"", ""):
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such quota root")
            return

        def answer(limits):
            self._sendQuota(limits)
            self.sendPositiveResponse(tag, b"GETQUOTA completed")

        self._store(self.account.quota(), tag, answer)

    auth_GETQUOTA = (do_GETQUOTA, imap4.IMAP4Server.arg_finalastring)
    select_GETQUOTA = auth_GETQUOTA

    def do_SETQUOTA(self, tag, line=None):
        self.sendNegativeResponse(tag, b"[NOPERM] Quota is set by the administrator")

    auth_SETQUOTA = (do_SETQUOTA, imap4.IMAP4Server.arg_line)
    select_SETQUOTA = auth_SETQUOTA

    # --- small extensions -----------------------------------------------------------------------

    def capabilities(self):
        cap = super().capabilities()
        for name in (b"UIDPLUS", b"MOVE", b"UNSELECT", b"ID", b"ENABLE", b"SPECIAL-USE", b"CHILDREN",
                     b"CREATE-SPECIAL-USE", b"LITERAL+", b"SASL-IR", b"QUOTA", b"QUOTA=RES-STORAGE", b"QUOTA=RES-MESSAGE", b"STATUS=SIZE",
                     b"CONDSTORE", b"QRESYNC", b"ESEARCH", b"LIST-EXTENDED", b"LIST-STATUS",
                     b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"):
            cap[name] = None
        cap[b"APPENDLIMIT"] = [b"%d" % self.factory.appendLimit]
        if self.plaintextAllowed:  # [auth] plaintext_networks
            cap.pop(b"LOGINDISABLED", None)
        return cap

    _ID_LOGGED = 1024

    def do_ID(self, tag, params=None):
        """
        RFC 2971: log what the client says it is (at most L{_ID_LOGGED} bytes of it: this is
        allowed before login, and a line may be 64 KB); say what we are.
        """
        params = params or b""
        if len(params) > self._ID_LOGGED:
            params = params[: self._ID_LOGGED] + b"... (%d bytes)" % len(params)
        log.info("imap client id {params!r} from {peer}", params=params, peer=self.peerHost)
        self.sendUntaggedResponse(b'ID ("name" "pymaild" "vendor" "pymaild")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, imap4.IMAP4Server.arg_line)
    auth_ID = unauth_ID
    select_ID = unauth_ID

    def do_ENABLE(self, tag, line=None):
        """
        RFC 5161: CONDSTORE and QRESYNC (which implies CONDSTORE, RFC 7162 3.2.3); anything
        else is ignored, as the RFC says.
        """
        enabled = []
        for word in (line or b"").upper().split():
            if word == b"CONDSTORE" and b"CONDSTORE" not in enabled:
                self.condstore = True
                enabled.append(word)
            elif word == b"QRESYNC" and b"QRESYNC" not in enabled and b"QRESYNC" in self.capabilities():
                self.condstore = self.qresync = True
                enabled.append(word)
        self.sendUntaggedResponse(b" ".join([b"ENABLED"] + enabled))
        self.sendPositiveResponse(tag, b"ENABLE completed")

    auth_ENABLE = (do_ENABLE, imap4.IMAP4Server.arg_line)  # authenticated state only (RFC 5161)

    def do_UNSELECT(self, tag):
        """
        RFC 3691: leave the folder without expunging.
        """
        mbox, self.mbox = self.mbox, None
        if mbox is not None:
            mbox.removeListener(self)
            close = getattr(mbox, "close", None)
            if close is not None:
                close()
        self.state = "auth"
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    # --- SEARCH over the index (Twisted's own matcher is broken: TWISTED_MAIL.md gap 7) ---------
    #     with ESEARCH (RFC 4731) result options, literals anywhere in the keys, and the
    #     MODSEQ result of RFC 7162.

    _RETURN_OPTIONS = frozenset({b"MIN", b"MAX", b"COUNT", b"ALL"})

    def opt_searchreturn(self, line):
        """
        ESEARCH: C{RETURN (MIN MAX COUNT ALL)}; C{RETURN ()} means ALL.
        """
        line = (line or b"").lstrip()
        if not line:
            raise imap4.IllegalClientResponse("SEARCH needs search keys")
        if line[:7].upper() != b"RETURN ":
            return None, line
        rest = line[7:].lstrip()
        end = rest.find(b")")
        if not rest.startswith(b"(") or end < 0:
            raise imap4.IllegalClientResponse("RETURN needs a parenthesised list")
        options = rest[1:end].upper().split()
        for option in options:
            if option not in self._RETURN_OPTIONS:
                raise imap4.IllegalClientResponse("Unknown RETURN option " + option[:20].decode("ascii", "replace"))
        return (options or [b"ALL"]), rest[end + 1 :].lstrip()

    def opt_charset(self, line):
        line = (line or b"").lstrip()
        if line[:8].upper() != b"CHARSET ":
            return None, line
        return self.arg_sortcharset(line[8:])

    _TRAILING_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}$")
    #: literals in one SEARCH command
    MAX_SEARCH_LITERALS = 64

    def arg_searchkeys(self, line, _literals=None, _before=b""):
        """
        The search keys, with literals (C{SUBJECT {5}}) anywhere: each literal is read (a
        continuation request, or none for LITERAL+) and stands in the line as a placeholder
        token until Twisted's tokenizer has split it, then put back.
        """
        literals = [] if _literals is None else _literals
        m = self._TRAILING_LITERAL.search(line)
        if m is None:
            text = _before + line
            depth = deepest = 0
            for c in text:
                if c == 0x28:
                    depth += 1
                    deepest = max(deepest, depth)
                elif c == 0x29:
                    depth -= 1
            from pymaild.imap import search as search_  # (at the first SEARCH: 10 ms less start-up)

            if deepest > search_.MAX_NESTING:
                raise imap4.IllegalClientResponse(f"SEARCH nested deeper than {search_.MAX_NESTING}")
            try:
                query = imap4.parseNestedParens(text)
            except imap4.IllegalClientResponse:
                raise
            except Exception:
                raise imap4.IllegalClientResponse("Malformed SEARCH")
            return _putLiterals(query, literals), b""
        if len(literals) >= self.MAX_SEARCH_LITERALS:
            raise imap4.IllegalClientResponse("Too many literals in SEARCH")
        if m.group(2):
            self._nonSync = True
        prefix = _before + line[: m.start()] + b"\x00%d\x00" % len(literals)

        def got(result):
            data, rest = result
            literals.append(data)
            return self.arg_searchkeys(rest, literals, prefix)

        return self._stringLiteral(int(m.group(1))).addCallback(got)

    def _compileSearch(self, tag, charset, query):
        from pymaild.imap import search as search_

        if isinstance(charset, bytes):
            charset = charset.decode("ascii", "replace").strip('"')
        try:
            return search_.compile(query, charset=charset)
        except search_.SearchError as e:
            if e.code == "BADCHARSET":
                self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] " + str(e).encode())
            else:
                self.sendBadResponse(tag, b"SEARCH failed: " + str(e).encode("utf-8", "replace"))
            return None

    def do_SEARCH(self, tag, options, charset, query, uid=0):
        predicate = self._compileSearch(tag, charset, query)
        if predicate is None:
            return
        withModseq = "MODSEQ" in predicate.keys
        if withModseq:
            self.condstore = True
        mbox = self.mbox

        def answer(result):
            numbers, modseq = result
            values = [mbox.getUID(n) for n in numbers] if uid else numbers
            if options is None:
                # RFC 3501 7.2.5: "* SEARCH" even when nothing matched
                line = b" ".join([b"SEARCH"] + [b"%d" % v for v in values])
                if withModseq and values:
                    line += b" (MODSEQ %d)" % modseq
                self.sendUntaggedResponse(line)
            else:
                self.sendUntaggedResponse(self._esearch(tag, options, values, uid, modseq if withModseq else None))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        self._store(mbox.search(predicate).addCallback(lambda numbers: mbox.highestModseq(numbers, withModseq)),
                    tag, answer)

    def _esearch(self, tag, options, values, uid, modseq) -> bytes:
        """
        RFC 4731: C{* ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set [MODSEQ n]}.
        """
        out = [b"ESEARCH (TAG " + imap4._quote(tag) + b")"]
        if uid:
            out.append(b"UID")
        if values:
            if b"MIN" in options:
                out.append(b"MIN %d" % min(values))
            if b"MAX" in options:
                out.append(b"MAX %d" % max(values))
        if b"COUNT" in options:
            out.append(b"COUNT %d" % len(values))
        if values and b"ALL" in options:
            out.append(b"ALL " + self._uidset(sorted(values)))
        if modseq is not None and values:
            out.append(b"MODSEQ %d" % modseq)
        return b" ".join(out)

    select_SEARCH = (do_SEARCH, opt_searchreturn, opt_charset, arg_searchkeys)

    # --- SORT and THREAD (RFC 5256, SORT=DISPLAY RFC 5957): pymaild/imap/sort.py ---------------

    def arg_sortcriteria(self, line):
        line = line.lstrip()
        end = line.find(b")")
        if not line.startswith(b"(") or end < 0:
            raise imap4.IllegalClientResponse("SORT needs a parenthesised list of criteria")
        try:
            return sort_.parseSort(imap4.parseNestedParens(line[: end + 1])[0]), line[end + 1 :].lstrip()
        except sort_.SortError as e:
            raise imap4.IllegalClientResponse(str(e))

    def arg_threadalgorithm(self, line):
        token, _, rest = line.lstrip().partition(b" ")
        try:
            return sort_.parseThreadAlgorithm(token), rest
        except sort_.SortError as e:
            raise imap4.IllegalClientResponse(str(e))

    def arg_sortcharset(self, line):
        """
        A charset: an astring, so a quoted string or a literal too (RFC 3501 9).
        """
        line = (line or b"").lstrip()
        if not line:
            raise imap4.IllegalClientResponse("A charset is needed")
        result = self.arg_astring(line)
        if isinstance(result, tuple):
            charset, rest = result
            return charset, (rest or b"").lstrip()
        return result.addCallback(lambda r: (r[0], (r[1] or b"").lstrip()))

    def do_SORT(self, tag, criteria, charset, query, uid=0):
        self._sortOrThread(tag, charset, query, uid, b"SORT",
                           lambda records: b" ".join(b"%d" % i for i in sort_.sortMessages(criteria, records)))

    def do_THREAD(self, tag, algorithm, charset, query, uid=0):
        self._sortOrThread(tag, charset, query, uid, b"THREAD",
                           lambda records: sort_.formatThreads(sort_.threadMessages(algorithm, records)))

    def _sortOrThread(self, tag, charset, query, uid, name, order):
        predicate = self._compileSearch(tag, charset, query)
        if predicate is None:
            return

        def answer(text):
            self.sendUntaggedResponse(name + (b" " + text if text else b""))
            self.sendPositiveResponse(tag, name + b" completed")

        self._store(self.mbox.sortRecords(predicate, bool(uid)).addCallback(order), tag, answer)

    select_SORT = (do_SORT, arg_sortcriteria, arg_sortcharset, arg_searchkeys)
    select_THREAD = (do_THREAD, arg_threadalgorithm, arg_sortcharset, arg_searchkeys)

    # --- UIDPLUS (RFC 4315) and MOVE (RFC 6851) -------------------------------------------------

    def do_UID(self, tag, command, line):
        command = command.upper()
        if command == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("Too many arguments for UID EXPUNGE")
            return self._expunge(tag, messages)
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE", b"SORT", b"THREAD"):
            raise imap4.IllegalClientResponse(command)
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)

    def do_EXPUNGE(self, tag):
        self._expunge(tag, None)

    select_EXPUNGE = (do_EXPUNGE,)

    def _expunge(self, tag, messages):
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return

        def announce(pairs):
            self._announceExpunged(pairs)
            self.sendPositiveResponse(tag, b"EXPUNGE completed")

        self._sendExpunges()
        self._store(self.mbox.expungeSome(messages, True), tag, announce)

    def _store(self, d, tag, done):
        """
        Answer a store call: C{done(result)} on success, C{NO} with the store's code otherwise.
        """

        def failed(failure):
            if failure.check(imap4.MailboxException):
                self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
            elif getattr(failure.value, "code", None) is not None and hasattr(failure.value, "enhanced"):
                self.sendNegativeResponse(tag, b"[OVERQUOTA] " + str(failure.value.text).encode())
            else:
                log.failure("IMAP command failed", failure)
                self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

        d.addCallback(done).addErrback(failed)  # an error in done() still gets an answer

    @staticmethod
    def _uidset(uids) -> bytes:
        out, run = [], []
        for u in uids:
            if run and u == run[-1] + 1:
                run.append(u)
                continue
            if run:
                out.append(b"%d" % run[0] if len(run) == 1 else b"%d:%d" % (run[0], run[-1]))
            run = [u]
        if run:
            out.append(b"%d" % run[0] if len(run) == 1 else b"%d:%d" % (run[0], run[-1]))
        return b",".join(out)

    def _withTarget(self, tag, mailbox, then):
        def got(dest):
            if dest is None:
                self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
                return
            then(dest)

        self._store(maybeDeferred(self.account.select, self._name(mailbox), 0), tag, got)

    def do_COPY(self, tag, messages, mailbox, uid=0):
        def copy(dest):
            def answer(result):
                validity, pairs = result
                code = b""
                if pairs:
                    src = self._uidset([a for a, _ in pairs])
                    dst = self._uidset([b for _, b in pairs])
                    code = b"[COPYUID %d %b %b] " % (validity, src, dst)
                self.sendPositiveResponse(tag, code + b"COPY completed")

            self._store(self.mbox.copyTo(messages, uid, dest), tag, answer)

        self._withTarget(tag, mailbox, copy)

    select_COPY = (do_COPY, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def do_MOVE(self, tag, messages, mailbox, uid=0):
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return

        def move(dest):
            def answer(result):
                validity, pairs, numbers = result
                if pairs:
                    src = self._uidset([a for a, _ in pairs])
                    dst = self._uidset([b for _, b in pairs])
                    self.sendUntaggedResponse(b"OK [COPYUID %d %b %b] Moved" % (validity, src, dst))
                self._announceExpunged(numbers)
                self.sendPositiveResponse(tag, b"MOVE completed")

            self._store(self.mbox.moveTo(messages, uid, dest), tag, answer)

        self._withTarget(tag, mailbox, move)

    select_MOVE = (do_MOVE, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def do_APPEND(self, tag, mailbox, flags, date, message):
        # read-only open: an APPEND must not claim the folder's \Recent messages
        d = maybeDeferred(self.account.select, self._name(mailbox), 0)
        d.addCallback(self._cbAppendGotMailbox, tag, flags, date, message)
        d.addErrback(self._ebAppendGotMailbox, tag)

    auth_APPEND = (do_APPEND, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.opt_plist,
                   imap4.IMAP4Server.opt_datetime, imap4.IMAP4Server.arg_literal)
    select_APPEND = auth_APPEND

    def _cbAppendGotMailbox(self, mbox, tag, flags, date, message):
        if not mbox:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        flags = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags or ()]

        def answer(uid):
            self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed" % (mbox.getUIDValidity(), uid))

        self._store(mbox.addMessage(message, flags, date), tag, answer)

    # --- FETCH: our own writer (fetch.py), batches from the store's threads ------------------

    #: messages loaded per store call; the next batch loads while this one is written (or once
    #: this one's fields are parsed: L{StoreMailbox.fetchBatch}'s C{prepared}).  Batches
    #: double up to FETCH_BATCH_MAX: the first answers go out soon, and a long FETCH of mail
    #: never summarized hands its parsing to the store's worker processes in fewer, larger
    #: pieces (500 at a time cost about 9 us a message more than 4,000 at a time)
    FETCH_BATCH = 500
    FETCH_BATCH_MAX = 4000
    #: a FETCH of flags alone (UID, FLAGS, MODSEQ: a client syncing a folder, or polling a
    #: message's flags) for consecutive messages is answered from the folder's flag index
    #: (arrays kept in memory, L{pymaild.store.maildir.Folder.flagIndex}): for fewer than
    #: FLAG_RUN_FROM messages on the reactor when the index is current and free (L{_flagsNow}),
    #: else FLAG_RUN messages per store call (which reads the index first if it is not kept or
    #: is stale; for fewer than FLAG_RUN_FROM messages only where that is cheap:
    #: L{StoreMailbox.flagIndexWorthReading})
    FLAG_RUN_FROM = 1000
    FLAG_RUN = 16384
    #: a FETCH of at most FETCH_NOW messages that needs no summaries and sets no \Seen (a
    #: client opening a message: BODY.PEEK[], RFC822.SIZE, INTERNALDATE) reads their index rows
    #: on the reactor when the user's lock is free (L{StoreMailbox.fetchNow}); the files are
    #: read as for any FETCH
    FETCH_NOW = 16

    def arg_fetchspec(self, line):
        try:
            return fetch.parseFetchCached(line), b""
        except fetch.FetchError as e:
            raise imap4.IllegalClientResponse(str(e))

    def do_FETCH(self, tag, messages, request, uid=0):
        mbox = self.mbox
        if request.vanished and not (uid and self.qresync):
            self.sendBadResponse(tag, b"VANISHED needs UID FETCH and ENABLE QRESYNC")  # RFC 7162 3.2.6
            return
        if request.modseq:
            self.condstore = True
        markSeen = request.marksSeen and mbox.isWriteable()
        if markSeen and not request.wantsFlags:
            request.items.append(imap4._FetchParser.Flags())
            request.types.add("flags")
        wanted = mbox.resolve(messages, uid)
        if (request.flagsOnly and not markSeen and not request.vanished and 0 < len(wanted) < self.FLAG_RUN_FROM
                and self._flagsNow(tag, request, wanted, uid)):
            return
        first = None
        if (not request.flagsOnly and not request.needsSummaries and not markSeen and not request.vanished
                and 0 < len(wanted) <= self.FETCH_NOW):
            first = mbox.fetchNow(wanted, request.changedSince, request.wantsDates)
            if first is not None and self._answerNow(tag, request, first, uid):
                return
        d = self._runFetch(request, messages, wanted, uid, markSeen, first)
        d.addCallbacks(lambda _: self.sendPositiveResponse(tag, b"FETCH completed"), self._fetchFailed,
                       errbackArgs=(tag,))

    select_FETCH = (do_FETCH, arg_seqset, arg_fetchspec)

    def _modseqWanted(self, request) -> bool:
        """Whether a FETCH's answers carry MODSEQ: asked for, or CONDSTORE on and FLAGS asked for."""
        return request.modseq or (self.condstore and request.wantsFlags)

    def _flagsNow(self, tag, request, wanted, uid) -> bool:
        """
        Answer a FETCH of flags alone for a run of fewer than L{FLAG_RUN_FROM} consecutive
        messages from the folder's flag index, on the reactor, if that index is kept, current
        and not in a store thread's use (L{StoreMailbox.flagRunNow}); False, having sent
        nothing, otherwise.  A client polling one message's flags, or a few new messages', is
        answered without the two thread wake-ups of a store call.
        """
        modseq = self._modseqWanted(request)
        data = self.mbox.flagRunNow(wanted, request, uid, modseq, request.changedSince)
        if data is None:
            return False
        self._answerWith(data, tag)
        return True

    def _answerNow(self, tag, request, batch, uid) -> bool:
        """
        Write the answer to a small FETCH whose index rows were read on the reactor
        (L{StoreMailbox.fetchNow}) at once, when every section is small enough to be read whole
        (none over L{fetch.STREAM_ABOVE}): without L{_runFetch}'s generators, flow control and
        idle-timer juggling, which a few messages' answer written in one go does not need.
        False, having sent nothing, otherwise (a section to stream, a file that cannot be read
        now): the general way then answers, errors included.
        """
        from pymaild.imap.mailbox import CRLFSection

        modseq = self._modseqWanted(request)
        out = []
        try:
            for seq, msg in batch:
                pieces = fetch.renderMessage(seq, msg, request, uid, modseq, CRLFSection)
                if not all(type(piece) is bytes for piece in pieces):  # (bytes, a Stream, bytes ...)
                    for piece in pieces:
                        if isinstance(piece, fetch.Stream):
                            piece.section.close()
                    return False
                out += pieces
        except Exception:
            return False
        self._answerWith(b"".join(out), tag)
        return True

    def _fetchFailed(self, failure, tag):
        if self.transport is None or getattr(self.transport, "disconnected", False):
            return
        if failure.check(imap4.MailboxException):
            self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
        elif failure.check(fetch.FetchError):
            self.sendBadResponse(tag, str(failure.value).encode("utf-8", "replace"))
        else:
            log.failure("FETCH failed", failure)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

    @defer.inlineCallbacks
    def _runFetch(self, request, messages, wanted, uid, markSeen, first=None):
        """
        Load and write a FETCH's answers, batch by batch; C{first}: the first batch if it was
        had already (L{StoreMailbox.fetchNow}).
        """
        mbox = self.mbox
        old = self.setTimeout(None)  # a long FETCH to a slow client is not idleness
        producer = _Backpressure(self.transport)
        try:
            if request.vanished:
                gone = yield mbox.vanished(request.changedSince, messages)
                if gone:
                    self.sendUntaggedResponse(b"VANISHED (EARLIER) " + self._uidset(gone))
            modseq = self._modseqWanted(request)
            if request.flagsOnly and not markSeen and wanted and (len(wanted) >= self.FLAG_RUN_FROM or mbox.flagIndexWorthReading()):
                done = yield self._writeFlagRuns(request, wanted, uid, modseq, producer)
                if done == len(wanted) or producer.stopped or self._gone():
                    return
                wanted = wanted[done:]  # the rest (another process changed the folder) goes below
            size = self.FETCH_BATCH
            direct = request.directFields
            flagsOnly = request.flagsOnly
            dates = request.wantsDates
            def load(i):
                # (a Deferred that fires when the batch's fields are parsed, and the batch's)
                prepared = defer.Deferred()
                return prepared, mbox.fetchBatch(wanted[i : i + size], request.needsSummaries, markSeen,
                                                 request.changedSince, direct, flagsOnly, dates, prepared)

            def drop(loading):
                if loading is not None:
                    loading[1].addErrback(lambda _: None)

            pending = (load(0) if first is None else (defer.succeed(None), defer.succeed(first))) if wanted else None
            i = 0
            while pending is not None:
                prepared, loading = pending
                yield prepared
                i += size
                size = min(size * 2, self.FETCH_BATCH_MAX)
                # The next batch loads once this one is parsed (its parsing overlaps the rest of
                # this one's loading, and its writing), except when loading sets \Seen: then
                # only what is about to be sent is marked.
                pending = load(i) if i < len(wanted) and not markSeen else None
                try:
                    batch = yield loading
                    yield self._writeBatch(batch, request, uid, modseq, producer)
                except BaseException:
                    drop(pending)
                    raise
                if producer.stopped or self._gone():
                    drop(pending)
                    return
                if pending is None and markSeen and i < len(wanted):
                    pending = load(i)
        finally:
            producer.unregister()
            self.setTimeout(old)
            # the ENVELOPEs its batches read from files go to the index after the answer
            mbox.fetchDone()

    @defer.inlineCallbacks
    def _writeFlagRuns(self, request, wanted, uid, modseq, producer):
        """
        Answer a FETCH of flags alone from the folder's flag index, L{FLAG_RUN} messages at a
        time (the next run made in a store thread while this one is written); a Deferred of
        how many of C{wanted} were answered (all, or fewer when the index and this session's
        view part: L{StoreMailbox.fetchFlagRun}).
        """
        mbox, size = self.mbox, self.FLAG_RUN
        load = lambda i: mbox.fetchFlagRun(wanted[i : i + size], request, uid, modseq, request.changedSince)
        pending, i = load(0), 0
        while pending is not None:
            data = yield pending
            if data is None:
                return i
            pending = load(i + size) if i + size < len(wanted) else None
            self.transport.write(data)
            i = min(i + size, len(wanted))
            yield producer.wait()
            if producer.stopped or self._gone():
                if pending is not None:
                    pending.addErrback(lambda _: None)
                return i
        return i

    @defer.inlineCallbacks
    def _writeBatch(self, batch, request, uid, modseq, producer):
        from pymaild.imap.mailbox import CRLFSection

        out, size = [], 0
        conn = self._plainConn()
        for seq, msg in batch:
            if producer.stopped:
                return
            try:
                pieces = fetch.renderMessage(seq, msg, request, uid, modseq, CRLFSection)
            except FileNotFoundError:
                # renamed since its row was read (a STORE of another session or process): the
                # row read again, and the file read, under the lock, in a store thread (the
                # function made here only: not one per message of every FETCH)
                pieces = yield self.mbox.renderAgain(
                    msg, functools.partial(fetch.renderMessage, seq, msg, request, uid, modseq, CRLFSection))
            for piece in pieces:
                if isinstance(piece, bytes):
                    out.append(piece)
                    size += len(piece)
                    continue
                # a large section: what is buffered, then the file streamed
                writeSequenceNow(self.transport, out, conn)
                out, size = [], 0
                producer.unregister()
                stream = _SectionProducer(piece.section)
                self._streaming = stream
                try:
                    yield stream.beginProducing(self.transport)
                finally:
                    self._streaming = None
                    piece.section.close()
                if stream.stopped:
                    return
            if size >= 262144:
                # (the answers as they are, gathered by the kernel: not joined into one string)
                writeSequenceNow(self.transport, out, conn)
                out, size = [], 0
                yield producer.wait()
        if out:
            writeSequenceNow(self.transport, out, conn)
        yield producer.wait()

    # --- STORE with CONDSTORE (RFC 7162 UNCHANGEDSINCE, MODSEQ in the answers) ------------------

    _UNCHANGEDSINCE = re.compile(rb"^\(\s*UNCHANGEDSINCE\s+(\d{1,19})\s*\)\s*", re.I)

    def arg_storemod(self, line):
        m = self._UNCHANGEDSINCE.match(line)
        if m is None:
            if line.startswith(b"("):
                raise imap4.IllegalClientResponse("Unknown STORE modifier")
            return None, line
        value = int(m.group(1))
        if value >= 1 << 63:
            raise imap4.IllegalClientResponse("UNCHANGEDSINCE out of range")
        return value, line[m.end():]

    def arg_flaglist(self, line):
        if not line:  # (Twisted's indexes None: "Server error" and a traceback in the log)
            raise imap4.IllegalClientResponse("Missing flag list")
        return imap4.IMAP4Server.arg_flaglist(self, line)

    def do_STORE(self, tag, messages, unchangedSince, mode, flags, uid=0):
        mode = mode.upper()
        if mode not in (b"FLAGS", b"+FLAGS", b"-FLAGS", b"FLAGS.SILENT", b"+FLAGS.SILENT", b"-FLAGS.SILENT"):
            self.sendBadResponse(tag, b"STORE needs FLAGS, +FLAGS or -FLAGS")
            return
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        silent = mode.endswith(b".SILENT")
        how = "add" if mode.startswith(b"+") else "remove" if mode.startswith(b"-") else "set"
        if unchangedSince is not None:
            self.condstore = True
        flags = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags]

        def answer(result):
            current, failed = result
            for seq, (flagList, msgUid, modseq) in current:
                # RFC 7162 3.1.3: with UNCHANGEDSINCE, MODSEQ is reported even when .SILENT
                if silent and unchangedSince is None:
                    continue
                items = [b"FLAGS (" + " ".join(flagList).encode() + b")"] if not silent else []
                if uid or self.qresync:
                    items.insert(0, b"UID %d" % msgUid)
                if self.condstore:
                    items.append(b"MODSEQ (%d)" % modseq)
                self.sendUntaggedResponse(b"%d FETCH (%b)" % (seq, b" ".join(items)))
            code = b""
            if failed:
                code = b"[MODIFIED " + self._uidset(failed) + b"] " if uid else \
                    b"[MODIFIED " + self._uidset(self.mbox.sequenceNumbers(failed)) + b"] "
            self.sendPositiveResponse(tag, code + b"STORE completed")

        report = not silent or unchangedSince is not None
        self._store(self.mbox.storeFlags(messages, uid, flags, how, unchangedSince, report), tag, answer)

    select_STORE = (do_STORE, arg_seqset, arg_storemod, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_flaglist)

    # --- unsolicited FETCH from other sessions' flag changes ----------------------------------

    def flagsChanged(self, newFlags):
        """
        C{newFlags}: sequence number -> (flags, uid, modseq).  MODSEQ once CONDSTORE is on,
        UID once QRESYNC is (RFC 7162 3.1.4.1 and 3.2.4).
        """
        if self.blocked is not None:
            # a command is running (an EXPUNGE may renumber): numbered when it has answered
            self._heldFlags.extend(newFlags.values())
            return
        for seq, (flags, msgUid, modseq) in sorted(newFlags.items()):
            items = [b"FLAGS (" + " ".join(flags).encode() + b")"]
            if self.qresync:
                items.insert(0, b"UID %d" % msgUid)
            if self.condstore:
                items.append(b"MODSEQ (%d)" % modseq)
            self.sendUntaggedResponse(b"%d FETCH (%b)" % (seq, b" ".join(items)))

    def _sendHeldFlags(self):
        held, self._heldFlags = self._heldFlags, []
        mbox = self.mbox
        if not held or mbox is None:
            return
        latest = {}
        for flags, msgUid, modseq in held:  # the last word on each message
            latest[msgUid] = (flags, msgUid, modseq)
        numbered = {}
        for msgUid, update in latest.items():
            seq = mbox.sequenceNumber(msgUid)
            if seq is not None:
                numbered[seq] = update
        self.flagsChanged(numbered)

    _sessionKey = None
    _streaming = None
    _heldFlags: list = []  # flag updates that arrived during a command (made per session below)

    def _gone(self) -> bool:
        return self.transport is None or bool(getattr(self.transport, "disconnected", False))

    def connectionLost(self, reason):
        self._lost = True
        stream, self._streaming = self._streaming, None
        if stream is not None:
            stream.stopProducing()  # Twisted's FileProducer never finishes then: its file leaked
        mbox, self.mbox = self.mbox, None
        if mbox is not None:  # stop hearing about the folder (and claiming its \Recent mail)
            mbox.removeListener(self)
            close = getattr(mbox, "close", None)
            if close is not None:
                close()
        key, self._sessionKey = self._sessionKey, None
        if key is not None:
            left = self.factory.sessions.get(key, 1) - 1
            if left > 0:
                self.factory.sessions[key] = left
            else:
                self.factory.sessions.pop(key, None)
        super().connectionLost(reason)

    def isBusy(self) -> bool:
        return self._pendingLiteral is not None

    def goodbye(self) -> None:
        self.sendUntaggedResponse(b"BYE Server shutting down")
        self.transport.loseConnection()


def _putLiterals(tokens, literals):
    """
    Put the literals of a SEARCH back where their placeholders are in Twisted's token list.
    """
    out = []
    for token in tokens:
        if isinstance(token, list):
            out.append(_putLiterals(token, literals))
        elif isinstance(token, bytes) and token[:1] == b"\x00":
            m = re.fullmatch(rb"\x00(\d+)\x00", token)
            if m is None or int(m.group(1)) >= len(literals):
                raise imap4.IllegalClientResponse("Malformed SEARCH")
            out.append(literals[int(m.group(1))])
        else:
            out.append(token)
    return out


class _SectionProducer:
    """
    Streams a large section as a literal (C{{size}} CRLF, then the bytes), 64 KiB at a time,
    as Twisted's C{FileProducer} does, but ends (its Deferred fails) when the connection goes.
    """

    CHUNK = 65536

    def __init__(self, section):
        self.section = section
        self.stopped = False
        self._d = None
        self._first = True

    def beginProducing(self, consumer):
        self.consumer = consumer
        self._d = defer.Deferred()
        consumer.registerProducer(self, False)
        return self._d

    def resumeProducing(self):
        if self._d is None:
            return
        data = b""
        if self._first:
            self._first = False
            data = b"{%d}\r\n" % self.section.seek(0, 2)
            self.section.seek(0)
        chunk = self.section.read(self.CHUNK)
        if chunk or data:
            self.consumer.write(data + chunk)
        if not chunk:
            self.consumer.unregisterProducer()
            d, self._d = self._d, None
            d.callback(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        self.stopped = True
        d, self._d = self._d, None
        if d is not None:
            d.callback(None)  # the writer sees C{stopped} and gives up


class IMAPFactory(ServerFactory):
    tooManyConnections = b"* BYE Too many connections, try again later\r\n"

    noisy = False

    def __init__(self, portal, tls, plaintextNetworks=(), implicitTLS: bool = False, throttle=None,
                 appendLimit: int = 50 << 20, autologout: float = 1800.0, maxLine: int = 65536, clock=None,
                 maxPerUser: int = 50, sessions: dict | None = None, pipeline=None):
        from pymaild.throttle import LoginThrottle

        #: the plugins (login hooks), or None
        self.pipeline = pipeline

        self.portal = portal
        self.tls = tls
        self.plaintextNetworks = tuple(plaintextNetworks)
        self.implicitTLS = implicitTLS
        self.throttle = throttle if throttle is not None else LoginThrottle()
        self.appendLimit = appendLimit
        self.autologout = autologout
        self.maxLine = maxLine
        self.maxPerUser = maxPerUser
        #: logged-in sessions per user, shared by the IMAP listeners (143 and 993)
        self.sessions = sessions if sessions is not None else {}
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock

    def buildProtocol(self, addr):
        p = PymaildIMAP4Server(contextFactory=self.tls)
        p.factory = self
        p.portal = self.portal
        p.POSTAUTH_TIMEOUT = self.autologout
        p.MAX_LENGTH = self.maxLine
        return p
