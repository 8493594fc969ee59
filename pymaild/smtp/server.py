# -*- test-case-name: tests.integration.test_smtp -*-
"""
The SMTP front-end: MX (port 25), submission (587, STARTTLS) and implicit-TLS submission (465),
on Twisted's C{ESMTP}.

This subclass keeps Twisted's greeting, timeout and address parsing (C{smtp.Address}) and does
the command handling itself, because Twisted's gets the dangerous parts wrong
(../shared/TWISTED_MAIL.md): commands pipelined after STARTTLS ran inside TLS; pipelined
commands ran while an asynchronous recipient check was pending; an overlong line inside DATA
dropped back to command mode.  Here:

  - the line receiver is C{LineReceiver}, whose C{pauseProducing} holds every pipelined command
    while one waits for the directory or the disk (L{PymaildESMTP._hold}; with
    L{pymaild.flow.LazyPause} the held commands wait in its buffer, and the socket stops being
    read only when 64 KiB of them wait);
  - STARTTLS throws away whatever was pipelined in plaintext and starts the session over;
  - DATA is read by L{pymaild.smtp.data.DataReader}: the end is only CRLF.CRLF, bare LF/CR are
    refused (or normalised, C{[smtp] bare_line_ends}), an overlong line or an oversized message
    is read to its real end and refused; the message streams to a spool file, once for all
    recipients;
  - C{250} after DATA comes only when every local copy is on disk and fsynced (the store's
    C{deliver}); a failure gives C{451 4.3.0} and removes the copies made so far.

Policy: on port 25 (MX) only the local domains receive mail: an unknown local address gets
C{550 5.1.1}, any other domain C{554 5.7.1} (no relay), unless the client logged in or is in
C{[smtp] trusted_networks}.  Submission ports want AUTH before MAIL (C{530 5.7.0}), TLS before
AUTH, and a MAIL FROM address of the logged-in user (C{553 5.7.1}).  Mail for other domains (from
logged-in users and trusted networks) and aliases forwarding to other domains go into the
outbound queue (C{factory.enqueue}), with the DSN parameters (RFC 3461: RET, ENVID at MAIL;
NOTIFY, ORCPT at RCPT; a forwarded recipient's ORCPT is the address the sender used): the queue
copy is fsynced first, the local copies next, and the queue copy is committed last, so that
C{250} means all of it is stored and a failure stores none of it.  CHUNKING (BDAT, RFC 3030):
chunks go to the same spool; a refused chunk is still read to its end.  Not yet: VRFY beyond 252.

Security: reads commands and data from anyone who connects; AUTH is offered only over TLS;
every reply carries an enhanced status code (RFC 2034).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import time
import uuid
from email.utils import formatdate
from pathlib import Path

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.mail import imap4, smtp
from twisted.mail.interfaces import IMessageDelivery
from twisted.protocols import basic
from zope.interface import implementer

from pymaild.envelope import inNetworks, normalizeAddress
from pymaild.errors import TemporaryFailure
from pymaild.throttle import LoginBlocked
from pymaild.pipeline.edit import edit, fieldLines, readHead
from pymaild.pipeline.stages import Delivery, Message, Recipient, Session, Transaction
from pymaild.flow import Backpressure, Closing, LazyPause, sendNow
from pymaild.sasl import MECHANISMS, AuthorizationRefused
from pymaild.smtp.data import BARE_CR, BARE_LF, DISK, LINE_TOO_LONG, TOO_BIG, BdatTransaction, ChunkReader, DataReader

log = Logger()

_PATH = re.compile(rb"^(FROM|TO):\s*(<[^<>]*>|[^\s<>]+)(.*)$", re.I)  # (brackets missing: as Postfix, taken)
_SOURCE_ROUTE = re.compile(rb"^<@[^:]*:")
_BAD_ADDRESS = re.compile(rb"[\x00-\x20\x7f]")  # controls, DEL, unquoted space (RFC 5321 4.1.2)


def _xtextValid(value: bytes) -> bool:
    """RFC 3461 4: printable ASCII except '+' and '=', which appear only as +XX."""
    return re.fullmatch(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*", value) is not None


def _xtextDecode(value: bytes) -> str:
    return re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value).decode("utf-8", "replace")


def _rcptDSN(params: dict):
    """
    C{(notify, orcpt)} from RCPT's DSN parameters (RFC 3461 4.1, 4.2): C{notify} a list of
    C{NEVER} or C{SUCCESS}/C{FAILURE}/C{DELAY} (None when not given), C{orcpt} C{"type;address"}
    with the xtext decoded (None when not given); None when a parameter is unknown.

    @raise ValueError: a DSN parameter with an invalid value.
    """
    notify = orcpt = None
    for key, value in params.items():
        if key == b"NOTIFY":
            words = value.upper().split(b",")
            if words == [b"NEVER"]:
                notify = ["NEVER"]
            elif words and set(words) <= {b"SUCCESS", b"FAILURE", b"DELAY"} and len(set(words)) == len(words):
                notify = [w.decode("ascii") for w in words]
            else:
                raise ValueError("NOTIFY")
        elif key == b"ORCPT":
            kind, semicolon, address = value.partition(b";")
            if not semicolon or not kind or not address or len(value) > 500 or not _xtextValid(address) or not re.fullmatch(rb"[A-Za-z0-9-]+", kind):
                raise ValueError("ORCPT")
            orcpt = kind.decode("ascii").lower() + ";" + _xtextDecode(address)
        else:
            return None
    return notify, orcpt


class MailLoop(Exception):
    """The message has passed more hops (C{Received:} headers) than C{[smtp] max_hops}."""


def countReceived(source, limit: int = 1 << 20) -> int:
    """
    The C{Received:} fields in the header of a spooled message (bytes, or a file's path),
    ours included, reading at most C{limit} bytes of it.
    """
    if isinstance(source, bytes):
        head = source[:limit]
    else:
        with open(source, "rb") as f:
            head = f.read(limit)
    end = head.find(b"\n\n")
    if end >= 0:
        head = head[: end + 1]
    return len(_RECEIVED.findall(b"\n" + head))


_RECEIVED = re.compile(rb"\nreceived[ \t]*:", re.I)


class MemoryBudget:
    """
    Bytes of arriving messages all SMTP sessions together may keep in memory (L{Spool}); past
    it, messages go to spool files, so that many clients each sending a large message slowly
    cannot fill the server's memory.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # (spools are given back from the store's threads)

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Spool:
    """
    One arriving message (trace headers first), held in memory up to C{memoryLimit} bytes and
    in a file under C{directory} beyond that.  Most mail is small: it then never touches the
    disk on the reactor thread (creating and writing a file there took 0.2-0.5 ms a message
    while the store's threads fsynced: the journal was busy) and is written once, into the
    mailboxes, by the store.  C{write} raises OSError when the file cannot be written.
    """

    def __init__(self, directory: Path, memoryLimit: int = 1 << 20, budget: "MemoryBudget | None" = None):
        self.directory = directory
        self.memoryLimit = memoryLimit
        self.budget = budget if budget is not None else MemoryBudget(1 << 62)
        self.buffer = bytearray()  # (one buffer: a list of tiny BDAT chunks cost 40 bytes each)
        self.size = 0
        self.held = 0  # bytes of the budget this spool holds
        self.path: Path | None = None
        self._file = None

    def write(self, data: bytes) -> None:
        if self._file is None:
            if self.size + len(data) <= self.memoryLimit and self.budget.take(len(data)):
                self.buffer += data
                self.size += len(data)
                self.held += len(data)
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / uuid.uuid4().hex
            self._file = open(self.path, "wb")
            self._file.write(self.buffer)
            self.buffer = bytearray()
            self._giveBack()
        self._file.write(data)
        self.size += len(data)

    def source(self):
        """What the store delivers from (bytes, or the file's path once it is closed)."""
        if self._file is None:
            return bytes(self.buffer)
        self._file.close()
        return self.path

    def _giveBack(self) -> None:
        self.budget.give(self.held)
        self.held = 0

    def discard(self) -> None:
        self.buffer = bytearray()
        self._giveBack()
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()  # (may fail again on a full disk: what it held is thrown away anyway)
            except OSError:
                pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


