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

import re
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
        # the end of data: a "." line after a CRLF, itself ended by CRLF (searched in buf
        # itself: the line before buf's first one ended with CRLF when _crlfBefore)
        if self._crlfBefore and buf.startswith(b".\r\n"):
            end = -2
        else:
            end = buf.find(b"\r\n.\r\n", 0, last + 1)
        rest = None
        if end >= 0 or end == -2:
            body = buf[: end + 2]  # its CRLF belongs to the message's last line
            rest = buf[end + 5:]
            self._carry = b""
        else:
            body = buf[: last + 1]  # (buf itself when it ends a line: no copy)
            self._carry = buf[last + 1:]
            self._crlfBefore = last > 0 and buf[last - 1] == 0x0D
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
        """Complete lines of the message (dot-stuffed, as sent): check, unstuff, store.  Passes
        of C{bytes} methods over the piece (none of them a 2-byte C{replace}, which costs a
        call per match): drop every CR (the store's line end is LF), count the LFs; when there
        were as many CRs as LFs and no CR is followed by anything but an LF, every line ended
        with CRLF.  Otherwise the careful way: every CRLF an LF (how many tells whether every
        LF had its CR), then any CR left is a bare one.  Then look for a line too long."""
        stored = body.replace(b"\r", b"")
        lines = stored.count(b"\n")
        if len(body) - len(stored) != lines or body[-1:] != b"\n" or _crNotLF(body) is not None:
            stored = body.replace(b"\r\n", b"\n")
            crlf = len(body) - len(stored)
            if crlf != lines or b"\r" in stored:
                if self.bare == "reject":
                    self._fail(BARE_LF if crlf != lines else BARE_CR)  # (a bare LF first, if both)
                stored = stored.replace(b"\r", b"\n")  # every bare CR a line end too (normalised)
        if self.problem is None and len(stored) >= self.maxLine - 1 and self._hasLongLine(stored):
            self._fail(LINE_TOO_LONG)
        # dot-unstuffing: a line's leading dot goes (the first line's too)
        if stored[:1] == b".":
            stored = stored[1:]
            if _lineDot(stored):
                stored = stored.replace(b"\n.", b"\n")
        elif _lineDot(stored):
            stored = stored.replace(b"\n.", b"\n")
        self.size += len(stored)
        if self.size > self.maxSize:
            self._fail(TOO_BIG)
        if self.problem is None:
            try:
                self.sink(stored)
            except OSError as e:  # the disk is full, or failing: read on to the end, then refuse
                self.error = e
                self._fail(DISK)

    def _hasLongLine(self, stored: bytes) -> bool:
        """
        Whether a line of C{stored} (LF line ends; it starts at a line's start) has
        C{maxLine - 1} octets or more without its LF (its CR counted, as the limit counts it).
        A line that long holds one of the aligned windows of half that length whole: only a
        window without an LF (a C{find} each, in C) needs its line measured.  For short limits
        a regex.
        """
        least = self.maxLine - 1
        half = (least + 1) // 2
        if half < 64:
            first = stored.find(b"\n")
            return first >= least or self._longLine.search(stored, first) is not None
        find, end = stored.find, len(stored)
        for at in range(0, end - half + 1, half):
            if find(b"\n", at, at + half) < 0:
                after = find(b"\n", at + half)
                if (end if after < 0 else after) - (stored.rfind(b"\n", 0, at) + 1) >= least:
                    return True
        return False

    @property
    def _longLine(self) -> re.Pattern:
        """A line end followed by a line of maxLine - 1 octets or more (without its LF)."""
        pattern = _LONG_LINES.get(self.maxLine)
        if pattern is None:
            pattern = _LONG_LINES[self.maxLine] = re.compile(rb"\n[^\n]{%d}" % max(self.maxLine - 1, 0))
        return pattern


_LONG_LINES: dict[int, re.Pattern] = {}

#: whether a line starts with a dot (a regex: several times faster than C{b"\n." in}, whose
#: search slows down on every '.' of the text)
_lineDot = re.compile(rb"\n\.").search
#: a CR followed by something other than an LF: a bare CR (in a piece that ends with an LF)
_crNotLF = re.compile(rb"\r[^\n]").search


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
