# -*- test-case-name: tests.pipeline.test_pipeline -*-
"""
The stages of a message's life where plugins are asked, in the order they happen, and the
objects each stage's hook receives.  This list is the one place the order is written down;
C{tests/pipeline/test_stage_order.py} checks a real SMTP session against it.

SMTP (ports 25, 587, 465), per connection and per message::

  stage      interface        method                                      when
  connect    IConnectHook     connect(session)                            before the greeting
  helo       IHeloHook        helo(session)                               EHLO/HELO accepted (session.helo set)
  auth       IAuthHook        auth(session, login, succeeded)             after the password check
  mail       IMailHook        mailFrom(session, transaction)              MAIL FROM passed pymaild's checks
  rcpt       IRcptHook        rcptTo(session, transaction, recipient)     RCPT TO passed pymaild's checks
  data       IDataHook        endOfData(session, transaction, message)    the whole message is in, before the reply
  delivery   IDeliveryHook    deliver(session, transaction, delivery)     once per local mailbox, before it is written
  (the 250 reply: the message is on disk)

Outbound queue, per recipient::

  queue      IQueueHook       queueEvent(event)                           deferred, delivered, bounced

IMAP and POP3, per login::

  login      ILoginHook       login(session, login, succeeded)            after the password check

What a verdict does at each stage (anything not listed: continue):

  - C{reject}/C{tempfail}: connect: the greeting is the refusal and the connection closes;
    helo, mail, rcpt, data: that command is refused with the verdict's code (rcpt: only that
    recipient); auth and login (succeeded): the login is refused as a wrong password would be
    (a tempfail as a temporary failure); delivery: a tempfail refuses the whole message (4xx,
    nothing is delivered), a reject drops that mailbox's copy (logged; the others get theirs).
    The default codes: connect 554 5.7.1, helo 550 5.7.1, mail 550 5.7.1, rcpt 550 5.7.1,
    data 550 5.7.1; tempfail 451 4.7.1.
  - C{accept}: the later plugins of the same stage are skipped (a whitelist placed first).
  - C{addHeaders}: at connect, helo, mail, rcpt and data, the fields are added to the message
    (after pymaild's Return-Path and Received); at delivery, to that mailbox's copy only.
  - C{removeHeaders}: at data: the fields are removed (pymaild's trace fields excepted).
  - C{quarantine}: at mail, rcpt or data: the message is accepted (250) and held in
    C{<data_dir>/quarantine/} instead of delivered (C{pymaildctl quarantine}).
  - C{fileInto}: at delivery: the folder and flags of that copy.
  - queue events and failed logins are reports: their verdicts are ignored.

A hook that raises, or does not answer within its plugin's C{timeout}, gets its plugin's
C{on_error} policy: C{continue} (fail open) or C{tempfail} (fail closed: 451 4.3.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from pymaild import interfaces as i

#: (stage, interface, method), in the order of a message's life
STAGES = (
    ("connect", i.IConnectHook, "connect"),
    ("helo", i.IHeloHook, "helo"),
    ("auth", i.IAuthHook, "auth"),
    ("mail", i.IMailHook, "mailFrom"),
    ("rcpt", i.IRcptHook, "rcptTo"),
    ("data", i.IDataHook, "endOfData"),
    ("delivery", i.IDeliveryHook, "deliver"),
    ("queue", i.IQueueHook, "queueEvent"),
    ("login", i.ILoginHook, "login"),
)

STAGE_NAMES = tuple(s[0] for s in STAGES)


@dataclass
class Session:
    """
    One client connection.

    @ivar id: a short unique id, as in the logs.
    @ivar protocol: C{"smtp"} (port 25), C{"submission"} (587, 465), C{"imap"} or C{"pop3"}.
    @ivar peer: the client's IP address (text); C{peerPort} its port.
    @ivar tls: whether the connection is encrypted now.
    @ivar trusted: whether the client is in C{[smtp] trusted_networks}.
    @ivar helo: the EHLO/HELO name (SMTP), or C{None}.
    @ivar user: the logged-in account, or C{None}.
    @ivar data: scratch space for plugins, kept for the session: use your plugin's name as key.
    """

    id: str
    protocol: str
    peer: str
    peerPort: int = 0
    localPort: int = 0
    tls: bool = False
    trusted: bool = False
    helo: str | None = None
    user: str | None = None
    data: dict = field(default_factory=dict)

    @classmethod
    def of(cls, transport, protocol: str, peer: str, **kw) -> "Session":
        """A new session for a connection (a new id; the ports from the transport)."""
        import uuid

        remote, local = transport.getPeer(), transport.getHost()
        return cls(uuid.uuid4().hex[:10].upper(), protocol, peer, getattr(remote, "port", 0),
                   getattr(local, "port", 0), **kw)


@dataclass
class Recipient:
    """
    One accepted recipient.

    @ivar address: as the client gave it.
    @ivar kind: C{"user"}, C{"alias"}, C{"group"} (local) or C{"remote"}.
    @ivar users: the local accounts it reaches.
    @ivar remote: the addresses outside the local domains it reaches (queued).
    """

    address: str
    kind: str
    users: frozenset = frozenset()
    remote: tuple = ()


@dataclass
class Transaction:
    """
    One message being received: from MAIL FROM to the reply after its data.

    @ivar id: its id (the one in its Received field and the logs).
    @ivar sender: the MAIL FROM address (C{""}: the null sender).
    @ivar params: the MAIL FROM parameters (C{{"SIZE": "1234", "BODY": "8BITMIME", ...}}).
    @ivar recipients: the L{Recipient}s accepted so far.
    """

    id: str
    sender: str
    params: dict = field(default_factory=dict)
    recipients: list = field(default_factory=list)


class Message:
    """
    The message at end of data.

    @ivar head: its header block as bytes (LF line ends; pymaild's Return-Path and Received
        first).
    @ivar headers: the same, parsed (an C{email.message.EmailMessage} with headers only),
        parsed the first time it is read; L{get} reads one field without parsing the rest.
    @ivar size: its size in bytes.
    @ivar open: C{open()} gives a new binary file object positioned at the first byte of the
        message (its header), never the whole message in memory.
    """

    def __init__(self, head: bytes, size: int, open: Callable[[], BinaryIO]):
        self.head = head
        self.size = size
        self.open = open
        self._headers = None

    def get(self, name: str, default=None):
        """
        The first field called C{name}, unfolded and decoded (RFC 2047), or C{default}: quicker
        than C{headers[name]}, which parses every field.
        """
        import re

        from pymaild.mime import decodeHeader

        m = re.search(rb"(?im)^" + re.escape(name.encode("ascii")) + rb"[ \t]*:(.*(?:\n[ \t].*)*)", self.head)
        if m is None:
            return default
        return decodeHeader(re.sub(rb"\n(?=[ \t])", b"", m.group(1)).strip())

    @property
    def headers(self):
        if self._headers is None:
            from email import policy
            from email.parser import BytesHeaderParser

            self._headers = BytesHeaderParser(policy=policy.default).parsebytes(self.head)
        return self._headers


@dataclass
class Delivery:
    """
    One local mailbox's copy of the message.

    @ivar user: the account.
    @ivar recipient: the address that led to it (an alias or a group's, or the user's own).
    """

    user: str
    recipient: str


@dataclass
class QueueEvent:
    """
    What happened to one recipient of a queued message.

    @ivar kind: C{"deferred"} (will be retried), C{"delivered"} or C{"bounced"} (failed for
        good; the sender gets a DSN unless it was the null sender).
    @ivar id: the queue id; C{sender}, C{recipient}: the envelope addresses.
    @ivar reply: the last SMTP reply or the reason, as text.
    """

    kind: str
    id: str
    sender: str
    recipient: str
    reply: str = ""
