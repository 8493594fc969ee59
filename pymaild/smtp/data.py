# -*- test-case-name: tests.smtp.test_data -*-
"""
The SMTP DATA reader: the bytes after C{354} up to the end of data, turned into the message
as the store keeps it (dot-unstuffed, LF line ends), written to a sink piece by piece.

The end of data is only C{CRLF.CRLF} (RFC 5321 4.1.1.4): a C{.} line counts as the end only
when the line before it ended with CRLF and the dot line itself ends with CRLF.  A bare LF or a
bare CR anywhere in the data is never a line end for this purpose, so the "SMTP smuggling"
variants (C{LF.LF}, C{LF.CRLF}, C{CR.CR}, C{CRLF.LF}, C{CRLF.CR} ...) never end a message
early, and what follows them never becomes a second message.  By the C{bare} policy a message
with bare line ends is refused after its real end (C{"reject"}, as Postfix does) or stored with
them made CRLF (C{"normalize"}).

A line longer than C{maxLine} or a message larger than C{maxSize} does not stop the reader
either: the rest is read and thrown away up to the real end, and the message is refused then
(L{DataReader.problem}); Twisted's reader instead went back to command mode in the middle of
the data (../shared/TWISTED_MAIL.md, gap 3).

The work is done on whole pieces with C{bytes} methods (one pass of C{count}, C{find} and
C{replace} over each piece), not line by line in Python.
"""

from __future__ import annotations

from typing import Callable

#: L{DataReader.problem} values
BARE_LF = "bare-lf"
BARE_CR = "bare-cr"
LINE_TOO_LONG = "line-too-long"
TOO_BIG = "too-big"
DISK = "disk"  # the sink failed (OSError in C{error})


class DataReader:
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


class ChunkReader:
    """
    One BDAT chunk (RFC 3030): exactly C{size} octets, taken as they are (no dot-stuffing, no
    end marker, so nothing to smuggle), stored with LF line ends.  The same C{feed} contract as
    L{DataReader}; the state that spans chunks (a CR at the end of one chunk, the size so far,
    the first problem) lives in C{transaction}, a L{BdatTransaction}.
    """

    def __init__(self, transaction: "BdatTransaction", size: int):
        self.transaction = transaction
        self.left = size

    @property
    def problem(self):
        return self.transaction.problem

    @property
    def error(self):
        return self.transaction.error

    def feed(self, data: bytes) -> bytes | None:
        take, rest = data[: self.left], data[self.left:]
        self.left -= len(take)
        self.transaction.take(take)
        return rest if self.left == 0 else None


class BdatTransaction:
    """What several BDAT chunks of one message share."""

    def __init__(self, sink: Callable[[bytes], None] | None, maxSize: int):
        self.sink = sink  # None: the chunks are read and thrown away (a refused transaction)
        self.maxSize = maxSize
        self.problem: str | None = None
        self.error: OSError | None = None
        self.size = 0
        self._cr = False

    def take(self, data: bytes) -> None:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data[-1:] == b"\r":
            data, self._cr = data[:-1], True
        self._store(data.replace(b"\r\n", b"\n") if b"\r" in data else data)

    def finish(self) -> None:
        """The last chunk is in: a CR held back is the message's own last octet."""
        if self._cr:
            self._cr = False
            self._store(b"\r")

    def _store(self, stored: bytes) -> None:
        self.size += len(stored)
        if self.size > self.maxSize and self.problem is None:
            self.problem = TOO_BIG
        if self.problem is None and self.sink is not None and stored:
            try:
                self.sink(stored)
            except OSError as e:
                self.error, self.problem = e, DISK
