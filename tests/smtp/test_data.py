"""
The SMTP DATA reader on its own: the end of data only at CRLF.CRLF, every smuggling variant
kept inside the message (and refused, or normalised), overlong lines and oversized messages
read to the real end, dot-unstuffing, and the same result for any way the bytes arrive.
"""

from __future__ import annotations

import random

import pytest

from pymaild.smtp.data import BARE_CR, BARE_LF, LINE_TOO_LONG, TOO_BIG, DataReader

#: end-of-data look-alikes an attacker puts before a second transaction (SMTP smuggling)
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\n.\r", b"\r.\n", b"\r.\r\n",
             b"\r\n.\r\r\n", b"\n\n.\n\n", b"\r\r\n.\r\r\n"]
SMUGGLED = b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<all@victim.example>\r\nDATA\r\nSubject: fake\r\n\r\npay\r\n"


def read(data: bytes, chunks=None, cls=DataReader, **kw):
    out = []
    reader = cls(out.append, kw.pop("maxSize", 1 << 30), **kw)
    pieces = chunks or [data]
    rest = None
    for i, piece in enumerate(pieces):
        rest = reader.feed(piece)
        if rest is not None:
            rest += b"".join(pieces[i + 1:])
            break
    return reader, b"".join(out), rest


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 5, 64, 1000))
        pieces.append(data[pos:pos + step])
        pos += step
    return pieces


def test_plain_message_is_unstuffed_and_stored_with_lf():
    data = b"Subject: hi\r\n\r\n..leading dot\r\nplain\r\n.\r\nNEXT COMMAND\r\n"
    reader, stored, rest = read(data)
    assert stored == b"Subject: hi\n\n.leading dot\nplain\n"
    assert rest == b"NEXT COMMAND\r\n" and reader.problem is None and reader.size == len(stored)


def test_empty_message_and_end_split_everywhere():
    reader, stored, rest = read(b".\r\n")
    assert stored == b"" and rest == b""
    data = b"a\r\n..b\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(data)):
        reader, stored, rest = read(data, [data[:cut], data[cut:]])
        assert (stored, rest) == (b"a\n.b\n", b"QUIT\r\n"), cut


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=repr)
def test_smuggling_variants_never_end_the_message(fake):
    """
    A fake end followed by a second transaction is message text: the reader runs to the real
    CRLF.CRLF; with bare line ends refused the message is refused, normalised it is one message
    holding the would-be commands as text.
    """
    data = b"Subject: first\r\n\r\nhello" + fake + SMUGGLED + b".\r\n"
    rng = random.Random(fake)
    for chunks in ([data], split_randomly(data, rng), split_randomly(data, rng)):
        reader, stored, rest = read(data, chunks)
        assert rest == b"", (fake, rest)
        assert reader.problem in (BARE_LF, BARE_CR) and stored == b""
        reader, stored, rest = read(data, chunks, bare="normalize")
        assert rest == b"" and reader.problem is None
        assert b"MAIL FROM:<ceo@victim.example>\n" in stored and stored.startswith(b"Subject: first\n")
        assert b"\r" not in stored


def test_random_chunking_gives_the_same_result():
    rng = random.Random(5)
    lines = [b"." * rng.randint(0, 3) + bytes(rng.choice(b"ab. \r\n") for _ in range(rng.randint(0, 30)))
             for _ in range(300)]
    lines = [line.replace(b"\r", b"").replace(b"\n", b"") for line in lines]
    sent = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)  # stuffed
    data = sent + b"\r\n.\r\nRSET\r\n"
    whole = read(data)
    assert whole[1] == b"\n".join(lines) + b"\n"
    assert whole[2] == b"RSET\r\n" and whole[0].problem is None
    for _ in range(50):
        parts = read(data, split_randomly(data, rng))
        assert (parts[1], parts[2], parts[0].problem) == (whole[1], whole[2], whole[0].problem)


