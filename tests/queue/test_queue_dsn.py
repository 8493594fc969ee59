"""
Delivery Status Notifications (L{pymaild.queue.dsn}): the multipart/report as a mail reader
parses it, the delivery-status fields per recipient, the original returned whole or as its
header block (byte for byte, streamed), remote replies that try to inject fields, and the
internationalised form.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import io
from email.parser import BytesHeaderParser

import pytest

from pymaild.queue import dsn
from pymaild.queue.dsn import RecipientReport, isBounce, writeDSN

HEADER = (b"Return-Path: <alice@example.com>\n"
          b"From: Alice <alice@example.com>\n"
          b"To: bob@example.org\n"
          b"Subject: lunch\n"
          b"Message-ID: <orig.1@example.com>\n")
ORIGINAL = HEADER + b"\nShall we meet at noon?\nCaf\xc3\xa9 du Nord.\n"
NOW = 1700000100.0
ARRIVAL = 1699990000.0

BOUNCE = RecipientReport("bob@example.org", "failed", "5.1.1", remoteMta="mx.example.org",
                         diagnostic="550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown",
                         lastAttempt=1700000000.0)
DELAY = RecipientReport("carol@example.net", "delayed", "4.4.1", remoteMta="mx.example.net",
                        diagnostic="421 4.4.1 try again later", lastAttempt=1700000000.0,
                        willRetryUntil=1700400000.0)
DELIVERY = RecipientReport("dave@example.org", "delivered", "2.0.0", remoteMta="mx.example.org",
                           diagnostic="250 2.0.0 Ok: queued as 4B1C2", lastAttempt=1700000000.0)


def build(recipients=(BOUNCE,), original=ORIGINAL, ret=None, envid=None, sender="alice@example.com",
          **kw) -> bytes:
    out = io.BytesIO()
    source = original if not isinstance(original, bytes) else io.BytesIO(original)
    writeDSN(out, reportingMta="mail.example.com", sender=sender, recipients=list(recipients),
             original=source, ret=ret, envid=envid, arrival=ARRIVAL, now=NOW,
             messageId="dsn.42@mail.example.com", **kw)
    return out.getvalue()


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def rawParts(data: bytes) -> list[tuple[bytes, bytes]]:
    """
    The (header, content) of each part of the report, cut from the bytes themselves, so that
    the content is exactly what was written.
    """
    boundary = parse(data).get_boundary().encode("ascii")
    pieces = data.split(b"\n--" + boundary)
    assert pieces[-1] == b"--\n"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\n")
        head, _, content = piece[1:].partition(b"\n\n")
        parts.append((head, content))
    return parts


def blocks(content: bytes) -> list:
    """The header blocks of a delivery-status body (one per message, one per recipient)."""
    return [BytesHeaderParser(policy=email.policy.default).parsebytes(block + b"\n")
            for block in content.rstrip(b"\n").split(b"\n\n")]


def statusBlocks(data: bytes) -> list:
    return blocks(rawParts(data)[1][1])


def test_failure_report_structure():
    """
    A failure report is a multipart/report of delivery-status with the explanation, the
    machine-readable report and the original's header, from the mailer daemon to the sender.
    """
    message = parse(build())
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.com>"
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Message-ID"] == "<dsn.42@mail.example.com>"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[0].get_content_charset() == "utf-8"
    assert not message.defects and all(not p.defects for p in parts)


def test_delivery_status_fields():
    """
    The per-message fields, then one block per recipient with its action, status, remote host,
    the remote reply and the dates (RFC 3464 2.2, 2.3), as email parses message/delivery-status.
    """
    report = parse(build()).get_payload()[1]
    perMessage, bob = report.get_payload()
    assert perMessage["Reporting-MTA"] == "dns; mail.example.com"
    assert email.utils.parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.org"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown")
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == 1700000000.0
    assert bob["Will-Retry-Until"] is None


def test_envid_and_orcpt_only_when_given():
    """
    C{Original-Envelope-Id} and C{Original-Recipient} appear only when the sender gave ENVID
    and ORCPT, kept as given (the envid in xtext, the ORCPT type apart from its address).
    """
    without = statusBlocks(build())
    assert "Original-Envelope-Id" not in without[0]
    assert "Original-Recipient" not in without[1]
    orcpt = RecipientReport("bob@example.org", "failed", "5.1.1", original="rfc822;Bob+2B@Example.ORG")
    given = statusBlocks(build([orcpt], envid="QQ+2B314159"))
    assert given[0]["Original-Envelope-Id"] == "QQ+2B314159"
    assert given[1]["Original-Recipient"] == "rfc822; Bob+2B@Example.ORG"
    assert given[1]["Final-Recipient"] == "rfc822; bob@example.org"


def test_several_recipients_with_different_actions():
    """
    One block per recipient in the order given, each with its own action and status;
    C{Will-Retry-Until} only for the delayed one.
    """
    relayed = RecipientReport("erin@example.com", "relayed", "2.0.0")
    found = statusBlocks(build([BOUNCE, DELAY, DELIVERY, relayed]))
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in found[1:]] == [
        ("rfc822; bob@example.org", "failed", "5.1.1"),
        ("rfc822; carol@example.net", "delayed", "4.4.1"),
        ("rfc822; dave@example.org", "delivered", "2.0.0"),
        ("rfc822; erin@example.com", "relayed", "2.0.0"),
    ]
    assert [b["Will-Retry-Until"] is not None for b in found[1:]] == [False, True, False, False]
    assert email.utils.parsedate_to_datetime(found[2]["Will-Retry-Until"]).timestamp() == 1700400000.0
    assert "Remote-MTA" not in found[4] and "Diagnostic-Code" not in found[4]


@pytest.mark.parametrize("recipients, subject", [
    ([BOUNCE], "Undelivered Mail Returned to Sender"),
    ([DELAY, BOUNCE], "Undelivered Mail Returned to Sender"),
    ([DELIVERY, BOUNCE], "Undelivered Mail Returned to Sender"),
    ([DELAY], "Delayed Mail (still being retried)"),
    ([DELAY, DELIVERY], "Delayed Mail (still being retried)"),
    ([DELIVERY], "Successful Mail Delivery Report"),
    ([DELIVERY, RecipientReport("x@example.com", "relayed", "2.0.0")], "Successful Mail Delivery Report"),
    ([RecipientReport("list@example.com", "expanded", "2.0.0")], "Successful Mail Delivery Report"),
])
def test_subject_per_kind(recipients, subject):
    """
    Any failure makes it a returned-mail report; delays alone a delay warning; deliveries
    alone a success report.
    """
    assert parse(build(recipients))["Subject"] == subject


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_headers_returned_exactly(ret):
    """
    Without RET=FULL the third part is text/rfc822-headers with the original's header block
    exactly as stored, up to the empty line; the body (with its 8-bit octets) stays out.
    """
    data = build(ret=ret)
    head, content = rawParts(data)[2]
    assert content == HEADER
    assert b"Content-Type: text/rfc822-headers\n" in head
    assert b"Content-Transfer-Encoding: 7bit" in head
    assert b"Caf" not in data
    assert data.isascii()
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"


@pytest.mark.parametrize("ret", ["FULL", "full"])
def test_full_returns_the_original_exactly(ret):
    """
    With RET=FULL the original is returned as message/rfc822, byte for byte (8-bit octets
    included, declared 8bit), and a mail reader sees it as the attached message.
    """
    data = build(ret=ret)
    head, content = rawParts(data)[2]
    assert content == ORIGINAL
    assert b"Content-Type: message/rfc822\n" in head
    assert b"Content-Transfer-Encoding: 8bit" in head
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    attached = message.get_payload()[2]
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_payload()[0]["Subject"] == "lunch"


def test_full_too_large_returns_the_headers():
    """
    An original larger than C{fullLimit} comes back as its header block; one of exactly
    C{fullLimit} octets still whole.
    """
    head, content = rawParts(build(ret="FULL", fullLimit=len(ORIGINAL) - 1))[2]
    assert content == HEADER and b"text/rfc822-headers" in head
    head, content = rawParts(build(ret="FULL", fullLimit=len(ORIGINAL)))[2]
    assert content == ORIGINAL and b"message/rfc822" in head


def test_full_only_in_failure_reports():
    """
    RET=FULL asks for the content in failure DSNs (RFC 3461 4.3): delay and success reports
    carry the header block only.
    """
    for recipients in ([DELAY], [DELIVERY]):
        head, content = rawParts(build(recipients, ret="FULL"))[2]
        assert content == HEADER and b"text/rfc822-headers" in head
        assert b"Content-Description: Message Headers" in head


@pytest.mark.parametrize("original, header", [
    (b"Subject: no body\nFrom: a@example.com\n", b"Subject: no body\nFrom: a@example.com\n"),
    (b"Subject: no line end", b"Subject: no line end"),
    (b"Subject: empty body\n\n", b"Subject: empty body\n"),
    (b"\nno header at all\n", b""),
    (b"", b""),
    (b"Subject: crlf\r\nFrom: a@example.com\r\n\r\nbody\r\n", b"Subject: crlf\r\nFrom: a@example.com\r\n"),
])
def test_header_block_edges(original, header):
    """
    An original without an empty line is all header; one that starts with an empty line has
    an empty header; CRLF line ends are copied as they are.  With RET=FULL every one of them
    comes back exactly.
    """
    assert rawParts(build(original=original))[2][1] == header
    assert rawParts(build(original=original, ret="FULL"))[2][1] == original
    parse(build(original=original))  # parses


@pytest.mark.parametrize("separator", ["\r\n", "\n", "\r", "\r\r\n", "\x00", "\u2028", "\x85", "\x1b\n"])
def test_remote_reply_cannot_inject(separator):
    """
    A remote reply with a line end (or any control character) followed by something that
    looks like a field becomes one line: no C{Injected} field, header or part appears, and the
    reply is joined with a space.
    """
    evil = RecipientReport(
        "bob@example.org", "failed", "5.1.1", remoteMta=f"mx.example.org{separator}Injected: host",
        diagnostic=f"550 5.1.1 user unknown{separator}Injected: yes{separator}{separator}Injected: twice")
    data = build([evil], envid=f"ID{separator}Injected: envid")
    message = parse(data)
    assert "Injected" not in message
    assert all("Injected" not in p for p in message.walk())
    found = statusBlocks(data)
    assert all("Injected" not in block for block in found)
    assert found[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown Injected: yes Injected: twice"
    assert found[1]["Remote-MTA"] == "dns; mx.example.org Injected: host"
    assert not any(line.startswith(b"Injected") for line in data.split(b"\n"))
    assert b"\r" not in data and b"\x00" not in data and b"\x1b" not in data
    assert len(message.get_payload()) == 3


def test_long_reply_is_folded_and_cut():
    """
    A huge multi-line reply is cut and folded: no line of the report is longer than 998
    octets, and the unfolded field still starts with the reply.
    """
    reply = "\r\n".join(f"550-5.7.1 line {i} " + "x" * 60 for i in range(200)) + "\r\n550 5.7.1 " + "y" * 3000
    data = build([RecipientReport("bob@example.org", "failed", "5.7.1", diagnostic=reply)])
    assert max(len(line) for line in data.split(b"\n")) <= 998
    code = statusBlocks(data)[1]["Diagnostic-Code"]
    assert code.startswith("smtp; 550-5.7.1 line 0 xxx") and code.endswith("...")
    assert len(code.encode()) <= dsn.MAX_VALUE + len("smtp; ")
    text = parse(data).get_payload()[0].get_content()
    assert "550-5.7.1 line 0" in text


def test_non_ascii_recipient_makes_a_global_report():
    """
    A non-ASCII address (SMTPUTF8) makes the report message/global-delivery-status in UTF-8,
    with the C{utf-8} address type for that address (RFC 6533); ASCII ones keep C{rfc822}.
    """
    intl = RecipientReport("jos\u00e9@ex\u00e4mple.org", "failed", "5.1.1",
                           original="utf-8;Jos\u00e9@ex\u00e4mple.org",
                           diagnostic="550 5.1.1 unknown user jos\u00e9")
    data = build([intl, BOUNCE])
    head, content = rawParts(data)[1]
    assert b"Content-Type: message/global-delivery-status\n" in head
    assert b"Content-Transfer-Encoding: 8bit" in head
    found = statusBlocks(data)
    assert found[1]["Final-Recipient"] == "utf-8; jos\u00e9@ex\u00e4mple.org"
    assert found[1]["Original-Recipient"] == "utf-8; Jos\u00e9@ex\u00e4mple.org"
    assert found[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown user jos\u00e9"
    assert found[2]["Final-Recipient"] == "rfc822; bob@example.org"
    assert "jos\u00e9@ex\u00e4mple.org".encode() in rawParts(data)[0][1]
    assert parse(data)["Content-Transfer-Encoding"] == "8bit"


def test_non_ascii_sender_makes_a_global_report():
    """The DSN goes to a non-ASCII sender: its C{To} is UTF-8 and the report global."""
    data = build(sender="<alic\u00e9@example.com>")
    assert parse(data)["To"] == "alic\u00e9@example.com"
    assert b"message/global-delivery-status" in rawParts(data)[1][0]


def test_ascii_report_stays_ascii():
    """
    With ASCII addresses the report is pure ASCII: non-ASCII text in a remote reply becomes
    C{?} rather than making the report 8-bit.
    """
    odd = RecipientReport("bob@example.org", "failed", "5.1.1", remoteMta="mx.example.org",
                          diagnostic="550 5.1.1 Benutzer unbekannt \u00fc\udcff")
    data = build([odd])
    assert data.isascii()
    assert statusBlocks(data)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt ??"
    assert b"Content-Type: message/delivery-status\n" in rawParts(data)[1][0]


def test_8bit_original_header_is_global():
    """
    An original whose header has 8-bit octets comes back as message/global (RET=FULL) or
    message/global-headers (RFC 6533), still byte for byte.
    """
    original = "Subject: d\u00e9j\u00e0 vu\nFrom: a@example.com\n\nbody\n".encode()
    head, content = rawParts(build(original=original, ret="FULL"))[2]
    assert b"Content-Type: message/global\n" in head and content == original
    head, content = rawParts(build(original=original))[2]
    assert b"Content-Type: message/global-headers\n" in head
    assert b"Content-Transfer-Encoding: 8bit" in head
    assert content == original.partition(b"\n\n")[0] + b"\n"


class BoundedReader(io.BytesIO):
    """A seekable original whose C{read} insists on a bounded size, and counts what it gives."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.given = 0
        self.reads = 0

    def read(self, size=-1):
        assert size is not None and 0 < size <= dsn.CHUNK, f"read({size})"
        chunk = super().read(size)
        self.given += len(chunk)
        self.reads += 1
        return chunk


