# -*- test-case-name: tests.queue.test_queue_runner -*-
"""
The wire side of outbound delivery: Twisted's C{ESMTPClient}, subclassed where it is wrong or
missing for a queue (../shared/TWISTED_MAIL.md, gaps 4 and 5):

  - DATA goes through pymaild's own encoder (L{pymaild.queue.encode.DataEncoder}): line ends
    made CRLF and dots stuffed with state carried across chunks (Twisted's C{transformChunk}
    missed a dot at a 16 KiB boundary, which smuggled a second message into the receiver);
  - the EHLO keywords are kept, so MAIL FROM carries C{SIZE}, C{BODY=8BITMIME}, C{SMTPUTF8} and
    the DSN parameters (C{RET}, C{ENVID}; C{NOTIFY}, C{ORCPT} on RCPT) when the server offers
    them, and a message that needs SMTPUTF8 is not sent to a server without it;
  - STARTTLS is opportunistic unless the policy says otherwise: the client context does not
    check the certificate for C{"may"} and C{"encrypt"} (C{"encrypt"} refuses a server without
    STARTTLS), and checks it against the host name for C{"verify"};
  - several messages go over one connection: L{QueueClient.getMailFrom} asks the connection's
    owner for the next job, and QUIT comes when there is none;
  - an RSET refused after a message ends the session instead of looping.

A L{Job} is one message for some recipients of one destination; its result
(L{Job.finished}) is a list of C{(address, code, reply)}, code C{-1} when the connection
failed before the server answered for that recipient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic

from pymaild.queue.encode import DataEncoder

log = Logger()


def xtext(value: str) -> bytes:
    """RFC 3461 4: C{+XX} for '+', '=', controls, space and non-ASCII."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)


@dataclass
class Job:
    """
    One message to some recipients of one destination.

    @ivar path: the message file (LF line ends).
    @ivar fd: a descriptor open on it for as long as the job runs (the message's lock), or None.
    @ivar recipients: L{pymaild.queue.files.Recipient}s (address, orcpt, notify).
    """

    id: str
    sender: str
    recipients: list
    path: str
    size: int = 0
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    fd: int | None = None
    finished: Deferred = field(default_factory=Deferred)
    #: where it went: the host name and whether the server offered DSN (NOTIFY=SUCCESS is
    #: passed on to it, or reported by us as "relayed")
    remoteMta: str | None = None
    remoteDSN: bool = False
    tls: str | None = None

    def report(self, results: list[tuple[str, int, str]]) -> None:
        if not self.finished.called:
            self.finished.callback(results)

    def failAll(self, code: int, reply: str) -> None:
        self.report([(r.address, code, reply) for r in self.recipients])


