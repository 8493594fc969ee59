"""
pymaild.store.summary: what the index caches for each message (sizes, ENVELOPE, BODY,
BODYSTRUCTURE, part offsets, SEARCH/SORT/THREAD fields).

The specimen messages are in C{tests/data/messages/}; more (limits, very large, randomly
damaged copies of the specimens) are generated here.  Debian's Dovecot is the oracle: the
differential tests at the end run every message through C{/usr/lib/dovecot/imap} and compare
its FETCH answers byte for byte (they skip when Dovecot is not installed).
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import sys
import tempfile
import tracemalloc
import unicodedata
from pathlib import Path

import pytest

from pymaild.store.summary import (
    MAX_PARTS,
    MessageSummary,
    baseSubject,
    casemap as casemapKey,
    fromJSON,
    summarize,
    toJSON,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dovecot_peer import (  # noqa: E402
    DovecotIMAP,
    dovecot_imap_path,
    maildir_filename,
    parse_fetch,
    scratch_maildir,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "messages"
SPECIMENS = sorted(p.name for p in DATA.glob("*.eml"))


def specimen(name: str) -> bytes:
    return (DATA / name).read_bytes()


def summary(data: bytes) -> MessageSummary:
    return summarize(io.BytesIO(data))


def casemap(s: str) -> str:
    """i;unicode-casemap for the strings used here: no character in them has a titlecase
    different from its upper case, and none has a multi-character one."""
    return unicodedata.normalize("NFKD", s.upper())


# --------------------------------------------------------------------------------------------
# Generated messages
# --------------------------------------------------------------------------------------------

def manyParts(n: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=b\n\n"
            + b"".join(b"--b\nContent-Type: text/plain\n\n%d\n" % i for i in range(n))
            + b"--b--\nepilogue\n")


def deepMultipart(depth: int) -> bytes:
    m = b"Subject: deep\n"
    for i in range(depth):
        m += (b'Content-Type: multipart/mixed; boundary="x%dy"\n\n--x%dy\n'
              b"Content-Type: text/plain\n\nt%d\n--x%dy\n" % (i, i, i, i))
    m += b"Content-Type: text/plain\n\ninner\n"
    for i in reversed(range(depth)):
        m += b"--x%dy--\n" % i
    return m


def deepRfc822(depth: int) -> bytes:
    return b"Content-Type: message/rfc822\n\n" * depth + b"Subject: deep\n\nx\n"


def bigAttachment(megabytes: int, crlf: bool = False) -> bytes:
    attachment = base64.encodebytes(bytes(range(256)) * (megabytes * 4096 * 3 // 4))
    m = (b"From: big@example.com\nSubject: big\nMIME-Version: 1.0\n"
         b"Content-Type: multipart/mixed; boundary=big\n\n"
         b"--big\nContent-Type: text/plain\n\nsee the attachment\n"
         b"--big\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
         + attachment + b"--big--\n")
    return m.replace(b"\n", b"\r\n") if crlf else m


_TOKENS = [b"\n", b"\r\n", b"\r", b"-", b"--", b'"', b"<", b">", b"(", b")", b"\\", b";", b":",
           b",", b"@", b".", b" ", b"\t", b"\x00", b"\xc3\xa9", b"=?", b"?=", b"\n ", b"\n\n", b"[",
           b"]", b"*", b"="]


def damaged(seed: int) -> bytes:
    """A specimen with a few random bytes inserted, deleted or replaced."""
    r = random.Random(seed)
    m = bytearray(specimen(r.choice([n for n in SPECIMENS if n != "long-header.eml"])))
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(m) + 1)
        op = r.random()
        if op < 0.4:
            m[i:i] = r.choice(_TOKENS)
        elif op < 0.7:
            del m[i:i + r.randint(1, 4)]
        else:
            m[i:i + 1] = r.choice(_TOKENS)
    return bytes(m)


GARBAGE = {
    "empty": b"",
    "one-newline": b"\n",
    "one-crlf": b"\r\n",
    "only-dashes": b"--",
    "no-newline-at-all": b"Subject: x",
    "nul-only": b"\x00" * 100,
    "binary": bytes(random.Random(1).randrange(256) for _ in range(5000)),
    "boundary-at-eof-without-newline":
        b"Content-Type: multipart/mixed; boundary=q\n\n--q\n\nx\n--q",
    "unterminated-quotes":
        b'From: "a <b@c>\nTo: (comment\nContent-Type: text/plain; name="x\n\nbody',
    "huge-header-line": b"Subject: " + b"x" * (2 << 20) + b"\nFrom: a@b\n\nbody\n",
    "huge-folded-header": b"To: " + b"a@b,\n " * 100000 + b"c@d\n\nbody\n",
    "many-parts": manyParts(MAX_PARTS + 5),
    "deep-multipart": deepMultipart(120),
    "deep-rfc822": deepRfc822(120),
    "empty-boundary": b'Content-Type: multipart/mixed; boundary=""\n\n--\n\nx\n----\n',
    "nul-in-parameter": b'Content-Type: text/plain; charset==?"utf\x008"; a=b\n\nbody\n',
    "boundary-in-header": b"Content-Type: multipart/mixed; boundary=b\n\n--b\nX: y\n--b\n--b--\n",
}


# --------------------------------------------------------------------------------------------
# A small IMAP reader, to check that the cached bytes are well-formed
# --------------------------------------------------------------------------------------------

def parseImap(data: bytes):
    """Parse one IMAP value (list, NIL, number, quoted string or literal) that must fill
    C{data}; lists become Python lists, strings bytes, NIL None."""
    value, pos = _value(data, 0)
    assert pos == len(data), f"trailing bytes after the value: {data[pos:pos + 40]!r}"
    return value


def _value(data: bytes, pos: int):
    c = data[pos:pos + 1]
    if c == b"(":
        items = []
        pos += 1
        while data[pos:pos + 1] != b")":
            if items and not (data[pos:pos + 1] == b"(" and data[pos - 1:pos] == b")"):
                # lists follow each other directly (the parts of a multipart, addresses)
                assert data[pos:pos + 1] == b" ", f"no space between list items at {pos}"
                pos += 1
            item, pos = _value(data, pos)
            items.append(item)
        return items, pos + 1
    if c == b'"':
        out = bytearray()
        pos += 1
        while data[pos] != 0x22:
            assert data[pos] not in b"\r\n" and data[pos] < 0x80, "bad byte in a quoted string"
            if data[pos] == 0x5C:
                pos += 1
                assert data[pos] in b'"\\', "bad escape in a quoted string"
            out.append(data[pos])
            pos += 1
        return bytes(out), pos + 1
    if c == b"{":
        close = data.index(b"}\r\n", pos)
        n = int(data[pos + 1:close])
        start = close + 3
        assert start + n <= len(data), "literal longer than the data"
        return data[start:start + n], start + n
    if data.startswith(b"NIL", pos):
        return None, pos + 3
    end = pos
    while end < len(data) and data[end:end + 1].isdigit():
        end += 1
    assert end > pos, f"unexpected {data[pos:pos + 20]!r}"
    return int(data[pos:end]), end


# --------------------------------------------------------------------------------------------
# The specimens
# --------------------------------------------------------------------------------------------

EXPECTED = [
    # name, vsize, body lines, BODY
    ("plain-lf.eml", 559, 5,
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 83 5)'),
    ("plain-crlf.eml", 559, 5,
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 83 5)'),
    ("quoted-printable.eml", 681, 7,
     b'("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "quoted-printable" 202 7)'),
    ("base64-attachment.eml", 9113, 125,
     b'(("text" "plain" ("charset" "ISO-8859-1") NIL NIL "7bit" 34 1)'
     b'("application" "pdf" ("name" "report 2025-01.pdf") NIL NIL "base64" 8408) "mixed")'),
    ("alternative-in-mixed.eml", 1252, 29,
     b'((("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 32 0)'
     b'("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 97 0) "alternative")'
     b'("image" "png" ("name" "logo.png") "<logo@example.org>" "The example.org logo" "base64" 98)'
     b' "mixed")'),
    ("missing-final-boundary.eml", 253, 8,
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 0)'
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 47 1) "mixed")'),
    ("boundary-whitespace.eml", 251, 10,
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0)'
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0) "mixed")'),
    ("multipart-no-boundary.eml", 178, 1,
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "alternative")'),
    ("nested-boundary-prefix.eml", 399, 16,
     b'((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 0)'
     b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 17 0) "alternative")'
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 56 0) "mixed")'),
    ("header-ended-by-boundary.eml", 345, 13,
     b'(("text" "plain" ("charset" "us-ascii") NIL "no empty line follows" "7bit" 0 0)'
     b'("message" "rfc822" NIL NIL NIL "7bit" 41 (NIL "inner" ((NIL NIL "inner" "example.com"))'
     b' ((NIL NIL "inner" "example.com")) ((NIL NIL "inner" "example.com")) NIL NIL NIL NIL NIL)'
     b' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) 2)'
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 2 0) "mixed")'),
    ("rfc822-empty.eml", 244, 8,
     b'(("message" "rfc822" NIL NIL NIL "7bit" 0 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)'
     b' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) 0)'
     b'("message" "rfc822" NIL NIL NIL "7bit" 24 (NIL "only a header" NIL NIL NIL NIL NIL NIL NIL'
     b' NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) 1) "mixed")'),
    ("preamble-epilogue.eml", 357, 15,
     b'((("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 8 0) "related") "mixed")'),
    ("no-mime-version.eml", 227, 1,
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1)'),
    ("no-blank-line.eml", 105, 0,
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'),
    ("headerless.eml", 65, 2,
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 63 2)'),
    ("html-only-8bit.eml", 201, 1,
     b'("text" "html" ("charset" "windows-1252") NIL NIL "8bit" 29 1)'),
    ("nul-bytes.eml", 218, 2,
     b'("text" "plain" ("charset" {7}\r\nutf\xef\xbf\xbd8) NIL NIL "7bit" 32 2)'),
    ("utf8-headers.eml", 382, 1,
     b'("text" "plain" ("charset" "utf-8" "name" {10}\r\nna\xc3\xafve.txt) NIL NIL "8bit" 10 1)'),
]


@pytest.mark.parametrize("name, vsize, lines, body", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_specimen(name, vsize, lines, body):
    """Each specimen's RFC822.SIZE, body line count and BODY are the ones Dovecot gives."""
    data = specimen(name)
    s = summary(data)
    assert s.size == len(data)
    assert s.vsize == vsize
    assert s.lines == lines
    assert s.body == body


