# -*- test-case-name: tests.pop3.test_pop3_mailbox -*-
"""
The POP3 avatar: the user's INBOX in the store, as RFC 1939 sees it.

A session works on a snapshot taken when it opens the mailbox (L{StoreInbox.load}): message
numbers, sizes (with CRLF line ends, as sent) and UIDLs stay fixed for the session; mail
delivered meanwhile shows in the next session.  DELE only marks; L{StoreInbox.commit} (the
UPDATE state, at QUIT) expunges the marked messages from the store, so IMAP sessions see them
vanish, and gives the messages fully retrieved the \\Seen flag (C{[pop3] mark_seen}).  A session
that ends any other way changes nothing.

UIDLs come from C{[pop3] uidl_format} (L{formatUidl}): by default the Maildir base name, which
stays the same when a message's flags change (over IMAP or by any Maildir tool), survives an
index rebuild and is never given to another message.

Messages are read in the store's threads and sent CRLF-terminated and dot-stuffed
(L{DotStuffer}); those above L{SMALL} are streamed in chunks of L{CHUNK}, never loaded whole.

This module does not import the store (a sibling layer): it works on the user store object
the service hands it, through the methods named below.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from twisted.mail import pop3
from zope.interface import implementer

from pymaild.uidl import formatUidl

#: messages up to this size are read and encoded in one piece (in a store thread)
SMALL = 256 << 10
#: larger ones are streamed in pieces of this many bytes
CHUNK = 64 << 10

#: whether a line starts with a dot: a regex finds it several times faster than C{b"\n." in}
#: (whose search slows down on every '.' of the text)
_lineDot = re.compile(rb"\n\.").search

class DotStuffer:
    """
    Turns a stored message (LF line ends, or CRLF, read in pieces of any size) into POP3's
    multi-line form: CRLF line ends, a dot doubled at the start of a line, and (from L{end})
    a last line end if the message has none, then the terminating C{.CRLF}.  The state between
    pieces is a held-back CR (a CRLF cut in two) and whether the output is at a line start.
    """

    def __init__(self):
        self._cr = False
        self._lineStart = True

    def feed(self, raw: bytes) -> bytes:
        if self._cr:
            raw = b"\r" + raw
            self._cr = False
        if raw[-1:] == b"\r":
            raw = raw[:-1]
            self._cr = True
        if not raw:
            return b""
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n")
        data = raw.replace(b"\n", b"\r\n")
        if _lineDot(data):
            data = data.replace(b"\n.", b"\n..")
        if self._lineStart and data[:1] == b".":
            data = b"." + data
        self._lineStart = data[-1:] == b"\n"
        return data

    def end(self) -> bytes:
        tail = b""
        if self._cr:
            self._cr = False
            tail = b"\r"
            self._lineStart = False
        if not self._lineStart:
            tail += b"\r\n"
        return tail + b".\r\n"


def stuffWhole(raw: bytes) -> bytes:
    """L{DotStuffer} over a whole message at once, terminating C{.CRLF} included."""
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    data = raw.replace(b"\n", b"\r\n")
    if _lineDot(data):
        data = data.replace(b"\n.", b"\n..")
    if data[:1] == b".":
        data = b"." + data
    if data[-1:] == b"\r" or (data and data[-1:] != b"\n"):
        return data + b"\r\n.\r\n"
    return data + b".\r\n"


def rawChunks(f) -> Iterator[bytes]:
    """The whole file, in pieces of L{CHUNK}."""
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return
        yield chunk


def topChunks(f, lines: int) -> Iterator[bytes]:
    """
    TOP's part of the file (RFC 1939 7): the header, the empty line after it, then at most
    C{lines} lines of the body.  A message without an empty line is all header.  Read line by
    line with a bound, so a huge line does not load at once.
    """
    out: list[bytes] = []
    size = 0
    inHeader, atStart, left = True, True, lines
    while inHeader or left > 0:
        piece = f.readline(CHUNK)
        if not piece:
            break
        out.append(piece)
        size += len(piece)
        complete = piece[-1:] == b"\n"
        if inHeader:
            if atStart and (piece == b"\n" or piece == b"\r\n"):
                inHeader = False
        elif complete:
            left -= 1
        atStart = complete
        if size >= CHUNK:
            yield b"".join(out)
            out, size = [], 0
    if out:
        yield b"".join(out)


class Gone(Exception):
    """The message was expunged (by IMAP, or another tool) since the snapshot."""


@dataclass
class Entry:
    uid: int
    size: int  # with CRLF line ends: what LIST and STAT count
    uidl: bytes
    path: str
    deleted: bool = False
    #: this message's lines of the LIST and UIDL answers, made with the snapshot (off the
    #: reactor), so that listing 100,000 messages is one join
    listLine: bytes = b""
    uidlLine: bytes = b""


class Transfer:
    """
    One RETR or TOP in progress: C{first} is the encoded message when it was small enough to
    read whole (then C{more} is None), otherwise the first piece, and C{more} yields the rest
    (each C{next} reads a piece of the file: call it in the store's threads, L{StoreInbox.run}).
    Always L{close} it.
    """

    def __init__(self, first: bytes, more: Iterator[bytes] | None = None, f=None):
        self.first = first
        self.more = more
        self._f = f

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()


@implementer(pop3.IMailbox)
class StoreInbox:
    """
    A POP3 session's view of one user's INBOX.

    @param user: the user's store (C{folder("INBOX")} with C{sync}, C{messages}, C{paths},
        C{uidvalidity}, C{store}, C{expunge}); its C{root} names the mailbox for the
        one-session lock.
    @param run: runs a blocking call in the store's threads; a Deferred of its result.
    @ivar account: the account's name (the portal's avatar id), set by L{pop3Avatar}.
    """

    account = ""

    def __init__(self, user, run: Callable, uidlFormat: str = "%f", markSeen: bool = True):
        self.user = user
        self.run = run
        self.uidlFormat = uidlFormat
        self.markSeen = markSeen
        self.key = str(getattr(user, "root", id(user)))
        self.entries: list[Entry] = []
        self.retrieved: set[int] = set()

    # --- opening and closing (the store's threads) -------------------------------------------

    def load(self):
        """Take the snapshot; a Deferred that fires with the number of messages."""
        return self.run(self._load)

    def _load(self) -> int:
        folder = self.user.folder("INBOX")
        folder.sync()
        validity = folder.uidvalidity
        fmt = self.uidlFormat
        entries = []
        for n, (uid, vsize, path) in enumerate(folder.listing(), 1):
            uidl = formatUidl(fmt, uid, validity, os.path.basename(path).partition(":")[0])
            entries.append(Entry(uid, vsize, uidl, path, False, b"%d %d\r\n" % (n, vsize), b"%d %s\r\n" % (n, uidl)))
        self.entries = entries
        return len(entries)

    def commit(self):
        """
        The UPDATE state: expunge the messages marked with DELE, mark the retrieved ones \\Seen.
        A Deferred of the number of messages removed.
        """
        gone = [e.uid for e in self.entries if e.deleted]
        seen = sorted(self.retrieved - set(gone)) if self.markSeen else []
        if not gone and not seen:
            from twisted.internet.defer import succeed

            return succeed(0)
        return self.run(self._commit, gone, seen)

    def _commit(self, gone: list[int], seen: list[int]) -> int:
        folder = self.user.folder("INBOX")
        removed = 0
        if gone:
            folder.store(gone, ["\\Deleted"], "add")
            removed = len(folder.expunge(gone))
        if seen:
            folder.store(seen, ["\\Seen"], "add")
        return removed

    # --- reading --------------------------------------------------------------------------

    def transferNow(self, index: int) -> Transfer | None:
        """
        RETR of message C{index} (0-based) done on the caller's thread when that is cheap: the
        file is where the snapshot saw it and at most L{SMALL} bytes (one open and one read,
        from the page cache as a rule).  C{None} otherwise: then use L{transfer}.
        """
        entry = self.entries[index]
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # renamed or gone: the store's threads find out which
        try:
            size = os.fstat(fd).st_size
            if size > SMALL:
                return None
            raw = os.read(fd, size + 1)  # a short read of a regular file is its end
            if len(raw) > size:
                return None  # it grew: stream it
        finally:
            os.close(fd)
        self.retrieved.add(entry.uid)
        return Transfer(stuffWhole(raw))

    def transfer(self, index: int, lines: int | None = None):
        """
        RETR (C{lines} None) or TOP of message C{index} (0-based): a Deferred of a
        L{Transfer}, or failing with L{Gone}.
        """
        entry = self.entries[index]
        if lines is None:
            self.retrieved.add(entry.uid)
        return self.run(self._open, entry, lines)

    def _open(self, entry: Entry, lines: int | None) -> Transfer:
        try:
            f = open(entry.path, "rb")
        except FileNotFoundError:
            # renamed (a flag change by IMAP or another tool) or expunged: ask the folder
            folder = self.user.folder("INBOX")
            folder.sync(moveNew=False)
            path = folder.paths([entry.uid]).get(entry.uid)
            if path is None:
                raise Gone(entry.uid) from None
            entry.path = path
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise Gone(entry.uid) from None
        try:
            stuffer = DotStuffer()
            if lines is None and os.fstat(f.fileno()).st_size <= SMALL:
                data = stuffer.feed(f.read()) + stuffer.end()
                f.close()
                return Transfer(data)
            chunks = rawChunks(f) if lines is None else topChunks(f, lines)
            # up to SMALL bytes here (a short TOP ends here), the rest on demand
            pieces, total = [], 0
            for chunk in chunks:
                pieces.append(stuffer.feed(chunk))
                total += len(chunk)
                if total >= SMALL:
                    break
            else:
                pieces.append(stuffer.end())
                f.close()
                return Transfer(b"".join(pieces))

            def more():
                for chunk in chunks:
                    yield stuffer.feed(chunk)
                yield stuffer.end()

            return Transfer(b"".join(pieces), more(), f)
        except BaseException:
            f.close()
            raise

    # --- twisted.mail.pop3.IMailbox (numbers are 0-based) ------------------------------------

    def listMessages(self, i=None):
        if i is None:
            return [0 if e.deleted else e.size for e in self.entries]
        entry = self.entries[i]
        if entry.deleted:
            raise ValueError("deleted")
        return entry.size

    def getMessage(self, i):
        return open(self.entries[i].path, "rb")

    def getUidl(self, i):
        return self.entries[i].uidl

    def deleteMessage(self, i):
        self.entries[i].deleted = True

    def undeleteMessages(self):
        for e in self.entries:
            e.deleted = False

    def sync(self):
        return self.commit()


def pop3Avatar(store, run, uidlFormat: str = "%f", markSeen: bool = True):
    """The realm's factory of POP3 avatars over C{store} (a C{MaildirStore})."""

    def avatar(user: str, mind):
        inbox = StoreInbox(store.user(user), run, uidlFormat, markSeen)
        inbox.account = user
        return inbox, lambda: None

    return avatar