class QueueClient(smtp.ESMTPClient):
    """
    One outbound SMTP connection, carrying the jobs its owner (a L{pymaild.queue.runner}
    connection attempt) hands out.

    @ivar owner: has C{nextJob()} (a L{Job} or None), C{sessionFailed(reason)} (the server
    refused us before any transaction: greeting, EHLO, STARTTLS, AUTH) and
    C{sessionEnded()}.
    """

    debug = True  # (keeps the last lines for error messages)
    heloFallback = True

    def __init__(self, owner, identity: str, tlsOptions=None, requireTLS: bool = False,
                 secret: bytes | None = None, authUser: bytes | None = None, timeout: float = 300.0):
        super().__init__(secret, tlsOptions, identity.encode("idna") if not identity.isascii() else identity)
        self.owner = owner
        self.requireTransportSecurity = requireTLS
        self.requireAuthentication = secret is not None
        self.timeout = self.commandTimeout = timeout
        self.extensionsOffered: dict[bytes, bytes | None] = {}
        self.job: Job | None = None
        self.transactions = 0
        self._failed = False
        self._quitting = False
        if secret is not None:
            self.registerAuthenticator(_Plain(authUser))
            self.registerAuthenticator(smtp.LOGINAuthenticator(authUser))

    # --- session set-up -------------------------------------------------------------------

    def esmtpState_serverConfig(self, code, resp):
        items = {}
        for line in resp.splitlines():
            words = line.split(None, 1)
            if words:
                items[words[0].upper()] = words[1] if len(words) > 1 else None
        self.extensionsOffered = items
        self._tlsStarted = False  # (EHLO answered over TLS: the handshake worked)
        self.tryTLS(code, resp, items)

    #: STARTTLS was accepted but the session never got to EHLO over TLS (a failed handshake):
    #: with opportunistic TLS the owner tries the same address again in plain text
    tlsFailed = False
    _tlsStarted = False

    def esmtpTLSFailed(self, code=-1, resp=None):
        self._tlsStarted = True  # (STARTTLS refused, e.g. 454: also worth a plain-text try)
        super().esmtpTLSFailed(code, resp)

    #: a reply longer than this many lines is an attack or a broken server
    MAX_REPLY_LINES = 100

    def lineReceived(self, line):
        if len(self.resp) >= self.MAX_REPLY_LINES:
            self.sendError(smtp.SMTPProtocolError(-1, b"reply of more than %d lines" % self.MAX_REPLY_LINES,
                                                  self.log.str()))
            self.transport.abortConnection()
            return
        return super().lineReceived(line)

    def esmtpState_starttls(self, code, resp):
        self._tlsStarted = True
        self.transport.startTLS(self.context)
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def sendError(self, exc):
        """Before a transaction: the owner tries the next host; during one: the job is deferred."""
        if not self._failed:
            self._failed = True
            reply = _text(getattr(exc, "resp", b"") or str(exc))
            code = getattr(exc, "code", -1)
            if self.job is not None:
                job, self.job = self.job, None
                job.failAll(code if isinstance(code, int) and code >= 400 else -1, reply or "connection failed")
            else:
                self.owner.sessionFailed(code if isinstance(code, int) else -1, reply)
        super().sendError(exc)

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.tlsFailed = self._tlsStarted
        if self.job is not None:
            job, self.job = self.job, None
            job.failAll(-1, f"lost connection with {self.owner.hostName} while sending message {job.id}")
        elif not self._failed and not self._quitting:
            self._failed = True
            self.owner.sessionFailed(-1, f"lost connection with {self.owner.hostName}: {reason.getErrorMessage() if reason else ''}")
        self.owner.sessionEnded()

    def timeoutConnection(self):
        self.sendError(smtp.SMTPTimeoutError(-1, b"timed out waiting for the server", self.log.str()))
        self.transport.abortConnection()

    # --- transactions ---------------------------------------------------------------------

    def getMailFrom(self):
        self.job = self.owner.nextJob()
        if self.job is None:
            return None
        self.job.remoteMta = self.owner.hostName
        self.job.remoteDSN = b"DSN" in self.extensionsOffered
        self.job.tls = "TLS" if self._tlsMode else None
        return self.job.sender

    def smtpState_from(self, code, resp):
        self._from = self.getMailFrom()
        self._failresponse = self.smtpTransferFailed
        if self._from is None:
            # a job on its way: wait for it once (the owner says when), else QUIT
            park = getattr(self.owner, "park", None)
            if not self._parked and park is not None and park(self._unparked):
                self._parked = True
                return
            self._quitting = True
            self._disconnectFromServer()
            return
        self._parked = False
        job, offered = self.job, self.extensionsOffered
        if job.smtputf8 and b"SMTPUTF8" not in offered:
            self.sentMail(553, b"5.6.7 the message needs SMTPUTF8, which the server does not offer", 0, [], self.log)
            self._okresponse = self.smtpState_from
            self.smtpState_from(250, b"")
            return
        words = [b"MAIL FROM:<" + job.sender.encode("utf-8") + b">"]
        if b"SIZE" in offered and job.size:
            words.append(b"SIZE=%d" % job.size)
        if job.body in ("8BITMIME", "BINARYMIME") and b"8BITMIME" in offered:
            words.append(b"BODY=8BITMIME")
        if job.smtputf8:
            words.append(b"SMTPUTF8")
        if b"DSN" in offered:
            if job.ret:
                words.append(b"RET=" + job.ret.encode("ascii"))
            if job.envid:
                words.append(b"ENVID=" + job.envid.encode("ascii"))
        if b"PIPELINING" not in offered:
            self.sendLine(b" ".join(words))
            self._expected = [250]
            self._okresponse = self.smtpState_to
            return
        # RFC 2920: MAIL, every RCPT and DATA in one write; the replies come back in order
        self.sendLine(b" ".join(words))
        for recipient in job.recipients:
            self.sendLine(self._rcptLine(recipient))
        self.sendLine(b"DATA")
        self._replies = []
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = self._pipelinedReply

    def _pipelinedReply(self, code, resp):
        self._replies.append((code, resp))
        job = self.job
        if len(self._replies) < len(job.recipients) + 2:
            return
        (mailCode, mailResp), rcpts, (dataCode, dataResp) = self._replies[0], self._replies[1:-1], self._replies[-1]
        self._replies = []
        self.toAddressesResult, self.successAddresses = [], []
        if 200 <= mailCode < 300:
            for recipient, (rcptCode, rcptResp) in zip(job.recipients, rcpts):
                self.toAddressesResult.append((recipient, rcptCode, rcptResp))
                if 200 <= rcptCode < 300:
                    self.successAddresses.append(recipient)
        if dataCode == 354 and self.successAddresses:
            self._failresponse = self.smtpTransferFailed
            return self.smtpState_data(dataCode, dataResp)
        if not 200 <= mailCode < 300:
            self.sentMail(mailCode, mailResp, 0, [], self.log)
        elif not self.successAddresses:
            self.sentMail(rcpts[-1][0] if rcpts else dataCode, b"No recipients accepted", 0,
                          self.toAddressesResult, self.log)
        else:
            self.sentMail(dataCode, dataResp, len(self.successAddresses), self.toAddressesResult, self.log)
        self._from = None
        if dataCode == 354:
            # (a server that took DATA with nothing to deliver: end it empty, then start over)
            self.transport.write(b".\r\n")
            self._expected = range(0, 1000)
            self._okresponse = self._failresponse = lambda code, resp: self._rset()
            return
        self._rset()

    def _rset(self):
        self.sendLine(b"RSET")
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = lambda code, resp: self._disconnectFromServer()

    def _rcptLine(self, recipient) -> bytes:
        line = b"RCPT TO:<" + recipient.address.encode("utf-8") + b">"
        if b"DSN" in self.extensionsOffered:
            if recipient.notify:
                line += b" NOTIFY=" + ",".join(recipient.notify).encode("ascii")
            if recipient.orcpt:
                kind, _, address = recipient.orcpt.partition(";")
                line += b" ORCPT=" + kind.strip().encode("ascii", "replace") + b";" + xtext(address.strip())
        return line

    def getMailTo(self):
        return list(self.job.recipients)

    def smtpState_toOrData(self, code, resp):
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if 200 <= code < 300:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if self.successAddresses:
                self.sendLine(b"DATA")
                self._expected = [354]
                self._okresponse = self.smtpState_data
            else:
                return self.smtpState_msgSent(code, b"No recipients accepted")
        else:
            self.sendLine(self._rcptLine(self.lastAddress))

    _parked = False

    def _unparked(self):
        if self.transport is not None and not self._failed and not getattr(self.transport, "disconnecting", False):
            self.smtpState_from(250, b"")

    #: a message file of at most this many bytes is read in one go, from the descriptor its
    #: lock holds open (no path looked up, no file opened on the reactor), and written with
    #: its final dot in one write (FileSender, whose first chunk is as large, reads it as
    #: whole, then costs a producer cycle and a second write for the dot); a larger one is
    #: streamed
    WHOLE_AT_MOST = basic.FileSender.CHUNK_SIZE

    def smtpState_data(self, code, resp):
        encoder = DataEncoder()
        job = self.job
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_msgSent
        if job.fd is not None:
            whole = os.pread(job.fd, self.WHOLE_AT_MOST + 1, 0)
            if len(whole) <= self.WHOLE_AT_MOST:
                self.transport.write(encoder.feed(whole) + encoder.finish())
                self._dotSent()
                return
        self._file = open(job.path, "rb")
        sender = basic.FileSender()

        def transform(chunk):
            self.resetTimeout()
            return encoder.feed(chunk)

        d = sender.beginFileTransfer(self._file, self.transport, transform)

        def done(_):
            self._file.close()
            self.transport.write(encoder.finish())
            self._dotSent()

        def failed(reason):
            self._file.close()
            self.sendError(reason.value)

        d.addCallbacks(done, failed)

    _dataSent = False

    def _dotSent(self):
        self._dataSent = True
        # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final dot (content checks)
        self.setTimeout(max(self.timeout or 0, 600.0))

    def smtpState_msgSent(self, code, resp):
        self.setTimeout(self.commandTimeout)
        if self._from is not None:
            self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
        self.toAddressesResult = []
        self._from = None
        if self._dataSent:
            # the reply to the final dot ends the transaction, whatever it says: the next MAIL
            # needs no RSET (RFC 5321 4.1.1.4)
            self._dataSent = False
            self.smtpState_from(code, resp)
            return
        self._rset()

    def sentMail(self, code, resp, numOk, addresses, log):
        job, self.job = self.job, None
        if job is None:
            return
        self.transactions += 1
        final = _text(resp)
        results = []
        byRecipient = {id(r): (c, _text(text)) for r, c, text in addresses}
        for recipient in job.recipients:
            rcpt = byRecipient.get(id(recipient))
            if rcpt is not None and not 200 <= rcpt[0] < 300:
                results.append((recipient.address, rcpt[0], rcpt[1]))  # refused at RCPT
            elif rcpt is None and not addresses:
                results.append((recipient.address, code, final))  # MAIL refused, or never asked
            else:
                results.append((recipient.address, code, final))
        job.report(results)


class _Plain:
    """
    SASL PLAIN with an empty authorisation identity (RFC 4616): Twisted's repeats the user
    name there, which some servers take as a request to act as another user and refuse.
    """

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"PLAIN"

    def challengeResponse(self, secret: bytes, chal) -> bytes:
        return b"\0" + self.user + b"\0" + secret


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())