def test_original_is_streamed():
    """
    The original is read in bounded pieces, never whole, and a 3 MB one comes back exactly.
    """
    body = b"".join(b"line %d of a long message \xe2\x82\xac\n" % i for i in range(100_000))
    original = HEADER + b"\n" + body
    reader = BoundedReader(original)
    data = build(original=reader, ret="FULL")
    assert rawParts(data)[2][1] == original
    assert reader.reads > 2 * len(original) // dsn.CHUNK  # read twice, in pieces


def test_headers_only_reads_little():
    """Returning the header of a large original reads about the header, not the body."""
    original = HEADER + b"\n" + b"x" * (5 * dsn.CHUNK)
    reader = BoundedReader(original)
    assert rawParts(build(original=reader))[2][1] == HEADER
    assert reader.given <= 2 * dsn.CHUNK


def test_boundary_never_in_the_original(monkeypatch):
    """
    A boundary that occurs in what is returned is never used: another one is drawn.
    """
    tokens = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n: next(tokens))
    original = HEADER + b"\n--pymaild-dsn-aaaa\nContent-Type: text/html\n\n<b>hi</b>\n"
    data = build(original=original, ret="FULL")
    assert parse(data).get_boundary() == "pymaild-dsn-bbbb"
    assert rawParts(data)[2][1] == original


