# -*- test-case-name: tests.integration.test_imap -*-
"""
Twisted's IMAP interfaces (C{IAccount}, C{IMailbox}, C{IMessage}) over pymaild's store.

The store blocks (files, sqlite); every call into it goes through C{run} (the store's thread
pool, L{pymaild.store.threads.StoreThreads.run}) and comes back as a Deferred.  What Twisted
asks synchronously (message count, UID of a sequence number, UIDNEXT ...) is answered from a
snapshot the mailbox keeps: the UID list taken at SELECT and updated by this session's own
commands and by the folder's change notifications.

This module knows the store only by its methods (duck typing), so that imap/ does not import
store/ (the layer rule of HACKING.md); service.py hands it a user's store.
"""

from __future__ import annotations

import email.utils
import io
import re
import threading
from array import array
from bisect import bisect_left, bisect_right

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.mail import imap4
from zope.interface import implementer

from pymaild.imap import fetch

log = Logger()

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def mailboxError(failure):
    """
    Turn a store refusal into the C{MailboxException} Twisted answers with C{NO}: the store's
    C{StoreError} carries an IMAP response code, a bad name is C{[CANNOT]}.
    """
    e = failure.value
    code = getattr(e, "code", None)
    if isinstance(code, str):
        raise imap4.MailboxException(f"[{code}] {e}")
    if isinstance(e, ValueError):
        raise imap4.MailboxException(f"[CANNOT] {e}")
    return failure


class CRLFSection(io.RawIOBase):
    """
    A byte range of a message file (stored with LF line ends) read with CRLF line ends, as IMAP
    sends it, without loading it into memory.  C{length} is the converted length, known in
    advance from the index, which is what Twisted's C{FileProducer} asks with seek/tell.
    """

    def __init__(self, path, start: int, end: int, length: int, skip: int = 0, limit: int | None = None):
        self._f = open(path, "rb")
        self._f.seek(start)
        self._left = end - start
        self._pending = b""
        self._pendingCR = False
        self.length = length
        self._skip = skip
        self._limit = length - skip if limit is None else min(limit, max(0, length - skip))
        self._pos = 0
        self._probing = False

    def readable(self):
        return True

    def _convert(self, n: int) -> bytes:
        chunk = self._f.read(min(n, self._left)) if self._left > 0 else b""
        self._left -= len(chunk)
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._pendingCR and chunk.startswith(b"\n"):
            out = out[1:]  # the CR of this CRLF was already sent
        self._pendingCR = chunk.endswith(b"\r")
        return out

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 30
        n = min(n, self._limit - self._pos)
        out = b""
        while len(out) < n:
            if not self._pending:
                self._pending = self._convert(65536)
                if not self._pending:
                    break
            if self._skip:
                drop = min(self._skip, len(self._pending))
                self._pending = self._pending[drop:]
                self._skip -= drop
                continue
            take = self._pending[: n - len(out)]
            self._pending = self._pending[len(take) :]
            out += take
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._limit if self._probing else self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        # Only what Twisted's FileProducer does to learn the size: tell, seek to the end, tell,
        # seek back.
        if whence == 2 and offset == 0:
            self._probing = True
            return self._limit
        if whence == 0 and offset == self._pos:
            self._probing = False
            return self._pos
        raise io.UnsupportedOperation("CRLFSection only supports Twisted's size probe")

    def close(self):
        self._f.close()
        super().close()


@implementer(imap4.IMessage, imap4.IMessageFile)
class StoreMessage:
    """
    One message as a FETCH sees it: metadata from the index, summary (ENVELOPE, BODYSTRUCTURE,
    part offsets) from the index's cache, bytes from the file.
    """

    recent = False  # \\Recent in this session (set by the mailbox)

    def __init__(self, meta, path, summary):
        self.meta = meta
        self.path = path
        self.summary = summary

    def getUID(self):
        return self.meta.uid

    def getFlags(self):
        return sorted(self.meta.flags | self.meta.keywords)

    def getInternalDate(self):
        return email.utils.formatdate(self.meta.internalDate, localtime=True)

    def getSize(self):
        return self.meta.vsize

    def open(self):
        return CRLFSection(self.path, 0, 1 << 62, self.meta.vsize)

    def getHeaders(self, negate, *names):
        wanted = {n.lower() if isinstance(n, str) else n.decode().lower() for n in names}
        with open(self.path, "rb") as f:
            parsed = email.message_from_binary_file(io.BytesIO(_headerBytes(f)))
        out = {}
        for name, value in parsed.items():
            if (name.lower() in wanted) != bool(negate) or (negate and not names):
                out.setdefault(name.lower(), value)
        return out

    def getBodyFile(self):
        top = self.summary.parts
        return CRLFSection(self.path, top["bodyStart"], top["bodyEnd"], top["bodyVSize"])

    def isMultipart(self):
        return self.summary is not None and self.summary.parts.get("kind") == "multipart"

    def getSubPart(self, part):
        raise imap4.IMAP4Exception("sub-parts are served by the server's spew_body")