@implementer(IMessageDelivery)
class SubmissionLogin:
    """
    The avatar submission logins get from the realm (SMTP's interface); pymaild's session does
    its own routing, so it only says who logged in (the account name, as the checker found it).
    """

    def __init__(self, user: str | None = None):
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):  # (never called: PymaildESMTP routes recipients itself)
        raise smtp.SMTPBadRcpt(user, 451, "4.3.0 Recipients are not checked here")


class PymaildESMTP(Closing, LazyPause, basic.LineReceiver, smtp.ESMTP):
    """
    pymaild's SMTP server protocol.
    """

    delimiter = b"\n"
    #: RFC 5321 4.5.3.1.4 wants 512 octets a command line; room for long ESMTP parameters
    MAX_LENGTH = 4096

    _held = False
    _lost = False
    _reader = None
    _spool = None
    _sasl = None
    _helo = None
    _from = None
    user = None  # the logged-in account (AUTH)
    _errors = 0  # 5xx replies so far: past [smtp] max_errors the session ends
    _utf8 = False  # this transaction's MAIL had SMTPUTF8 (RFC 6531)
    _mailParams: dict = {}  # this transaction's MAIL parameters (RET, ENVID, BODY ...)

    # --- connection -----------------------------------------------------------------------

    def connectionMade(self):
        self.peerHost = getattr(self.transport.getPeer(), "host", "")
        self.secure = self.factory.implicitTLS
        self.trusted = inNetworks(self.peerHost, self.factory.trustedNetworks)
        self.callLater = self.factory.clock.callLater
        self._flow = Backpressure(self.transport)
        #: (address, local accounts, ((remote address, (NOTIFY, ORCPT)), ...)) per RCPT taken
        self._rcpts: list[tuple[str, frozenset, tuple, tuple]] = []  # (..., (NOTIFY, ORCPT))
        self.setTimeout(self.factory.commandTimeout)
        pipeline = self.factory.pipeline
        # (the plugins enabled when the client connected serve the whole connection: a SIGHUP
        # that enables the first ones reaches the next connections)
        self._pipeline = pipeline = pipeline if pipeline is not None and pipeline.entries else None
        if pipeline is not None:
            self.session = Session.of(self.transport, "submission" if self.factory.submission else "smtp",
                                      self.peerHost, tls=self.secure, trusted=self.trusted)
            if pipeline.has("connect"):
                self._hold()  # (a client talking before the greeting waits for it)
                pipeline.run("connect", self.session).addCallback(self._connectDecided)
                return
        self._reply(220, self.factory.hostname.encode() + b" ESMTP pymaild", code=None)

    session = None  # the plugins' view of this connection (when plugins are enabled)
    _pipeline = None  # the plugins, when any was enabled as the connection was made
    _transaction = None  # the plugins' view of the message being received
    _pluginHeaders: list = []  # header fields plugins added for this message
    _pluginRemove: list = []  # header field names plugins removed
    _quarantine = None  # the text of a plugin's quarantine verdict for this message

    def _refused(self, outcome, code: int, status: str, text: str, stage: str) -> None:
        """A plugin's reject or tempfail as this command's reply."""
        code, status, text = outcome.reply(code, status, text)
        log.info("smtp {stage} from {peer}: refused by plugin {plugin}: {code} {status} {text}", stage=stage,
                 peer=self.peerHost, plugin=outcome.plugin, code=code, status=status, text=text)
        self._reply(code, text.encode("ascii", "replace"), code=status)

    def _connectDecided(self, outcome):
        if self._lost:
            return
        if outcome.verdict.refuses:
            self._refused(outcome, 554, "5.7.1", "Connection refused by policy", "connect")
            self._close()
            return
        self.session.data.setdefault("_headers", []).extend(outcome.headers)
        self._reply(220, self.factory.hostname.encode() + b" ESMTP pymaild", code=None)
        self._release()

    def connectionLost(self, reason):
        self._lost = True
        self._closed()
        self.setTimeout(None)
        self._dropSpool()
        if self._flow is not None:
            self._flow.stopProducing()

    def timeoutConnection(self):
        self._reply(421, b"Timeout, closing the connection", code="4.4.2")
        self._close()

    def lineLengthExceeded(self, line):
        self._reply(500, b"Line too long", code="5.5.2")
        self._close()

    def stopProducing(self):
        basic.LineReceiver.stopProducing(self)

    def isBusy(self) -> bool:
        """A transaction is in flight (between MAIL and the end of DATA): shutdown waits for it."""
        return self._from is not None or self._reader is not None or self._chunk is not None

    def goodbye(self) -> None:
        self._reply(421, self.factory.hostname.encode() + b" Service shutting down, try again later", code="4.3.2")
        self._close()

    # --- replies and holding ----------------------------------------------------------------

    def _reply(self, status: int, text: bytes, code: str | None = "2.0.0", more: list[bytes] = ()) -> None:
        """
        One reply.  Every reply carries an enhanced status code (RFC 2034) except the greeting
        and the answers to EHLO and HELO (C{code=None}); C{more} makes a multi-line reply.
        """
        lines = [text, *more]
        out = [b"%d-%s\r\n" % (status, line) for line in lines[:-1]]
        if status >= 500:
            self._errors += 1
        prefix = b"" if code is None else code.encode() + b" "
        out.append(b"%d %s%s\r\n" % (status, prefix, lines[-1]))
        self.answer(b"".join(out))

    def _hold(self) -> None:
        self._held = True
        self.pauseProducing()

    def _release(self, _=None) -> None:
        if self._lost or self._closing:
            return
        if self._flow.paused:
            self._held = True
            self.pauseProducing()
            self._flow.wait().addCallback(self._release)
            return
        if not self._buffer:
            # nothing pipelined behind: the client waits for this reply, send it now rather
            # than on the reactor's next turn (flow.sendNow)
            sendNow(self.transport)
        if self._held:
            self._held = False
            self.resumeProducing()

    # --- commands -------------------------------------------------------------------------

    def lineReceived(self, line):
        self.resetTimeout()
        if line[-1:] == b"\r":
            line = line[:-1]
        if self._closing:
            return
        if self._sasl is not None:
            self._saslStep(line)
            return
        if b"\r" in line or b"\0" in line:
            self._reply(501, b"Syntax error: CR or NUL in a command", code="5.5.2")
            return
        verb, _, rest = line.partition(b" ")
        handler = getattr(self, "smtp_" + verb.upper().decode("ascii", "replace"), None) if verb.isalpha() else None
        if handler is None:
            self._reply(500, b"Command not recognised", code="5.5.2")
            return
        try:
            handler(rest.strip())
        except Exception:
            log.failure("smtp command from {peer}", peer=self.peerHost)
            self._reply(451, b"Internal error", code="4.3.0")
            self._close()
            return
        if self._errors > self.factory.maxErrors and not self._closing:
            log.info("smtp {peer}: too many errors", peer=self.peerHost)
            self._reply(421, b"Too many errors, closing the connection", code="4.7.0")
            self._close()
            return
        if not self._held:
            self._release()  # a client that does not read its replies stops being read

    def _extensions(self) -> list[bytes]:
        ext = [b"PIPELINING", b"SIZE %d" % self.factory.maxSize, b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8",
               b"CHUNKING", b"BINARYMIME", b"DSN"]
        if not self.secure and self.factory.tls is not None:
            ext.append(b"STARTTLS")
        if self.secure and self.factory.portal is not None:
            ext.append(b"AUTH " + b" ".join(MECHANISMS))
        ext.append(b"HELP")
        return ext

    def smtp_EHLO(self, rest):
        self._greet(rest, True)

    def smtp_HELO(self, rest):
        self._greet(rest, False)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        """EHLO or HELO: a new session state; EHLO lists the extensions."""
        if not rest:
            self._reply(501, b"EHLO needs a domain or address literal" if esmtp else b"HELO needs a domain",
                        code="5.5.4")
            return
        self._reset()
        helo = rest.decode("ascii", "replace")[:255]
        pipeline = self._pipeline
        if pipeline is not None and pipeline.has("helo"):
            self._helo = None
            self.session.helo = helo
            self._hold()
            pipeline.run("helo", self.session).addCallback(self._heloDecided, helo, rest, esmtp)
            return
        self._heloOK(helo, rest, esmtp)

    def _heloOK(self, helo: str, rest: bytes, esmtp: bool) -> None:
        self._helo = helo
        self._esmtp = esmtp
        if self.session is not None:
            self.session.helo = helo
        self._reply(250, self.factory.hostname.encode() + b" Hello " + rest[:255], code=None,
                    more=self._extensions() if esmtp else ())

    def _heloDecided(self, outcome, helo, rest, esmtp):
        if self._lost:
            return
        if outcome.verdict.refuses:
            self.session.helo = None
            self._refused(outcome, 550, "5.7.1", "Refused by policy", "helo")
        else:
            self.session.data["_heloHeaders"] = list(outcome.headers)
            self._heloOK(helo, rest, esmtp)
        self._release()

    def smtp_NOOP(self, rest):
        self._reply(250, b"OK")

    def smtp_RSET(self, rest):
        self._reset()
        self._reply(250, b"Reset", code="2.0.0")

    def smtp_VRFY(self, rest):
        """
        RFC 5321 3.5.3: C{252} (neither yes nor no) unless C{[smtp] vrfy} lets this client ask:
        then C{250} for a local address that exists, C{550 5.1.1} for one that does not.
        """
        mode = self.factory.vrfy
        if mode == "off" or (mode == "trusted" and self.user is None and not self.trusted):
            self._reply(252, b"Cannot verify the user, but will accept the message and try", code="2.5.0")
            return
        text = rest.strip()
        if text[:1] == b"<" and text[-1:] == b">":
            text = text[1:-1]
        try:
            address = text.decode("utf-8")
        except UnicodeDecodeError:
            address = ""
        local, at, domain = normalizeAddress(address).rpartition("@")
        if not address or _BAD_ADDRESS.search(text) or not at or not local:
            self._reply(501, b"Syntax: VRFY <address>", code="5.5.4")
            return
        if not self.factory.directory.isLocalDomain(domain):
            self._reply(252, b"Not a local address; will accept the message and try", code="2.5.0")
            return
        self._hold()
        d = maybeDeferred(self.factory.directory.lookup, address)
        d.addCallbacks(self._verified, self._directoryDown, (address,))

    def _verified(self, resolution, address):
        if self._lost:
            return
        if resolution.exists:
            self._reply(250, b"<" + address.encode("utf-8") + b">", code="2.1.5")
        else:
            self._reply(550, b"No such user here", code="5.1.1")
        self._release()

    def smtp_HELP(self, rest):
        self._reply(214, b"Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT STARTTLS AUTH", code="2.0.0")

    def smtp_QUIT(self, rest):
        self._reply(221, self.factory.hostname.encode() + b" Bye", code="2.0.0")
        self._close()

    def smtp_STARTTLS(self, rest):
        if rest:
            self._reply(501, b"STARTTLS takes no parameters", code="5.5.4")
            return
        if self.secure:
            self._reply(503, b"Already using TLS", code="5.5.1")
            return
        if self.factory.tls is None:
            self._reply(454, b"TLS not available", code="4.7.0")
            return
        self._reply(220, b"Ready to start TLS", code="2.0.0")
        self._flow.unregister()  # TLS starts with no producer registered
        self.transport.startTLS(self.factory.tls)
        self._flow.register()
        self.secure = True
        # RFC 3207 4.2: forget everything, and what was pipelined in plaintext after STARTTLS
        self._buffer = b""
        self._reset()
        self._helo = None
        self.user = None
        if self.session is not None:
            self.session.tls, self.session.helo, self.session.user = True, None, None

    # --- AUTH (RFC 4954) ------------------------------------------------------------------

    def smtp_AUTH(self, rest):
        if not self.secure or self.factory.portal is None:
            self._reply(538, b"Encryption required for requested authentication mechanism", code="5.7.11")
            return
        if self.user is not None:
            self._reply(503, b"Already authenticated", code="5.5.1")
            return
        if self._from is not None:
            self._reply(503, b"AUTH not allowed during a mail transaction", code="5.5.1")
            return
        words = rest.split()
        if not words or words[0].upper() not in MECHANISMS or len(words) > 2:
            self._reply(504, b"Unrecognised authentication type", code="5.5.4")
            return
        challenge = MECHANISMS[words[0].upper()]()
        self._sasl = challenge
        if len(words) == 2:
            if words[0].upper() == b"LOGIN":
                challenge.getChallenge()
            self._saslStep(words[1])
        else:
            self.transport.write(b"334 " + base64.b64encode(challenge.getChallenge()) + b"\r\n")

    def _saslStep(self, line):
        challenge = self._sasl
        line = line.strip()
        if line == b"*":
            self._sasl = None
            self._reply(501, b"Authentication cancelled", code="5.0.0")
            return
        try:
            challenge.setResponse(b"" if line == b"=" else base64.b64decode(line, validate=True))
        except AuthorizationRefused as e:
            self._sasl = None
            self._reply(535, str(e).encode(), code="5.7.8")
            return
        except (binascii.Error, ValueError, IndexError, imap4.IllegalClientResponse):
            self._sasl = None
            self._reply(501, b"Malformed authentication response", code="5.5.2")
            return
        if challenge.moreChallenges():
            self.transport.write(b"334 " + base64.b64encode(challenge.getChallenge()) + b"\r\n")
            return
        self._sasl = None
        name = (challenge.username or b"").decode("utf-8", "replace")
        throttle = self.factory.throttle
        if throttle.blocked(self.peerHost, name.lower()):
            self._reply(454, b"Too many failed logins, try again later", code="4.7.0")
            return
        self._hold()
        creds = UsernamePassword(challenge.username, challenge.password)
        d = throttle.checking(self.peerHost, name.lower(),
                              lambda: self.factory.portal.login(creds, None, IMessageDelivery))
        d.addCallbacks(self._authOK, self._authFailed, (name,), None, (name,))

    def _authOK(self, result, name):
        _, avatar, logout = result
        logout()
        if self._lost:
            return
        user = getattr(avatar, "user", None) or (name if "@" in name else f"{name}@{self.factory.localDomains[0]}")
        pipeline = self._pipeline
        if pipeline is not None and pipeline.has("auth"):
            self.session.user = user
            pipeline.run("auth", self.session, name, True).addCallback(self._authDecided, user, name)
            return
        self._loggedIn(user, name)

    def _authDecided(self, outcome, user, name):
        if self._lost:
            return
        if outcome.verdict.refuses:
            self.session.user = None
            log.info("smtp login {user} from {peer}: refused by plugin {plugin}", event="login", protocol="smtp",
                     user=name, peer=self.peerHost, result="refused", plugin=outcome.plugin)
            if outcome.action == "tempfail":
                self._reply(454, b"Temporary authentication failure", code="4.7.0")
            else:
                self._reply(535, b"Authentication credentials invalid", code="5.7.8")
            self._release()
            return
        self._loggedIn(user, name)

    def _loggedIn(self, user, name):
        self.user = user
        if self.session is not None:
            self.session.user = user
        self.factory.throttle.succeeded(self.peerHost, name.lower())
        log.info("smtp login {user} from {peer}: ok", event="login", protocol="smtp", user=name, peer=self.peerHost,
                 result="ok")
        self._reply(235, b"Authentication successful", code="2.7.0")
        self._release()

    def _authFailed(self, failure, name):
        if failure.check(LoginBlocked):  # (it waited for checks under way, and they failed)
            result, status, text, code = "blocked", 454, b"Too many failed logins, try again later", "4.7.0"
        elif failure.check(UnauthorizedLogin):
            result, status, text, code = "failed", 535, b"Authentication credentials invalid", "5.7.8"
        elif failure.check(TemporaryFailure):
            result, status, text, code = "tempfail", 454, b"Temporary authentication failure", "4.7.0"
        else:
            log.failure("smtp login {user}", failure, user=name)
            result, status, text, code = "error", 454, b"Temporary authentication failure", "4.7.0"
        log.info("smtp login {user} from {peer}: {result}", event="login", protocol="smtp", user=name,
                 peer=self.peerHost, result=result)
        delay = self.factory.throttle.failed(self.peerHost, name.lower()) if result == "failed" else 0
        if result == "failed" and self._pipeline is not None:
            self._pipeline.notify("auth", self.session, name, False)
        d = Deferred()
        self.factory.clock.callLater(delay, d.callback, None)
        d.addCallback(lambda _: None if self._lost else self._reply(status, text, code=code))
        d.addCallback(self._release)

    # --- the transaction ------------------------------------------------------------------

    def _reset(self) -> None:
        self._from = None
        self._rcpts = []
        self._bdat = None
        self._transaction = None
        self._pluginHeaders = []
        self._pluginRemove = []
        self._quarantine = None
        self._dropSpool()

    def _path(self, rest: bytes, which: bytes):
        """C{(address, params)} of MAIL FROM / RCPT TO, or None after a reply."""
        m = _PATH.match(rest)
        if m is None or m.group(1).upper() != which:
            self._reply(501, b"Syntax: " + which + b":<address>", code="5.5.4")
            return None
        if _SOURCE_ROUTE.match(m.group(2)):
            self._reply(554 if which == b"TO" else 501, b"Source routes are not accepted", code="5.7.1")
            return None
        address = m.group(2)[1:-1] if m.group(2)[:1] == b"<" else m.group(2)
        if _BAD_ADDRESS.search(address):
            self._reply(501, b"Invalid characters in the address", code="5.1.7" if which == b"FROM" else "5.1.3")
            return None
        try:
            text = address.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(501, b"Address is not UTF-8", code="5.1.7" if which == b"FROM" else "5.1.3")
            return None
        params = {}
        for word in m.group(3).split():
            key, _, value = word.partition(b"=")
            params[key.upper()] = value
        return text, params

    def smtp_MAIL(self, rest):
        if self._helo is None:
            self._reply(503, b"Send EHLO or HELO first", code="5.5.1")
            return
        if self._from is not None:
            self._reply(503, b"Nested MAIL command", code="5.5.1")
            return
        if self.factory.submission and self.user is None:
            self._reply(530, b"Authentication required", code="5.7.0")
            return
        parsed = self._path(rest, b"FROM")
        if parsed is None:
            return
        sender, params = parsed
        for key, value in params.items():
            if key == b"SIZE":
                if not value.isdigit():
                    self._reply(501, b"Bad SIZE parameter", code="5.5.4")
                    return
                if int(value) > self.factory.maxSize:
                    self._reply(552, b"Message size exceeds fixed maximum message size", code="5.3.4")
                    return
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME", b"BINARYMIME"):
                    self._reply(501, b"Bad BODY parameter", code="5.5.4")
                    return
            elif key == b"SMTPUTF8" and not value:
                pass
            elif key == b"AUTH" and value:
                pass  # RFC 4954 5: the submitter's identity as a relay saw it; taken, not trusted
            elif key in (b"RET", b"ENVID"):  # (RFC 3461 4.3, 4.4; ENVID kept as received, xtext)
                if (key == b"RET" and value.upper() not in (b"FULL", b"HDRS")) or (
                        key == b"ENVID" and not (value and len(value) <= 100 and _xtextValid(value))):
                    self._reply(501, b"Bad %s parameter (RFC 3461)" % key, code="5.5.4")
                    return
            else:
                self._reply(555, b"Unsupported MAIL parameter", code="5.5.4")
                return
        if sender and "@" not in sender:
            self._reply(553, b"Sender address needs a domain", code="5.1.7")
            return
        self._utf8 = b"SMTPUTF8" in params
        self._mailParams = params
        if not sender.isascii() and not self._utf8:
            self._reply(553, b"Non-ASCII address without SMTPUTF8 (RFC 6531)", code="5.6.7")
            return
        if self.factory.submission:
            self._hold()
            d = maybeDeferred(self.factory.directory.addressesOf, self.user)
            d.addCallbacks(self._senderChecked, self._directoryDown, (sender,))
            return
        self._senderOK(sender)  # (held until the plugins answer, if they answer later)

    def _senderChecked(self, addresses, sender):
        if self._lost:
            return
        mine = not sender or normalizeAddress(sender) in addresses or normalizeAddress(sender) == normalizeAddress(self.user)
        if not mine:  # (<>, for read receipts and vacation replies, is anybody's)
            self._reply(553, b"Sender address does not belong to you", code="5.7.1")
        elif self._senderOK(sender):
            return
        self._release()

    def _senderOK(self, sender: str) -> bool:
        """
        MAIL passed pymaild's checks: ask the plugins, then 250.  True when the answer comes
        later (a plugin is asked; the input stays held until then).
        """
        pipeline = self._pipeline
        if pipeline is None:
            self._from = sender
            self._reply(250, b"Sender OK", code="2.1.0")
            return False
        self._transaction = Transaction(uuid.uuid4().hex[:12].upper(), sender,
                                        {k.decode("ascii", "replace"): v.decode("utf-8", "replace")
                                         for k, v in self._mailParams.items()})
        # (a new message: nothing of the last one's plugin verdicts carries over)
        self._pluginHeaders = list(self.session.data.get("_headers", ())) + list(self.session.data.get("_heloHeaders", ()))
        self._pluginRemove, self._quarantine = [], None
        if not pipeline.has("mail"):
            self._from = sender
            self._reply(250, b"Sender OK", code="2.1.0")
            return False
        outcome = pipeline.ask("mail", self.session, self._transaction)
        if isinstance(outcome, Deferred):
            self._hold()
            outcome.addCallback(self._mailDecided, sender, True)
            return True
        self._mailDecided(outcome, sender, False)
        return False

    def _mailDecided(self, outcome, sender, release):
        if self._lost:
            return
        if outcome.verdict.refuses:
            self._transaction = None
            self._refused(outcome, 550, "5.7.1", "Sender refused by policy", "mail")
        else:
            self._take(outcome)
            self._from = sender
            self._reply(250, b"Sender OK", code="2.1.0")
        if release:
            self._release()

    def _take(self, outcome) -> None:
        """A stage's header changes and quarantine verdict, for this message."""
        self._pluginHeaders.extend(outcome.headers)
        self._pluginRemove.extend(outcome.remove)
        if outcome.action == "quarantine" and self._quarantine is None:
            self._quarantine = f"{outcome.plugin}: {outcome.verdict.text}"

    def _directoryDown(self, failure):
        if not failure.check(TemporaryFailure):
            log.failure("smtp directory lookup", failure)
        if not self._lost:
            self._reply(451, b"Temporary lookup failure, try again later", code="4.4.3")  # (RFC 3463: directory server failure)
        self._release()

    def smtp_RCPT(self, rest):
        if self._from is None:
            self._reply(503, b"Need MAIL before RCPT", code="5.5.1")
            return
        parsed = self._path(rest, b"TO")
        if parsed is None:
            return
        address, params = parsed
        try:
            dsn = _rcptDSN(params)
        except ValueError as e:
            self._reply(501, b"Bad %s parameter (RFC 3461)" % str(e).encode(), code="5.5.4")
            return
        if dsn is None:
            self._reply(555, b"Unsupported RCPT parameter", code="5.5.4")
            return
        if not address.isascii() and not self._utf8:
            self._reply(553, b"Non-ASCII address without SMTPUTF8 (RFC 6531)", code="5.6.7")
            return
        if len(self._rcpts) >= self.factory.maxRecipients:
            self._reply(452, b"Too many recipients", code="4.5.3")
            return
        local, at, domain = normalizeAddress(address).rpartition("@")
        if not at and domain == "postmaster":
            pass  # RFC 5321 4.5.1: <postmaster> without a domain is always taken
        elif not at or not self.factory.directory.isLocalDomain(domain):
            if not at:
                self._reply(550, b"Recipient address needs a domain", code="5.1.3")
            elif self.user is None and not self.trusted:
                self._reply(554, b"Relay access denied", code="5.7.1")
            elif self.factory.enqueue is None:
                self._reply(451, b"Delivery to other domains is not available, try again later", code="4.3.2")
            else:
                self._recipientOK(address, frozenset(), ((address, dsn),), dsn, "remote")
            return
        self._hold()
        d = maybeDeferred(self.factory.directory.lookup, address)  # (user+tag@ included)
        d.addCallbacks(self._recipientChecked, self._directoryDown, (address, dsn))

    def _recipientChecked(self, resolution, address, dsn):
        if self._lost:
            return
        if not resolution.exists:
            self._reply(550, b"No such user here", code="5.1.1")
        elif resolution.remote and self.factory.enqueue is None:
            self._reply(451, b"Forwarding to other domains is not available, try again later", code="4.3.2")
        elif self.factory.hasRoom is not None and resolution.users:
            d = self.factory.run(lambda: all(self.factory.hasRoom(u) for u in resolution.users))
            d.addCallbacks(self._roomChecked, self._directoryDown, (address, resolution, dsn))
            return
        elif self._accept(address, resolution, dsn):
            return
        self._release()

    def _roomChecked(self, room, address, resolution, dsn):
        if self._lost:
            return
        if room:
            if self._accept(address, resolution, dsn):
                return
        else:
            self._reply(552, b"Mailbox full", code="5.2.2")
        self._release()

    def _accept(self, address, resolution, dsn) -> bool:
        """True when the answer comes later (see L{_recipientOK})."""
        # forwarded to other domains: queued, with the address the sender used as ORCPT
        orcpt = dsn[1] or f"rfc822;{address}"
        forwards = tuple((remote, (dsn[0], orcpt)) for remote in sorted(resolution.remote))
        return self._recipientOK(address, frozenset(resolution.users), forwards, dsn, resolution.kind)

    def _recipientOK(self, address, users, forwards, dsn, kind) -> bool:
        """
        RCPT passed pymaild's checks: ask the plugins, then take it and 250.  True when the
        answer comes later (a plugin is asked; the caller leaves the input held).
        """
        pipeline = self._pipeline
        if pipeline is None or not pipeline.has("rcpt"):
            if self._transaction is not None:  # (for the data and delivery stages)
                self._transaction.recipients.append(Recipient(address, kind, users, tuple(a for a, _ in forwards)))
            self._rcpts.append((address, users, forwards, dsn))
            self._reply(250, b"Recipient OK", code="2.1.5")
            return False
        recipient = Recipient(address, kind, users, tuple(a for a, _ in forwards))
        outcome = pipeline.ask("rcpt", self.session, self._transaction, recipient)
        if not isinstance(outcome, Deferred):
            self._rcptDecided(outcome, recipient, (address, users, forwards, dsn), False)
            return False
        self._hold()
        outcome.addCallback(self._rcptDecided, recipient, (address, users, forwards, dsn))
        return True

    def _rcptDecided(self, outcome, recipient, taken, release=True):
        if self._lost:
            return
        if outcome.verdict.refuses:
            self._refused(outcome, 550, "5.7.1", "Recipient refused by policy", "rcpt")
        elif self._transaction is not None:  # (not RSET meanwhile)
            self._take(outcome)
            self._transaction.recipients.append(recipient)
            self._rcpts.append(taken)
            self._reply(250, b"Recipient OK", code="2.1.5")
        if release:
            self._release()

    # --- DATA ------------------------------------------------------------------------------

    def smtp_DATA(self, rest):
        if self._from is None:
            self._reply(503, b"Need MAIL before DATA", code="5.5.1")
            return
        if not self._rcpts:
            self._reply(554, b"No valid recipients", code="5.5.1")
            return
        if self._bdat is not None:
            self._reply(503, b"DATA after BDAT", code="5.5.1")
            return
        if not self._openSpool():
            self._reply(452, b"Insufficient system storage, try again later", code="4.3.1")
            return
        self._reader = DataReader(self._spool.write, self.factory.maxSize, self.factory.maxLineLength,
                                  self.factory.bareLineEnds)
        self._reply(354, b"End data with <CR><LF>.<CR><LF>", code=None)
        self.setTimeout(self.factory.dataTimeout)
        self.setRawMode()
        rest, self._buffer = self._buffer, b""
        if rest:
            self.rawDataReceived(rest)

    _bdat = None  # the BdatTransaction of a message arriving in BDAT chunks

    def smtp_BDAT(self, rest):
        """
        CHUNKING (RFC 3030): C{BDAT size [LAST]}, then exactly C{size} octets.  The octets are
        read even when the command is refused, so that they never run as commands.
        """
        words = rest.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 12 or (
                len(words) == 2 and words[1].upper() != b"LAST"):
            self._reply(501, b"Syntax: BDAT size [LAST]", code="5.5.4")
            self._close()  # the chunk's length is unknown: its octets cannot be told from commands
            return
        size, last = int(words[0]), len(words) == 2
        refusal = None
        if self._from is None:
            refusal = (503, b"Need MAIL before BDAT", "5.5.1")
        elif not self._rcpts:
            refusal = (554, b"No valid recipients", "5.5.1")
        elif self._reader is not None:
            refusal = (503, b"BDAT after DATA", "5.5.1")
        if refusal is not None:
            transaction = BdatTransaction(None, 0)
            transaction.problem = "refused"
            self._bdatRefusal = refusal
        else:
            if self._bdat is None:
                if not self._openSpool():
                    transaction = BdatTransaction(None, 0)
                    transaction.problem = DISK
                    self._bdat = None
                else:
                    self._bdat = BdatTransaction(self._spool.write, self.factory.maxSize)
            transaction = self._bdat or transaction
        self._chunk = (ChunkReader(transaction, size), last)
        self._readChunk()

    def _readChunk(self) -> None:
        reader, last = self._chunk
        if reader.left == 0:
            self._chunkDone()  # (lineReceived releases the input unless a delivery holds it)
            return
        self.setTimeout(self.factory.dataTimeout)
        self.setRawMode()
        rest, self._buffer = self._buffer, b""
        if rest:
            self.rawDataReceived(rest)

    def _chunkDone(self) -> bool:
        """A chunk is in: answer it.  True when the answer comes later (the delivery after LAST)."""
        reader, last = self._chunk
        self._chunk = None
        transaction = reader.transaction
        if transaction.problem == "refused":
            status, text, code = self._bdatRefusal
            self._reply(status, text, code=code)
            return False
        if transaction is not self._bdat or transaction.problem is not None:
            self._bdat = None
            self._endOfData(transaction)  # refused (too big, disk): the transaction ends
            return False
        if not last:
            self._reply(250, b"%d octets received" % transaction.size, code="2.0.0")
            return False
        self._bdat = None
        transaction.finish()
        self._hold()
        self._endOfData(transaction)
        return transaction.problem is None

    def _openSpool(self) -> bool:
        self._queueId = self._transaction.id if self._transaction is not None else uuid.uuid4().hex[:12].upper()
        self._spool = Spool(self.factory.spool, budget=self.factory.spoolMemory)
        self._spool.write(self._traceHeaders())
        return True

    def _traceHeaders(self) -> bytes:
        """Return-Path and Received (RFC 5321 4.4, with TLS and login as RFC 8314 7.4 asks)."""
        with_ = "ESMTP" if getattr(self, "_esmtp", True) else "SMTP"
        tls = ""
        if self.secure:
            with_ += "S"
            tls = self._tlsInfo()
        if self.user is not None:
            with_ += "A"
        auth = f"\n\t(authenticated user {self.user})" if self.user else ""
        forWhom = f"\n\tfor <{self._rcpts[0][0]}>" if len(self._rcpts) == 1 else ""
        helo = re.sub(r"[^\x21-\x7e]", "?", self._helo or "unknown")
        received = (f"Received: from {helo} ([{self.peerHost}]){tls}{auth}\n\tby {self.factory.hostname} (pymaild) with {with_}"
                    f" id {self._queueId}{forWhom};\n\t{formatdate(time.time())}\n")
        returnPath = f"Return-Path: <{self._from}>\n".encode("utf-8", "replace")
        self._returnPathLength = len(returnPath)  # (the queue's copy goes without it: RFC 5321 4.4)
        trace = returnPath + received.encode("utf-8", "replace")
        self._traceLength = len(trace)  # (plugins' header fields go after it)
        return trace

    def _tlsInfo(self) -> str:
        try:
            connection = self.transport.getHandle()
            return f"\n\t(using {connection.get_protocol_version_name()} with cipher {connection.get_cipher_name()})"
        except Exception:  # not an OpenSSL connection (tests on StringTransport)
            return ""

    _chunk = None  # (ChunkReader, last) while a BDAT chunk arrives

    def rawDataReceived(self, data):
        if self._closing:
            return
        if self._chunk is not None:
            self.resetTimeout()
            rest = self._chunk[0].feed(data)
            if rest is None:
                return
            self.setLineMode()
            self.setTimeout(self.factory.commandTimeout)
            self._buffer = rest + self._buffer
            self._hold()  # no command before this chunk's reply (or, after LAST, the delivery)
            if not self._chunkDone():
                self._release()
            return
        if self._reader is None:
            return
        self.resetTimeout()
        reader = self._reader
        try:
            rest = reader.feed(data)
        except OSError:
            log.failure("smtp spool write")
            reader.problem = "disk"
            rest = None
        if rest is None:
            return
        self._reader = None
        self.setLineMode()  # (LineReceiver keeps the rest until we resume)
        self.setTimeout(self.factory.commandTimeout)
        self._hold()
        self._buffer = rest + self._buffer
        self._endOfData(reader)

    def _endOfData(self, reader):
        problem = reader.problem
        if problem is not None:
            self._dropSpool()
            if problem == DISK:
                log.error("smtp spool: {error}", error=reader.error)
            status = {DISK: (452, b"Insufficient system storage, try again later", "4.3.1"),
                      BARE_LF: (550, b"Message refused: bare LF in the data (RFC 5321 2.3.8)", "5.6.0"),
                      BARE_CR: (550, b"Message refused: bare CR in the data (RFC 5321 2.3.8)", "5.6.0"),
                      LINE_TOO_LONG: (500, b"Line too long in the data (RFC 5321 4.5.3.1.6)", "5.5.2"),
                      TOO_BIG: (552, b"Message size exceeds fixed maximum message size", "5.3.4")}.get(
                          problem, (451, b"Temporary local problem, try again later", "4.3.0"))
            log.info("smtp message from {peer} refused: {problem}", peer=self.peerHost, problem=problem)
            self._from, self._rcpts = None, []
            self._reply(status[0], status[1], code=status[2])
            self._release()
            return
        spool, self._spool = self._spool, None
        pipeline = self._pipeline
        if pipeline is not None and (pipeline.has("data") or pipeline.has("delivery")):
            d = self._pluginStages(spool)
            d.addErrback(lambda f: (spool.discard(), f)[1])
            d.addErrback(self._notDelivered)  # (a bug of ours: 451, never a lost message)
            return
        self._store(spool)

    @inlineCallbacks
    def _pluginStages(self, spool):
        """The data stage, then the delivery stage per local mailbox, then L{_store}."""
        pipeline = self._pipeline
        source = spool.source()
        if pipeline.has("data"):
            head = readHead(source) if isinstance(source, bytes) else (yield self.factory.run(readHead, source))
            opener = (lambda: io.BytesIO(source)) if isinstance(source, bytes) else (lambda: open(source, "rb"))
            outcome = yield pipeline.run("data", self.session, self._transaction, Message(head, spool.size, opener))
            if self._lost:
                spool.discard()
                return
            if outcome.verdict.refuses:
                spool.discard()
                self._from, self._rcpts = None, []
                self._refused(outcome, 550, "5.7.1", "Message refused by policy", "data")
                self._release()
                return
            self._take(outcome)
        placements, dropped = {}, set()
        if pipeline.has("delivery"):
            first = {}
            for address, users, _, _ in self._rcpts:
                for user in sorted(users):
                    first.setdefault(user, address)
            for user, address in first.items():
                outcome = yield pipeline.run("delivery", self.session, self._transaction, Delivery(user, address))
                if self._lost:
                    spool.discard()
                    return
                if outcome.action == "tempfail":
                    spool.discard()
                    self._from, self._rcpts = None, []
                    self._refused(outcome, 451, "4.7.1", "Try again later", "delivery")
                    self._release()
                    return
                if outcome.action == "reject":
                    log.info("smtp message {id}: the copy for {user} dropped by plugin {plugin}", id=self._queueId,
                             user=user, plugin=outcome.plugin)
                    dropped.add(user)
                elif outcome.folder or outcome.flags or outcome.headers:
                    placements[user] = (outcome.folder, tuple(outcome.flags), fieldLines(outcome.headers),
                                        self._traceLength)
        self._store(spool, placements, dropped)

    def _store(self, spool, placements=None, dropped=frozenset()):
        """Every local copy and the queue's, durably, then 250 (or a 4xx/5xx and nothing stored)."""
        users = sorted({user for _, us, _, _ in self._rcpts for user in us} - set(dropped))
        remote = {}
        for _, _, forwards, _ in self._rcpts:
            for address, dsn in forwards:
                remote.setdefault(normalizeAddress(address), (address, dsn))
        params = self._mailParams
        transaction = {
            "sender": self._from,
            "recipients": [(address, notify, orcpt) for address, (notify, orcpt) in remote.values()],
            "ret": params.get(b"RET", b"").upper().decode("ascii") or None,
            "envid": params.get(b"ENVID", b"").decode("ascii") or None,
            "body": params.get(b"BODY", b"").upper().decode("ascii") or None,
            "smtputf8": self._utf8,
            "client": {"helo": self._helo, "address": self.peerHost, "user": self.user, "id": self._queueId},
            "skip": self._returnPathLength,
            # RFC 3461 6.2: local recipients whose sender asked NOTIFY=SUCCESS get a report
            "delivered": [(address, dsn[1]) for address, us, _, dsn in self._rcpts
                          if us and dsn[0] and "SUCCESS" in dsn[0]] if self._from else [],
        }

        headers, remove, quarantined = self._pluginHeaders, self._pluginRemove, self._quarantine
        traceLength = self._traceLength

        def work():
            queued = None
            cleanup = None
            try:
                source = spool.source()
                hops = countReceived(source)
                if hops > self.factory.maxHops:
                    raise MailLoop(hops)
                if headers or remove:
                    source, cleanup = edit(source, traceLength, headers, remove, self.factory.spool)
                if quarantined is not None:
                    return "quarantine:" + self.factory.quarantine(source, transaction, users, quarantined)
                if transaction["recipients"]:
                    # fsynced in the queue's tmp/ first; in the queue (and so to be sent)
                    # only once every local copy is stored too: all or none
                    queued = self.factory.enqueue(source, transaction)
                if users:
                    if placements:
                        self.factory.deliver(source, users, placements)
                    else:
                        self.factory.deliver(source, users)
                if queued is not None:
                    queued.commit()
                if transaction["delivered"] and self.factory.reportDelivered is not None:
                    try:  # (advice to the sender: a failure here does not undo the delivery)
                        self.factory.reportDelivered(source, transaction)
                    except Exception:
                        log.failure("smtp: delivery report for {id}", id=self._queueId)
                if queued is not None:
                    return queued.id
            except BaseException:
                if queued is not None:
                    queued.abort()
                raise
            finally:
                spool.discard()
                if cleanup is not None:
                    cleanup()

        # no timeout while the disk works: a 421 now would make the sender send it again
        self.setTimeout(None)
        d = self.factory.run(work)
        d.addCallback(self._queued)
        d.addCallbacks(self._delivered, self._notDelivered, (len(users),))
        d.addBoth(lambda _: None if self._lost else self.setTimeout(self.factory.commandTimeout))

    def _queued(self, queueId):
        if queueId is not None and queueId.startswith("quarantine:"):
            log.info("smtp message {id} from <{sender}> quarantined as {quarantineId}: {reason}", id=self._queueId,
                     sender=self._from, quarantineId=queueId[11:], reason=self._quarantine)
        elif queueId is not None:
            log.info("smtp message {id} from <{sender}> queued as {queueId}", id=self._queueId,
                     sender=self._from, queueId=queueId)
            self.factory.queued(queueId)

    def _delivered(self, _, count):
        log.info("smtp message {id} from <{sender}> delivered to {count} mailboxes", id=self._queueId,
                 sender=self._from, count=count)
        self._from, self._rcpts = None, []
        if not self._lost:
            self._reply(250, b"OK: queued as " + self._queueId.encode(), code="2.0.0")
        self._release()

    def _notDelivered(self, failure):
        self._from, self._rcpts = None, []
        if failure.check(MailLoop):
            log.info("smtp message {id} from {peer} refused: {hops} Received headers (a mail loop)",
                     id=self._queueId, peer=self.peerHost, hops=failure.value.args[0])
            if not self._lost:
                self._reply(554, b"Too many hops, the message is looping", code="5.4.6")
            self._release()
            return
        log.failure("smtp delivery of {id}", failure, id=self._queueId)
        if not self._lost:
            if type(failure.value).__name__ == "QuotaExceeded":
                # a mailbox filled up since RCPT: the others must not lose the message, so all
                # of it is refused for now (RCPT refuses that recipient for good next time)
                self._reply(452, b"Mailbox full, try again later", code="4.2.2")
            else:
                self._reply(451, b"Local delivery failed, try again later", code="4.3.0")
        self._release()

    def _dropSpool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.discard()
        self._reader = None


