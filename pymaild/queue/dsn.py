# -*- test-case-name: tests.queue.test_queue_dsn -*-
"""
Delivery Status Notifications: the message the outbound queue sends back to a message's
envelope sender when it gives up on some recipients (a C{5xx} reply, a domain that does not
exist, a message that expired after days of retries), and, when asked for, when delivery is
delayed or has succeeded.

The message is a C{multipart/report} (RFC 6522) of three parts:

  1. C{text/plain}: what happened, for a person (in the manner of Postfix's bounce messages);
  2. C{message/delivery-status} (RFC 3464 2.2, 2.3): the same for programs, with the status
     codes of RFC 3463 and the C{ENVID}/C{ORCPT} values of the DSN SMTP extension (RFC 3461);
     C{message/global-delivery-status} with UTF-8 and C{utf-8} address types when an address
     is not ASCII (RFC 6533 3, 4);
  3. the original message (C{RET=FULL}, RFC 3461 4.3) as C{message/rfc822} (C{message/global}
     when its header has 8-bit octets, RFC 6532 3.7), or only its header block
     (C{text/rfc822-headers}, RFC 6522 4; C{message/global-headers}, RFC 6533 5).

L{writeDSN} writes it to a binary file with LF line ends, as the store keeps messages; the
original is copied in pieces, never read whole (it may be tens of megabytes), and its own line
ends are kept as they are.  The DSN goes out with the null reverse path (RFC 3464 2,
RFC 5321 4.5.5); the caller never sends one for a message whose sender was null
(L{isBounce}), so two servers never bounce bounces at each other.

Security: every value that came from outside (the remote SMTP replies above all, but also
addresses, host names and the envelope id) is made one line of printable text before it is
written: control characters, CR, LF and Unicode line separators become a space, so a reply
cannot add a header, a delivery-status field or a MIME boundary; values are cut to
L{MAX_VALUE} octets and folded, so no line is longer than RFC 5322's 998.  The MIME boundary
is random and checked against the part of the original that is copied.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import BinaryIO, Sequence

#: the RFC 3464 2.3.3 actions
FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED = "failed", "delayed", "delivered", "relayed", "expanded"
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"

#: octets read from the original at a time
CHUNK = 64 * 1024
#: longest value from outside (a reply, an address) written into a field, in octets
MAX_VALUE = 900

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_FALLBACK_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0"}  # the others: 2.0.0
# C0, DEL, C1 (with NEL) and the Unicode line and paragraph separators: every character that
# some reader may take as a line end, or that has no business in a header
_BREAK = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_JOIN = re.compile("[ \n]*\n[ \n]*")

#: what an enhanced status code means to a person (RFC 3463 3, by subject and detail)
_MEANING = {
    "1.1": "the mailbox does not exist",
    "1.2": "the recipient's domain does not exist or does not receive mail",
    "1.3": "the address is not valid",
    "1.6": "the recipient has moved and left no forwarding address",
    "1.10": "the recipient's domain does not accept mail (null MX)",
    "2.1": "the mailbox is disabled and does not accept messages",
    "2.2": "the recipient's mailbox is full",
    "2.3": "the message is larger than the recipient accepts",
    "3.4": "the message is larger than the receiving system accepts",
    "4.1": "the recipient's mail server did not answer",
    "4.2": "the connection to the recipient's mail server was broken",
    "4.4": "no mail server could be found for the recipient's domain",
    "4.7": "the message could not be delivered in time and has expired",
    "7.1": "the receiving system refused the message",
    "7.26": "the message failed the receiving system's authentication checks",
}
_SUBJECT_MEANING = {
    "1": "there is a problem with the address",
    "2": "there is a problem with the recipient's mailbox",
    "3": "there is a problem with the receiving mail system",
    "4": "there is a network or routing problem",
    "5": "the mail systems could not understand each other",
    "6": "there is a problem with the message's content",
    "7": "the message was refused for a security or policy reason",
}


@dataclass(frozen=True)
class RecipientReport:
    """
    What happened to one recipient: one per-recipient block of the report (RFC 3464 2.3).

    @ivar address: the final recipient, as the queue tried it.
    @ivar action: one of L{ACTIONS}.
    @ivar status: the enhanced status code (RFC 3463), e.g. C{"5.1.1"}; a malformed one is
        reported as C{X.0.0} of the action's class.
    @ivar original: the C{ORCPT} value given at C{RCPT}, decoded from xtext: C{"rfc822;addr"}
        (a value without a type is taken as C{rfc822}); C{None} if none was given.
    @ivar remoteMta: the host name that answered, if any.
    @ivar diagnostic: the remote SMTP reply, possibly of several lines (they are joined with
        a space).
    @ivar lastAttempt: the time of the last delivery attempt (Unix time).
    @ivar willRetryUntil: for C{"delayed"}: when the queue gives up (Unix time).
    """

    address: str
    action: str
    status: str
    original: str | None = None
    remoteMta: str | None = None
    diagnostic: str | None = None
    lastAttempt: float | None = None
    willRetryUntil: float | None = None


def isBounce(sender: str) -> bool:
    """
    Whether C{sender} is the null reverse path (C{""} or C{"<>"}): the message is itself a
    notification, and no DSN is ever sent about it (RFC 3464 2, RFC 5321 4.5.5).
    """
    return sender.strip() in ("", "<>")


def writeDSN(out: BinaryIO, *, reportingMta: str, sender: str,
             recipients: Sequence[RecipientReport], original: BinaryIO, ret: str | None,
             envid: str | None, arrival: float, now: float, messageId: str,
             fullLimit: int = 10 << 20) -> None:
    """
    Write the DSN about C{original} for C{recipients} to C{out}.

    The original is returned whole (C{message/rfc822} or C{message/global}) when the sender
    asked for it with C{RET=FULL}, the report tells of a failure (RFC 3461 4.3 asks for the
    content in I{failed} DSNs; delay and success reports carry the header only) and it is no
    larger than C{fullLimit} octets; otherwise only its header block is returned.

    @param out: where the message goes (binary, LF line ends).
    @param reportingMta: our host name: C{Reporting-MTA} and the C{From} address's domain.
    @param sender: the original envelope sender, the DSN's C{To}.
    @param recipients: one report per recipient (at least one), in the order to list them.
    @param original: the message as stored, positioned at its start; it must be seekable (it
        is read twice: once to learn its size, its header block and whether it has 8-bit
        octets, once to copy it), and it is read L{CHUNK} octets at a time.
    @param ret: C{"FULL"}, C{"HDRS"} or C{None} (the C{RET} parameter of C{MAIL}).
    @param envid: the C{ENVID} parameter of C{MAIL}, xtext as received, or C{None}.
    @param arrival: when the original arrived (Unix time): C{Arrival-Date}.
    @param now: the time of the report (Unix time): C{Date}.
    @param messageId: the DSN's Message-ID, without angle brackets.
    @param fullLimit: the largest original returned whole, in octets.
    @raise ValueError: no recipients, an unknown action, or a null C{sender} (never bounce a
        bounce).
    """
    if isBounce(sender):
        raise ValueError("no DSN is sent to the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
    actions = {r.action for r in recipients}
    utf8 = not sender.isascii() or any(not r.address.isascii() or not _orcpt(r.original)[1].isascii()
                                       for r in recipients)

    start = original.tell()
    size = original.seek(0, 2) - start
    full = (ret or "").upper() == "FULL" and FAILED in actions and size <= fullLimit
    while True:
        boundary = "pymaild-dsn-" + secrets.token_hex(16)
        survey = _survey(original, start, full, boundary.encode("ascii"))
        if not survey.boundaryFound:
            break

    eightBit = utf8 or survey.eightBit
    text = _humanText(reportingMta, recipients, actions, full, utf8)
    status = _statusText(reportingMta, recipients, envid, arrival, utf8)
    encoding = "utf-8" if utf8 else "ascii"

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(reportingMta, utf8)}>",
        f"To: {_clean(_unbracket(sender), utf8)}",
        f"Subject: {_subject(actions)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{_clean(messageId.strip().strip('<>'), False)}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eightBit else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}",
        "",
        "",
    ]
    out.write("\n".join(head).encode(encoding))
    out.write(text.encode(encoding))
    statusType = "message/global-delivery-status" if utf8 else "message/delivery-status"
    out.write("\n".join([
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {statusType}",
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}",
        "",
        "",
    ]).encode(encoding))
    out.write(status.encode(encoding))
    if full:
        kind = "message/global" if survey.headers8bit else "message/rfc822"
        description, length = "Undelivered Message", size
    else:
        kind = "message/global-headers" if survey.headers8bit else "text/rfc822-headers"
        description = "Undelivered Message Headers" if FAILED in actions else "Message Headers"
        length = survey.headerEnd
    out.write("\n".join([
        "",
        f"--{boundary}",
        f"Content-Description: {description}",
        f"Content-Type: {kind}",
        f"Content-Transfer-Encoding: {'8bit' if survey.eightBit else '7bit'}",
        "",
        "",
    ]).encode(encoding))
    _copy(original, start, length, out)
    out.write(f"\n--{boundary}--\n".encode("ascii"))


@dataclass
class _Survey:
    headerEnd: int  # octets of the header block: up to the empty line, without it
    headers8bit: bool
    eightBit: bool  # in what is copied (the whole message when full, else the header block)
    boundaryFound: bool


def _survey(original: BinaryIO, start: int, full: bool, boundary: bytes) -> _Survey:
    """
    Read the original once, a piece at a time: where its header block ends, whether it has
    8-bit octets, and whether C{boundary} occurs in what will be copied.  Without C{full} the
    reading stops at the end of the header block.
    """
    original.seek(start)
    headerEnd: int | None = None
    headers8bit = eightBit = found = False
    # the end of what was read before, so that a match across two pieces is found; the
    # message starts with a virtual LF, so that an empty first line ends an empty header
    tail, tailStart = b"\n", -1
    keep = max(2, len(boundary) - 1)
    pos = 0
    while True:
        chunk = original.read(CHUNK)
        if not chunk:
            break
        buf = tail + chunk
        if headerEnd is None:
            ends = [i for i in (buf.find(b"\n\n"), buf.find(b"\n\r\n")) if i >= 0]
            if ends:
                headerEnd = tailStart + min(ends) + 1
                headers8bit = headers8bit or not chunk[: max(0, headerEnd - pos)].isascii()
            else:
                headers8bit = headers8bit or not chunk.isascii()
        eightBit = eightBit or not chunk.isascii()
        found = found or boundary in buf
        pos += len(chunk)
        tail = buf[-keep:]
        tailStart = pos - len(tail)
        if headerEnd is not None and not full:
            break
    if headerEnd is None:
        headerEnd = pos  # no empty line: the whole message is its header
    if not full:
        eightBit = headers8bit
    return _Survey(headerEnd, headers8bit, eightBit, found)


def _copy(original: BinaryIO, start: int, length: int, out: BinaryIO) -> None:
    """Copy C{length} octets of the original from C{start} to C{out}, a piece at a time."""
    original.seek(start)
    left = length
    while left > 0:
        chunk = original.read(min(CHUNK, left))
        if not chunk:
            break
        out.write(chunk)
        left -= len(chunk)


def _unbracket(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _subject(actions: set[str]) -> str:
    if FAILED in actions:
        return SUBJECT_FAILED
    if DELAYED in actions:
        return SUBJECT_DELAYED
    return SUBJECT_SUCCESS


def _date(when: float) -> str:
    """An RFC 5322 date-time, in UTC."""
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def _clean(value: str, utf8: bool, limit: int = MAX_VALUE) -> str:
    """
    C{value} from outside as one line of printable text: every control character (and line
    separator) becomes a space, runs of them with the spaces around them one space; without
    C{utf8} every non-ASCII character becomes C{?}; at most C{limit} octets of UTF-8.
    """
    value = _JOIN.sub(" ", _BREAK.sub("\n", value)).strip()
    # lone surrogates (bytes decoded with surrogateescape) cannot be written: "?" too
    value = value.encode("utf-8" if utf8 else "ascii", "replace").decode("utf-8")
    raw = value.encode("utf-8")
    if len(raw) > limit:
        value = raw[: limit - 3].decode("utf-8", "ignore") + "..."
    return value


def _orcpt(original: str | None) -> tuple[str, str]:
    """The address type and the address of an C{ORCPT} value (C{("", "")} for none)."""
    if original is None:
        return "", ""
    kind, sep, address = original.partition(";")
    if not sep:
        kind, address = "rfc822", original
    return kind.strip() or "rfc822", address.strip()


def _address(kind: str, address: str, utf8: bool) -> str:
    """
    C{kind; address} for C{Final-Recipient} and C{Original-Recipient}: a non-ASCII address
    has the C{utf-8} type (RFC 6533 3), and is only ever written in a global report.
    """
    address = _clean(address, utf8)
    if not address.isascii():
        kind = "utf-8"
    return f"{_clean(kind, False, 64)}; {address}"


def _field(name: str, value: str, width: int = 78) -> str:
    """
    C{name: value} and its line end, folded before a space where a line would be longer than
    C{width} (RFC 5322 2.2.3: unfolding gives the value back exactly).  The value is one line
    of at most L{MAX_VALUE} octets (L{_clean}), so no line is longer than 998 octets.
    """
    line = f"{name}: {value}"
    lines = []
    floor = len(name) + 2  # never fold inside "Name: "
    while len(line) > width:
        cut = line.rfind(" ", floor, width + 1)
        if cut < 0:
            cut = line.find(" ", max(floor, width + 1))
        if cut < 0 or not line[cut:].strip():
            break
        lines.append(line[:cut])
        line = line[cut:]
        floor = len(line) - len(line.lstrip(" ")) + 1  # a folded line is never only spaces
    lines.append(line)
    return "\n".join(lines) + "\n"


def _status(r: RecipientReport) -> str:
    status = r.status.strip()
    if _STATUS.match(status):
        return status
    return _FALLBACK_STATUS.get(r.action, "2.0.0")


def _statusText(reportingMta: str, recipients: Sequence[RecipientReport], envid: str | None,
                arrival: float, utf8: bool) -> str:
    """The body of the C{message/delivery-status} part (RFC 3464 2.2, 2.3)."""
    blocks = []
    block = []
    if envid is not None:
        block.append(_field("Original-Envelope-Id", _clean(envid, False)))
    block.append(_field("Reporting-MTA", f"dns; {_clean(reportingMta, utf8)}"))
    block.append(_field("Arrival-Date", _date(arrival)))
    blocks.append("".join(block))
    for r in recipients:
        block = []
        if r.original is not None:
            kind, address = _orcpt(r.original)
            block.append(_field("Original-Recipient", _address(kind, address, utf8)))
        block.append(_field("Final-Recipient", _address("rfc822", r.address, utf8)))
        block.append(_field("Action", r.action))
        block.append(_field("Status", _status(r)))
        if r.remoteMta:
            block.append(_field("Remote-MTA", f"dns; {_clean(r.remoteMta, utf8)}"))
        if r.diagnostic:
            block.append(_field("Diagnostic-Code", f"smtp; {_clean(r.diagnostic, utf8)}"))
        if r.lastAttempt is not None:
            block.append(_field("Last-Attempt-Date", _date(r.lastAttempt)))
        if r.action == DELAYED and r.willRetryUntil is not None:
            block.append(_field("Will-Retry-Until", _date(r.willRetryUntil)))
        blocks.append("".join(block))
    return "\n".join(blocks)


def _meaning(status: str) -> str:
    """What a status code means, in words (RFC 3463)."""
    _, _, rest = status.partition(".")
    if rest in _MEANING:
        return _MEANING[rest]
    return _SUBJECT_MEANING.get(rest.partition(".")[0], "")


def _wrap(text: str, indent: str = "", hanging: str = "") -> str:
    """
    C{text} as lines of at most 76 characters (a word longer than that, at most L{MAX_VALUE}
    octets, stays whole), the first indented by C{indent}, the others by C{indent + hanging}.
    """
    return textwrap.fill(text, width=76, initial_indent=indent, subsequent_indent=indent + hanging,
                         break_long_words=False, break_on_hyphens=False) + "\n"


def _recipientText(r: RecipientReport, utf8: bool) -> str:
    """One recipient's paragraph in the human-readable part."""
    address = _clean(r.address, utf8)
    status = _status(r)
    if r.action == FAILED:
        what = _meaning(status) or "the message could not be delivered"
    elif r.action == DELAYED:
        what = _meaning(status) or "the message could not be delivered yet"
        what += "; the mail system will keep trying"
        if r.willRetryUntil is not None:
            what += f" until {_date(r.willRetryUntil)}"
    elif r.action == DELIVERED:
        what = "delivered"
    elif r.action == RELAYED:
        what = ("handed on to a mail system that does not send delivery reports: you may"
                " not hear more about this recipient")
    else:
        what = "delivered to a mailing list or alias, which passed it on to its members"
    line = f"<{address}>: {what}."
    _, original = _orcpt(r.original)
    if original and original.casefold() != r.address.casefold():
        line += f" (You sent it to <{_clean(original, utf8)}>.)"
    text = _wrap(line, hanging="    ")
    if r.diagnostic:
        host = f"The mail server {_clean(r.remoteMta, utf8)}" if r.remoteMta else "The mail server"
        text += _wrap(f"{host} said: {_clean(r.diagnostic, utf8)}", "    ")
    elif r.remoteMta and r.action in (FAILED, DELAYED):
        text += _wrap(f"(while talking to {_clean(r.remoteMta, utf8)})", "    ")
    return text