def test_plain_message():
    """A plain text message: every field, exactly."""
    s = summary(specimen("plain-lf.eml"))
    assert s.envelope == (
        b'("Tue, 14 Jan 2025 09:15:00 +0100" "Lunch on Thursday?" '
        b'(("Alice Example" NIL "alice" "example.org")) '
        b'(("Alice Example" NIL "alice" "example.org")) '
        b'(("Alice Example" NIL "alice" "example.org")) '
        b'(("Bob" NIL "bob" "example.net")) NIL NIL NIL '
        b'"<20250114081500.GA1234@example.org>")')
    assert s.bodystructure == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 83 5 NIL ("inline" NIL) NIL NIL)')
    assert (s.headerSize, s.headerVSize, s.bodyVSize, s.bodySize) == (463, 476, 83, 78)
    assert s.headerFields == {
        "date": "Tue, 14 Jan 2025 09:15:00 +0100",
        "from": "Alice Example <alice@example.org>",
        "to": "Bob <bob@example.net>",
        "subject": "Lunch on Thursday?",
        "message-id": "<20250114081500.GA1234@example.org>",
    }
    assert (s.sortSubject, s.sortFrom, s.sortTo, s.sortCc) == (
        "LUNCH ON THURSDAY?", "ALICE", "BOB", "")
    assert (s.displayFrom, s.displayTo) == ("ALICE EXAMPLE", "BOB")
    assert s.replyOrForward is False
    assert s.sentDate == 1736842500
    assert (s.messageId, s.inReplyTo, s.references) == (
        "<20250114081500.GA1234@example.org>", None, ())
    assert s.parts == {"kind": "single", "headerStart": 0, "bodyStart": 463, "bodyEnd": 541,
                       "headerVSize": 476, "bodyVSize": 83, "parts": []}


