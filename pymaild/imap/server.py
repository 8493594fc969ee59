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

import re

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import imap4

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

    def sendServerGreeting(self):
        msg = b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] pymaild ready"
        self.sendPositiveResponse(message=msg)

    def do_LOGIN(self, tag, user, passwd):
        if b"LOGINDISABLED" in self.capabilities():
            # RFC 3501 6.2.3, RFC 5530 PRIVACYREQUIRED
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS (or port 993) before LOGIN")
            return
        name = user.decode("utf-8", "replace")
        throttle = self.factory.throttle
        if throttle.blocked(self.peerHost, name.lower()):
            log.info("imap login {user} from {peer}: blocked", event="login", protocol="imap", user=name,
                     peer=self.peerHost, result="blocked")
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins, try again later")
            return
        d = maybeDeferred(self.authenticateLogin, user, passwd)
        d.addCallbacks(self._loginSucceeded, self._loginFailed, (tag, name), None, (tag, name))

    def do_AUTHENTICATE(self, tag, mechanism, initial=b""):
        """
        AUTHENTICATE, with SASL-IR (RFC 4959): an initial response on the command line saves
        a round trip ("=" is an empty one).
        """
        if not initial:
            return super().do_AUTHENTICATE(tag, mechanism)
        mechanism = mechanism.upper().strip()
        if mechanism not in self.challengers:
            self.sendNegativeResponse(tag, b"AUTHENTICATE method unsupported")
            return
        challenge = self.challengers[mechanism]()
        response = b"" if initial.strip() == b"=" else initial.strip()
        try:
            self._IMAP4Server__cbAuthChunk(response, challenge, tag)  # Twisted's own next step
        except imap4.IllegalClientResponse as e:
            self.sendBadResponse(tag, str(e).encode())

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)

    def authenticateLogin(self, user, passwd):
        from twisted.cred.credentials import UsernamePassword

        return self.factory.portal.login(UsernamePassword(user, passwd), None, imap4.IAccount)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    def _loginSucceeded(self, result, tag, name):
        iface, avatar, logout = result
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
        if failure.check(UnauthorizedLogin):
            result, answer = "failed", b"[AUTHENTICATIONFAILED] Authentication failed"
        elif failure.check(TemporaryFailure):
            result, answer = "tempfail", b"[UNAVAILABLE] Temporary authentication failure, try again later"
        else:
            log.failure("imap login {user} from {peer}", failure, user=name, peer=self.peerHost)
            result, answer = "error", b"[SERVERBUG] Internal error, try again later"
        log.info("imap login {user} from {peer}: {result}", event="login", protocol="imap", user=name, peer=self.peerHost, result=result)
        delay = self.factory.throttle.failed(self.peerHost, name.lower()) if result == "failed" else 0
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

    _SEQSET = re.compile(rb"^(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*$")

    def arg_seqset(self, line):
        """
        RFC 3501 sequence-set: numbers are nz-number (1 to 4294967295); Twisted accepts 0 and
        anything larger.
        """
        token = line.split(b" ", 1)[0]
        if not self._SEQSET.match(token) or any(
            not 1 <= int(n) <= 0xFFFFFFFF for n in re.findall(rb"\d+", token)
        ):
            raise imap4.IllegalClientResponse(f"Invalid sequence set: {token[:40]!r}")
        return super().arg_seqset(line)

    select_STORE = (
        imap4.IMAP4Server.do_STORE, arg_seqset, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_flaglist
    )

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
        b"APPEND", b"LOGIN", b"CLOSE", b"GETQUOTA", b"GETQUOTAROOT",
    })
    _heldTag = None
    _holdToken = 0

    def lookupCommand(self, cmd):
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
            return handler(this, tag, *args, **kwargs)

        return (held,) + tuple(entry[1:])

    def _hold(self, tag):
        if self.blocked is None:
            self.blocked = []
        self._heldTag = tag
        self._holdToken += 1

    def _respond(self, state, tag, message):
        super()._respond(state, tag, message)
        if tag is not None and tag == self._heldTag:
            self._heldTag = None
            self.factory.clock.callLater(0, self._releaseHold, self._holdToken)

    def _releaseHold(self, token):
        if token == self._holdToken and self._heldTag is None and self.blocked is not None:
            self._unblock()

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

    def _cbSelectWork(self, mbox, cmdName, tag):
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
        mbox.addListener(self)
        mbox.attach()
        mbox.onExpunge = self._expungesArrived
        self.mbox = mbox
        self.state = "select"
        access = b"[READ-WRITE]" if mbox.isWriteable() else b"[READ-ONLY]"
        self.sendPositiveResponse(tag, access + b" " + cmdName + b" completed")

    # --- changes from other sessions: IDLE, NOOP, CHECK ----------------------------------------

    idling = False

    def _sendExpunges(self):
        mbox = self.mbox
        if mbox is not None and hasattr(mbox, "takeExpunged"):
            for number in mbox.takeExpunged():
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

    # --- LIST with subscriptions from the same listing ---------------------------------------------

    def _cbListWork(self, mailboxes, tag, sub, cmdName):
        for name, box in mailboxes:
            if sub and not box.subscribed:
                continue
            flags = [flag.encode() for flag in box.getFlags()]
            if sub and box.info is None:
                continue
            resp = (imap4.DontQuoteMe(cmdName), map(imap4.DontQuoteMe, flags), b"/", name.encode("imap4-utf-7"))
            self.sendUntaggedResponse(imap4.collapseNestedLists(resp))
        self.sendPositiveResponse(tag, cmdName + b" completed")

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
                     b"CREATE-SPECIAL-USE", b"LITERAL+", b"SASL-IR", b"QUOTA", b"QUOTA=RES-STORAGE", b"QUOTA=RES-MESSAGE", b"STATUS=SIZE"):
            cap[name] = None
        cap[b"APPENDLIMIT"] = [b"%d" % self.factory.appendLimit]
        if self.plaintextAllowed:  # [auth] plaintext_networks
            cap.pop(b"LOGINDISABLED", None)
        return cap

    def do_ID(self, tag, params=None):
        """
        RFC 2971: log what the client says it is; say what we are.
        """
        log.info("imap client id {params!r} from {peer}", params=params, peer=self.peerHost)
        self.sendUntaggedResponse(b'ID ("name" "pymaild" "vendor" "pymaild")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, imap4.IMAP4Server.arg_line)
    auth_ID = unauth_ID
    select_ID = unauth_ID

    def do_ENABLE(self, tag, line=None):
        """
        RFC 5161: nothing this version can enable yet (CONDSTORE/QRESYNC come later).
        """
        self.sendUntaggedResponse(b"ENABLED")
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

    def do_SEARCH(self, tag, charset, query, uid=0):
        from pymaild.imap import search

        if isinstance(charset, bytes):
            charset = charset.decode("ascii", "replace").strip('"')
        try:
            predicate = search.compile(query, charset=charset)
        except search.SearchError as e:
            if e.code == "BADCHARSET":
                self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] " + str(e).encode())
            else:
                self.sendBadResponse(tag, b"SEARCH failed: " + str(e).encode("utf-8", "replace"))
            return

        def answer(numbers):
            mbox = self.mbox
            values = [mbox.getUID(n) for n in numbers] if uid else numbers
            # RFC 3501 7.2.5: "* SEARCH" even when nothing matched
            self.sendUntaggedResponse(b" ".join([b"SEARCH"] + [b"%d" % v for v in values]))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        self._store(self.mbox.search(predicate), tag, answer)

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset, imap4.IMAP4Server.arg_searchkeys)

    # --- UIDPLUS (RFC 4315) and MOVE (RFC 6851) -------------------------------------------------

    def do_UID(self, tag, command, line):
        command = command.upper()
        if command == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("Too many arguments for UID EXPUNGE")
            return self._expunge(tag, messages)
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE"):
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

        def announce(numbers):
            for number in numbers:
                self.sendUntaggedResponse(b"%d EXPUNGE" % number)
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

        d.addCallbacks(done, failed)

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
                for number in numbers:
                    self.sendUntaggedResponse(b"%d EXPUNGE" % number)
                self.sendPositiveResponse(tag, b"MOVE completed")

            self._store(self.mbox.moveTo(messages, uid, dest), tag, answer)

        self._withTarget(tag, mailbox, move)

    select_MOVE = (do_MOVE, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def _cbAppendGotMailbox(self, mbox, tag, flags, date, message):
        if not mbox:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        flags = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags or ()]

        def answer(uid):
            self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed" % (mbox.getUIDValidity(), uid))

        self._store(mbox.addMessage(message, flags, date), tag, answer)

    # --- FETCH from the index's summaries and straight from the files -----------------------

    _SEEN_PARTS = {"rfc822", "rfc822text"}

    def do_FETCH(self, tag, messages, query, uid=0):
        if self.mbox is not None and query:
            types = {part.type for part in query}
            self.mbox.wantSummaries = bool(types & {"envelope", "bodystructure", "body", "rfc822header", "rfc822text"})
            markSeen = any(
                (part.type == "body" and not part.peek and (part.empty or part.header or part.text or part.mime))
                or part.type in self._SEEN_PARTS
                for part in query
            )
            self.mbox.markSeen = markSeen and self.mbox.isWriteable()
            if self.mbox.markSeen and "flags" not in types:
                query = list(query) + [imap4._FetchParser.Flags()]
        super().do_FETCH(tag, messages, query, uid)

    select_FETCH = (do_FETCH, arg_seqset, imap4.IMAP4Server.arg_fetchatt)

    def spew_envelope(self, id, msg, _w=None, _f=None):
        _w(b"ENVELOPE " + msg.summary.envelope)

    def spew_bodystructure(self, id, msg, _w=None, _f=None):
        _w(b"BODYSTRUCTURE " + msg.summary.bodystructure)

    def spew_rfc822header(self, id, msg, _w=None, _f=None):
        top = msg.summary.parts
        return self._spewSection(b"RFC822.HEADER", msg, top["headerStart"], top["bodyStart"], top["headerVSize"], None, _w, _f)

    def spew_rfc822text(self, id, msg, _w=None, _f=None):
        top = msg.summary.parts
        return self._spewSection(b"RFC822.TEXT", msg, top["bodyStart"], top["bodyEnd"], top["bodyVSize"], None, _w, _f)

    def spew_rfc822(self, id, msg, _w=None, _f=None):
        return self._spewSection(b"RFC822", msg, 0, 1 << 62, msg.getSize(), None, _w, _f)

    def spew_body(self, part, id, msg, _w=None, _f=None):
        if not (part.header or part.text or part.mime or part.empty):
            _w(b"BODY " + msg.summary.body)
            return
        name = part.getBytes()
        name = name[: name.index(b"]") + 1]  # without Twisted's (wrong) partial suffix
        node = msg.summary.parts
        path = list(part.part)
        for number in path:
            node = _child(node, number)
            if node is None:
                _w(name + b" NIL")
                return
        if part.mime and path:
            start, end, length = node["headerStart"], node["bodyStart"], node["headerVSize"]
        elif part.empty:
            if path:
                start, end, length = node["bodyStart"], node["bodyEnd"], node["bodyVSize"]
            else:
                start, end, length = 0, 1 << 62, msg.getSize()
        else:
            if path:  # HEADER/TEXT of a part: only a message/rfc822 part has them
                if node.get("kind") != "message":
                    _w(name + b" NIL")
                    return
                node = node["parts"][0]
            if part.text:
                start, end, length = node["bodyStart"], node["bodyEnd"], node["bodyVSize"]
            else:
                start, end, length = node["headerStart"], node["bodyStart"], node["headerVSize"]
                if part.header.fields:
                    data = _headerFields(msg.path, start, end, part.header.fields, part.header.negate)
                    return self._spewBytes(name, data, part, _w)
        partial = (part.partialBegin, part.partialLength) if part.partialBegin is not None else None
        return self._spewSection(name, msg, start, end, length, partial, _w, _f)

    def _spewBytes(self, name, data, part, _w):
        if part.partialBegin is not None:
            data = data[part.partialBegin : part.partialBegin + part.partialLength]
            name += b"<%d>" % part.partialBegin
        _w(name + b" {%d}\r\n" % len(data) + data)

    def _spewSection(self, name, msg, start, end, length, partial, _w, _f):
        from pymaild.imap.mailbox import CRLFSection

        skip, limit = 0, None
        if partial is not None:
            skip, limit = partial
            name += b"<%d>" % skip
        section = CRLFSection(msg.path, start, end, length, skip, limit)
        if section.seek(0, 2) <= 65536:
            section.seek(0)
            data = section.read()
            section.close()
            _w(name + b" {%d}\r\n" % len(data) + data)
            return None
        section.seek(0)
        _w(name + b" ")
        _f()
        d = imap4.FileProducer(section).beginProducing(self.transport)
        return d.addBoth(lambda r: (section.close(), r)[1])

    _sessionKey = None

    def connectionLost(self, reason):
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