def _headerBytes(f) -> bytes:
    out = []
    for line in f:
        if line in (b"\n", b"\r\n"):
            break
        out.append(line)
    return b"".join(out)


class _Fields:
    """
    Stands in for a summary when a FETCH needs only some of its FETCH-ready fields.
    """

    __slots__ = ("envelope", "bodystructure", "body")

    def __init__(self, names, values):
        for name, value in zip(names, values):
            setattr(self, name, value)


def inSet(messageSet, uids) -> list[int]:
    """
    The UIDs of C{uids} inside a Twisted C{MessageSet} whose C{*} means "no upper bound" (its
    own C{in} needs C{last}, which can be set only once).
    """
    spans = []
    for low, high in messageSet.ranges:
        low, high = (1 << 32) if low is None else low, (1 << 32) if high is None else high
        spans.append((min(low, high), max(low, high)))
    spans.sort()
    lows, highs = [], []  # merged, so that one bisect finds the only span that may hold a UID
    for low, high in spans:
        if highs and low <= highs[-1] + 1:
            highs[-1] = max(highs[-1], high)
        else:
            lows.append(low)
            highs.append(high)
    out = []
    for u in uids:
        i = bisect_right(lows, u) - 1
        if i >= 0 and u <= highs[i]:
            out.append(u)
    return out


def listPattern(pattern: str):
    """
    A LIST pattern (RFC 3501 6.3.8) as a predicate on folder names: C{*} matches anything,
    C{%} anything but the delimiter, the rest literally and case-sensitively, except a leading
    INBOX (Twisted's C{wildcardToRegexp} neither escapes nor anchors, and ignores case
    everywhere).
    """
    if pattern[:5].upper() == "INBOX" and pattern[5:6] in ("", "/", "*", "%"):
        pattern = "INBOX" + pattern[5:]
    body = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.compile(body, re.S).fullmatch


_STATUS_KEYS = {
    "MESSAGES": "messages", "UIDNEXT": "uidnext", "UIDVALIDITY": "uidvalidity", "UNSEEN": "unseen",
    "SIZE": "size",  # RFC 8438 STATUS=SIZE
    "HIGHESTMODSEQ": "highestmodseq",  # RFC 7162
    "RECENT": "recent",
}


def statusItems(status: dict, names) -> dict:
    """
    STATUS items (RFC 3501 names, plus SIZE and HIGHESTMODSEQ) from a folder's C{status()}.
    """
    out = {}
    for name in names:
        key = name.upper()
        if key in _STATUS_KEYS:
            out[name] = status[_STATUS_KEYS[key]]
    return out