def test_line_ends_do_not_change_the_imap_view():
    """LF and CRLF copies of a message have the same virtual sizes, ENVELOPE and BODYSTRUCTURE;
    only the physical sizes and offsets differ (by one byte per line)."""
    lf, crlf = summary(specimen("plain-lf.eml")), summary(specimen("plain-crlf.eml"))
    for attr in ("vsize", "headerVSize", "bodyVSize", "lines", "envelope", "bodystructure", "body",
                 "headerFields", "sortSubject", "sentDate"):
        assert getattr(lf, attr) == getattr(crlf, attr), attr
    assert crlf.size - lf.size == specimen("plain-lf.eml").count(b"\n")
    assert crlf.size == crlf.vsize


def test_forwarded_message():
    """message/rfc822 carries the encapsulated message's ENVELOPE, BODYSTRUCTURE and line
    count; the part tree goes down into it."""
    s = summary(specimen("forwarded-rfc822.eml"))
    parsed = parseImap(s.bodystructure)
    forwarded = parsed[1]
    assert forwarded[:2] == [b"message", b"rfc822"]
    envelope, inner, lines = forwarded[7:10]
    assert envelope[1] == b"Re: [proj] Release plan"
    assert envelope[2] == [[b"=?ISO-8859-1?Q?Fran=E7ois?=", None, b"francois", b"example.fr"]]
    assert envelope[6] == [[None, None, b"undisclosed-recipients", None], [None, None, None, None]]
    assert envelope[8:] == [b"<plan.6@example.com>", b"<plan.7@example.fr>"]
    assert inner[-5:] == [b"alternative", [b"boundary", b"alt"], None, None, None]
    assert lines == 22
    message = s.parts["parts"][1]
    assert message["kind"] == "message"
    assert [p["kind"] for p in message["parts"]] == ["multipart"]
    assert [p["kind"] for p in message["parts"][0]["parts"]] == ["single", "single"]
    assert s.sortSubject == "RELEASE PLAN"