def test_normalize_mode_is_the_same_for_every_chunking():
    """With bare line ends normalised, a piece that starts right after a bare LF loses nothing."""
    data = b"line1\nABCDEF\r\n\rX\n..dot\r\n.\r\nQUIT\r\n"
    whole = read(data, bare="normalize")
    assert whole[1] == b"line1\nABCDEF\n\nX\n.dot\n" and whole[2] == b"QUIT\r\n"
    for cut in range(1, len(data)):
        parts = read(data, [data[:cut], data[cut:]], bare="normalize")
        assert (parts[1], parts[2]) == (whole[1], whole[2]), cut
    rng = random.Random(9)
    for _ in range(100):
        parts = read(data, split_randomly(data, rng), bare="normalize")
        assert (parts[1], parts[2]) == (whole[1], whole[2])


def test_a_failing_sink_is_read_to_the_end_and_refused():
    """A full disk while the message arrives: the data is still read to CRLF.CRLF, then refused."""
    def full(data):
        raise OSError(28, "No space left on device")

    reader = DataReader(full, 1 << 30)
    assert reader.feed(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
    assert reader.problem == "disk" and reader.error.errno == 28


def test_overlong_line_is_read_to_the_real_end_and_refused():
    """
    A line over the limit does not leave DATA: its rest and everything up to CRLF.CRLF is read,
    nothing of it runs as a command, and the message is refused.
    """
    data = b"Subject: x\r\n\r\n" + b"A" * 5000 + b"\r\nMAIL FROM:<evil@example>\r\n.\r\nNOOP\r\n"
    for chunks in ([data], split_randomly(data, random.Random(1))):
        reader, stored, rest = read(data, chunks, maxLine=1000)
        assert reader.problem == LINE_TOO_LONG and rest == b"NOOP\r\n"
    reader, stored, rest = read(b"x" * 998 + b"\r\n.\r\n", maxLine=1000)
    assert reader.problem is None and stored == b"x" * 998 + b"\n"
    reader, stored, rest = read(b"x" * 999 + b"\r\n.\r\n", maxLine=1000)
    assert reader.problem == LINE_TOO_LONG


def test_too_big_is_counted_to_the_end():
    data = b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 1000 + b".\r\nQUIT\r\n"
    reader, stored, rest = read(data, split_randomly(data, random.Random(2)), maxSize=5000)
    assert reader.problem == TOO_BIG and rest == b"QUIT\r\n"
    assert reader.size == len(b"Subject: big\n\n") + 11 * 1000


def test_bdat_chunks_store_lf_and_keep_a_final_cr():
    from pymaild.smtp.data import BdatTransaction, ChunkReader

    out = []
    t = BdatTransaction(out.append, 1 << 20)
    assert ChunkReader(t, 5).feed(b"a\r\nb\rNEXT") == b"NEXT"  # the CR is held: a CRLF may be cut
    assert ChunkReader(t, 4).feed(b"\nc\r\r") == b""
    t.finish()
    assert b"".join(out) == b"a\nb\nc\r\r" and t.size == len(b"a\nb\nc\r\r") and t.problem is None
    small = BdatTransaction(out.append, 3)
    ChunkReader(small, 10).feed(b"0123456789")
    assert small.problem == TOO_BIG


# --- the reader of commit 7ab4532 (before its passes were merged), kept as the oracle ---------

class _ReferenceReader:
    """
    Feed it what arrives after C{354} (L{feed}) until it returns the bytes that follow the end
    of data (C{b""} when nothing does).

    @ivar problem: C{None}, or why the message must be refused (the first reason found).
    @ivar size: octets of the message as stored (LF line ends), counted even past the limit.
    """

    def __init__(self, sink: Callable[[bytes], None], maxSize: int, maxLine: int = 1000,
                 bare: str = "reject"):
        self.sink = sink
        self.maxSize = maxSize
        self.maxLine = maxLine  # octets of a line, its CRLF included (RFC 5321 4.5.3.1.6: 1000)
        self.bare = bare
        self.problem: str | None = None
        self.error: OSError | None = None
        self.size = 0
        self._carry = b""  # the start of a line whose end has not arrived
        self._crlfBefore = True  # the line before the carry ended with CRLF (DATA's own did)
        self._discarding = False  # inside an overlong line, thrown away up to its LF

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def feed(self, data: bytes) -> bytes | None:
        buf = self._carry + data if self._carry else data
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                self._carry = b"\r" if buf[-1:] == b"\r" else b""
                return None
            self._discarding = False
            self._crlfBefore = nl > 0 and buf[nl - 1] == 0x0D
            buf = buf[nl + 1:]
        last = buf.rfind(b"\n")
        if last < 0:
            self._carry = buf
            if len(buf) >= self.maxLine:
                self._overlong()
            return None
        complete, self._carry = buf[: last + 1], buf[last + 1:]
        # the end of data: a "." line after a CRLF, itself ended by CRLF
        prefix = b"\r\n" if self._crlfBefore else b"\n"
        probe = prefix + complete
        end = probe.find(b"\r\n.\r\n")
        rest = None
        if end >= 0:
            body = probe[len(prefix) : end + 2]  # its CRLF belongs to the message's last line
            rest = probe[end + 5 :] + self._carry
            self._carry = b""
        else:
            body = complete
            self._crlfBefore = complete[-2:-1] == b"\r"
        if body:
            self._take(body)
        if rest is None and len(self._carry) >= self.maxLine:
            self._overlong()
        return rest

    def _overlong(self) -> None:
        self._fail(LINE_TOO_LONG)
        self._discarding = True
        self._carry = b"\r" if self._carry[-1:] == b"\r" else b""

    def _take(self, body: bytes) -> None:
        """Complete lines of the message (dot-stuffed, as sent): check, unstuff, store."""
        lines = body.count(b"\n")
        crlf = body.count(b"\r\n")
        if lines != crlf:
            if self.bare == "reject":
                self._fail(BARE_LF)
            body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # every line end CRLF
            crlf = lines
        if body.count(b"\r") != crlf:
            if self.bare == "reject":
                self._fail(BARE_CR)
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if self.problem is None and len(body) >= self.maxLine and max(map(len, body.split(b"\n"))) >= self.maxLine:
            self._fail(LINE_TOO_LONG)  # (a line's length here counts its CR, not its LF)
        # dot-unstuffing: a line's leading dot goes (the first line's too)
        body = b"\r\n" + body
        if b"\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")
        stored = body[2:].replace(b"\r\n", b"\n")
        self.size += len(stored)
        if self.size > self.maxSize:
            self._fail(TOO_BIG)
        if self.problem is None:
            try:
                self.sink(stored)
            except OSError as e:  # the disk is full, or failing: read on to the end, then refuse
                self.error = e
                self._fail(DISK)



