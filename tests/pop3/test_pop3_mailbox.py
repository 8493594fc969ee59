"""
The pieces of the POP3 mailbox that need no server: dot-stuffing across any chunking, TOP's
cut, UIDL formats.
"""

from __future__ import annotations

import io
import random

import pytest

from pymaild.pop3.mailbox import DotStuffer, stuffWhole, topChunks
from pymaild.uidl import checkUidlFormat, formatUidl

SAMPLES = [
    b"",
    b".",
    b"a\n.b\n..c\n.\nend",
    b"Subject: x\r\n\r\n.dot\r\nbare\rcr\r\n.\r\n",
    b"\r\n\r\n.\r\n\r",
    b"x" * 1000 + b"\n." * 300 + b"\r",
]


def reference(raw: bytes) -> bytes:
    """The same transformation on the whole message at once, written the plain way."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    lines = text.split(b"\r\n")
    last = lines.pop()  # after the last CRLF: b"" if the message ended with one
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    if last:
        out += (b"." + last if last.startswith(b".") else last) + b"\r\n"
    return out + b".\r\n"


@pytest.mark.parametrize("raw", SAMPLES)
def test_dot_stuffing_is_the_same_for_every_chunking(raw):
    rng = random.Random(raw)
    expected = reference(raw)
    for _ in range(200):
        stuffer, out, pos = DotStuffer(), [], 0
        while pos < len(raw):
            step = rng.randint(1, 7)
            out.append(stuffer.feed(raw[pos:pos + step]))
            pos += step
        out.append(stuffer.end())
        assert b"".join(out) == expected
    assert stuffWhole(raw) == expected  # the one-piece path of small messages


def test_top_cuts_after_the_header_and_n_lines():
    message = b"A: 1\nB: 2\n folded\n\nl1\nl2\nl3\n"
    assert b"".join(topChunks(io.BytesIO(message), 0)) == b"A: 1\nB: 2\n folded\n\n"
    assert b"".join(topChunks(io.BytesIO(message), 2)) == b"A: 1\nB: 2\n folded\n\nl1\nl2\n"
    assert b"".join(topChunks(io.BytesIO(message), 99)) == message
    assert b"".join(topChunks(io.BytesIO(b"A: 1\nno body"), 5)) == b"A: 1\nno body"
    # a body line longer than a chunk counts once
    long = b"A: 1\n\n" + b"x" * 200_000 + b"\nnext\n"
    assert b"".join(topChunks(io.BytesIO(long), 1)) == b"A: 1\n\n" + b"x" * 200_000 + b"\n"


def test_uidl_formats():
    assert formatUidl("%f", 5, 99, "1700000000.M1P2.host,S=10") == b"1700000000.M1P2.host,S=10"
    assert formatUidl("%08Xu%08Xv", 26, 1700000000, "x") == b"0000001A6553F100"
    assert formatUidl("%u.%v", 7, 8, "x") == b"7.8"
    assert formatUidl("u%%%u", 7, 8, "x") == b"u%7"
    too_long = formatUidl("%f", 1, 1, "h" * 80)
    assert len(too_long) == 40 and too_long == formatUidl("%f", 1, 1, "h" * 80)
    assert formatUidl("%f", 1, 1, "with space") != formatUidl("%f", 1, 1, "with spacf")
    assert b" " not in formatUidl("%f", 1, 1, "with space")
    for good in ("%f", "%f-%u", "%08Xu%08Xv", "pop-%u-%v"):
        assert checkUidlFormat(good) == good
    for bad in ("%v", "%u", "%08Xu", "%q", "plain", "a b%f", "%"):
        with pytest.raises(ValueError):
            checkUidlFormat(bad)