def test_writes_to_a_file(tmp_path):
    """The report goes to a real file from a real queued message file, with LF line ends."""
    source = tmp_path / "orig.eml"
    source.write_bytes(ORIGINAL)
    target = tmp_path / "dsn.eml"
    with open(source, "rb") as original, open(target, "wb") as out:
        writeDSN(out, reportingMta="mail.example.com", sender="alice@example.com",
                 recipients=[BOUNCE], original=original, ret="FULL", envid=None,
                 arrival=ARRIVAL, now=NOW, messageId="dsn.1@mail.example.com")
    data = target.read_bytes()
    assert b"\r" not in data
    assert rawParts(data)[2][1] == ORIGINAL
    assert len(parse(data).get_payload()) == 3


def test_human_readable_part():
    """
    The explanation names each recipient with what happened and what the remote server said;
    a delay report says it is only a warning and until when it is retried.
    """
    text = parse(build([BOUNCE])).get_payload()[0].get_content()
    assert "mail.example.com" in text
    assert "could not be delivered" in text
    assert "<bob@example.org>: the mailbox does not exist." in text
    assert "mx.example.org said: 550 5.1.1 <bob@example.org>:" in text
    assert "headers of your message are attached" in text
    assert "Your message is attached" in parse(build([BOUNCE], ret="FULL")).get_payload()[0].get_content()
    delayed = parse(build([DELAY])).get_payload()[0].get_content()
    assert "THIS IS A WARNING ONLY" in delayed
    assert "<carol@example.net>" in delayed and "Sun, 19 Nov 2023" in delayed
    success = parse(build([DELIVERY])).get_payload()[0].get_content()
    assert "successfully delivered" in success and "<dave@example.org>: delivered." in success
    assert max(len(line) for line in text.splitlines()) <= 80


def test_malformed_status_falls_back():
    """A status that is not an RFC 3463 code is reported as X.0.0 of the action's class."""
    reports = [RecipientReport("a@example.org", "failed", "550"),
               RecipientReport("b@example.org", "delayed", "4.4"),
               RecipientReport("c@example.org", "delivered", "2.0.0\r\nX: y")]
    assert [b["Status"] for b in statusBlocks(build(reports))[1:]] == ["5.0.0", "4.0.0", "2.0.0"]


@pytest.mark.parametrize("sender, bounce", [
    ("", True), ("<>", True), (" <> ", True), ("alice@example.com", False), ("<alice@example.com>", False)])
def test_isBounce(sender, bounce):
    """The null reverse path, bare or in brackets, is a bounce; anything else is not."""
    assert isBounce(sender) is bounce


@pytest.mark.parametrize("kw", [
    {"sender": ""}, {"sender": "<>"}, {"recipients": []},
    {"recipients": [RecipientReport("a@example.org", "bounced", "5.0.0")]},
])
def test_refused(kw):
    """No DSN to the null sender (never bounce a bounce), none without recipients or with an
    unknown action."""
    with pytest.raises(ValueError):
        build(**kw)