_INTRO = {
    FAILED: (
        "I'm sorry to have to tell you that your message could not be delivered to one or"
        " more recipients. The mail system has given up on them: sending the same message"
        " again will most likely fail again. The reason for each recipient is given below."
    ),
    DELAYED: (
        "Your message has not been delivered yet to one or more recipients, because of a"
        " problem that may go away. The mail system will keep trying to deliver it, and"
        " will tell you if it finally gives up."
    ),
    DELIVERED: (
        "Your message was successfully delivered to the recipients listed below. If it was"
        " delivered to a mailbox you will receive no further notifications; otherwise you"
        " may still receive notifications of problems from other systems."
    ),
}
_WARNING = (
    "####################################################################\n"
    "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
    "####################################################################\n"
)
_HEADINGS = {
    FAILED: "Your message could not be delivered to:",
    DELAYED: "Your message is delayed for:",
    DELIVERED: "Your message was delivered to:",
}


def _humanText(reportingMta: str, recipients: Sequence[RecipientReport], actions: set[str],
               full: bool, utf8: bool) -> str:
    """The C{text/plain} part: the report for a person who does not know SMTP."""
    kind = FAILED if FAILED in actions else DELAYED if DELAYED in actions else DELIVERED
    parts = [f"This is the mail system at host {_clean(reportingMta, utf8)}.\n"]
    if kind == DELAYED:
        parts.append(_WARNING)
    intro = _INTRO[kind]
    if kind == FAILED:
        intro += (" Your message is attached below." if full
                  else " The headers of your message are attached below.")
    parts.append(_wrap(intro))
    if kind == FAILED:
        parts.append(_wrap(
            "For further assistance, please contact the postmaster of your mail service."
            " If you do so, please include this problem report."))
    parts.append("                   The mail system\n")
    groups = {FAILED: [], DELAYED: [], DELIVERED: []}
    for r in recipients:
        groups[r.action if r.action in (FAILED, DELAYED) else DELIVERED].append(r)
    for group in (FAILED, DELAYED, DELIVERED):
        if groups[group]:
            parts.append(_HEADINGS[group] + "\n\n" + "\n".join(_recipientText(r, utf8) for r in groups[group]))
    return "\n".join(parts)
