# -*- test-case-name: tests.queue.test_queue_encode -*-
"""
The SMTP DATA encoder: a stored message turned into the bytes sent after C{354}, dot-stuffed
(RFC 5321 4.5.2), every line end made CRLF, and ended with C{CRLF.CRLF}.  It is the outbound
counterpart of L{pymaild.smtp.data.DataReader}.

Twisted's C{SMTPClient.transformChunk} does this per C{FileSender} chunk (16 KiB) on its own:
a line that starts with C{.} right at a chunk boundary is not stuffed, so a stored message
holding C{"\\n.\\n"} there would end the data early and what follows would be read by the
remote server as commands (outbound SMTP smuggling); it also turns a stored C{CRLF} into
C{CR CRLF}.  L{DataEncoder} carries what a line end needs across pieces (a CR at the end of a
piece whose LF may come next, and whether the next piece starts a line), so the result is the
same however the message is cut.

Stored messages have LF line ends (Maildir), but any mix is accepted: CRLF, bare LF and bare
CR each become one CRLF, so no bare CR or LF ever goes out.  Lines are not folded: a line
longer than RFC 5321's 1000 octets goes out as it is.

The work is done on whole pieces with C{bytes} methods (C{replace} over each piece), not
character by character in Python: messages can be tens of megabytes.
"""

from __future__ import annotations

import re


#: whether a line starts with a dot (a regex: several times faster than C{b"\n." in}, whose
#: search slows down on every '.' of the text)
_lineDot = re.compile(rb"\n\.").search


class DataEncoder:
    """
    Feed it the message in pieces of any size (L{feed}), send what each call returns, and at
    the end send what L{finish} returns.

    @ivar size: octets produced so far (what was returned by L{feed} and L{finish}).
    """

    def __init__(self) -> None:
        self.size = 0
        self._cr = False  # the last piece ended with a CR, held back: its LF may come next
        self._lineStart = True  # what goes out next starts a line (the first line does)

    def feed(self, chunk: bytes) -> bytes:
        """
        Encode one piece of the message.

        @return: the encoded bytes that can be sent now; a CR at the end of C{chunk} is held
            back until the next piece (or L{finish}) shows whether an LF follows it.
        """
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk[-1:] == b"\r":
            chunk = chunk[:-1]
            self._cr = True
        if not chunk:
            return b""
        if b"\r" in chunk:  # every line end LF for now: CRLF first, then the bare CRs
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if _lineDot(chunk):
            chunk = chunk.replace(b"\n.", b"\n..")
        if self._lineStart and chunk[:1] == b".":
            chunk = b"." + chunk
        self._lineStart = chunk[-1:] == b"\n"
        out = chunk.replace(b"\n", b"\r\n")
        self.size += len(out)
        return out

    def finish(self) -> bytes:
        """
        The message is all in.

        @return: a CR held back (as CRLF), a CRLF if the message did not end with a line end,
            and the end of data C{.CRLF}: everything sent then ends with C{CRLF.CRLF} (an
            empty message is C{.CRLF} alone).
        """
        if self._cr:
            self._cr = False
            self._lineStart = True
            out = b"\r\n.\r\n"
        elif self._lineStart:
            out = b".\r\n"
        else:
            self._lineStart = True
            out = b"\r\n.\r\n"
        self.size += len(out)
        return out


def encodeMessage(data: bytes) -> bytes:
    """
    The whole message at once: L{DataEncoder.feed} over C{data}, then L{DataEncoder.finish}.
    """
    encoder = DataEncoder()
    return encoder.feed(data) + encoder.finish()
