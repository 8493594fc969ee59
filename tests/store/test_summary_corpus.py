"""
pymaild.store.summary does not change its answers when it is made faster: every field of the
summaries of a corpus (the specimens, the generated limit cases, damaged copies and a few
hundred randomly built MIME messages) is compared with digests stored in
C{tests/data/summary-corpus.txt}, computed by the implementation they were taken from.

The Dovecot differential tests (C{test_summary.py}) check ENVELOPE, BODY, BODYSTRUCTURE and
RFC822.SIZE against Dovecot, the generated messages of this corpus included; the digests also
cover what Dovecot cannot be asked for the same way (part offsets, header fields, sort keys)
and do not need Dovecot installed.

Only a deliberate change of the summaries may regenerate the file::

    python tests/store/test_summary_corpus.py > tests/data/summary-corpus.txt
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from pymaild.store.summary import MessageSummary, summarize, summarizePath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_summary import (  # noqa: E402
    GARBAGE,
    SPECIMENS,
    assertMatchesDovecot,
    damaged,
    dovecotFetch,
    specimen,
)

EXPECTED = Path(__file__).resolve().parent.parent / "data" / "summary-corpus.txt"

# --------------------------------------------------------------------------------------------
# Random MIME messages
# --------------------------------------------------------------------------------------------

_NAMES = ["Alice Smith", "Bob", "Carol O'Brien", "=?utf-8?q?J=C3=BCrgen?=", "=?iso-8859-1?b?SvxyZ2Vu?=",
          "Dave (the boss)", "\"Erin, Jr.\"", "\"quoted \\\"name\\\"\"", "Frank  Wilson", "\xc3\xa9lise",
          "Grace.Hopper", ""]
_ADDRS = ["alice@example.org", "bob@mail.example.com", "carol+tag@example.net", "dave@[192.0.2.1]",
          "erin", "\"odd local\"@example.org", "frank@example", "@route.example:grace@example.org",
          "a..b@example.org", "heidi@EXAMPLE.ORG"]
_SUBJECTS = ["meeting notes", "Re: meeting notes", "Fwd: [list] Re: budget (fwd)", "RE: re: Re: x",
             "=?utf-8?b?w6lsw6h2ZQ==?= report", "=?utf-8?q?caf=C3=A9?= =?utf-8?q?_au_lait?=",
             "[fwd: inner subject]", "   spaced    out   ", "tab\there", "caf\xc3\xa9 8-bit",
             "quote \" and \\ backslash", "", "a \"b\" c \\ d \\ e \" f"]
_DATES = ["Sun, 01 Jan 2023 00:00:36 +0000", "1 Feb 99 13:14 EST", "Mon, 31 Feb 2023 10:00:00 +0100",
          "Tue, 2 Jan 2024 25:61:00 -0830", "not a date", "Wed, 03 Jan 2024 10:00:00 (CET) +0100",
          "4 Mar 2024 08:00:00 PST"]
_TYPES = ["text/plain", "TEXT/PLAIN", "text/html", "application/pdf", "image/png", "text/calendar",
          "application/octet-stream", "text", "text/plain;", "message/delivery-status"]
_PARAMS = ["", "; charset=us-ascii", "; charset=\"utf-8\"; format=flowed", "; charset=ISO-8859-1",
           "; name=\"report 2025.pdf\"", "; name*=utf-8''na%C3%AFve.txt",
           "; name*0=\"long \"; name*1=\"name.txt\"", "; name*0*=utf-8''a%20; name*1=b",
           "; CHARSET=US-ASCII", "; a=b; a=c", " ; x = y", "; q=\"\\\"\""]
_ENCODINGS = [None, "7bit", "8bit", "base64", "quoted-printable", "BASE64", "x-uuencode", "7bit (c)"]
_WORDS = "the of and to in budget report draft schedule --not a boundary -- ---- end".split()


def _folded(r: random.Random, value: str) -> str:
    if r.random() < 0.2 and " " in value:
        i = value.index(" ")
        return value[:i] + "\n" + r.choice(" \t") + value[i + 1:]
    return value


def _name(r: random.Random, name: str) -> str:
    choice = r.random()
    if choice < 0.15:
        name = name.upper()
    elif choice < 0.3:
        name = name.lower()
    if r.random() < 0.05:
        name += r.choice([" ", "\t", "  "])
    return name


def _address(r: random.Random) -> str:
    name, addr = r.choice(_NAMES), r.choice(_ADDRS)
    form = r.random()
    if form < 0.35 or not name:
        return addr
    if form < 0.9:
        return f"{name} <{addr}>"
    if form < 0.95:
        return f"{addr} ({name})"
    return f"group: {addr}, {r.choice(_ADDRS)};"


def _header(r: random.Random, envelope: bool) -> list[str]:
    lines = []
    if envelope:
        lines.append("Received: from mx.example.org (mx [192.0.2.1])\n\tby mail.example.com; "
                     + r.choice(_DATES))
        pool = [("Date", lambda: r.choice(_DATES)), ("Subject", lambda: r.choice(_SUBJECTS)),
                ("From", lambda: _address(r)), ("Sender", lambda: _address(r)),
                ("Reply-To", lambda: _address(r)),
                ("To", lambda: ", ".join(_address(r) for _ in range(r.randint(1, 4)))),
                ("Cc", lambda: ", ".join(_address(r) for _ in range(r.randint(1, 3)))),
                ("Bcc", lambda: _address(r)),
                ("Message-ID", lambda: r.choice(["<%d@example.org>" % r.randrange(10**6), "<bad>",
                                                 "<a b@c>", "no brackets@x"])),
                ("In-Reply-To", lambda: "<%d@example.org> (comment)" % r.randrange(100)),
                ("References", lambda: " ".join("<%d@example.org>" % r.randrange(100)
                                                for _ in range(r.randint(1, 5)))),
                ("X-Mailer", lambda: "Mutt/2.2.9"), ("MIME-Version", lambda: "1.0")]
        for name, value in r.sample(pool, r.randint(3, len(pool))):
            lines.append(f"{_name(r, name)}: {_folded(r, value())}")
            if r.random() < 0.05:
                lines.append(f"{_name(r, name)}:{value()}")  # repeated, no space
    return lines


def _part(r: random.Random, depth: int, boundaries: list[str]) -> tuple[list[str], str]:
    """(header lines, body) of one part."""
    header = []
    kind = r.random() if depth < 4 else 0.0
    if kind < 0.55:
        ctype = r.choice(_TYPES)
        if r.random() < 0.9:
            header.append(f"{_name(r, 'Content-Type')}: {ctype}{r.choice(_PARAMS)}")
        encoding = r.choice(_ENCODINGS)
        if encoding:
            header.append(f"{_name(r, 'Content-Transfer-Encoding')}: {encoding}")
        for name, value in (("Content-ID", "<part%d@example.org>" % r.randrange(99)),
                            ("Content-Description", r.choice(_SUBJECTS)),
                            ("Content-Disposition", r.choice(["inline", "attachment; filename=a.txt",
                                                              "attachment; filename*=utf-8''%C3%A9"])),
                            ("Content-Language", r.choice(["en", "en, de", "de-CH (c)"])),
                            ("Content-Location", "http://example.org/a b"),
                            ("Content-MD5", "Q2hlY2sgSW50ZWdyaXR5IQ==")):
            if r.random() < 0.12:
                header.append(f"{_name(r, name)}: {_folded(r, value)}")
        lines = []
        for _ in range(r.randint(0, 12)):
            words = r.choices(_WORDS, k=r.randint(0, 12))
            if r.random() < 0.05 and boundaries:
                words = ["--" + r.choice(boundaries) + r.choice(["", "--", "x", " "])]
            lines.append(" ".join(words))
        body = "\n".join(lines) + r.choice(["\n", "", "\n\n"])
        return header, body
    if kind < 0.85:
        boundary = r.choice(["b%d" % r.randrange(1000), "=_Part_%d" % r.randrange(99),
                             (boundaries[-1] + "x") if boundaries else "nested",
                             "with space %d" % depth, "x" * r.choice([10, 70, 85])])
        subtype = r.choice(["mixed", "alternative", "related", "digest", "MIXED"])
        quoted = f'"{boundary}"' if " " in boundary or r.random() < 0.5 else boundary
        header.append(f"{_name(r, 'Content-Type')}: multipart/{subtype};"
                      f"{r.choice([' ', chr(10) + chr(9)])}boundary={quoted}")
        if r.random() < 0.7:
            header.append("MIME-Version: 1.0")
        inner = boundaries + [boundary[:80]]
        body = r.choice(["", "This is a multi-part message in MIME format.\n", "preamble\n\n"])
        for _ in range(r.randint(0, 4)):
            h, b = _part(r, depth + 1, inner)
            body += f"--{boundary}{r.choice(['', '', ' ', chr(9)])}\n" + "\n".join(h) + "\n\n" + b
            if not b.endswith("\n"):
                body += "\n"
        if r.random() < 0.85:
            body += f"--{boundary}--\n" + r.choice(["", "epilogue\n", "--not-it\n"])
        return header, body
    header.append(f"{_name(r, 'Content-Type')}: message/rfc822")
    if r.random() < 0.7:
        header.append("MIME-Version: 1.0")
    h, b = _part(r, depth + 1, boundaries)
    return header, "\n".join(_header(r, True) + h) + "\n\n" + b


def randomMessage(seed: int) -> bytes:
    r = random.Random(seed)
    h, b = _part(r, 0, [])
    lines = _header(r, True) + h
    r.shuffle(lines)
    text = "\n".join(lines) + "\n\n" + b
    data = text.encode("latin-1", "replace") if r.random() < 0.1 else text.encode("utf-8")
    roll = r.random()
    if roll < 0.3:
        data = data.replace(b"\n", b"\r\n")
    elif roll < 0.35:
        data = data.replace(b"\n", b"\r\n", r.randint(1, 20))
    if r.random() < 0.15:
        m = bytearray(data)
        for _ in range(r.randint(1, 4)):
            i = r.randrange(len(m) + 1)
            m[i:i] = r.choice([b"\n", b"\r", b"--", b"\x00", b"\xff", b";", b"\n\n", b"\n "])
        data = bytes(m)
    return data


# header lines at the edges of unfolding and blank handling, each in a root header, a part's
# header and an encapsulated message's header, with LF and CRLF line ends
_EDGE_HEADERS = [
    b"Subject:", b"Subject: ", b"Subject:  \n\tfolded", b"Subject:\t\n folded", b"Subject: \r",
    b"Subject: a\r\r", b"Subject:\ra", b"Subject \t: spaced name", b"SUBJECT:upper", b"Subject: a\n\n",
    b"From: a@b\n  \n\tc@d", b"To:\n b@c", b"Cc: x@y\n\t", b"Date:  Tue, 14 Jan 2025 09:15:00 +0100",
    b"Message-ID:\t<a@b>", b"Message-ID: <a b@c>", b"In-Reply-To: <x@y>\n <z@w>", b"X-Other: y\n\tz",
    b" Subject: leading blank", b"Subject: one\nSubject: two", b"Content-Type: text/html;\n\tcharset=\"x\"",
    b"Content-Transfer-Encoding:  base64 ", b"Content-Transfer-Encoding: (c) 8bit",
    b"Content-Transfer-Encoding:\n\tquoted-printable", b"Content-ID:\t<i@d>\r",
]


def _edgeMessages():
    for i, line in enumerate(_EDGE_HEADERS):
        for crlf in (False, True):
            for where in ("root", "part", "rfc822"):
                if where == "root":
                    m = b"From: r@s\n" + line + b"\nTo: t@u\n\nbody\n"
                elif where == "part":
                    m = (b"Content-Type: multipart/mixed; boundary=z\n\n--z\n" + line
                         + b"\nX: y\n\nbody\n--z--\n")
                else:
                    m = b"Content-Type: message/rfc822\n\nFrom: r@s\n" + line + b"\n\nbody\n"
                yield f"edge-{i}-{where}{'-crlf' if crlf else ''}", m.replace(b"\n", b"\r\n") if crlf else m


def _keptLimits():
    """Messages that reach the caps on kept header bytes (8 MiB, with one 950-byte header in
    each of 9,000 parts) and on kept header lines (10,000, two in each of 6,000 parts)."""
    description = b"Content-Description: " + b"d" * 929 + b"\n"
    yield "limit-kept-bytes", (
        b"Content-Type: multipart/mixed; boundary=k\n\n"
        + b"".join(b"--k\n" + description + b"\n%d\n" % i for i in range(9000)) + b"--k--\n")
    yield "limit-kept-lines", (
        b"Content-Type: multipart/mixed; boundary=k\n\n"
        + b"".join(b"--k\nContent-Type: text/plain\nContent-ID: <%d>\n\n%d\n" % (i, i)
                   for i in range(6000)) + b"--k--\n")


def corpus():
    """(name, message) pairs, deterministic."""
    for name in SPECIMENS:
        yield name, specimen(name)
    yield from _edgeMessages()
    yield from _keptLimits()
    for name in sorted(GARBAGE):
        yield "garbage-" + name, GARBAGE[name]
    for seed in range(1000, 1400):
        yield f"damaged-{seed}", damaged(seed)
    for seed in range(600):
        yield f"random-{seed}", randomMessage(seed)


def digest(s: MessageSummary) -> str:
    """One digest of every field of the summary (repr: bytes, str, int, dict and tuple values
    are written exactly, in order)."""
    text = repr([(f.name, getattr(s, f.name)) for f in fields(MessageSummary)])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _expected() -> dict:
    out = {}
    for line in EXPECTED.read_text().splitlines():
        name, value = line.split()
        out[name] = value
    return out


CORPUS = list(corpus())


class ShortReads(io.RawIOBase):
    """A file that returns at most C{n} bytes a read (buffer edges everywhere)."""

    def __init__(self, data: bytes, n: int):
        self._data = data
        self._pos = 0
        self._n = n

    def readable(self):
        return True

    def read(self, size=-1):
        size = self._n if size is None or size < 0 else min(size, self._n)
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


def test_corpus_is_complete():
    """The stored digests are those of this corpus, no more, no less (a digest file that does
    not match the corpus would let messages go unchecked)."""
    assert sorted(_expected()) == sorted(name for name, _ in CORPUS)


@pytest.mark.parametrize("name, data", CORPUS, ids=[name for name, _ in CORPUS])
def test_summaries_are_unchanged(name, data):
    """Every field of the summary is the one stored, whether the message is given as bytes or
    comes from a file read in one piece or a few bytes at a time."""
    expected = _expected()[name]
    assert digest(summarize(data)) == expected
    assert digest(summarize(io.BytesIO(data))) == expected
    if len(data) < 100_000:
        assert digest(summarize(ShortReads(data, 997))) == expected


def test_files_read_whole_or_in_chunks(tmp_path):
    """summarizePath() answers as summarize() does, for files read in one piece and for those
    of a megabyte or more (the huge-header ones), read in chunks."""
    path = tmp_path / "message"
    sizes = set()
    for name, data in CORPUS:
        path.write_bytes(data)
        assert digest(summarizePath(str(path))) == _expected()[name], name
        sizes.add(len(data) >= 1 << 20)
    assert sizes == {False, True}


# the messages of this corpus that the Dovecot differential tests of test_summary.py lack
GENERATED = [(name, data) for name, data in CORPUS if name.startswith(("random-", "edge-"))]


@pytest.fixture(scope="module")
def dovecotAnswers():
    return dovecotFetch(GENERATED)


@pytest.mark.parametrize("name, data", GENERATED, ids=[name for name, _ in GENERATED])
def test_generated_messages_match_dovecot(dovecotAnswers, name, data):
    """The random MIME messages and the header edge cases: ENVELOPE, BODYSTRUCTURE, BODY and
    RFC822.SIZE byte for byte as Dovecot sends them (as in test_summary.test_matches_dovecot)."""
    assertMatchesDovecot(data, dovecotAnswers[name])


def _usualDates():
    """Dates in the usual form with every field at and around its limits."""
    r = random.Random(7)
    for _ in range(3000):
        yield "%s%d %s %04d %02d:%02d:%02d %s%02d%02d" % (
            r.choice(["", "Sun, ", "Xyz, ", "mon, "]), r.choice([1, 9, 10, 28, 29, 30, 31, 32, 0]),
            r.choice(["Jan", "feb", "FEB", "Apr", "Dec", "Foo"]),
            r.choice([0, 1, 1900, 1970, 1999, 2000, 2023, 2024, 2100, 9999]),
            r.choice([0, 23, 24, 99]), r.choice([0, 59, 60]), r.choice([0, 59, 60, 61]),
            r.choice("+-"), r.choice([0, 1, 12, 14, 99]), r.choice([0, 30, 59, 60, 99]))


def test_usual_dates_take_the_general_way_s_answer():
    """The quick reading of the usual Date form gives what the general one gives."""
    from pymaild.store.summary import _anySentDate, _sentDate

    answers = set()
    for text in _usualDates():
        raw = text.encode()
        answers.add(_sentDate(raw) is None)
        assert _sentDate(raw) == _anySentDate(raw), text
    assert answers == {True, False}


if __name__ == "__main__":
    for name, data in CORPUS:
        print(name, digest(summarize(io.BytesIO(data))))