class SMTPFactory(protocol.ServerFactory):
    """
    Builds L{PymaildESMTP} for one listener.

    @ivar implicitTLS: whether the listener is TLS from the first byte (465).
    @ivar submission: a submission listener (587, 465): AUTH before MAIL.
    """

    tooManyConnections = b"421 4.7.0 Too many connections, try again later\r\n"
    noisy = False

    def __init__(self, hostname: str, tls, implicitTLS: bool = False, portal=None, *, submission: bool = False,
                 directory=None, run=None, spool: Path | None = None, throttle=None, clock=None,
                 trustedNetworks=(), localDomains=("localhost",), maxSize: int = 50 << 20,
                 maxRecipients: int = 1000, maxLineLength: int = 1000, bareLineEnds: str = "reject",
                 commandTimeout: float = 300.0, deliver=None, maxErrors: int = 20, hasRoom=None,
                 maxHops: int = 50, enqueue=None, queued=None, reportDelivered=None, vrfy: str = "off",
                 dataTimeout: float = 300.0, pipeline=None, quarantine=None):
        from pymaild.throttle import LoginThrottle

        self.hostname = hostname
        self.tls = tls
        self.implicitTLS = implicitTLS
        self.portal = portal
        self.submission = submission
        self.directory = directory
        self.run = run
        self.spool = Path(spool) if spool is not None else Path("spool")
        self.throttle = throttle if throttle is not None else LoginThrottle()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.trustedNetworks = tuple(trustedNetworks)
        self.localDomains = tuple(localDomains)
        self.maxSize = maxSize
        self.maxRecipients = maxRecipients
        self.maxLineLength = maxLineLength
        self.bareLineEnds = bareLineEnds
        self.commandTimeout = commandTimeout
        #: seconds a client may stay silent in the middle of DATA or a BDAT chunk
        self.dataTimeout = dataTimeout
        #: C{[smtp] vrfy}: "off" (always 252), "trusted" (answers to logged-in clients and
        #: trusted networks), "on" (answers to anyone)
        self.vrfy = vrfy
        self.maxErrors = maxErrors
        #: messages arriving on all of this listener's sessions keep at most this much in memory
        self.spoolMemory = MemoryBudget(64 << 20)
        #: more Received headers than this (ours included) is a mail loop: 554 5.4.6
        self.maxHops = maxHops
        #: C{hasRoom(user)}, blocking: whether the user's quota leaves room (RCPT checks it)
        self.hasRoom = hasRoom
        #: C{deliver(path, users)}, blocking (run in the store's threads): the spooled message
        #: at C{path} into each user's INBOX, durably, all or none (the service passes the
        #: store's L{pymaild.store.delivery.deliverToUsers})
        self.deliver = deliver
        #: C{enqueue(source, transaction)}, blocking: the message into the outbound queue's
        #: C{tmp/}, fsynced; returns a handle with C{commit()}, C{abort()} and C{id}.  None:
        #: no queue (mail for other domains gets 451 4.3.2).  C{transaction} is a dict with
        #: sender, recipients [(address, notify, orcpt)], ret, envid, body, smtputf8, client.
        self.enqueue = enqueue
        #: C{queued(id)}, on the reactor: a message was committed to the queue
        self.queued = queued or (lambda id: None)
        #: C{reportDelivered(source, transaction)}, blocking: send the sender a "delivered"
        #: DSN for C{transaction["delivered"]} (local recipients with NOTIFY=SUCCESS)
        self.reportDelivered = reportDelivered
        #: the plugins (a L{pymaild.pipeline.runner.Pipeline}), or None: no plugin is asked
        self.pipeline = pipeline
        #: C{quarantine(source, transaction, users, reason)}, blocking: hold a message a plugin
        #: quarantined (durably); returns its quarantine id
        self.quarantine = quarantine

    def buildProtocol(self, addr):
        p = PymaildESMTP()
        p.factory = self
        p.host = self.hostname
        p.portal = self.portal
        return p