def _readWith(cls, pieces, **kw):
    reader, stored, rest = read(b"", pieces, cls, **kw)
    return reader.problem, reader.size, stored, rest


_ALPHABET = [b"a", b"b", b" ", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"\n.\n", b"x" * 40]


@pytest.mark.parametrize("bare", ["reject", "normalize"])
def test_same_answers_as_the_reference_reader(bare):
    """The merged passes give what the straightforward reader gave: the same problem, size,
    stored bytes and rest, for random messages full of dots, bare CRs and LFs, long lines and
    fake ends, cut at random places."""
    rng = random.Random(20261129)
    for _ in range(3000):
        data = b"".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 60)))
        if rng.random() < 0.7:
            data += b"\r\n.\r\n" + b"".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 5)))
        pieces = split_randomly(data, rng)
        kw = {"bare": bare, "maxLine": rng.choice((3, 8, 50, 1000)), "maxSize": rng.choice((10, 1 << 30))}
        assert _readWith(DataReader, pieces, **kw) == _readWith(_ReferenceReader, pieces, **kw), (data, pieces, kw)


_LONG_ALPHABET = [b"a", b".", b"\r\n", b"\r\n.", b"\r", b"\n", b"x" * 63, b"y" * 64, b"z" * 127, b"w" * 500]


@pytest.mark.parametrize("bare", ["reject", "normalize"])
def test_long_lines_as_the_reference_reader(bare):
    """The long-line check by windows (limits of 128 octets and more) finds exactly the lines
    the reference finds: lines just under, at and over the limit, at a piece's start and end,
    next to bare CRs and LFs."""
    rng = random.Random(20261130)
    for _ in range(3000):
        data = b"".join(rng.choice(_LONG_ALPHABET) for _ in range(rng.randint(0, 40)))
        data += b"\r\n.\r\n"
        pieces = split_randomly(data, rng)
        kw = {"bare": bare, "maxLine": rng.choice((128, 129, 130, 200, 1000)), "maxSize": 1 << 30}
        assert _readWith(DataReader, pieces, **kw) == _readWith(_ReferenceReader, pieces, **kw), (data, pieces, kw)