@implementer(imap4.IMailbox, imap4.IMessageCopier, imap4.ICloseableMailbox)
class StoreMailbox:
    """
    A selected folder.

    @ivar uids: the session's view: sequence number N is C{uids[N - 1]}.
    """

    def __init__(self, folder, run, writeable: bool, status: dict, uids: list[int], watcher=None, reactor=None):
        self.folder = folder
        self.run = run
        self.writeable = writeable
        self.info = status
        self.uids = uids if isinstance(uids, array) else array("I", uids)  # 4 bytes a message
        #: \\Recent (RFC 3501 2.3.2) for this session: UID ranges [low, high) it claimed (or,
        #: read-only, saw unclaimed); one or two ranges in practice
        self.recentRanges: list[tuple[int, int]] = []
        self.listeners = []
        self.wantSummaries = False
        self.markSeen = False
        self.firstUnseen = None
        #: UIDs other sessions or processes expunged, not yet announced: EXPUNGE responses
        #: wait for a command that allows them (RFC 3501 7.4.1); sequence numbers stay
        #: stable until then.
        self.pendingExpunged: set[int] = set()
        self._pendingFlags: set[int] = set()
        #: called (on the reactor) when expunges arrive, so an IDLE session can send them at once
        self.onExpunge = None
        self._local = threading.local()
        self._watcher = watcher
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._attached = False

    def attach(self):
        """
        Start hearing about changes (SELECT/EXAMINE, on the reactor).  A mailbox opened only
        for STATUS, APPEND or COPY is never attached.
        """
        if not self._attached:
            self._attached = True
            self.folder.addListener(self._folderChanged)
            if self._watcher is not None:
                self._watcher.watch(self.folder)

    # --- changes made elsewhere ---------------------------------------------------------------

    def _own(self, work):
        """
        Run C{work} in the store's thread marked as this session's own change, which the
        session's listener then ignores (the command's own response reports it).
        """

        def marked(*args):
            self._local.own = True
            try:
                return work(*args)
            finally:
                self._local.own = False

        return marked

    def _folderChanged(self, folder, changes):
        if getattr(self._local, "own", False):
            return
        self._reactor.callFromThread(self._apply, changes)

    _parked = False

    def _apply(self, changes):
        if not self._attached or self._parked:
            return
        added = sorted(u for u in set(changes.added) if self.sequenceNumber(u) is None)
        if added:
            if self.uids and added[0] < self.uids[-1]:  # not seen in practice: UIDs only grow
                self.uids = array("I", sorted(set(self.uids) | set(added)))
            else:
                self.uids.extend(added)
            for listener in list(self.listeners):
                listener.newMessages(len(self.uids), None)
            if self.writeable:
                self.run(self.folder.claimRecent).addCallback(self._claimed)
        gone = {u for u in changes.expunged if self.sequenceNumber(u) is not None}
        if gone:
            self.pendingExpunged |= gone
            if self.onExpunge is not None:
                self.onExpunge()
        changed = [u for u in changes.flagsChanged if self.sequenceNumber(u) is not None and u not in self.pendingExpunged]
        if changed:
            # changes arriving in a burst (another session's big STORE, a sync) are read once
            if not self._pendingFlags:
                self._reactor.callLater(0.05, self._loadFlags)
            self._pendingFlags.update(changed)

    #: at most this many changed messages' flags are read on the reactor from the kept flag
    #: index (L{pymaild.store.maildir.Folder.flagRowsNow}); more, by a store call
    FLAG_ROWS_NOW = 1000

    def _loadFlags(self):
        uids, self._pendingFlags = sorted(self._pendingFlags), set()
        if uids and self._attached:
            # (from the flag index the change updated)
            found = self.folder.flagRowsNow(uids) if len(uids) <= self.FLAG_ROWS_NOW else None
            if found is not None:
                self._announceFlags(found)
            else:
                self.run(self.folder.flagRows, uids).addCallback(self._announceFlags)

    def _claimed(self, span):
        low, high = span
        if high > low:
            self.recentRanges.append((low, high))
            for listener in list(self.listeners):
                listener.newMessages(None, self.getRecentCount())

    def _announceFlags(self, messages):
        update = {}
        for m in messages:
            seq = self.sequenceNumber(m.uid)
            if seq is not None and m.uid not in self.pendingExpunged:
                update[seq] = (self._flagList(m), m.uid, m.modseq)
        if update:
            for listener in list(self.listeners):
                listener.flagsChanged(update)

    def takeExpunged(self) -> list[tuple[int, int]]:
        """
        The EXPUNGE responses owed to the client, as C{(sequence number, uid)} in the order to
        send them; the session's view drops those messages.
        """
        if not self.pendingExpunged:
            return []
        return self._numbers(self.pendingExpunged)

    def detach(self):
        if self._attached:
            self._attached = False
            self.folder.removeListener(self._folderChanged)
            if self._watcher is not None:
                self._watcher.unwatch(self.folder)

    # --- what Twisted asks synchronously, from the snapshot --------------------------------

    def getFlags(self):
        return list(SYSTEM_FLAGS)

    def getHierarchicalDelimiter(self):
        return "/"

    def getUIDValidity(self):
        return self.info["uidvalidity"]

    def getUIDNext(self):
        return self.info["uidnext"]

    def getUID(self, message):
        return self.uids[message - 1]

    def sequenceNumber(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def sequenceNumbers(self, uids) -> list[int]:
        return [n for n in map(self.sequenceNumber, uids) if n is not None]

    def getMessageCount(self):
        return len(self.uids)

    def getRecentCount(self):
        view = self.uids
        return sum(bisect_left(view, high) - bisect_left(view, low) for low, high in self.recentRanges)

    def isRecent(self, uid: int) -> bool:
        for low, high in self.recentRanges:
            if low <= uid < high:
                return True
        return False

    def _recentPredicate(self):
        """A snapshot of L{isRecent} for a store thread."""
        ranges = list(self.recentRanges)
        return lambda uid: any(low <= uid < high for low, high in ranges)

    def _flagList(self, message) -> list[str]:
        flags = sorted(message.flags | message.keywords)
        if self.isRecent(message.uid):
            flags.append("\\Recent")
        return flags

    def getUnseenCount(self):
        return self.info["unseen"]

    def isWriteable(self):
        return self.writeable

    def destroy(self):
        pass

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener, detach: bool = True):
        """
        C{listener} hears no more; the last one gone, the mailbox stops hearing about changes
        (L{detach}) unless C{detach} is false (a SELECT of the next mailbox closes it later).
        """
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            if detach:
                self.detach()
            else:
                self._parked = True  # (attached for its watch alone: it applies no change)
                self.onExpunge = None

    # --- store calls, in the store's threads ------------------------------------------------

    def _refresh(self, _=None):
        def work():
            return self.folder.status(), self.folder.uids()

        def done(result):
            self.info, uids = result
            self.uids = array("I", uids)
            return _

        return self.run(work).addCallback(done)

    def requestStatus(self, names):
        return self.run(self.folder.status).addCallback(lambda status: statusItems(status, names))

    def addMessage(self, message, flags=(), date=None):
        when = None
        if date:
            parsed = email.utils.parsedate_tz(date if isinstance(date, str) else date.decode())
            if parsed is not None:
                when = email.utils.mktime_tz(parsed)

        def work():
            message.seek(0)
            return self.folder.append(message, list(flags), when)

        return self.run(self._own(work)).addErrback(mailboxError)

    def resolve(self, messages, uid) -> list[int]:
        """
        The UIDs a sequence set names, against this session's view, ascending.
        """
        view = self.uids
        if not view:
            return []
        # Setting C{last} sorts and merges the ranges (C{MessageSet.clean} runs whenever it is
        # set), so their slices of the view, joined, are ascending and distinct without a sort:
        # C{1:*} over 10,000 messages is one slice, not a set of 10,000 numbers sorted.
        spans = []
        # a set without * (the commonest: one number) keeps the ranges clean as parsed, and
        # needs no C{last}; setting it would sort and merge them again
        star = any(low is None or high is None for low, high in messages.ranges)
        if uid:
            if star:
                messages.last = view[-1]
            for low, high in messages.ranges:
                low = view[-1] if low is None else low
                high = view[-1] if high is None else high
                if low > high:
                    low, high = high, low
                spans.append((bisect_left(view, low), bisect_right(view, high)))
        else:
            count = len(view)
            if star:
                messages.last = count
            for low, high in messages.ranges:  # ranges clipped to the view: 1:4294967295 is cheap
                high = count if high is None else high
                low, high = max(1, min(low, high)), min(count, max(low, high))
                if low <= high:
                    spans.append((low - 1, high))
        out = []
        for start, stop in spans:
            out.extend(view[start:stop])
        return out

    _resolve = resolve

    def fetchBatch(self, uids, wantSummaries: bool, markSeen: bool, changedSince: int | None = None,
                   directFields: tuple | None = None, flagsOnly: bool = False, dates: bool = True,
                   prepared: defer.Deferred | None = None):
        """
        A Deferred of C{[(sequence number, StoreMessage)]} for C{uids} (a slice of this view;
        messages expunged meanwhile are left out).  C{markSeen} sets \\Seen first, so that
        the FLAGS sent show it; C{changedSince} keeps only messages with a greater MODSEQ;
        C{directFields} (ENVELOPE/BODYSTRUCTURE/BODY only) reads just those summary fields;
        C{flagsOnly} (UID, FLAGS, MODSEQ only) reads the index's flags alone (no sizes,
        internal dates or file names: the messages carry no path); without C{dates} (no
        INTERNALDATE asked for) an internal date the index lacks is left 0, not read from the
        file.

        C{prepared}, a Deferred, fires (with None) once the messages' fields are read or
        parsed, before the rest is loaded: a FETCH starts its next batch then, and that
        batch's parsing in the store's worker processes overlaps this one's index reads in
        another store thread.  With it, the ENVELOPEs read from files are not written to the
        index here (unless more than C{Folder.DEFERRED_MAX} wait): the FETCH calls
        L{fetchDone} after its answer.
        """
        markSeen = markSeen and self.writeable
        wanted = set(uids)
        # a dense slice of UIDs is read with one BETWEEN query per table instead of IN lists
        span = range(uids[0], uids[-1] + 1) if uids and uids[-1] - uids[0] < 2 * len(uids) else uids
        # first: ENVELOPEs read from never-summarized files bring their mtimes, which the folder
        # then has for INTERNALDATE (messages() stats no file for them)
        early = wantSummaries and directFields is not None and changedSince is None and not flagsOnly
        deferWrite = prepared is not None

        @self._own
        def prepare():
            if markSeen and uids:
                self.folder.store(uids, ["\\Seen"], "add")
            if early:
                return self.folder.summaryFields(span if len(span) == len(uids) else uids, directFields, deferWrite)
            return None

        @self._own
        def work(fields=None):
            if early and deferWrite:
                self.folder.writeDeferred(above=self.folder.DEFERRED_MAX)
            if flagsOnly:
                metas = self.folder.flagRows(span)
                if changedSince is not None:
                    metas = [m for m in metas if m.modseq > changedSince]
                return [(m.uid, StoreMessage(m, None, None)) for m in metas if m.uid in wanted]
            metas = [m for m in self.folder.messages(span, dates=dates) if m.uid in wanted]
            if changedSince is not None:
                metas = [m for m in metas if m.modseq > changedSince]
            present = [m.uid for m in metas]
            # without gaps the range itself (one BETWEEN) names exactly these messages
            exact = span if len(present) == len(uids) == len(span) else present
            paths = self.folder.paths(exact)
            if not wantSummaries:
                summaries = {}
            elif directFields is not None:
                if fields is None:
                    fields = self.folder.summaryFields(exact, directFields)
                summaries = {u: _Fields(directFields, values) for u, values in fields.items()}
            else:
                summaries = self.folder.summaries(present)
            out = []
            for meta in metas:
                path = paths.get(meta.uid)
                if path is None or (wantSummaries and meta.uid not in summaries):
                    continue
                out.append((meta.uid, StoreMessage(meta, path, summaries.get(meta.uid))))
            return out

        def ready(result):
            if not prepared.called:
                prepared.callback(None)
            return result

        if prepared is not None and early:  # (two store calls: the next batch starts between)
            loaded = self.run(prepare).addBoth(ready).addCallback(lambda fields: self.run(work, fields))
        else:
            loaded = self.run(lambda: work(prepare()))
            if prepared is not None:
                loaded.addBoth(ready)
        return loaded.addCallback(self._numbered)

    def fetchDone(self):
        """
        After a FETCH's answer: write the ENVELOPEs and internal dates its batches read from
        files to the index (L{pymaild.store.maildir.Folder.writeDeferred}), in a store thread.
        The answer did not wait for them (~23% of the samples of a first FETCH of ENVELOPE of
        10,000 messages); until then the folder's readers find them in memory.  A Deferred.
        """
        if not self.folder.deferredCount():
            return defer.succeed(None)
        return self.run(self.folder.writeDeferred).addErrback(
            lambda failure: log.failure("writing the ENVELOPEs a FETCH read", failure))

    def fetchNow(self, uids, changedSince: int | None = None, dates: bool = True):
        """
        L{fetchBatch}'s answer at once, on the reactor, for a few messages of a request that
        needs neither summaries nor a change (no \\Seen to set): from one indexed read made
        without waiting (L{pymaild.store.maildir.Folder.messagesNow}); None when that cannot
        be had (the user's lock busy, a date to read from a file), and the caller goes
        through a store thread.
        """
        found = self.folder.messagesNow(uids, dates)
        if found is None:
            return None
        wanted = set(uids)
        return self._numbered([(meta.uid, StoreMessage(meta, path, None)) for meta, path in found
                               if meta.uid in wanted and (changedSince is None or meta.modseq > changedSince)])

    def renderAgain(self, message, render):
        """
        C{render()} again, in a store thread, for a message whose file was not found where its
        row said (another session's STORE, or another process, renamed it meanwhile): with
        C{message.path} as the file is now, under the user's lock
        (L{pymaild.store.maildir.Folder.withFile}).  A Deferred of what C{render} returns;
        C{MailboxException} (C{[EXPUNGEISSUED]}) if the message is gone.
        """

        def use(path):
            message.path = path
            return render()

        return self.run(lambda: self.folder.withFile(message.meta.uid, use)).addErrback(mailboxError)

    def _numbered(self, found):
        """C{[(uid, StoreMessage)]} -> C{[(sequence number, StoreMessage)]} in this view."""
        out = []
        for u, message in found:
            seq = self.sequenceNumber(u)
            if seq is not None:
                message.recent = self.isRecent(u)
                out.append((seq, message))
        return out

    def fetchFlagRun(self, uids, request, uid: bool, modseq: bool, changedSince: int | None = None):
        """
        A Deferred of the FETCH responses (bytes) of a request for flags alone for C{uids}, a
        run of consecutive messages of this view, from the folder's flag index
        (L{pymaild.imap.fetch.renderFlagRun}); of None when that does not apply (the run is not
        consecutive here, or the index no longer has exactly these messages: an expunge not
        announced yet, another process's change): the caller then uses L{fetchBatch}.
        """
        render = self._flagRunRenderer(uids, request, uid, modseq, changedSince)
        if render is None:
            return defer.succeed(None)
        return self.run(lambda: render(self.folder.flagIndex()))

    #: a FETCH of flags for a few messages reads a flag index that is stale (a delivery, another
    #: process's change) only in a folder of at most this many messages (~15 ms at 10,000);
    #: in a larger one it reads their rows, until a FETCH of 1,000 or more reads the index
    FLAG_INDEX_READ_FOR_FEW = 10000

    def flagIndexWorthReading(self) -> bool:
        """
        Whether a FETCH of flags for a few messages should read the folder's whole flag index
        when it is not current (then the next ones are answered on the reactor): when none is
        kept (read once), or when the folder is small; not a large folder's again after each
        new message.
        """
        return not self.folder.keepsFlagIndex() or len(self.uids) <= self.FLAG_INDEX_READ_FOR_FEW

    def flagRunNow(self, uids, request, uid: bool, modseq: bool, changedSince: int | None = None) -> bytes | None:
        """
        L{fetchFlagRun}'s answer at once, on the reactor, when the folder's flag index is kept,
        current and free (L{pymaild.store.maildir.Folder.keptFlagIndex}); None otherwise, and
        the caller goes through a store thread.
        """
        render = self._flagRunRenderer(uids, request, uid, modseq, changedSince)
        if render is None:
            return None
        index = self.folder.keptFlagIndex()
        return None if index is None else render(index)

    def _flagRunRenderer(self, uids, request, uid: bool, modseq: bool, changedSince: int | None):
        """
        For L{fetchFlagRun}: a function of a flag index giving the FETCH responses for C{uids}
        (or None if the index does not hold exactly that run); None when C{uids} is not a run
        of consecutive messages of this view.
        """
        first = self.sequenceNumber(uids[0]) if uids else None
        run = array("I", uids)
        if first is None or self.uids[first - 1 : first - 1 + len(run)] != run:
            return None
        recent = list(self.recentRanges)

        def render(index):
            start = bisect_left(index.uids, run[0])
            if index.uids[start : start + len(run)] != run:
                return None
            return fetch.renderFlagRun(index, start, len(run), first, request, uid, modseq, recent, changedSince)

        return render

    def highestModseq(self, numbers, wanted: bool = True):
        """
        A Deferred of C{(numbers, the highest MODSEQ among those messages)} (RFC 7162 SEARCH
        MODSEQ result); C{(numbers, None)} without a store call when not C{wanted}.
        """
        if not wanted or not numbers:
            return defer.succeed((numbers, None))
        uids = [self.uids[n - 1] for n in numbers]
        return self.run(lambda: max((m.modseq for m in self.folder.messages(uids)), default=0)).addCallback(
            lambda modseq: (numbers, modseq))

    def resync(self, since: int, known=None):
        """
        QRESYNC at SELECT (RFC 7162 3.2.5): a Deferred of C{(UIDs expunged after MODSEQ
        C{since}, [(seq, (flags, uid, modseq))] of messages changed after it)}, both limited to
        the client's known UIDs when it sent them.
        """
        view = list(self.uids)

        def work():
            return self.folder.vanished(since), self.folder.changedSince(since, view)

        def numbered(result):
            gone, changed = result
            if known is not None:  # RFC 7162 3.2.5.2: both limited to the client's known UIDs
                gone = inSet(known, gone)
                inside = set(inSet(known, [m.uid for m in changed]))
                changed = [m for m in changed if m.uid in inside]
            out = []
            for m in changed:
                seq = self.sequenceNumber(m.uid)
                if seq is not None:
                    out.append((seq, (self._flagList(m), m.uid, m.modseq)))
            return gone, out

        return self.run(work).addCallback(numbered)

    def vanished(self, since: int, messages):
        """
        QRESYNC: a Deferred of the UIDs in the UID set C{messages} expunged after MODSEQ C{since}.
        """
        def work():
            return self.folder.vanished(since)

        def within(gone):
            return inSet(messages, gone)

        return self.run(work).addCallback(within)

    def search(self, predicate):
        """
        SEARCH over the folder in bulk (L{pymaild.imap.search.searchFolder}): flag, size, date
        and UID keys read the index rows only, FROM/SUBJECT/... one column of header fields,
        TEXT/BODY the summaries and files.  A Deferred of matching sequence numbers (of this
        session's view).
        """
        from pymaild.imap.search import searchFolder

        view = list(self.uids)
        recent = self._recentPredicate()
        return self.run(lambda: searchFolder(predicate, self.folder, view, recent=recent))

    def sortRecords(self, predicate, uid: bool):
        """
        SORT/THREAD: a Deferred of L{pymaild.imap.sort.SortRecord}s of the messages that match
        C{predicate} (ids are UIDs when C{uid}), built in the store's thread.
        """
        from pymaild.imap.search import searchFolder
        from pymaild.imap.sort import recordsFrom

        view = list(self.uids)
        recent = self._recentPredicate()

        def work():
            numbers = searchFolder(predicate, self.folder, view, recent=recent)
            wanted = [view[n - 1] for n in numbers]
            metas = {m.uid: m for m in self.folder.messages(wanted)}
            summaries = self.folder.summaries(list(metas))
            rows = [(n, u, metas[u], summaries[u]) for n, u in zip(numbers, wanted) if u in metas and u in summaries]
            return recordsFrom(rows, uid)

        return self.run(work)

    def storeFlags(self, messages, uid, flags, how: str, unchangedSince: int | None = None, report: bool = True):
        """
        STORE: a Deferred of C{([(seq, (flags, uid, modseq))] for every message of the set
        still present (none unless C{report}), [uids not changed because of UNCHANGEDSINCE])}.
        """
        wanted = self.resolve(messages, uid)
        if wanted and wanted[-1] - wanted[0] + 1 == len(wanted):  # (ascending and distinct: dense)
            wanted = range(wanted[0], wanted[-1] + 1)  # (STORE 1:*: no set of every UID made again)

        # The answer goes out as soon as the index holds the change: a bulk STORE renames its
        # files after that (Folder.store's answer), while the reactor writes the answer; the
        # next command that needs the folder waits for the renames (the user's lock).
        answered = defer.Deferred()
        told = []

        def answer(changed, failed):
            try:
                if report:
                    failedSet = set(failed)
                    current = [m for m in self.folder.messages(wanted) if m.uid not in failedSet]
                else:
                    current = []
                result = (current, failed)
            except Exception:
                result = Failure()
            told.append(True)
            self._reactor.callFromThread(answered.errback if isinstance(result, Failure) else answered.callback, result)

        @self._own
        def work():
            self.folder.store(wanted, flags, how, unchangedSince, answer=answer)

        def ended(result):
            if not told:  # (failed before its answer: the STORE fails)
                answered.errback(result if isinstance(result, Failure) else Failure(RuntimeError("STORE gave no answer")))
            elif isinstance(result, Failure):  # (after: the store logged it and synced)
                log.failure("STORE after its answer", result)

        def numbered(result):
            current, failed = result
            out = []
            for m in current:
                seq = self.sequenceNumber(m.uid)
                if seq is not None:
                    out.append((seq, (self._flagList(m), m.uid, m.modseq)))
            return out, sorted(failed)

        self.run(work).addBoth(ended)
        return answered.addCallback(numbered)

    def _numbers(self, gone) -> list[tuple[int, int]]:
        """
        C{(EXPUNGE sequence number, uid)} for UIDs leaving this view, in sending order; the
        view drops them.
        """
        gone = set(gone)
        numbers, removed = [], 0
        for u in sorted(gone):
            seq = self.sequenceNumber(u)
            if seq is not None:
                numbers.append((seq - removed, u))
                removed += 1
        if numbers:
            self.uids = array("I", (u for u in self.uids if u not in gone))
        self.pendingExpunged -= gone
        return numbers

    def expungeSome(self, messages=None, uid=True):
        """
        EXPUNGE, or UID EXPUNGE (RFC 4315) when C{messages} is given: a Deferred of the
        C{(sequence number, uid)} pairs to announce.
        """
        wanted = None if messages is None else self._resolve(messages, uid)

        def done(gone):
            numbers = self._numbers(gone)
            return self.run(self.folder.status).addCallback(lambda info: (setattr(self, "info", info), numbers)[1])

        return self.run(self._own(lambda: self.folder.expunge(wanted))).addCallback(done)

    def copyTo(self, messages, uid, dest):
        """
        COPY with UIDPLUS: a Deferred of C{(dest uidvalidity, [(source uid, dest uid)])}.
        """
        wanted = self._resolve(messages, uid)

        def work():
            pairs = self.folder.copy(wanted, dest.folder)
            return dest.folder.status()["uidvalidity"], pairs

        return self.run(work).addErrback(mailboxError)

    def moveTo(self, messages, uid, dest):
        """
        MOVE (RFC 6851): a Deferred of C{(dest uidvalidity, pairs, EXPUNGE numbers)}.
        """
        wanted = self._resolve(messages, uid)

        @self._own
        def work():
            pairs = self.folder.move(wanted, dest.folder)
            return dest.folder.status()["uidvalidity"], pairs

        def done(result):
            validity, pairs = result
            return validity, pairs, self._numbers([src for src, _ in pairs])

        return self.run(work).addErrback(mailboxError).addCallback(done)

    def expunge(self):
        before = list(self.uids)

        def done(gone):
            gone = set(gone)
            numbers, removed = [], 0
            for i, u in enumerate(before):
                if u in gone:
                    numbers.append(i + 1 - removed)
                    removed += 1
            return self._refresh().addCallback(lambda _: numbers)

        return self.run(self._own(self.folder.expunge)).addCallback(done)

    def copy(self, message):
        source = message  # a StoreMessage fetched from the source folder

        def work():
            with open(source.path, "rb") as f:
                return self.folder.append(f, sorted(source.meta.flags | source.meta.keywords), source.meta.internalDate)

        return self.run(work).addCallback(self._refresh)

    def close(self):
        self.detach()


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class StoreAccount:
    """
    A logged-in user's folders.
    """

    def __init__(self, user, run, watcher=None):
        self.user = user
        self.run = run
        self.watcher = watcher

    def _call(self, f, *args):
        return self.run(f, *args).addErrback(mailboxError)

    def listMailboxes(self, ref, wildcard):
        ref = ref.decode() if isinstance(ref, bytes) else ref
        wildcard = wildcard.decode() if isinstance(wildcard, bytes) else wildcard
        matches = listPattern(ref + wildcard)

        def work():
            folders = self.user.listFolders()
            names = {f.name for f in folders}
            parents = set()
            for name in names:
                parts = name.split("/")
                parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
            out = [(f.name, FolderInfo(f, any(p.startswith(f.name + "/") for p in names))) for f in folders]
            # a parent that is no folder (Dovecot's Maildir++ makes only .A.B for A/B)
            out += [(p, FolderInfo(None, True, p)) for p in sorted(parents - names)]
            out.sort(key=lambda pair: (pair[0] != "INBOX", pair[0]))
            return [(name, info) for name, info in out if matches(name)]

        return self.run(work)

    def listExtended(self, ref: str, patterns, *, subscribed: bool = False, recursive: bool = False,
                     specialOnly: bool = False, status=None, lsub: bool = False):
        """
        LIST-EXTENDED (RFC 5258) with LIST-STATUS (RFC 5819): a Deferred of
        C{[(name, attributes, childinfo, status items or None)]}, INBOX first.

        C{subscribed}: only subscribed names (those that no longer exist too, as
        C{\\NonExistent}); with C{recursive}, also matching names that are not subscribed but
        have subscribed children (C{childinfo} True).  C{specialOnly}: RFC 6154's SPECIAL-USE
        selection.  C{status}: STATUS item names for every selectable mailbox listed.  C{lsub}
        (with C{subscribed} and C{recursive}): RFC 3501 LSUB, where such a parent is listed only
        when the pattern stops above a subscribed descendant (a C{%} match).
        """
        matchers = [listPattern(ref + p) for p in patterns]

        def work():
            folders = {f.name: f for f in self.user.listFolders()}
            subs = self.user.subscriptions()
            parents = set()
            for name in set(folders) | (subs if subscribed else set()):
                parts = name.split("/")
                parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
            candidates = set(folders) | parents | (subs if subscribed else set())
            out = []
            for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
                if not any(m(name) for m in matchers):
                    continue
                info = folders.get(name)
                prefix = name + "/"
                childinfo = False
                if subscribed and name not in subs:
                    below = [s for s in subs if s.startswith(prefix)] if recursive else []
                    if lsub:
                        below = [s for s in below if not any(m(s) for m in matchers)]
                    if not below:
                        continue
                    childinfo = True
                if specialOnly and not (info and info.special):
                    continue
                attributes = []
                if info is None:
                    attributes.append("\\NonExistent" if name not in parents else "\\Noselect")
                hasChildren = any(f.startswith(prefix) for f in folders)
                attributes.append("\\HasChildren" if hasChildren else "\\HasNoChildren")
                if name in subs:
                    attributes.append("\\Subscribed")
                if info is not None and info.special:
                    attributes.append(info.special)
                items = None
                if status and info is not None:
                    try:
                        folder = self.user.folder(name)
                        folder.sync(moveNew=False)
                        items = statusItems(folder.status(), status)
                    except Exception as e:  # deleted meanwhile by another session: no STATUS
                        if getattr(e, "code", None) != "NONEXISTENT":
                            raise
                        continue
                out.append((name, attributes, childinfo, items))
            return out

        return self.run(work)

    def quota(self):
        """
        RFC 9208: a Deferred of C{((bytes used, bytes limit), (messages used, messages limit))}.
        """

        def work():
            used = self.user.quota.usage()
            return (used[0], self.user.quota.storageLimit), (used[1], self.user.quota.messageLimit)

        return self.run(work)

    def select(self, name, readwrite=1):
        name = name.decode() if isinstance(name, bytes) else name

        def work():
            folder = self.user.folder(name)
            folder.sync(moveNew=bool(readwrite))
            mailbox = StoreMailbox(
                folder, self.run, bool(readwrite), folder.status(), folder.uidArray(), self.watcher
            )
            summarizer = getattr(self.user, "summarizer", None)
            if summarizer is not None:
                summarizer.warmUp(len(mailbox.uids))  # (a first FETCH of ENVELOPE may follow)
            unseen = folder.firstUnseen()
            if unseen is not None:
                mailbox.firstUnseen = mailbox.sequenceNumber(unseen)
            # a read-write SELECT claims the recent messages; EXAMINE only looks (RFC 3501 2.3.2)
            span = folder.claimRecent() if readwrite else (folder.recentFrom(), mailbox.info["uidnext"])
            if span[1] > span[0]:
                mailbox.recentRanges.append(span)
            return mailbox

        def missing(failure):
            if getattr(failure.value, "code", None) == "NONEXISTENT" or isinstance(failure.value, ValueError):
                return None
            return failure

        return self.run(work).addErrback(missing)

    def create(self, pathspec, special=None):
        pathspec = pathspec.decode() if isinstance(pathspec, bytes) else pathspec
        return self._call(self.user.createFolder, pathspec.rstrip("/"), special).addCallback(lambda _: True)

    def delete(self, name):
        return self._call(self.user.deleteFolder, name)

    def rename(self, oldname, newname):
        return self._call(self.user.renameFolder, oldname, newname)

    def isSubscribed(self, name):
        return name in self.user.subscriptions()

    def subscribe(self, name):
        return self._call(self.user.subscribe, name, True)

    def unsubscribe(self, name):
        return self._call(self.user.subscribe, name, False)

    def addMailbox(self, name, mbox=None):
        return self.create(name)

    def getPersonalNamespaces(self):
        return [[b"", b"/"]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None


class FolderInfo:
    """
    What LIST shows of a folder: its attributes (RFC 3348 CHILDREN, RFC 6154 SPECIAL-USE), or
    of a parent name that is no folder (\\Noselect).
    """

    def __init__(self, info, hasChildren: bool = False, name: str | None = None):
        self.info = info
        self.hasChildren = hasChildren
        self.subscribed = bool(info and info.subscribed)
        self.name = info.name if info else name

    def getFlags(self):
        flags = ["\\HasChildren" if self.hasChildren else "\\HasNoChildren"]
        if self.info is None:
            flags.insert(0, "\\Noselect")
        elif self.info.special:
            flags.append(self.info.special)
        return flags

    def getHierarchicalDelimiter(self):
        return "/"