def test_groups_and_routes():
    """Group syntax becomes (NIL NIL name NIL) ... (NIL NIL NIL NIL); routes are kept; for the
    sort keys a group is the first address (RFC 5322: address = mailbox / group), its
    addr-mailbox the group's name, as in the ENVELOPE."""
    s = summary(specimen("group-addresses.eml"))
    envelope = parseImap(s.envelope)
    assert envelope[5] == [[None, None, b"undisclosed-recipients", None], [None, None, None, None]]
    assert envelope[6] == [
        [None, None, b"Team", None],
        [None, None, b"alice", b"example.com"],
        [b"Bob B.", None, b"bob", b"example.com"],
        [None, None, b"carol", b"example.com"],
        [None, None, None, None],
        [None, None, b"Other Group", None],
        [None, None, None, None],
    ]
    assert envelope[7] == [
        [None, b"@relay1.example.net,@relay2.example.net", b"eve", b"example.com"]]
    assert (s.sortTo, s.displayTo, s.sortCc) == (
        "UNDISCLOSED-RECIPIENTS", "UNDISCLOSED-RECIPIENTS", "TEAM")


def test_broken_addresses():
    """Addresses that cannot be parsed are filled in the way Dovecot does, and never fail."""
    envelope = parseImap(summary(specimen("broken-addresses.eml")).envelope)
    assert envelope[2] == [[b"John Smith", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"]]
    assert envelope[3] == [[None, None, b"user", b"MISSING_DOMAIN"]]
    assert [None, b"INVALID_ROUTE", b"MISSING_MAILBOX", b"MISSING_DOMAIN"] in envelope[6]
    assert [b"Name", None, b"a", b"SYNTAX_ERROR"] in envelope[6]


def test_duplicate_headers():
    """Repeated headers: in the ENVELOPE the last Date/Subject/Message-ID counts and the
    addresses add up (as Dovecot does); SEARCH sees every copy."""
    s = summary(specimen("duplicate-headers.eml"))
    envelope = parseImap(s.envelope)
    assert envelope[0] == b"Sun, 26 Jan 2025 02:00:00 +0000"
    assert envelope[1] == b"second subject"
    assert envelope[2] == [[None, None, b"first", b"example.com"],
                           [b"Second", None, b"second", b"example.com"]]
    assert envelope[9] == b"<two@example.com>"
    assert s.headerFields["subject"] == "first subject\nsecond subject"
    assert s.sentDate == 1737856800


@pytest.mark.parametrize("name, fields", [
    ("quoted-printable.eml", {
        "from": "Jörg Müller <joerg@example.de>",
        "subject": "Grüße aus München",
        "references": "<root.0@example.com> <orig.0@example.com>",
        "in-reply-to": "<orig.0@example.com>"}),
    ("rfc2047.eml", {
        "from": "山田 <yamada@example.jp>",
        "to": 'Éloise <eloise@example.fr>, "Renée" <renee@example.fr>',
        "subject": "Re: Übersicht – Q1 café"}),
    ("utf8-headers.eml", {
        "from": "Jörg Müller <jörg@bücher.example>",
        "subject": "Überraschung für Zoë — «test»"}),
    ("nul-bytes.eml", {"subject": "null\ufffdbyte"}),
    ("missing-headers.eml", {}),
    ("headerless.eml", {}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_search_fields(name, fields):
    """headerFields has the headers SEARCH looks at, RFC 2047-decoded and unfolded; absent
    headers are absent."""
    got = summary(specimen(name)).headerFields
    for key, value in fields.items():
        assert got[key] == value
    if not fields:
        assert got == {}


@pytest.mark.parametrize("name, keys", [
    ("quoted-printable.eml", dict(
        sortSubject=unicodedata.normalize("NFKD", "GRÜßE AUS MÜNCHEN"), sortFrom="JOERG",
        sortTo="LIST", sortCc="JOHN", displayFrom=casemap("Jörg Müller"),
        displayTo="LIST@EXAMPLE.COM", replyOrForward=False,
        messageId="<qp.1@example.de>", inReplyTo="<orig.0@example.com>",
        references=("<root.0@example.com>", "<orig.0@example.com>"), sentDate=1736935200)),
    ("rfc2047.eml", dict(
        sortSubject=casemap("Übersicht – Q1 café"), sortFrom="YAMADA", sortTo="ELOISE",
        displayFrom="山田", displayTo=casemap("Éloise"), sentDate=1737531900,
        replyOrForward=True)),
    ("alternative-in-mixed.eml", dict(
        sortSubject="ISSUE #42: WHAT'S NEW", displayFrom="NEWSLETTER")),
    ("missing-headers.eml", dict(
        sortSubject="", sortFrom="", displayFrom="", sentDate=None, messageId=None,
        inReplyTo=None, references=())),
    ("broken-addresses.eml", dict(
        # "Message-ID: no-angle-brackets@example.com" is no msg-id (RFC 5322 3.6.4): for
        # THREAD=REFERENCES the message has none (RFC 5256 section 4, step 1)
        # "From: John Smith" has no mailbox: the ENVELOPE's MISSING_MAILBOX is its addr-mailbox
        sortFrom="MISSING_MAILBOX", displayFrom="JOHN SMITH", sortTo="MISSING_MAILBOX",
        displayTo="MISSING_MAILBOX@MISSING_DOMAIN",
        messageId=None, inReplyTo="<a@example.com>")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_sort_and_thread_keys(name, keys):
    """The SORT (RFC 5256, RFC 5957) and THREAD keys."""
    s = summary(specimen(name))
    for key, value in keys.items():
        assert getattr(s, key) == value, key


@pytest.mark.parametrize("subject, base", [
    ("Re: hello", "hello"),
    ("RE: Re: re: hello", "hello"),
    ("Fwd: hello (fwd)", "hello"),
    ("Fw: [list] Re: hello", "hello"),
    ("[list] hello", "hello"),
    ("[list]", "[list]"),
    ("Re: [list] [tag] hello  world ", "hello world"),
    ("[fwd: Re: hello]", "hello"),
    ("Re:Re:   ", ""),
    ("\tRe :  hi", "hi"),
    ("Re[2]: hello", "hello"),
    ("Reply: hello", "Reply: hello"),
    ("Re: [fwd: [x] hi (fwd)]", "hi"),
    ("[a][b]", "[b]"),
    ("Re: " * 100000 + "[a] " * 100000 + "x" + " (fwd)" * 1000, "x"),
], ids=lambda v: repr(v)[:40])
def test_base_subject(subject, base):
    """RFC 5256 section 2.1: reply/forward leaders, [blob]s, (fwd) trailers and [fwd: ...]
    wrappers go."""
    assert baseSubject(subject) == base


@pytest.mark.parametrize("subject, replyOrForward", [
    ("hello", False),
    ("Re: hello", True),
    ("[list] Fwd: hello", True),
    ("hello (fwd)", True),
    ("  hello", False),
    ("[list] hello", False),
    ("[fwd: hello]", False),  # a subj-fwd is not a subj-refwd (RFC 5256 4, step 5.C.v)
    ("Reply: hello", False),
], ids=lambda v: repr(v))
def test_reply_or_forward(subject, replyOrForward):
    """replyOrForward: the subject had a subj-refwd leader or a "(fwd)" trailer."""
    s = summary(b"Subject: " + subject.encode() + b"\n\nx\n")
    assert s.replyOrForward is replyOrForward


@pytest.mark.parametrize("text, key", [
    ("abc", "ABC"),
    ("a_b", "A_B"),
    ("straße", "STRAßE"),  # ß has no single-character titlecase
    ("\u01c6", "Dz\u030c"),  # dž: titlecase Dž (not upper case DŽ), then NFKD
    ("ﬁle", "fiLE"),  # the ligature has no single-character titlecase; NFKD comes after
    ("é", "E\u0301"),
    ("Ａ", "A"),
])
def test_casemap(text, key):
    """casemap is i;unicode-casemap (RFC 5051): titlecase each character, then NFKD."""
    assert casemapKey(text) == key


def test_casemap_orders_by_titlecase():
    """Titlecase, not lower case: "_" (0x5F) sorts after "A" but before "a"."""
    assert casemapKey("a_") > casemapKey("ab")
    assert casemapKey("a_") < casemapKey("a|")


@pytest.mark.parametrize("date, expected", [
    ("Tue, 14 Jan 2025 09:15:00 +0100", "2025-01-14 08:15:00"),
    ("14 Jan 2025 09:15 -0130", "2025-01-14 10:45:00"),
    ("Tue, 14 Jan 2025 09:15:00 -0000 (UTC)", "2025-01-14 09:15:00"),
    ("Tue, 14 Jan 25 09:15:00 EST", "2025-01-14 14:15:00"),
    ("Tue, 14 Jan 99 09:15:00 GMT", "1999-01-14 09:15:00"),
    ("Tue, 14 Jan 2025 09:15:00 XYZ", "2025-01-14 09:15:00"),  # invalid zone: UTC
    ("Tue, 14 Jan 2025 09:15:00 +0199", "2025-01-14 09:15:00"),
    ("Tue, 14 Jan 2025 25:99:00 +0100", "2025-01-13 23:00:00"),  # invalid time: 00:00:00
    ("Tue, 14 Jan 2025", "2025-01-14 00:00:00"),
    ("Tue, 14 Jan 2025 noon", "2025-01-14 00:00:00"),
    ("Tue, 32 Jan 2025 09:15:00 +0000", None),  # no valid date: the internal date
    ("Tue, 29 Feb 2025 09:15:00 +0000", None),
    ("2025-01-14 09:15:00", None),
    ("garbage", None),
    ("", None),
])
def test_sent_date(date, expected):
    """RFC 5256 section 2.2: the Date header in UTC; an invalid zone is UTC, an invalid time
    00:00:00; no valid date at all gives None (SORT and THREAD use the internal date)."""
    import calendar
    import time

    s = summary(b"Date: " + date.encode() + b"\n\nx\n")
    if expected is None:
        assert s.sentDate is None
    else:
        assert s.sentDate == calendar.timegm(time.strptime(expected, "%Y-%m-%d %H:%M:%S"))


def test_message_ids():
    """Only valid message identifiers (<left@right>) count; folding inside one is removed."""
    s = summary(b"Message-ID: <no-at-sign> <a@b>\nIn-Reply-To: your mail of Tuesday\n"
                b"References: <r1@x> junk <r2\n @x> <> <@x> <y@>\n\t<r3@x>\n\nx\n")
    assert (s.messageId, s.inReplyTo, s.references) == (
        "<a@b>", None, ("<r1@x>", "<r2@x>", "<r3@x>"))


def test_part_offsets_stream_the_parts():
    """The part tree's offsets cut the file into exactly what BODY[n], BODY[n.MIME] and
    BODY[HEADER] send."""
    data = specimen("base64-attachment.eml")
    tree = summary(data).parts
    assert data[:tree["bodyStart"]].endswith(b"\n\n")
    text, attachment = tree["parts"]
    assert data[text["bodyStart"]:text["bodyEnd"]] == b"Please find the report attached.\n"
    assert data[text["headerStart"]:text["bodyStart"]] == (
        b"Content-Type: text/plain; charset=ISO-8859-1\nContent-Transfer-Encoding: 7bit\n\n")
    payload = data[attachment["bodyStart"]:attachment["bodyEnd"]]
    assert base64.b64decode(payload) == bytes(range(256)) * 24
    assert data[attachment["headerStart"]:].startswith(b"Content-Type: application/pdf;")

    data = specimen("alternative-in-mixed.eml")
    tree = summary(data).parts
    alternative, image = tree["parts"]
    plain, html = alternative["parts"]
    assert data[plain["bodyStart"]:plain["bodyEnd"]] == "Plain text version with a café.".encode()
    assert data[html["bodyStart"]:html["bodyEnd"]].startswith(b"<html>")
    assert data[image["bodyStart"]:image["bodyEnd"]].endswith(b"==")


def tree_nodes(node, depth=0):
    yield node, depth
    for child in node["parts"]:
        yield from tree_nodes(child, depth + 1)


def virtual(data: bytes) -> int:
    """Bytes with every line end counted as CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


ALL_MESSAGES = ([(name, specimen(name)) for name in SPECIMENS]
                + sorted(GARBAGE.items())
                + [(f"damaged-{seed}", damaged(seed)) for seed in range(40)])


@pytest.mark.parametrize("name, data", ALL_MESSAGES, ids=[m[0] for m in ALL_MESSAGES])
def test_structure_is_consistent(name, data):
    """For every message, broken or not: the part tree covers the file, children lie inside
    their parent's body in order, the virtual sizes add up, and the cached bytes are well-formed
    IMAP (a 10-item ENVELOPE, balanced BODY/BODYSTRUCTURE, exact literal lengths)."""
    s = summary(data)
    assert s.size == len(data)
    assert s.vsize == virtual(data)
    tree = s.parts
    assert tree["headerStart"] == 0 and tree["bodyEnd"] == len(data)
    assert s.headerSize == tree["bodyStart"] and s.headerVSize == tree["headerVSize"]
    for node, depth in tree_nodes(tree):
        assert node["headerStart"] <= node["bodyStart"] <= node["bodyEnd"] <= len(data)
        assert node["headerVSize"] == virtual(data[node["headerStart"]:node["bodyStart"]])
        assert node["bodyVSize"] == virtual(data[node["bodyStart"]:node["bodyEnd"]])
        previous = node["bodyStart"]
        for child in node["parts"]:
            assert previous <= child["headerStart"] and child["bodyEnd"] <= node["bodyEnd"]
            previous = child["bodyEnd"]
        if node["kind"] == "message":
            assert len(node["parts"]) == 1
        elif node["kind"] == "single":
            assert node["parts"] == []
        assert depth < 100
    envelope = parseImap(s.envelope)
    assert len(envelope) == 10
    for addresses in envelope[2:8]:
        assert addresses is None or all(len(a) == 4 for a in addresses)
    assert isinstance(parseImap(s.bodystructure), list)
    assert isinstance(parseImap(s.body), list)
    assert sum(1 for _ in tree_nodes(tree)) <= MAX_PARTS


@pytest.mark.parametrize("name, data",
                         ALL_MESSAGES[:len(SPECIMENS)] + [("many-parts", GARBAGE["many-parts"])],
                         ids=SPECIMENS + ["many-parts"])
def test_json_round_trip(name, data):
    """toJSON/fromJSON give back an equal summary, bytes fields included; the JSON is one
    object."""
    s = summary(data)
    text = toJSON(s)
    assert isinstance(json.loads(text), dict)
    assert fromJSON(text) == s


@pytest.mark.parametrize("text", ["[]", "{}", '{"v": 1}', '{"v": 2, "size": 1}', "null"])
def test_json_rejects_other_texts(text):
    """fromJSON raises ValueError for JSON that is not a summary."""
    with pytest.raises(ValueError):
        fromJSON(text)


def test_limits_follow_dovecot():
    """At most 10,000 parts (the rest of the message is the last part's body) and MIME nesting
    at most 100 deep (a deeper multipart or message/rfc822 part is an opaque
    application/octet-stream part)."""
    s = summary(manyParts(MAX_PARTS + 5))
    leaves = s.parts["parts"]
    assert len(leaves) == MAX_PARTS - 1
    assert s.body.count(b'("text" "plain"') == MAX_PARTS - 1
    assert b'"7bit" 262 27)' in s.body  # the last part absorbed the rest

    s = summary(deepMultipart(120))
    depth = max(d for _, d in tree_nodes(s.parts))
    assert depth == 99
    assert (b'("application" "octet-stream" ("boundary" "x99y") NIL NIL "7bit" 2372 NIL'
            in s.bodystructure)

    s = summary(deepRfc822(120))
    assert s.bodystructure.count(b'"message" "rfc822"') == 99
    assert b'("application" "octet-stream" NIL NIL NIL "7bit" 660' in s.bodystructure


class SequentialFile(io.RawIOBase):
    """A file that only reads forward and remembers the sizes asked for."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.reads = []

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, n=-1):
        assert n is not None and 0 < n <= 1 << 20, f"read({n}) is not a bounded read"
        self.reads.append(n)
        return self._f.read(n)

    def seek(self, *args):
        raise AssertionError("summarize() must not seek")

    def close(self):
        self._f.close()
        super().close()


def test_large_message_in_bounded_memory():
    """A 50 MB message with a 40 MB attachment is read once, forward, in bounded chunks,
    without holding it: the peak of Python allocations stays under 4 MB (LF and CRLF)."""
    workdir = Path(tempfile.mkdtemp())
    try:
        for crlf in (False, True):
            path = workdir / "big.eml"
            with open(path, "wb") as f:
                f.write(bigAttachment(40, crlf))
                f.write(b"x" * (10 << 20))
            size = path.stat().st_size
            f = SequentialFile(path)
            tracemalloc.start()
            try:
                s = summarize(f)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
                f.close()
            assert peak < 4 << 20, f"peak {peak} bytes"
            assert s.size == size
            assert sum(f.reads) >= size
            attachment = s.parts["parts"][1]
            assert attachment["bodyEnd"] - attachment["bodyStart"] > 40_000_000
            assert b'"application" "octet-stream" NIL NIL NIL "base64"' in s.bodystructure
    finally:
        shutil.rmtree(workdir)


def test_internal_errors_do_not_stop_the_index(monkeypatch):
    """Should the parser ever fail on a message, summarize() still answers: the whole file as
    one text/plain body, with the right sizes."""
    from pymaild.store import summary as module

    def broken(part):
        raise IndexError("a bug")

    monkeypatch.setattr(module, "_applyContent", broken)
    data = specimen("alternative-in-mixed.eml")
    s = summary(data)
    assert (s.size, s.vsize, s.lines) == (len(data), virtual(data), data.count(b"\n"))
    assert s.body == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" %d %d)' % (
        virtual(data), data.count(b"\n"))
    assert s.envelope == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_huge_header_values_are_cut():
    """Header values longer than 1 MiB are kept only up to 1 MiB (a deliberate difference from
    Dovecot, which would send all of them): memory stays bounded, the structure stays right."""
    s = summary(GARBAGE["huge-header-line"])
    subject = parseImap(s.envelope)[1]
    assert (1 << 20) - len(b"Subject: ") <= len(subject) <= 1 << 20
    assert s.parts["bodyEnd"] == len(GARBAGE["huge-header-line"])
    assert s.lines == 1


# --------------------------------------------------------------------------------------------
# Differential tests against Dovecot
# --------------------------------------------------------------------------------------------

DIFFERENTIAL = (
    [(name, specimen(name)) for name in SPECIMENS]
    + [("many-parts", manyParts(MAX_PARTS + 5)),
       ("deep-multipart", deepMultipart(120)),
       ("deep-rfc822", deepRfc822(120)),
       ("big-attachment-lf", bigAttachment(5)),
       ("big-attachment-crlf", bigAttachment(5, crlf=True))]
    + [(name, GARBAGE[name]) for name in sorted(GARBAGE)
       if name not in ("empty", "huge-header-line", "huge-folded-header", "many-parts",
                       "deep-multipart", "deep-rfc822")]
    + [(f"damaged-{seed}", damaged(seed)) for seed in range(1000, 1400)])

FETCH_ITEMS = ("ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.SIZE")


def dovecotFetch(messages) -> dict:
    """Dovecot's FETCH answers (FETCH_ITEMS) for C{messages}, (name, bytes) pairs, by name;
    skips the test when Dovecot is not installed."""
    if dovecot_imap_path() is None:
        pytest.skip("Dovecot is not installed (apt-get install dovecot-imapd); "
                    "the differential tests need /usr/lib/dovecot/imap")
    root = scratch_maildir("summary-dovecot-")
    try:
        for number, (_, data) in enumerate(messages, 1000000):
            (root / "cur" / maildir_filename(number, data)).write_bytes(data)
        with DovecotIMAP(root) as imap:
            untagged, tagged = imap.command("SELECT INBOX")
            assert b" OK " in tagged, tagged
            fetch = "FETCH 1:* (%s)" % " ".join(FETCH_ITEMS)
            # The second answer is the one from Dovecot's cache, which is what clients see
            # (the first can differ in case for plain text/plain messages, see below).
            for _ in range(2):
                untagged, tagged = imap.command(fetch)
                assert b" OK " in tagged, tagged
        answers = {}
        for response in untagged:
            if b" FETCH " in response:
                number, items = parse_fetch(response)
                answers[messages[number - 1][0]] = items
        assert len(answers) == len(messages)
        return answers
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def assertMatchesDovecot(data: bytes, theirs: dict) -> None:
    s = summary(data)
    mine = {"ENVELOPE": s.envelope, "BODYSTRUCTURE": s.bodystructure, "BODY": s.body,
            "RFC822.SIZE": b"%d" % s.vsize}
    for item in FETCH_ITEMS:
        assert mine[item] == theirs[item], item


@pytest.fixture(scope="module")
def dovecotAnswers():
    """Dovecot's FETCH answers for every message of DIFFERENTIAL, by name."""
    return dovecotFetch(DIFFERENTIAL)


@pytest.mark.parametrize("name, data", DIFFERENTIAL, ids=[m[0] for m in DIFFERENTIAL])
def test_matches_dovecot(dovecotAnswers, name, data):
    """ENVELOPE, BODYSTRUCTURE, BODY and RFC822.SIZE are byte for byte what Dovecot sends,
    literals (8-bit, CR/LF, more than four escapes) and quoted strings alike.

    Deliberate differences, none of them exercised here: Dovecot answers the very first FETCH of
    an uncached single-part text/plain us-ascii 7bit message with the Content-Type's own case
    ("TEXT" "PLAIN") and every later one with the canonical lower case, which summarize() always
    gives (this test compares with Dovecot's cached, second answer); header values longer than
    1 MiB are cut at 1 MiB, and only the first 10,000 Date/Subject/address/Message-ID/Content-*
    header lines of a message are used (Dovecot has no such caps); and Dovecot drops the last
    continuation line of a folded header of several hundred kilobytes (100,000 lines), which
    summarize() keeps ("huge-folded-header" is therefore only in the structural tests)."""
    assertMatchesDovecot(data, dovecotAnswers[name])


def test_non_text_codec_in_encoded_word_keeps_the_structure():
    """
    An encoded-word naming a codec that is not a charset (zlib, base64) is read as plain
    bytes; it does not throw the message's MIME structure away.
    """
    import io

    from pymaild.store.summary import decodeHeader, summarize

    assert decodeHeader(b"=?zlib?q?x?= hi") == "x hi"
    s = summarize(io.BytesIO(
        b"Subject: =?zlib?q?x?=\nContent-Type: multipart/mixed; boundary=a\n\n--a\n\nx\n--a\n\ny\n--a--\n"
    ))
    assert s.parts["kind"] == "multipart" and len(s.parts["parts"]) == 2