def _child(node, number: int):
    """
    Part C{number} (0-based) below C{node} in the summary's part tree (RFC 3501 6.4.5 section
    numbering): a multipart's parts; a message/rfc822 part's enclosed message's parts; a
    single part has only its own body as part 1.
    """
    kind = node.get("kind")
    if kind == "message":
        return _child(node["parts"][0], number)
    if kind == "multipart":
        parts = node.get("parts") or []
        return parts[number] if 0 <= number < len(parts) else None
    return node if number == 0 else None


_FIELD = re.compile(rb"^([^:\s]+)[ \t]*:", re.M)


def _headerFields(path, start: int, end: int, fields, negate: bool) -> bytes:
    """
    The header lines (with their continuation lines) whose names are in C{fields} (or not, with
    C{negate}), as stored, with CRLF line ends and the blank line that ends a header.
    """
    wanted = {f.lower() if isinstance(f, bytes) else f.encode().lower() for f in fields}
    with open(path, "rb") as f:
        f.seek(start)
        header = f.read(end - start)
    out, keep = [], False
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        m = _FIELD.match(line)
        keep = m is not None and ((m.group(1).lower() in wanted) != negate)
        if keep:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out) + b"\r\n"


class IMAPFactory(ServerFactory):
    tooManyConnections = b"* BYE Too many connections, try again later\r\n"

    noisy = False

    def __init__(self, portal, tls, plaintextNetworks=(), implicitTLS: bool = False, throttle=None,
                 appendLimit: int = 50 << 20, autologout: float = 1800.0, maxLine: int = 65536, clock=None,
                 maxPerUser: int = 50, sessions: dict | None = None):
        from pymaild.throttle import LoginThrottle

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
        from pymaild.throttle import ThrottledPortal

        p = PymaildIMAP4Server(contextFactory=self.tls)
        p.factory = self
        # AUTHENTICATE runs Twisted's own code against p.portal: throttle it there; LOGIN
        # (authenticateLogin below) uses the plain portal and throttles itself.
        p.portal = ThrottledPortal(self.portal, self.throttle, getattr(addr, "host", ""), self.clock)
        p.POSTAUTH_TIMEOUT = self.autologout
        p.MAX_LENGTH = self.maxLine
        return p
