"""
The SMTP DATA encoder of the outbound queue: the same bytes as a line-by-line reference however
the message is cut into pieces (a CR at the end of a piece, a dot line at a piece boundary, the
16 KiB and 64 KiB boundaries where Twisted's transformChunk forgot the dot), and a round trip
through pymaild's own DATA reader that finds the end exactly where the encoder put it.
"""

from __future__ import annotations

import random
import re

import pytest

from pymaild.queue.encode import DataEncoder, encodeMessage
from pymaild.smtp.data import DataReader

SAMPLES = [
    b"",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\r",
    b"\r\r\n\n",
    b".",
    b"..",
    b".\n",
    b"..\n",
    b".\r\n",
    b".\r",
    b"\n.",
    b"\r.",
    b"\r\n.",
    b"no final line end",
    b"Subject: hi\n\nbody\n",
    b"Subject: hi\r\n\r\nbody\r\n",
    b".first line dotted\nsecond\n",
    b"a\n.\nb\n..\nc\n...\n",
    b"a\r\n.\r\nb\r.\rc\n.\r\nd\r\n.\n",
    b"mixed\rbare\rcr\nand lf\r\nand crlf\n\n\r\r\n\n.",
    b"\n\n\n.\n\n",
    b"8-bit \xff\xfe\x80 caf\xc3\xa9\n.\xe9t\xe9\n\x00nul\r\x00\n",
    b"trailing cr\r",
    b"trailing crs\r\r",
    b"line.with.dots. inside.\n . space first\n",
]

#: what an attacker would put in a message to end the data early if the dot went unstuffed
SMUGGLING = (b"Subject: first\n\nhello\n.\nMAIL FROM:<a@evil.example>\nRCPT TO:<b@victim.example>\n"
             b"DATA\n\r\n.\r\nMAIL FROM:<c@evil.example>\r\n\r.\rMAIL FROM:<d@evil.example>\r"
             b"QUIT\nbye")


def reference(data: bytes) -> bytes:
    """The encoding, line by line: split at every CRLF, LF or CR, double a leading dot, CRLF."""
    if not data:
        return b".\r\n"
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line end: no line after it
    out = b""
    for line in lines:
        if line.startswith(b"."):
            line = b"." + line
        out += line + b"\r\n"
    return out + b".\r\n"


def encode(pieces) -> bytes:
    encoder = DataEncoder()
    out = b"".join(encoder.feed(piece) for piece in pieces) + encoder.finish()
    assert encoder.size == len(out)
    return out


def split_at(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.choice((0, 1, 2, 3, 5, 64, 1000))
        pieces.append(data[pos:pos + step])
        pos += step
    return pieces


def stored(data: bytes) -> bytes:
    """What the inbound reader stores for a message sent by the encoder: LF line ends only."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data + b"\n" if data and not data.endswith(b"\n") else data


def test_reference():
    assert reference(b"") == b".\r\n"
    assert reference(b"a") == b"a\r\n.\r\n"
    assert reference(b".a\r\rb\r\n\n.\n") == b"..a\r\n\r\nb\r\n\r\n..\r\n.\r\n"


@pytest.mark.parametrize("data", SAMPLES + [SMUGGLING], ids=repr)
def test_every_split_matches_the_reference(data):
    expected = reference(data)
    assert encodeMessage(data) == expected
    assert encode([data]) == expected
    for cut in range(len(data) + 1):
        assert encode(split_at(data, [cut])) == expected, cut
    assert encode([data[i:i + 1] for i in range(len(data))]) == expected
    if len(data) <= 40:
        for a in range(len(data) + 1):
            for b in range(a, len(data) + 1):
                assert encode(split_at(data, [a, b])) == expected, (a, b)
    rng = random.Random(data)
    for _ in range(20):
        assert encode(split_randomly(data, rng)) == expected


def test_random_messages_match_the_reference():
    rng = random.Random(25)
    for _ in range(500):
        data = bytes(rng.choice(b"a.\r\n\xff ") for _ in range(rng.randint(0, 60)))
        expected = reference(data)
        assert encodeMessage(data) == expected, data
        assert encode(split_randomly(data, rng)) == expected, data
        cut = rng.randint(0, len(data))
        assert encode(split_at(data, [cut])) == expected, (data, cut)


def message_with_dot_lines_at(*offsets: int, size: int) -> bytes:
    """LF lines of text where a line starting with "." begins at each of C{offsets}."""
    out = bytearray()
    for offset in offsets:
        while offset - len(out) > 80:
            out += b"x" * 71 + b"\n"
        out += b"y" * (offset - len(out) - 1) + b"\n"
        assert len(out) == offset
        out += b".dot line at a boundary\n"
    while len(out) < size:
        out += b"z" * 71 + b"\n"
    return bytes(out)


@pytest.mark.parametrize("pieceSize", [16384, 65536])
def test_dot_line_at_piece_boundary(pieceSize):
    data = message_with_dot_lines_at(16384, 65536, 65536 + 16384, size=200000)
    for offset in (16384, 65536):
        assert data[offset - 1:offset + 1] == b"\n."
    pieces = [data[i:i + pieceSize] for i in range(0, len(data), pieceSize)]
    out = encode(pieces)
    assert out == reference(data)
    assert out.count(b"\r\n..dot line at a boundary\r\n") == 3
    assert b"\r\n.\r\n" not in out[:-3]
    # and as CRLF, with the CR the last octet of a piece and the LF the first of the next
    crlf = data.replace(b"\n", b"\r\n")
    cut = crlf.index(b"\r\n.dot") + 1
    out = encode([crlf[:cut], crlf[cut:]])
    assert out == reference(data)
    # in a bare-CR message too
    cr = data.replace(b"\n", b"\r")
    assert encode([cr[i:i + pieceSize] for i in range(0, len(cr), pieceSize)]) == reference(data)


def read_back(pieces):
    """Feed the encoder's output and a next command to DataReader, as a remote server would."""
    sink = []
    reader = DataReader(sink.append, maxSize=1 << 30, maxLine=1 << 20, bare="reject")
    consumed = 0
    for i, piece in enumerate(pieces):
        rest = reader.feed(piece)
        if rest is not None:
            consumed += len(piece) - len(rest)
            return reader, b"".join(sink), consumed, rest + b"".join(pieces[i + 1:])
        consumed += len(piece)
    return reader, b"".join(sink), consumed, None


@pytest.mark.parametrize("data", SAMPLES + [SMUGGLING], ids=repr)
def test_round_trip_through_the_reader(data):
    out = encodeMessage(data)
    wire = out + b"QUIT\r\n"
    rng = random.Random(data)
    for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))],
                   split_randomly(wire, rng), split_randomly(wire, rng)):
        reader, message, consumed, rest = read_back(pieces)
        assert reader.problem is None  # no bare CR or LF went out
        assert consumed == len(out) and rest == b"QUIT\r\n"  # the end exactly where it was put
        assert message == stored(data)


def test_smuggling_message_stays_one_message():
    reader, message, consumed, rest = read_back([encodeMessage(SMUGGLING)])
    assert rest == b"" and consumed == len(encodeMessage(SMUGGLING))
    assert message.count(b"MAIL FROM:") == 3 and message.endswith(b"QUIT\nbye\n")
    assert b"\n.\n" in message


def test_round_trip_with_boundary_dot_lines():
    data = message_with_dot_lines_at(16384, 65536, size=100000)
    encoder = DataEncoder()
    pieces = [encoder.feed(data[i:i + 16384]) for i in range(0, len(data), 16384)]
    pieces.append(encoder.finish())
    reader, message, consumed, rest = read_back(pieces + [b"RSET\r\n"])
    assert reader.problem is None and rest == b"RSET\r\n" and message == data


def test_finish_after_a_piece_ending_in_cr():
    encoder = DataEncoder()
    assert encoder.feed(b"line\r") == b"line"  # the CR is held back: an LF may follow
    assert encoder.size == 4
    assert encoder.finish() == b"\r\n.\r\n"
    assert encoder.size == 9
    encoder = DataEncoder()
    assert encoder.feed(b"\r") == b""
    assert encoder.feed(b"\r") == b"\r\n"
    assert encoder.finish() == b"\r\n.\r\n"
    encoder = DataEncoder()
    assert encoder.feed(b"a\r") + encoder.feed(b"\n") == b"a\r\n"  # one line end, not two
    assert encoder.finish() == b".\r\n"


def test_empty_message():
    assert encodeMessage(b"") == b".\r\n"
    encoder = DataEncoder()
    assert encoder.feed(b"") == b""
    assert encoder.finish() == b".\r\n" and encoder.size == 3


def test_message_without_final_line_end():
    assert encodeMessage(b"Subject: x\n\nno end") == b"Subject: x\r\n\r\nno end\r\n.\r\n"
    assert encodeMessage(b".") == b"..\r\n.\r\n"
    encoder = DataEncoder()
    assert encoder.feed(b"a\n") == b"a\r\n"
    assert encoder.feed(b".b") == b"..b"
    assert encoder.finish() == b"\r\n.\r\n"
