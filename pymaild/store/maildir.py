# -*- test-case-name: tests.store.test_store -*-
"""
The Maildir++ store: every user's folders, messages, flags and quota, shared by delivery, IMAP
and POP3.

Layout (as Dovecot lays out C{mail_location = maildir:~} with an inbox namespace whose
separator is C{/}): the user's directory C{<data_dir>/mail/<domain>/<localpart>/} holds INBOX
(C{cur/ new/ tmp/}) and one C{.Folder} directory per folder (C{.Parent.Child} for
C{Parent/Child}; names in modified UTF-7, see L{pymaild.store.names}).  Flags live in the
C{:2,} suffix of file names, keywords as letters mapped by each folder's C{dovecot-keywords}.
Quota is kept in C{maildirsize}, subscriptions in C{subscriptions}.

The files are the truth; the index (L{pymaild.store.index}) is a cache.  Every operation that
changes files does the file system part first (rename, link, unlink: each atomic) and the index
part after, in one transaction; a crash between the two is repaired by the next sync, which
compares the directories with the index.  So a message that was stored is there exactly once
after any crash, and a UID is never reused.

Everything here blocks (file system, sqlite): the protocols call it from a thread pool
(L{pymaild.store.threads}).  One L{UserStore} per user per process serialises its operations
with a lock; other processes (an MDA, Dovecot, mutt) may change the files at any time.

Security: every folder name from a client goes through L{names.validate} and
L{names.toDirectory}, which produce a single path component; nothing is created outside the
user's directory.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from array import array
from bisect import bisect_left
from collections import Counter, OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from operator import eq, itemgetter, not_
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, NamedTuple

from twisted.logger import Logger
from zope.interface import implementer

from pymaild.interfaces import IUserStore
from pymaild.store import dovecot, names, quota as quotamod
from pymaild.store.delivery import (
    FLAG_LETTERS,
    LETTER_FLAGS,
    FileName,
    commitTmp,
    fsyncDirectory,
    infoName,
    uniqueName,
    writeTmp,
)
from pymaild.store.index import BUSY_TIMEOUT, FIELD_COLUMNS, FIELDS, checkpointLater, connect, reopen

log = Logger()

INDEX_NAME = "pymaild.index.sqlite"
#: a directory mtime this close to "now" may still change within the same tick: rescan next time
_RACY_NS = 2_000_000_000

SPECIAL_USE = ("\\Drafts", "\\Sent", "\\Trash", "\\Junk", "\\Archive")


class StoreError(Exception):
    """
    A request the store refuses; C{str()} is meant for the client (IMAP C{NO} text).

    @ivar code: an IMAP response code such as C{"NONEXISTENT"}, C{"ALREADYEXISTS"}.
    """

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


def _safePart(part: str, what: str) -> str:
    if not part or part in (".", "..") or "/" in part or "\0" in part or part.startswith("."):
        raise ValueError(f"unsafe {what} for a mail directory: {part!r}")
    return part


def _makeMaildir(path: Path, folderMarker: bool) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(path / sub, mode=0o700, exist_ok=True)
    if folderMarker and not (path / "maildirfolder").exists():
        (path / "maildirfolder").touch(mode=0o600)


class Message(NamedTuple):
    """
    One message as the index knows it (a tuple: a listing makes one per message, 100,000 for a
    large folder, and a tuple is made without running Python code: see L{Folder._messages}).
    """

    uid: int
    flags: frozenset[str]
    keywords: frozenset[str]
    modseq: int
    size: int
    vsize: int
    internalDate: int


@dataclass
class Changes:
    """
    What a sync or an operation changed in a folder, for the sessions that have it open.
    """

    added: list[int] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    flagsChanged: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.expunged or self.flagsChanged)


#: STORE on this many messages or more commits without sqlite's automatic checkpoint
#: (L{UserStore.deferCheckpoint}).
_BULK_CHECKPOINT = 1000

#: A bulk STORE's rows in one statement (L{Folder._storeBulk}): C{?1} a JSON array of
#: C{[uid, name, flags, keywords]}.  The C{LIMIT} keeps the subquery apart (materialized), so
#: that sqlite goes through the array and finds each row by its key (without it, sqlite went
#: through the folder's rows and scanned the array for each: minutes for 15,000).
_BULK_STORE = (
    "UPDATE messages SET name = j.n, innew = 0, flags = j.f, keywords = j.k, modseq = ?2"
    " FROM (SELECT value->>0 AS u, value->>1 AS n, value->>2 AS f, value->>3 AS k FROM json_each(?1) LIMIT -1) AS j"
    " WHERE messages.folder = ?3 AND messages.uid = j.u"
)


#: STORE on this many messages or more lifts the folder's inotify watch around its renames.
_QUIET_FROM = 64

#: Seconds an expected inotify event of this process's own rename is waited for (L{Folder.expectEvents}).
_EXPECT_SECONDS = 10.0

#: The most bytes of UID arrays (L{Folder.uidArray}) kept for the whole process.
UID_CACHE_BYTES = 64 << 20

#: The most bytes of flag indexes (L{Folder.flagIndex}) kept for the whole process.
FLAG_CACHE_BYTES = 64 << 20

#: A flag index of this many messages or more, read whole, is also stored in the index file
#: (table C{flagindex}) for the next process to read in one row.
FLAG_INDEX_STORED_FROM = 1000


class _FlagSets(dict):
    """
    Flag text from the index ("\\Seen \\Flagged") -> its frozenset, made once per text.
    """

    def __missing__(self, text: str) -> frozenset[str]:
        found = self[text] = frozenset(text.split())
        return found


class _Uncollected:
    """
    No garbage collection while a bulk of acyclic objects is made (index rows, L{Message}s):
    every collection would only scan them (a collection every 700 allocations, and full ones as
    the rows pile up: 40 of the 165 ms a listing of 100,000 messages took).  Nested and
    concurrent uses (store threads) collect again when the last one ends, if collection was on.
    """

    _lock = threading.Lock()
    _depth = 0
    _wasEnabled = False

    def __enter__(self) -> None:
        with self._lock:
            if _Uncollected._depth == 0:
                _Uncollected._wasEnabled = gc.isenabled()
                gc.disable()
            _Uncollected._depth += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            _Uncollected._depth -= 1
            if _Uncollected._depth == 0 and _Uncollected._wasEnabled:
                gc.enable()


_uncollected = _Uncollected()


class _CacheBudget:
    """
    Least-recently-used accounting of the folders' cached arrays (UIDs, or flag indexes) within
    a byte budget; C{drop} names the L{Folder} method that forgets one.
    """

    def __init__(self, limit: int, drop: str = "_dropUidCache"):
        self.limit = limit
        self.drop = drop
        self.used = 0
        self._order: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, folder, size: int) -> None:
        victims = []
        with self._lock:
            self.used += size - self._order.pop(folder, 0)
            self._order[folder] = size
            while self.used > self.limit and len(self._order) > 1:
                victim, victimSize = self._order.popitem(last=False)
                self.used -= victimSize
                victims.append(victim)
        for victim in victims:
            getattr(victim, self.drop)()


_uidCaches = _CacheBudget(UID_CACHE_BYTES)
_flagCaches = _CacheBudget(FLAG_CACHE_BYTES, "_dropFlagIndex")


class FlagIndex(NamedTuple):
    """
    A folder's UIDs, flags and MODSEQs as arrays (L{Folder.flagIndex}): what a FETCH of flags
    alone reads, 16 bytes a message, kept between calls as Dovecot keeps its index mapped.
    The arrays are shared: read them, never change them.

    @ivar uids: every UID, ascending (C{array('I')}).
    @ivar codes: for each UID, the index in C{pairs} of its flags (C{array('I')}).
    @ivar modseqs: for each UID, its MODSEQ (C{array('Q')}).
    @ivar pairs: the distinct C{(system flags, keywords)} of the folder, as the index's texts.
    """

    uids: array
    codes: array
    modseqs: array
    pairs: list[tuple[str, str]]


def _emptyFlagIndex(pairs: list | None = None) -> FlagIndex:
    return FlagIndex(array("I"), array("I"), array("Q"), [] if pairs is None else pairs)


class _PairCodes(dict):
    """(flags text, keywords text) -> a small number, given in order of first sight."""

    def __init__(self):
        super().__init__()
        self.pairs: list[tuple[str, str]] = []

    def __missing__(self, pair: tuple[str, str]) -> int:
        code = self[pair] = len(self.pairs)
        self.pairs.append(pair)
        return code


class _DirFds:
    """
    The folder's cur/ and new/ opened as directories, for *at() calls on many files.
    """

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.fds = []
        for sub in ("cur", "new"):
            self.fds.append(os.open(os.path.join(self.path, sub), os.O_RDONLY | os.O_DIRECTORY))
        return self.fds

    def __exit__(self, *exc):
        for fd in self.fds:
            os.close(fd)


@dataclass(frozen=True)
class FolderInfo:
    name: str
    special: str | None
    subscribed: bool


#: A C{cur/} of at least this many files, indexed for the first time, goes L{Folder._indexAll}'s way.
_BULK_FROM = 256

#: L{Folder._indexAll} checks and inserts the names this many at a time, so that the JSON text,
#: sqlite's copy of it and its parse, and the flag texts found in it are ~300 KB that each slice
#: reuses instead of ~32 MB of fresh pages for 100,000 names (16,246 -> 8,057 minor faults in
#: all; a fresh page costs ~3 us on these machines, up to ~14 in the seconds after a large write).
_BULK_CHUNK = 4096

#: The names L{Folder._indexAll} takes, one per line: ten digits of seconds (2001-2286),
#: C{.M}microseconds C{P}pid (C{Q}counter), the host, C{,S=}size C{,W=}size (at most 15 digits:
#: sqlite's integers), the flags; every name in C{cur/} has it or the general path runs.  The
#: check of a listing with a name that needs a JSON escape (the others: L{_BULK_ARRAY}).
_BULK_NAMES = re.compile(
    r"(?:[0-9]{10}+\.M[0-9]++P[0-9]++(?:Q[0-9]++)?+\.[^,:\n/]*+,S=[0-9]{1,15}+,W=[0-9]{1,15}+(?::2,[^\n]*+)?+\n)*+")

#: The same shape over the names as L{Folder._indexAll}'s JSON array (C{["name","name",...]},
#: no name empty), for names that need no JSON escape: without a quote, a backslash or a control
#: character (a name with one goes L{_BULK_NAMES}'s way and C{json.dumps}).
_BULK_NAME = r"[0-9]{10}+\.M[0-9]++P[0-9]++(?:Q[0-9]++)?+\.[^\x00-\x1f\",:/\\]*+,S=[0-9]{1,15}+,W=[0-9]{1,15}+(?::2,[^\x00-\x1f\"\\]*+)?+"
_BULK_ARRAY = re.compile(r'\["' + _BULK_NAME + r'(?:","' + _BULK_NAME + r')*+"\]')

#: In such an array, a name whose next name has the same ten digits of seconds (the match ends
#: before the next name's opening quote, so that a run of three gives two matches).
_BULK_SAME_SECOND = re.compile(r'"([0-9]{10})[^"]*+",(?="\1)')

#: In such an array, the text after a name's ":" (its first; the host has none).
_BULK_INFO = re.compile(r':(2,[^"]*+)"')

_UNIQUE = re.compile(r"^(\d+)\.(?:M(\d+))?(?:P(\d+))?(?:Q(\d+))?")


def _jsonArray(names: list[str]) -> str:
    """
    C{["name","name",...]} for names that need no JSON escape (at least one), made in one
    allocation: C{'["' + '","'.join(names) + '"]'} makes three strings of its size, whose fresh
    pages (~1,500 each for 100,000 names) cost a first index ~3 us apiece on these machines.
    """
    if len(names) == 1:
        return '["' + names[0] + '"]'
    first, last = names[0], names[-1]
    names[0], names[-1] = '["' + first, last + '"]'
    try:
        return '","'.join(names)
    finally:
        names[0], names[-1] = first, last


def _jsonSlices(names: list[str]):
    """
    (index of the first name, JSON array) for each slice of L{_BULK_CHUNK} names in turn, as
    L{Folder._indexAll} checks and inserts them.
    """
    for a in range(0, len(names), _BULK_CHUNK):
        yield a, _jsonArray(names[a : a + _BULK_CHUNK])


def _deliveryOrder(base: str):
    """
    Sort key putting maildir names in delivery order: seconds, then microseconds, numerically
    ("M5000" before "M12000", which a plain string sort gets wrong), then the name.
    """
    m = _UNIQUE.match(base)
    if m is None:
        return (1 << 62, 0, 0, base)
    secs, usecs, _, counter = m.groups()
    return (int(secs), int(usecs or 0), int(counter or 0), base)


#: names in one STORE above which L{_mayChange} reads every row rather than one OR term a name
_MAY_CHANGE_TERMS = 64


def _mayChange(mode: str, system: frozenset[str], keywords: frozenset[str]) -> tuple[str, tuple]:
    """
    For STORE: an SQL condition (" AND ...", parameters) that keeps the index rows whose flags
    the change may alter.  It may keep rows the change leaves alone (they are skipped later),
    never drop one it alters: C{flags} and C{keywords} are space-separated names.
    """
    if mode == "set":
        return " AND (flags != ? OR keywords != ?)", (" ".join(sorted(system)), " ".join(sorted(keywords)))
    # A system flag's name is in no other's (FLAG_LETTERS: no padding needed, which cost a
    # third of the condition's time on 10,000 rows); a keyword may be in another's ("a" in "ab").
    tests = [("flags", name) for name in sorted(system)] + [("' ' || keywords || ' '", " " + name + " ")
                                                             for name in sorted(keywords)]
    if not tests:
        return " AND 0", ()
    if len(tests) > _MAY_CHANGE_TERMS:
        return "", ()  # (sqlite refuses an expression over 1,000 deep: every row, sorted out later)
    op = "= 0" if mode == "add" else "> 0"
    return " AND (" + " OR ".join(f"instr({column}, ?) {op}" for column, _ in tests) + ")", \
        tuple(value for _, value in tests)


def _decodable(text: str) -> bool:
    """Whether C{text} is valid Unicode: C{os.listdir} turns bytes that are not UTF-8 into lone
    surrogates (surrogateescape), which sqlite's binding refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stampsOf(stats) -> tuple[str, ...]:
    """Directories' stamps: inode and mtime (a directory made again under the same name differs)."""
    return tuple(f"{st.st_ino}:{st.st_mtime_ns}" for st in stats)


def _settled(stats, now_ns: int) -> bool:
    """Whether these directories' mtimes are far enough before C{now_ns} (L{_RACY_NS}) that a
    change at or after C{now_ns} would move them."""
    return all(now_ns - st.st_mtime_ns >= _RACY_NS for st in stats)


def _unseenChange(oldFlags: str, newFlags: str) -> int:
    """
    How a message's flag change (the index's space-separated system flags, before and after)
    moves its folder's unseen counter: -1, 0 or +1.
    """
    return ("\\Seen" not in newFlags) - ("\\Seen" not in oldFlags)


def _splitFlags(imapFlags: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """
    IMAP flags -> (system flags with maildir letters, keywords).  \\Recent is session state and
    is dropped; system flag names are matched case-insensitively.
    """
    system, keywords = set(), set()
    canon = {k.lower(): k for k in FLAG_LETTERS}
    for flag in imapFlags:
        if flag.startswith("\\"):
            known = canon.get(flag.lower())
            if known:
                system.add(known)
        elif flag:
            keywords.add(flag)
    return frozenset(system), frozenset(keywords)


@implementer(IUserStore)
class MaildirStore:
    """
    All users' mail under one root (C{<data_dir>/mail}).  Hands out one L{UserStore} per user.
    """

    def __init__(self, root: Path, storageLimit: int = 0, messageLimit: int = 0,
                 specialFolders: dict[str, str] | None = None, summarizer=None):
        self.root = Path(root)
        self.summarizer = summarizer  # a pymaild.store.summarizer.Summarizer for bulk summaries, or None
        self.storageLimit = storageLimit
        self.messageLimit = messageLimit
        self.specialFolders = dict(specialFolders or {
            "\\Drafts": "Drafts", "\\Sent": "Sent", "\\Trash": "Trash",
            "\\Junk": "Junk", "\\Archive": "Archive",
        })
        self._users: dict[str, UserStore] = {}
        self._limits: dict[str, int] = {}  # per-user storage limits (the directory's quota)
        self._places: dict[str, str] = {}  # account -> directory where a stable key moved it
        self._keys = None  # the MailboxKeys map, opened at the first setMailboxKey
        self._lock = threading.Lock()
        self._made: set[str] = set()  # user maildirs made or found (userDirectory)

    def userDirectory(self, user: str, check: bool = False) -> Path:
        """
        The user's maildir, made if missing.  Once made (or found) it is not looked at again
        on every delivery unless C{check}: a delivery that finds it gone asks again with
        C{check} (L{pymaild.store.delivery.deliverToUsers}).
        """
        path = self.root / self._relative(user)
        key = str(path)
        if check or key not in self._made:
            _makeMaildir(path, folderMarker=False)
            self._made.add(key)
        return path

    def _relative(self, user: str) -> str:
        """The user's directory relative to the root: its stable key's, else its address's."""
        place = self._places.get(user)
        if place is not None:
            return place
        local, _, domain = user.rpartition("@")
        return f"{_safePart(domain, 'domain')}/{_safePart(local, 'local part')}"

    def user(self, user: str) -> UserStore:
        """
        The user's store (opened once per process and directory; blocking).
        """
        with self._lock:
            relative = self._relative(user)
            store = self._users.get(relative)
            if store is None:
                store = UserStore(self.userDirectory(user), self._limits.get(user, self.storageLimit),
                                  self.messageLimit, self.specialFolders, self.summarizer)
                self._users[relative] = store
            return store

    def setMailboxKey(self, user: str, key: str | None) -> None:
        """
        The stable key of the directory entry whose account is C{user} now (C{[ldap]
        mailbox_attribute}; see L{pymaild.store.keys}): from now on C{user}'s mail is in the
        directory that key was given, whatever C{user}'s address was then.  C{None} (an entry
        without the attribute): the address's directory.
        """
        if key is None:
            return
        local, _, domain = user.rpartition("@")
        natural = f"{_safePart(domain, 'domain')}/{_safePart(local, 'local part')}"
        with self._lock:
            if self._keys is None:
                from pymaild.store.keys import MailboxKeys

                self._keys = MailboxKeys(self.root)
        place = self._keys.place(key, natural)
        with self._lock:
            if self._places.get(user, natural) != place:
                log.info("mailbox of {user}: {place}", user=user, place=place)
            if place == natural:
                self._places.pop(user, None)
            else:
                self._places[user] = place

    def place(self, user: str, relative: str) -> None:
        """
        Use C{<root>/relative} as C{user}'s directory (as the server found it: a quarantine
        release in pymaildctl, which does not ask the directory).
        """
        parts = relative.split("/")
        if len(parts) != 2:
            raise ValueError(f"not a mailbox directory: {relative!r}")
        relative = f"{_safePart(parts[0], 'domain')}/{_safePart(parts[1], 'local part')}"
        with self._lock:
            self._places[user] = relative

    def placeOf(self, user: str) -> str:
        """The user's directory relative to the root, as L{place} takes it (another process's
        store then finds the user where this one does)."""
        with self._lock:
            return self._relative(user)

    def storageLimitOf(self, user: str) -> int:
        """The user's storage limit in bytes (L{setStorageLimit}; 0: none)."""
        with self._lock:
            return self._limits.get(user, self.storageLimit)

    def setStorageLimit(self, user: str, limit: int | None) -> None:
        """
        The user's own storage limit in bytes (from the directory; None: the store's default),
        taken at once by an open user store (its maildirsize is rewritten at the next use).
        """
        limit = self.storageLimit if limit is None else limit
        with self._lock:
            if self._limits.get(user, self.storageLimit) == limit:
                return
            self._limits[user] = limit
            store = self._users.get(self._relative(user))
        if store is not None:
            with store.quota._lock:
                store.quota.storageLimit = limit


class UserStore:
    """
    One user's folders.  Thread-safe: every method holds the user's lock.
    """

    def __init__(self, root: Path, storageLimit: int = 0, messageLimit: int = 0,
                 specialFolders: dict[str, str] | None = None, summarizer=None):
        self.root = Path(root)
        self.summarizer = summarizer
        _makeMaildir(self.root, folderMarker=False)
        self.lock = threading.RLock()
        self._depth = 0
        self._undo = []  # (see onRollback)
        self.db = connect(self.root / INDEX_NAME)
        self._wal = self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        self._autocheckpoint = self.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self._checkpointScope = self._checkpointDeferred = False
        self.quota = quotamod.Quota(self.root, storageLimit, messageLimit)
        self.specialFolders = specialFolders or {}
        self._folders: dict[str, Folder] = {}
        self._cleanDeleted()

    @contextmanager
    def transaction(self, immediate: bool = True):
        """
        One sqlite transaction (nested uses join the outer one).  The connection runs in
        autocommit mode, so without this every statement would commit alone.  C{immediate}
        takes the write lock at once (BEGIN IMMEDIATE); without it, a read transaction, which in
        WAL mode waits for no writer (for reads only).
        """
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if self.db.in_transaction:  # (a ROLLBACK failed, and the reopen after it: try again)
                self._reopen()
            self.db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            self._depth = 1
            try:
                yield
                self._depth = 0
                self.db.execute("COMMIT")
            except BaseException:
                # the body failed, or the COMMIT (a full disk): nothing of it stays, in the
                # index or in the caches it updated (their keys would come again with the next
                # change, which takes the same UIDNEXT and MODSEQ)
                self._depth = 0
                try:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                except sqlite3.Error as e:  # (sqlite rolled back already, or cannot: the first error counts)
                    log.warn("rollback failed: {error}", error=str(e))
                if self.db.in_transaction:
                    self._reopen()  # (else every BEGIN after would fail: a transaction is open)
                for undo in self._undo:
                    undo()
                raise
            finally:
                self._undo.clear()

    def _reopen(self) -> None:
        """
        Drop a connection that a failed ROLLBACK left in its transaction (closing it rolls the
        transaction back) and open the index again; if that fails, the old one stays, and the
        next transaction tries again before its BEGIN.  Caller holds the lock.
        """
        path = self.root / INDEX_NAME
        try:
            fresh = reopen(path)
        except (sqlite3.Error, OSError) as e:
            log.warn("cannot reopen the index {path} after a failed rollback: {error}", path=str(path), error=str(e))
            return
        try:
            self.db.close()
        except sqlite3.Error as e:
            log.warn("closing the index {path} failed: {error}", path=str(path), error=str(e))
        self.db = fresh
        log.warn("reopened the index {path} after a failed rollback", path=str(path))

    def onRollback(self, undo) -> None:
        """
        Within a transaction: call C{undo} (a cache's drop) if it does not commit.  Caller
        holds the lock.
        """
        if self._depth:
            self._undo.append(undo)

    @contextmanager
    def cacheTransaction(self):
        """
        A transaction that writes caches alone (what the files say, such as internal dates, or
        what the index says in another shape): committed without an fsync
        (C{synchronous=NORMAL}), as a crash that loses it loses nothing but the work of
        computing it again; no UID or MODSEQ may be taken in it (those commits are synced, see
        L{pymaild.store.index}).  Within another transaction it is part of that one.
        """
        with self.lock:
            if self._depth or not self._wal:  # (NORMAL outside WAL mode can corrupt at a power cut)
                with self.transaction():
                    yield
                return
            self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.transaction():
                    yield
            finally:
                self.db.execute("PRAGMA synchronous=FULL")

    def inTransaction(self) -> bool:
        return self._depth > 0

    @contextmanager
    def deferCheckpoint(self, bulk: bool = True):
        """
        Commits within carry no automatic checkpoint once C{bulk} (or L{holdCheckpoint} within,
        for a write that learns it is large as it goes): a write of many rows gets its answer
        without waiting for sqlite to copy the WAL (megabytes, then) into the database and fsync
        it; the checkpoint runs afterwards in the checkpoint thread
        (L{pymaild.store.index.checkpointLater}).  Durability is the same: a commit is in the
        WAL, fsynced, either way.
        """
        with self.lock:
            outermost = not self._checkpointScope  # (nested: the outermost scope lets go)
            self._checkpointScope = True
            try:
                if bulk:
                    self.holdCheckpoint()
                yield
            finally:
                if outermost:
                    self._checkpointScope = False
                    if self._checkpointDeferred:
                        self._checkpointDeferred = False
                        try:
                            self.db.execute(f"PRAGMA wal_autocheckpoint={int(self._autocheckpoint)}")
                        finally:
                            checkpointLater(self.root / INDEX_NAME)

    def holdCheckpoint(self) -> None:
        """Within L{deferCheckpoint} (caller holds the lock): no automatic checkpoint from now on."""
        if self._checkpointScope and self._wal and not self._checkpointDeferred:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointDeferred = True

    # --- folders ---------------------------------------------------------------------------

    def _cleanDeleted(self) -> None:
        for entry in os.scandir(self.root):
            if entry.name.startswith("DELETED.") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _path(self, name: str) -> Path:
        directory = names.toDirectory(name)
        return self.root / directory if directory else self.root

    def exists(self, name: str) -> bool:
        name = names.validate(name)
        return name == "INBOX" or (self._path(name) / "cur").is_dir()

    def listFolders(self) -> list[FolderInfo]:
        """
        Every folder on disk (INBOX first), whoever made it, with its special use and whether
        it is subscribed.
        """
        with self.lock:
            found = ["INBOX"]
            for entry in os.scandir(self.root):
                if entry.name.startswith(".") and entry.name not in (".", "..") and entry.is_dir(follow_symlinks=False):
                    try:
                        name = names.fromDirectory(entry.name)
                    except names.InvalidName:
                        continue
                    if os.path.isdir(os.path.join(entry.path, "cur")):
                        found.append(name)
            special = dict(self.db.execute("SELECT name, special FROM folders WHERE special IS NOT NULL"))
            subscribed = self.subscriptions()
            out = [FolderInfo(found[0], None, "INBOX" in subscribed)]
            out += [FolderInfo(n, special.get(n), n in subscribed) for n in sorted(found[1:])]
            return out

    def createFolder(self, name: str, special: str | None = None) -> Folder:
        """
        Create a folder (and its missing parents).

        @raise names.InvalidName: a hostile or malformed name.
        @raise StoreError: C{ALREADYEXISTS}.
        """
        with self.lock:
            name = names.validate(name)
            if name == "INBOX" or (self._path(name) / "cur").is_dir():
                raise StoreError("ALREADYEXISTS", f"Mailbox already exists: {name}")
            if special is not None and special not in SPECIAL_USE:
                raise StoreError("USEATTR", f"Unsupported special-use attribute {special}")
            parts = name.split("/")
            for depth in range(1, len(parts) + 1):
                partial = "/".join(parts[:depth])
                if partial == "INBOX":
                    continue
                path = self._path(partial)
                if not (path / "cur").is_dir():
                    _makeMaildir(path, folderMarker=True)
            fsyncDirectory(self.root)
            folder = self.folder(name)
            if special is not None:
                self.db.execute("UPDATE folders SET special=? WHERE name=?", (special, name))
            return folder

    def ensureSpecialFolders(self) -> None:
        """
        Create Drafts, Sent, Trash, Junk and Archive (names from the configuration) if missing,
        and mark them with their special use (first login).
        """
        with self.lock:
            for attribute, name in self.specialFolders.items():
                if not self.exists(name):
                    self.createFolder(name, attribute)
                else:
                    self.folder(name)
                    self.db.execute("UPDATE folders SET special=? WHERE name=? AND special IS NULL", (attribute, name))

    def deleteFolder(self, name: str) -> None:
        """
        Delete a folder and its messages.  INBOX and folders with children cannot be deleted.
        """
        with self.lock:
            name = names.validate(name)
            if name == "INBOX":
                raise StoreError("CANNOT", "INBOX cannot be deleted")
            path = self._path(name)
            if not (path / "cur").is_dir():
                raise StoreError("NONEXISTENT", f"Mailbox doesn't exist: {name}")
            if any(f.name.startswith(name + "/") for f in self.listFolders()):
                raise StoreError("INUSE", f"Mailbox has children, delete them first: {name}")
            trash = self.root / f"DELETED.{uniqueName()}"
            os.rename(path, trash)
            fsyncDirectory(self.root)
            with self.transaction():
                row = self.db.execute("SELECT id FROM folders WHERE name=?", (name,)).fetchone()
                if row:
                    self.db.execute("DELETE FROM messages WHERE folder=?", (row[0],))
                    self.db.execute("DELETE FROM folders WHERE id=?", (row[0],))
                    self.db.execute("DELETE FROM meta WHERE key=?", (f"firstrecent:{row[0]}",))
                self.db.execute("DELETE FROM subscriptions WHERE name=?", (name,))
            folder = self._folders.pop(name, None)
            shutil.rmtree(trash, ignore_errors=True)
            self._recalculateQuota()
            if folder is not None:
                folder.deleted = True

    def renameFolder(self, old: str, new: str) -> None:
        """
        Rename a folder with its children.  Renaming INBOX moves its messages into the new
        folder and leaves INBOX empty (RFC 3501 6.3.5).
        """
        with self.lock:
            old, new = names.validate(old), names.validate(new)
            if self.exists(new):
                raise StoreError("ALREADYEXISTS", f"Mailbox already exists: {new}")
            if not self.exists(old):
                raise StoreError("NONEXISTENT", f"Mailbox doesn't exist: {old}")
            if new.startswith(old + "/"):
                raise StoreError("CANNOT", "Cannot rename a mailbox under itself")
            if old == "INBOX":
                inbox = self.folder("INBOX")
                target = self.createFolder(new)
                inbox.sync()
                inbox.move([m.uid for m in inbox.messages()], target)
                return
            moves = [(old, new)] + [
                (f.name, new + f.name[len(old):]) for f in self.listFolders() if f.name.startswith(old + "/")
            ]
            for src, dst in moves:
                self._path(dst)  # validates the new name (length, characters)
            for src, dst in moves:
                os.rename(self._path(src), self._path(dst))
                self._folders.pop(src, None)
            fsyncDirectory(self.root)
            with self.transaction():
                for src, dst in moves:
                    self.db.execute("UPDATE folders SET name=? WHERE name=?", (dst, src))
                    if self.db.execute("DELETE FROM subscriptions WHERE name=?", (src,)).rowcount:
                        self.db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?)", (dst,))
            self._writeSubscriptions()

    def subscriptions(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM subscriptions")}

    def subscribe(self, name: str, subscribed: bool = True) -> None:
        with self.lock:
            name = names.validate(name)
            with self.transaction():
                if subscribed:
                    self.db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?)", (name,))
                else:
                    self.db.execute("DELETE FROM subscriptions WHERE name=?", (name,))
            self._writeSubscriptions()

    def _writeSubscriptions(self) -> None:
        """
        Keep Dovecot's C{subscriptions} file (one name per line, version 1 format) in step.
        """
        text = "".join(n + "\n" for n in sorted(self.subscriptions()))
        tmp = self.root / ".subscriptions.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.root / "subscriptions")

    def folder(self, name: str) -> Folder:
        """
        Open a folder (its index row is created, importing C{dovecot-uidlist}, on first sight).

        @raise StoreError: C{NONEXISTENT}.
        """
        with self.lock:
            name = names.validate(name)
            folder = self._folders.get(name)
            if folder is not None and not folder.deleted:
                return folder
            path = self._path(name)
            if not (path / "cur").is_dir():
                raise StoreError("NONEXISTENT", f"Mailbox doesn't exist: {name}")
            _makeMaildir(path, folderMarker=name != "INBOX")
            folder = Folder(self, name, path)
            self._folders[name] = folder
            return folder

    def _recalculateQuota(self) -> None:
        try:
            self.quota.recalculate()
        except OSError:
            log.failure("quota recalculation in {root} failed", root=str(self.root))

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Folder:
    """
    One folder: its directory, its index rows and the sessions listening to its changes.
    """

    def __init__(self, user: UserStore, name: str, path: Path):
        self.user = user
        self.name = name
        self.path = path
        # cur/ and new/ as strings ending in a slash: a file's path is one of them and its name
        # (L{messagesNow}, on the reactor, joined them at every call)
        self._curPrefix, self._newPrefix = os.path.join(path, "cur", ""), os.path.join(path, "new", "")
        self.deleted = False
        self.listeners: list[Callable[[Folder, Changes], None]] = []
        db = user.db
        self._imported: dict[str, int] = {}
        self._warned: set[str] = set()  # (unique bases of files left out, L{_leaveOut}: warned of once)
        # ENVELOPEs and internal dates read from files, not written to the index yet (under the
        # user's lock: L{summaryFields}' C{deferWrite}, L{writeDeferred})
        self._deferredEnvelopes: dict[int, bytes] = {}
        self._deferredDates: dict[int, int] = {}
        row = db.execute("SELECT id FROM folders WHERE name=?", (name,)).fetchone()
        if row is None:
            # Look again inside the write transaction: another process may be creating it too.
            with self.user.transaction():
                row = db.execute("SELECT id FROM folders WHERE name=?", (name,)).fetchone()
                if row is None:
                    uidvalidity, uidnext = self._newUidValidity(), 1
                    try:
                        uidlist = dovecot.parseUidlist(path / "dovecot-uidlist")
                    except (ValueError, OSError) as e:
                        log.warn("ignoring {path}: {error}", path=str(path / "dovecot-uidlist"), error=str(e))
                        uidlist = None
                    if uidlist is not None:
                        uidvalidity, uidnext = uidlist.uidvalidity, uidlist.nextuid
                        self._imported = dict(uidlist.entries)
                    cur = db.execute(
                        "INSERT INTO folders (name, uidvalidity, uidnext, highestmodseq) VALUES (?, ?, ?, 1)",
                        (name, uidvalidity, uidnext),
                    )
                    row = (cur.lastrowid,)
        self.id = row[0]
        self._keywordLetters: dict[str, str] = {}
        self._loadKeywords()
        #: While sessions listen: the index's file names (base -> (name, in new/)) as of the
        #: index state C{_namesKey}, so that a sync that finds the directories as the index
        #: has them compares two in-memory dicts instead of reading every row (see _scan).
        self._names: dict[str, tuple[str, bool]] | None = None
        self._namesKey: tuple | None = None
        #: the same names as two sets, (cur/, new/), made from C{_names} when a sync needs them
        #: (None after every change of C{_names}): the directory listings compare with them at
        #: C speed
        self._nameSets: tuple[frozenset, frozenset] | None = None
        self._uidArray: array | None = None
        self._uidKey: tuple | None = None
        #: (index key, L{FlagIndex}, bytes) while kept (see L{flagIndex})
        self._flagIndex: tuple | None = None
        #: inotify events this process's own renames will cause: (directory, kind, name) ->
        #: deadlines (see L{expectEvents})
        self._expected: dict[tuple[str, str, str], list[float]] = {}
        self._expectLock = threading.Lock()
        #: set by a watcher (L{pymaild.store.watch.FolderWatcher}) while it watches this folder:
        #: a context manager that lifts the watch around this process's own bulk renames
        self.quiet: Callable | None = None
        #: whether a watcher's inotify watch is in place (L{watchChanged}), and a count of its
        #: changes: the directories' own stamps are noted only under one unbroken watch
        self._heard = False
        self._watchEpoch = 0
        #: (new/, cur/) stamps right after this process last made the index and the directories
        #: agree (a sync, a STORE's announced renames) under a watch: see L{_noteOwnStamps}
        self._ownStamps: tuple[str, str] | None = None

    def _newUidValidity(self) -> int:
        used = {r[0] for r in self.user.db.execute("SELECT uidvalidity FROM folders")}
        value = int(time.time())
        while value in used:
            value += 1
        return value

    # --- keywords <-> letters (dovecot-keywords) ---------------------------------------------

    def _loadKeywords(self) -> None:
        try:
            mapping = dovecot.parseKeywords(self.path / "dovecot-keywords")
        except (ValueError, OSError):
            mapping = {}
        self._keywordLetters = {kw: chr(ord("a") + i) for i, kw in mapping.items() if 0 <= i < 26}
        self._letterKeywords = {v: k for k, v in self._keywordLetters.items()}

    def _letterFor(self, keyword: str) -> str | None:
        letter = self._keywordLetters.get(keyword)
        if letter is None and len(self._keywordLetters) < 26:
            self._loadKeywords()  # another process may have added some
            letter = self._keywordLetters.get(keyword)
            if letter is None and len(self._keywordLetters) < 26:
                used = set(self._letterKeywords)
                letter = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in used)
                self._keywordLetters[keyword] = letter
                self._letterKeywords[letter] = keyword
                dovecot.writeKeywords(
                    self.path / "dovecot-keywords",
                    {ord(l) - ord("a"): k for l, k in self._letterKeywords.items()},
                )
        return letter

    def _letters(self, flags: Iterable[str], keywords: Iterable[str]) -> str:
        letters = {FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}
        for kw in sorted(keywords):
            letter = self._letterFor(kw)
            if letter:
                letters.add(letter)
        return "".join(sorted(letters))

    def _flagsFromName(self, fn: FileName, knownKeywords: frozenset[str] = frozenset()) -> tuple[str, str]:
        flags = sorted(LETTER_FLAGS[c] for c in fn.systemLetters if c in LETTER_FLAGS)
        keywords = set(knownKeywords) - set(self._keywordLetters)  # keywords that have no letter
        for c in fn.keywordLetters:
            kw = self._letterKeywords.get(c)
            if kw is None:
                self._loadKeywords()
                kw = self._letterKeywords.get(c)
            if kw:
                keywords.add(kw)
        return " ".join(flags), " ".join(sorted(keywords))

    # --- state ---------------------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        """
        UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, MESSAGES, UNSEEN, SIZE and RECENT (messages no
        session has been told of yet, see L{claimRecent}), without syncing.
        """
        with self.user.lock:
            db = self.user.db
            uidvalidity, uidnext, highest, count, unseen, size = db.execute(
                "SELECT uidvalidity, uidnext, highestmodseq, messages, unseen, vsize FROM folders WHERE id=?",
                (self.id,),
            ).fetchone()
            recentFrom = self.recentFrom()
            if recentFrom * 2 < uidnext:
                # (most are recent, e.g. a large folder no session has opened yet: count the
                # others, fewer rows to walk; 100,000 recent took 15 ms the other way)
                (older,) = db.execute(
                    "SELECT count(*) FROM messages WHERE folder=? AND uid<?", (self.id, recentFrom)
                ).fetchone()
                recent = count - older
            else:
                (recent,) = db.execute(
                    "SELECT count(*) FROM messages WHERE folder=? AND uid>=?", (self.id, recentFrom)
                ).fetchone()
            return {
                "uidvalidity": uidvalidity, "uidnext": uidnext, "highestmodseq": highest,
                "messages": count, "unseen": unseen, "size": size, "recent": recent,
            }

    # --- \Recent (RFC 3501 2.3.2): the first session told of a message has it as recent -------

    def _recentKey(self) -> str:
        return f"firstrecent:{self.id}"

    def recentFrom(self) -> int:
        """
        The lowest UID no session has claimed as recent yet (kept in the index's meta table).
        """
        with self.user.lock:
            row = self.user.db.execute("SELECT value FROM meta WHERE key=?", (self._recentKey(),)).fetchone()
            return int(row[0]) if row else 0

    def claimRecent(self) -> tuple[int, int]:
        """
        Claim the messages no session has seen as recent (a read-write SELECT, or new mail
        reaching a selected folder): C{(low, high)}, the UIDs C{low <= uid < high} are recent for
        the caller and for no one after it.
        """
        with self.user.lock:
            # nothing to claim (a folder opened again, the usual SELECT): read alone, without a
            # write transaction (which waits for another process's writer); else claimed within
            # one, which reads again
            low, uidnext = self._recentState()
            if uidnext <= low:
                return low, low
            with self.user.transaction():
                low, uidnext = self._recentState()
                if uidnext > low:
                    self.user.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                         (self._recentKey(), str(uidnext)))
                return low, max(low, uidnext)

    def _recentState(self) -> tuple[int, int]:
        """The lowest UID not claimed as recent yet (L{recentFrom}) and UIDNEXT, in one read.
        Caller holds the lock."""
        low, uidnext = self.user.db.execute(
            "SELECT (SELECT value FROM meta WHERE key=?), uidnext FROM folders WHERE id=?",
            (self._recentKey(), self.id),
        ).fetchone()
        return (int(low) if low is not None else 0), uidnext

    @property
    def uidvalidity(self) -> int:
        return self.status()["uidvalidity"]

    def _select(self, query: str, params: tuple, uids: Iterable[int] | None) -> list[tuple]:
        """
        The rows of C{query} (a SELECT whose first column is C{uid}, ending in a WHERE clause)
        for every UID, or only for C{uids} (a C{range} is one BETWEEN; anything else goes in
        chunks of 500), in UID order.  Caller holds the lock.
        """
        db = self.user.db
        if uids is None:
            return db.execute(query + " ORDER BY uid", params).fetchall()
        if isinstance(uids, range) and uids.step == 1:
            if not uids:
                return []
            return db.execute(
                query + " AND uid BETWEEN ? AND ? ORDER BY uid", (*params, uids.start, uids.stop - 1)
            ).fetchall()
        wanted = sorted(set(uids))
        if len(wanted) == 1:  # (one message: a client opening it)
            return db.execute(query + " AND uid=?", (*params, wanted[0])).fetchall()
        rows = []
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            rows += db.execute(
                query + f" AND uid IN ({','.join('?' * len(chunk))}) ORDER BY uid", (*params, *chunk)
            ).fetchall()
        return rows

    _MESSAGE_QUERY = "SELECT uid, flags, keywords, modseq, size, vsize, internaldate FROM messages WHERE folder=?"
    _MESSAGE_FILE_QUERY = _MESSAGE_QUERY.replace(" FROM", ", name, innew FROM", 1)

    def messages(self, uids: Iterable[int] | None = None, dates: bool = True) -> list[Message]:
        """
        Metadata of every message (or of C{uids}), in UID order, from the index alone; the
        internal dates it lacks are read from the files, or left 0 without C{dates} (for a
        caller that does not use them: a FETCH without INTERNALDATE).
        """
        with self.user.lock:
            with _uncollected:
                rows = self._select(self._MESSAGE_QUERY, (self.id,), uids)
            return self._messages(rows, dates)

    def messagesNow(self, uids: Iterable[int], dates: bool = True) -> list[tuple[Message, str]] | None:
        """
        L{messages} and L{paths} of a few messages in one indexed read, found without waiting:
        None when the user's lock is held (a store thread is working for this user), when
        C{dates} is asked for and an internal date is not in the index yet (that would stat the
        file), or when the read fails.  No file system call, so the reactor may call it: a
        FETCH of one message's body is answered without a store thread.
        """
        lock = self.user.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            rows = self._select(self._MESSAGE_FILE_QUERY, (self.id,), uids)
        except sqlite3.Error:  # busy, or the file gone: the store thread's way reports it
            return None
        finally:
            lock.release()
        if dates and any(r[6] is None for r in rows):
            return None
        sets, new = _FlagSets(), tuple.__new__
        cur, inNew = self._curPrefix, self._newPrefix
        return [(new(Message, (uid, sets[f], sets[k], m, s, v, d or 0)), (inNew if n else cur) + name)
                for uid, f, k, m, s, v, d, name, n in rows]

    def flagRows(self, uids: Iterable[int] | None = None) -> list[Message]:
        """
        Flags, keywords and MODSEQ of many messages (sizes and internal dates left 0): what
        another session needs to announce a flag change, without reading files for internal
        dates the index does not have yet.
        """
        with self.user.lock, _uncollected:
            rows = self._select("SELECT uid, flags, keywords, modseq FROM messages WHERE folder=?", (self.id,), uids)
            sets, new = _FlagSets(), tuple.__new__
            return [new(Message, (uid, sets[f], sets[k], m, 0, 0, 0)) for uid, f, k, m in rows]

    def flagRowsNow(self, uids: Iterable[int]) -> list[Message] | None:
        """
        L{flagRows} of C{uids} (ascending) from the kept flag index, found without waiting
        (L{keptFlagIndex}): None when that index is not at hand (not kept, not current, the
        user's lock held).  No file system call, so the reactor may call it: a session told
        that another session changed flags announces them without a store call (with ten
        sessions on one folder, each STORE would otherwise cost nine).
        """
        index = self.keptFlagIndex()
        if index is None:
            return None
        sets, new = _FlagSets(), tuple.__new__
        known, codes, modseqs, pairs = index
        out, i, end = [], 0, len(known)
        for uid in uids:
            i = bisect_left(known, uid, i)
            if i == end:
                break
            if known[i] == uid:
                f, k = pairs[codes[i]]
                out.append(new(Message, (uid, sets[f], sets[k], modseqs[i], 0, 0, 0)))
        return out

    def changedSince(self, since: int, uids: Iterable[int] | None = None) -> list[Message]:
        """
        The messages (all, or those among C{uids}) whose MODSEQ is greater than C{since}, in
        UID order: CONDSTORE's CHANGEDSINCE.  Filtered by sqlite, not by loading every row.
        """
        with self.user.lock:
            with _uncollected:
                rows = self._select(self._MESSAGE_QUERY + " AND modseq>?", (self.id, since), uids)
            return self._messages(rows)

    def vanished(self, since: int, uids: Iterable[int] | None = None) -> list[int]:
        """
        The UIDs removed from this folder (expunged, moved away, or found gone by a sync) with
        a MODSEQ greater than C{since}, only those among C{uids} if given, ascending: QRESYNC's
        C{VANISHED (EARLIER)}.  Every removal is kept (a UID is never reused), so the answer is
        exact for any C{since}.
        """
        with self.user.lock:
            return [r[0] for r in self._select(
                "SELECT uid FROM expunged WHERE folder=? AND modseq>?", (self.id, since), uids)]

    def _messages(self, rows: list[tuple], dates: bool = True) -> list[Message]:
        """
        L{Message}s from rows of L{_MESSAGE_QUERY}, reading the internal dates not yet known
        (with C{dates}; else 0).  Caller holds the lock.
        """
        missing = [r[0] for r in rows if r[6] is None]
        sets, new = _FlagSets(), tuple.__new__  # Message(...) would run NamedTuple's __new__
        if missing:
            known = self._deferredDates  # (read with their ENVELOPEs, not written yet: no stat)
            if known:
                known = {u: known[u] for u in missing if u in known}
                missing = [u for u in missing if u not in known]
            if dates and missing:
                known = {**known, **self._internalDates(missing)}  # (file system calls: not inside _uncollected)
            with _uncollected:
                return [new(Message, (uid, sets[f], sets[k], m, s, v, d if d is not None else known.get(uid, 0)))
                        for uid, f, k, m, s, v, d in rows]
        with _uncollected:
            return [new(Message, (uid, sets[f], sets[k], m, s, v, d)) for uid, f, k, m, s, v, d in rows]

    def _internalDates(self, uids: list[int]) -> dict[int, int]:
        """
        Read the internal dates (file mtimes) the index does not have yet, and keep them.  A
        sync does not stat every new file, so that indexing a large folder reads only its
        directories, as Dovecot does.
        """
        dates = {}
        stat = os.stat
        for uid, path in self.paths(uids).items():  # one query, not one per message
            try:
                dates[uid] = int(stat(path).st_mtime)
            except FileNotFoundError:
                continue
        with self.user.cacheTransaction():  # (the files' mtimes: a cache, not synced)
            self.user.db.executemany(
                "UPDATE messages SET internaldate=? WHERE folder=? AND uid=?",
                [(d, self.id, u) for u, d in dates.items()],
            )
        return dates

    def firstUnseen(self) -> int | None:
        """
        The lowest UID without \\Seen (for SELECT's [UNSEEN n]).
        """
        with self.user.lock:
            return self.user.db.execute(
                "SELECT min(uid) FROM messages WHERE folder=? AND instr(flags, '\\Seen') = 0", (self.id,)
            ).fetchone()[0]

    def uids(self) -> list[int]:
        return self.uidArray().tolist()

    def uidArray(self) -> array:
        """
        Every UID, ascending, as a new C{array('I')} (4 bytes a message).  The array is kept
        between calls (within L{UID_CACHE_BYTES} for the whole process, least recently used
        dropped first) and copied, as long as UIDNEXT and the message count say the set is the
        same (every insert moves UIDNEXT, so a delete and an insert cannot cancel out): a
        client that reconnects to a large folder does not wait for every row again.
        """
        with self.user.lock:
            db = self.user.db
            cached, cachedKey = self._uidArray, self._uidKey
            if cached is not None:
                key = db.execute("SELECT uidnext, messages FROM folders WHERE id=?", (self.id,)).fetchone()
                if tuple(key) == cachedKey:
                    _uidCaches.touch(self, len(cached) * 4)
                    return array("I", cached)
            with self.user.transaction(immediate=False):  # the key and the rows of one moment
                key = tuple(db.execute("SELECT uidnext, messages FROM folders WHERE id=?", (self.id,)).fetchone())
                uids = array("I", (r[0] for r in db.execute(
                    "SELECT uid FROM messages WHERE folder=? ORDER BY uid", (self.id,))))
            self._uidArray, self._uidKey = uids, key
            _uidCaches.touch(self, len(uids) * 4)
            return array("I", uids)

    def _dropUidCache(self) -> None:
        self._uidArray = self._uidKey = None

    def flagIndex(self) -> FlagIndex:
        """
        Every message's UID, flags and MODSEQ as arrays (L{FlagIndex}), read from the index
        once and kept (within L{FLAG_CACHE_BYTES} for the whole process) as long as the index
        key (L{_indexKey}) is the same: every insert moves UIDNEXT and every flag change or
        expunge HIGHESTMODSEQ, in this process or any other.  A large folder's is also stored
        in the index file when read whole, under that key, so that another process (a
        restart, a POP3 or IMAP worker) reads it in one row.  A folder another process
        deleted has an empty one.
        """
        with self.user.lock:
            db = self.user.db
            cached = self._flagIndex
            key = self._indexKey()
            if key is None:  # deleted by another process: nothing (the caller's general path says so)
                return _emptyFlagIndex()
            if cached is not None and cached[0] == key:
                _flagCaches.touch(self, cached[2])
                return cached[1]
            store = None
            # the key and the rows of one moment, in a read transaction (waits for no writer)
            with self.user.transaction(immediate=False), _uncollected:
                key = self._indexKey()
                if key is None:
                    return _emptyFlagIndex()
                stamp = ":".join(map(str, (*key, sys.byteorder)))
                stored = db.execute(
                    "SELECT uids, codes, modseqs, pairs FROM flagindex WHERE folder=? AND key=?", (self.id, stamp)
                ).fetchone()
                if stored is not None:
                    index = _emptyFlagIndex([tuple(p) for p in json.loads(stored[3])])
                    for column, data in zip(index[:3], stored[:3]):
                        column.frombytes(data)
                else:
                    rows = db.execute(
                        "SELECT uid, flags, keywords, modseq FROM messages WHERE folder=? ORDER BY uid", (self.id,)
                    ).fetchall()
                    codes = _PairCodes()
                    uids, flags, keywords, modseqs = zip(*rows) if rows else ((), (), (), ())
                    index = FlagIndex(array("I", uids), array("I", map(codes.__getitem__, zip(flags, keywords))),
                                      array("Q", modseqs), codes.pairs)
                    del rows, uids, flags, keywords, modseqs
                    if len(index.uids) >= FLAG_INDEX_STORED_FROM:
                        store = stamp
            if store is not None:
                self._storeFlagIndex(store, index)
            size = 16 * len(index.uids) + 200 * len(index.pairs)
            self._flagIndex = (key, index, size)
            _flagCaches.touch(self, size)
            return index

    def keptFlagIndex(self) -> FlagIndex | None:
        """
        The flag index (L{flagIndex}) if it is kept and still current, found without waiting:
        None when the user's lock is held (a store thread is working for this user), when no
        index is kept, when the index key moved (anyone's change since), or when the key
        cannot be read at once.  At most one indexed sqlite read and no file system call, so
        the reactor may call it: a small FETCH of flags is then answered without a store
        thread, two thread wake-ups that on an idle machine cost more than the work.
        """
        lock = self.user.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            cached = self._flagIndex
            if cached is None:
                return None
            try:
                key = self._indexKey()
            except sqlite3.Error:  # busy, or the file gone: the store thread's way reports it
                return None
            if cached[0] != key:
                return None
            _flagCaches.touch(self, cached[2])
            return cached[1]
        finally:
            lock.release()

    def keepsFlagIndex(self) -> bool:
        """Whether a flag index is kept, current or not (a hint: read without the lock)."""
        return self._flagIndex is not None

    def _dropFlagIndex(self) -> None:
        self._flagIndex = None

    def _storeFlagIndex(self, stamp: str, index: FlagIndex) -> None:
        """
        Keep a flag index just read whole in the index file for the next process, if that is
        quick: a write waits at most 0.1 s for another process's (a FETCH must not wait for a
        long sync), and is not synced to disk (a cache: lost in a crash, read again after).
        Caller holds the lock, outside any transaction.
        """
        db = self.user.db
        if self.user.inTransaction():
            return
        try:
            db.execute("PRAGMA busy_timeout=100")
            with self.user.cacheTransaction():
                db.execute(
                    "INSERT OR REPLACE INTO flagindex (folder, key, uids, codes, modseqs, pairs) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.id, stamp, *(column.tobytes() for column in index[:3]), json.dumps(index.pairs)))
        except sqlite3.OperationalError as e:  # busy, disk full: the next process reads the rows
            log.debug("flag index of {folder} not stored: {error}", folder=self.name, error=str(e))
        finally:
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")

    def _flagIndexUpdated(self, kept: tuple | None, plans: list, modseq: int) -> None:
        """
        Inside the transaction of a STORE: the flag index (C{kept}: the cache entry as it was
        valid before the change, or None) gets the new flags and MODSEQ of the STORE's C{plans}
        (see L{_planStore}) in a copy (sessions may be reading the arrays), instead of
        being read again whole; a change of more than a quarter of the folder drops it instead.
        """
        if kept is None:
            self._flagIndex = None
            return
        _, index, _ = kept
        if len(plans) > len(index.uids) // 4 + 16:
            self._flagIndex = None
            return
        codes, modseqs, pairs = array("I", index.codes), array("Q", index.modseqs), list(index.pairs)
        known = {pair: code for code, pair in enumerate(pairs)}
        uids = index.uids
        count = len(uids)
        coded = {}  # outcome (one tuple per distinct change, see _planStore) -> code
        i = 0
        for uid, _, outcome, *_ in plans:  # (in UID order: each search starts where the last ended)
            i = bisect_left(uids, uid, i)
            if i == count or uids[i] != uid:
                self._flagIndex = None  # (cannot be: the index had it)
                return
            code = coded.get(id(outcome))
            if code is None:
                pair = (outcome[1], outcome[2])
                code = known.get(pair)
                if code is None:
                    code = known[pair] = len(pairs)
                    pairs.append(pair)
                coded[id(outcome)] = code
            codes[i] = code
            modseqs[i] = modseq
        updated = FlagIndex(uids, codes, modseqs, pairs)
        size = 16 * len(uids) + 200 * len(pairs)
        self._flagIndex = (self._indexKey(), updated, size)
        self.user.onRollback(self._dropFlagIndex)
        _flagCaches.touch(self, size)

    def _row(self, uid: int):
        return self.user.db.execute(
            "SELECT name, innew, flags, keywords FROM messages WHERE folder=? AND uid=?", (self.id, uid)
        ).fetchone()

    def filePath(self, uid: int) -> Path:
        with self.user.lock:
            row = self._row(uid)
            if row is None:
                raise StoreError("NONEXISTENT", f"No message with UID {uid}")
            return self.path / ("new" if row[1] else "cur") / row[0]

    def open(self, uid: int) -> BinaryIO:
        """
        The message's bytes as a file (LF line ends, as stored).  If another process renamed
        the file (a flag change), the folder is synced and the open retried once.

        @raise StoreError: C{EXPUNGEISSUED} if the message is gone.
        """
        for attempt in (0, 1):
            try:
                return open(self.filePath(uid), "rb")
            except FileNotFoundError:
                if attempt == 0:
                    self.sync(force=True)  # (renamed by someone: whatever the stamps say)
        raise StoreError("EXPUNGEISSUED", f"Message {uid} has been expunged")

    def withFile(self, uid: int, use):
        """
        C{use(path)} with the message's file as it is now, for a reader whose file name went
        stale (a C{FileNotFoundError}: a STORE renamed the file after its row was read).  The
        row is read again and C{use} called under the user's lock, so that no STORE of this
        process renames the file in between; if even that file is gone (another process renamed
        it), once more after a sync.

        @raise StoreError: C{EXPUNGEISSUED} if the message is gone.
        """
        for attempt in (0, 1):
            with self.user.lock:
                row = self._row(uid)
                if row is None:
                    break
                try:
                    return use(os.path.join(self.path, "new" if row[1] else "cur", row[0]))
                except FileNotFoundError:
                    if attempt:
                        break
            self.sync(force=True)  # (renamed by another process: whatever the stamps say)
        raise StoreError("EXPUNGEISSUED", f"Message {uid} has been expunged")

    def paths(self, uids: Iterable[int]) -> dict[int, str]:
        """
        The files of many messages in one query (FETCH and SEARCH over a whole folder), as
        strings (a C{Path} per message costs more than opening the file).
        """
        with self.user.lock:
            rows = self._select("SELECT uid, name, innew FROM messages WHERE folder=?", (self.id,), uids)
        cur, new = os.path.join(self.path, "cur", ""), os.path.join(self.path, "new", "")
        return {uid: (new if innew else cur) + name for uid, name, innew in rows}

    def listing(self) -> list[tuple[int, int, str]]:
        """
        C{(uid, vsize, path)} of every message, by UID, in one query: what a POP3 session
        needs to open the folder (sizes with CRLF line ends, files as strings).
        """
        with self.user.lock:
            rows = self.user.db.execute(
                "SELECT uid, vsize, name, innew FROM messages WHERE folder=? ORDER BY uid", (self.id,)
            ).fetchall()
        cur, new = os.path.join(self.path, "cur", ""), os.path.join(self.path, "new", "")
        return [(uid, vsize, (new if innew else cur) + name) for uid, vsize, name, innew in rows]

    #: summary fields L{summaryFields} can read without decoding the whole summary
    DIRECT_FIELDS = ("envelope", "bodystructure", "body")

    def summaryFields(self, uids: Iterable[int], fields: Iterable[str],
                      deferWrite: bool = False) -> dict[int, tuple[bytes, ...]]:
        """
        Some of the summary's FETCH-ready fields (L{DIRECT_FIELDS}) of many messages, read by
        sqlite's C{json_extract} instead of decoding every summary in Python (a warm
        C{FETCH 1:* (ENVELOPE)} spent most of its time there).  Messages without a cached
        summary get one computed (L{summaries}).  With C{deferWrite}, the ENVELOPEs read from
        headers (L{_envelopes}) and the internal dates read with them are not written to the
        index here but kept in memory, where the folder's readers find them, until
        L{writeDeferred} writes them (a FETCH calls it after its answer).
        """
        fields = tuple(fields)
        if not set(fields) <= set(self.DIRECT_FIELDS):
            raise ValueError(f"not a direct summary field: {fields}")
        wanted = sorted(set(uids)) if not isinstance(uids, range) else uids
        with self.user.lock:
            rows = self._select(f"SELECT uid, {', '.join(fields)} FROM wire WHERE folder=?", (self.id,), wanted)
        out = {row[0]: row[1:] for row in rows}
        missing = [u for u in wanted if u not in out] if out else wanted  # (a range stays one: BETWEEN)
        if missing:  # summaries cached before schema 5 have these fields in their JSON
            columns = ", ".join(f"json_extract(summary, '$.{name}')" for name in fields)
            with self.user.lock:
                rows = self._select(f"SELECT uid, {columns} FROM summaries WHERE folder=?", (self.id,), missing)
            for row in rows:
                try:
                    out[row[0]] = tuple(value.encode("latin-1") for value in row[1:])
                except (AttributeError, UnicodeEncodeError):
                    continue  # damaged (or without them: not found in wire): computed again below
            if out:
                missing = [u for u in missing if u not in out]
        if missing and fields == ("envelope",):
            missing = self._envelopes(missing, out, deferWrite)
        if missing:
            for uid, summary in self.summaries(missing).items():
                out[uid] = tuple(getattr(summary, name) for name in fields)
        return out

    def _envelopes(self, uids: list[int], out: dict, deferWrite: bool = False) -> list[int]:
        """
        The ENVELOPE of messages without a summary, into C{out} as C{(envelope,)}: from the
        C{envelopes} table (or those not written yet), or read from the message's header alone
        and kept there (in one transaction for the batch; with C{deferWrite}, by
        L{writeDeferred}), as Dovecot answers a first FETCH of ENVELOPE; parsing the whole
        message for its summary took three times as long.  Returns the UIDs still missing (a
        header over a megabyte, a file gone or renamed meanwhile): their whole summary is
        computed.
        """
        with self.user.lock:
            rows = self._select("SELECT uid, envelope FROM envelopes WHERE folder=?", (self.id,), uids)
            deferred = self._deferredEnvelopes
            for uid, envelope in rows:
                out[uid] = (envelope,)
            if deferred:
                for uid in uids:
                    if uid in deferred:
                        out[uid] = (deferred[uid],)
        missing = [u for u in uids if u not in out] if out else uids
        if not missing:
            return []
        paths = self.paths(missing)
        found = self._workers().envelopes(paths)
        computed = {uid: got[0] for uid, got in found.items() if got is not None and got[0] is not None}
        if found:
            # the files' mtimes came with them: the internal dates the index lacks are kept
            # too, so that the same FETCH's INTERNALDATE stats no file (L{_internalDates})
            dates = {uid: got[1] for uid, got in found.items() if got is not None}
            with self.user.lock:
                self._deferredEnvelopes.update(computed)
                self._deferredDates.update(dates)
                if not deferWrite:
                    self._writeDeferred()
            for uid, envelope in computed.items():
                out[uid] = (envelope,)
        return [u for u in missing if u not in computed]

    #: a FETCH's ENVELOPEs not written yet (L{summaryFields}' C{deferWrite}) are written at
    #: once, before its answer ends, when more than this many wait (memory: a few hundred
    #: bytes each)
    DEFERRED_MAX = 16384

    def deferredCount(self) -> int:
        """How many messages' ENVELOPEs and dates wait for L{writeDeferred} (read without the lock)."""
        return max(len(self._deferredEnvelopes), len(self._deferredDates))

    def writeDeferred(self, above: int = 0) -> None:
        """
        Write the ENVELOPEs and internal dates L{summaryFields} kept in memory (C{deferWrite})
        to the index, in one transaction (a cache's: not synced), for the messages still in
        it; with C{above}, only if more than that many wait.
        """
        with self.user.lock:
            if self.deferredCount() > above:
                self._writeDeferred()

    def _writeDeferred(self) -> None:
        """L{writeDeferred}'s write; the caller holds the user's lock."""
        envelopes, dates = self._deferredEnvelopes, self._deferredDates
        if not envelopes and not dates:
            return
        self._deferredEnvelopes, self._deferredDates = {}, {}
        with self.user.cacheTransaction():
            if envelopes:
                # (present ones only: expunged meanwhile, its row is gone; a dense span is one
                # BETWEEN, a sparse one IN lists)
                span = range(min(envelopes), max(envelopes) + 1)
                present = self._select("SELECT uid FROM messages WHERE folder=?", (self.id,),
                                       span if len(span) <= 2 * len(envelopes) else sorted(envelopes))
                self.user.db.executemany(
                    "INSERT OR REPLACE INTO envelopes (folder, uid, envelope) VALUES (?, ?, ?)",
                    [(self.id, uid, envelopes[uid]) for (uid,) in present if uid in envelopes])
            self.user.db.executemany(
                "UPDATE messages SET internaldate=? WHERE folder=? AND uid=? AND internaldate IS NULL",
                [(date, self.id, uid) for uid, date in dates.items()])

    def summaries(self, uids: Iterable[int]) -> dict:
        """
        The summaries of many messages: cached ones in one query, the rest computed (and
        cached) one by one.
        """
        from pymaild.store.summary import fromJSON, summarize, summarizePath

        wanted = sorted(set(uids))
        with self.user.lock:
            rows = self._select("SELECT uid, summary FROM summaries WHERE folder=?", (self.id,), wanted)
            wire = {r[0]: r[1:] for r in self._select("SELECT uid, envelope, bodystructure, body FROM wire WHERE folder=?",
                                                      (self.id,), wanted)}
        out = {}
        for uid, text in rows:
            try:
                out[uid] = fromJSON(text, wire.get(uid))
            except ValueError:
                continue  # a broken cached summary is computed again (and replaced)
        missing = [uid for uid in wanted if uid not in out]
        if missing:
            paths = self.paths(missing)  # one query, not one per message
            computed, texts = {}, {}
            if self.user.summarizer is not None:
                for uid, result in self.user.summarizer.summarize(paths).items():
                    if result is not None:
                        computed[uid], texts[uid] = result
            else:
                for uid, path in paths.items():
                    try:
                        computed[uid] = summarizePath(path)
                    except OSError:
                        pass
            for uid in missing:
                if uid in computed or uid not in paths:
                    continue  # (no index row: expunged, perhaps by another session not told yet)
                try:  # renamed by another process meanwhile (open() syncs), or gone
                    with self.open(uid) as f:
                        computed[uid] = summarize(f)
                except (StoreError, OSError):
                    continue
            self._keep(computed, texts=texts)
            out.update(computed)
        return out

    def _keep(self, computed: dict, summaries: bool = True, texts: dict | None = None) -> None:
        """
        Cache summaries (with C{summaries}) and their header fields (the C{fields} table: see
        L{headerFields}) of the messages still in the index, in one transaction (one fsync) for
        the whole batch.  Without C{summaries} only missing header fields are filled in.
        C{texts} has the JSON texts of some of them, already encoded.
        """
        from pymaild.store.summary import toJSON, wireFields

        if not computed:
            return
        with self.user.lock, self.user.cacheTransaction():
            db = self.user.db
            present = [r[0] for r in self._select("SELECT uid FROM messages WHERE folder=?", (self.id,), computed)]
            if summaries:
                db.executemany(
                    "INSERT OR REPLACE INTO summaries (folder, uid, summary) VALUES (?, ?, ?)",
                    [(self.id, uid, (texts or {}).get(uid) or toJSON(computed[uid], wire=False)) for uid in present],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO wire (folder, uid, envelope, bodystructure, body) VALUES (?, ?, ?, ?, ?)",
                    [(self.id, uid, *wireFields(computed[uid])) for uid in present],
                )
                db.executemany("DELETE FROM envelopes WHERE folder=? AND uid=?", [(self.id, uid) for uid in present])
                deferred = self._deferredEnvelopes
                if deferred:  # (the whole summary replaces them: not written later)
                    for uid in present:
                        deferred.pop(uid, None)
            db.executemany(
                f"INSERT OR {'REPLACE' if summaries else 'IGNORE'} INTO fields (folder, uid, "
                + ", ".join(FIELD_COLUMNS.values()) + f") VALUES (?, ?{', ?' * len(FIELDS)})",
                [(self.id, uid, *map(computed[uid].headerFields.get, FIELDS)) for uid in present],
            )

    def _workers(self):
        """The user's summary workers (L{pymaild.store.summarizer.Summarizer}), or, for a store
        without them, one with none: all in this thread."""
        summarizer = self.user.summarizer
        if summarizer is None:
            from pymaild.store.summarizer import Summarizer

            summarizer = Summarizer(0)
        return summarizer

    def textMatches(self, paths: dict[int, str], limit: int, match) -> dict[int, object]:
        """
        SEARCH TEXT and BODY over many messages at once, in the summary workers and this thread
        (L{pymaild.store.summaryworker.textAll}): C{{uid: match(data, parts)}} for the files at
        C{paths} of at most C{limit} bytes, None for the others.  No lock: the files alone.
        """
        items = {uid: (path, limit, match) for uid, path in paths.items()}
        return self._workers().texts(items)

    def _headerFieldsOf(self, uids: list[int]) -> list[int]:
        """
        The SEARCH fields of messages whose summaries are not cached, read from their headers
        alone (in the summary workers, as a first FETCH of ENVELOPE reads them) and kept in
        the C{fields} table (a cache: the summary, when it comes, writes the same values);
        returns the UIDs still missing (a file gone or renamed meanwhile, a header over a
        megabyte or one that failed to parse, a summary already cached: the caller takes the
        summaries' way).
        """
        with self.user.lock:
            cached = {r[0] for r in self._select("SELECT uid FROM summaries WHERE folder=?", (self.id,), uids)}
        todo = [u for u in uids if u not in cached]
        paths = self.paths(todo)
        found = self._workers().headerFields(paths)
        computed = {uid: fields for uid, fields in found.items() if fields is not None}
        if computed:
            with self.user.lock, self.user.cacheTransaction():
                present = [r[0] for r in self._select("SELECT uid FROM messages WHERE folder=?", (self.id,), computed)]
                self.user.db.executemany(
                    "INSERT OR IGNORE INTO fields (folder, uid, " + ", ".join(FIELD_COLUMNS.values())
                    + f") VALUES (?, ?{', ?' * len(FIELDS)})",
                    [(self.id, uid, *map(computed[uid].get, FIELDS)) for uid in present])
        return [u for u in uids if u not in computed]

    def headerFields(self, names: Iterable[str], uids: Iterable[int] | None = None) -> dict[str, dict[int, str]]:
        """
        The decoded header fields SEARCH reads, for every message (or those among C{uids}),
        loaded in bulk from the C{fields} table without decoding summaries: C{{name: {uid:
        value}}} for each of C{names} (lower-case, from L{pymaild.store.index.FIELDS}: from,
        to, cc, bcc, subject, message-id, in-reply-to, references, date).  Values are as in
        C{MessageSummary.headerFields} (unfolded, RFC 2047 decoded, repeated fields joined by
        a newline; Date raw); a message without the field is left out of that field's dict.
        Messages whose fields are not known yet get them read from their headers alone
        (L{_headerFieldsOf}: a first SEARCH FROM of 100,000 messages never summarized took 20 s
        computing whole summaries), or, where that fails, their summaries computed (and both
        cached), as FETCH would.

        @raise ValueError: a name that is not kept.
        """
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in FIELD_COLUMNS]
        if unknown:
            raise ValueError(f"header fields not kept in the index: {unknown}")
        with self.user.lock:
            missing = [r[0] for r in self._select(
                "SELECT uid FROM messages WHERE folder=? AND NOT EXISTS"
                " (SELECT 1 FROM fields f WHERE f.folder = messages.folder AND f.uid = messages.uid)",
                (self.id,), uids)]
        if missing:
            missing = self._headerFieldsOf(missing)
        if missing:
            # computes (outside the lock, as FETCH does) and keeps the summaries not cached;
            # the fields of cached ones go in here
            self._keep(self.summaries(missing), summaries=False)
        out: dict[str, dict[int, str]] = {name: {} for name in names}
        if not names:
            return out
        with self.user.lock:
            rows = self._select(
                f"SELECT uid, {', '.join(FIELD_COLUMNS[n] for n in names)} FROM fields WHERE folder=?",
                (self.id,), uids)
        for i, name in enumerate(names, 1):
            column = out[name]
            for row in rows:
                if row[i] is not None:
                    column[row[0]] = row[i]
        return out

    def summary(self, uid: int):
        """
        The message's L{pymaild.store.summary.MessageSummary}, computed on first need and cached.
        """
        from pymaild.store.summary import fromJSON, summarize

        with self.user.lock:
            cached = self.user.db.execute(
                "SELECT summary FROM summaries WHERE folder=? AND uid=?", (self.id, uid)
            ).fetchone()
            wire = self.user.db.execute(
                "SELECT envelope, bodystructure, body FROM wire WHERE folder=? AND uid=?", (self.id, uid)
            ).fetchone()
            if cached is not None:
                try:
                    return fromJSON(cached[0], wire)
                except ValueError:
                    pass  # broken: computed again below
            if self._row(uid) is None:
                raise StoreError("NONEXISTENT", f"No message with UID {uid}")
        with self.open(uid) as f:
            result = summarize(f)
        self._keep({uid: result})  # unless expunged meanwhile
        return result

    # --- sync ------------------------------------------------------------------------------------

    def _dirStats(self, fds=None) -> tuple:
        """The stat results of new/ and cur/ (by the open descriptors C{(cur, new)} if given)."""
        if fds is not None:
            return os.fstat(fds[1]), os.fstat(fds[0])
        return os.stat(self.path / "new"), os.stat(self.path / "cur")

    def sync(self, moveNew: bool = True, force: bool = False) -> Changes:
        """
        Bring the index in line with the directories: new files get UIDs (in file name order,
        which is delivery order), vanished files are expunged, renamed files change flags.  With
        C{moveNew}, files in C{new/} move to C{cur/} (what an IMAP session does on open).
        Unchanged directories are not even listed: the same mtimes as at the last sync, settled
        (see L{_RACY_NS}), or as this process left them under a watch (L{_noteOwnStamps}).
        C{force} lists them anyway (the watcher heard another process change them: its change
        may not have moved the mtime, within the same clock tick).
        """
        with self.user.lock:
            db = self.user.db
            epoch = self._watchEpoch
            now_ns = time.time_ns()
            stats = self._dirStats()
            raw = _stampsOf(stats)
            if force:
                self._noteOwnStamps(epoch, None)  # (should this sync fail, the next one lists)
            elif ((raw == self._ownStamps or (raw == self._storedStamps() and _settled(stats, now_ns)))
                    and not (moveNew and self._newHasMail())):
                return Changes()
            # The whole scan is one transaction (BEGIN IMMEDIATE): another process syncing the
            # same folder waits, then sees this one's UIDs instead of assigning its own.
            with self.user.deferCheckpoint(bulk=False):  # (held by _indexAll: a first index)
                with self.user.transaction():
                    changes = self._scan(moveNew)
                stats = self._dirStats()
                raw = _stampsOf(stats)
                # a stamp this close to the sync's start may still change unseen (the same
                # tick): kept empty, the next sync lists the directories again
                newStamp, curStamp = raw if _settled(stats, now_ns) else ("", "")
                with self.user.cacheTransaction():  # (lost in a crash: the next sync lists the directories)
                    db.execute("UPDATE folders SET newstamp=?, curstamp=? WHERE id=?", (newStamp, curStamp, self.id))
            self._noteOwnStamps(epoch, raw)
            if changes:
                self._notify(changes)
            return changes

    def _storedStamps(self) -> tuple | None:
        """The directories' stamps the index recorded at its last sync (settled, or empty)."""
        row = self.user.db.execute("SELECT newstamp, curstamp FROM folders WHERE id=?", (self.id,)).fetchone()
        return None if row is None else tuple(row)

    def _newHasMail(self) -> bool:
        """Whether new/ holds a message (a listing of new/ alone, which is small: a sync that
        moves new mail to cur/ must not skip it because the stamps agree)."""
        return any(name[0] != "." for name in os.listdir(self.path / "new"))

    def watchChanged(self, heard: bool) -> None:
        """
        From the watcher (L{pymaild.store.watch.FolderWatcher}, in the reactor's thread): its
        inotify watch of this folder is now in place (C{heard}) or not (lifted around a bulk
        STORE, ended).  Stamps noted before no longer count: events may have gone unheard.
        """
        with self._expectLock:
            self._heard = heard
            self._watchEpoch += 1
            self._ownStamps = None

    def _noteOwnStamps(self, epoch: int, stamps: tuple[str, str] | None) -> None:
        """
        The caller (holding the lock) just made the index agree with the directories, whose
        stamps are now C{stamps}, and read C{epoch} (L{watchChanged}) before it looked at them.
        If a watch was in place all along, the next sync that finds these stamps need not list
        the directories, even when they are too recent for the index's own stamps (which every
        process trusts): another process's change either moves an mtime or, within the same
        clock tick, is heard by the watch, whose sync lists them (C{force}).  Without such a
        watch they are forgotten.  So a SELECT right after a STORE's renames costs no listing
        of a folder of 100,000 messages (60-140 ms).
        """
        with self._expectLock:
            self._ownStamps = stamps if stamps is not None and self._heard and epoch == self._watchEpoch else None

    def _scan(self, moveNew: bool) -> Changes:
        db = self.user.db
        listings = (os.listdir(self.path / "cur"), os.listdir(self.path / "new"))
        if not (moveNew and listings[1]) and self._namesValid():
            # the usual case: the directories are as the index has them (the listings as sets
            # against the cache's; a dot file, or anything else, goes the long way below)
            sets = self._nameSets
            if sets is None:
                names = self._names.values()
                sets = self._nameSets = (frozenset(n for n, inNew in names if not inNew),
                                         frozenset(n for n, inNew in names if inNew))
            if len(listings[0]) == len(sets[0]) and sets[0] == set(listings[0]) and sets[1] == set(listings[1]):
                return Changes()
        if len(listings[0]) >= _BULK_FROM and not listings[1] and not self._imported:
            with _uncollected:
                changes = self._indexAll(listings[0])
            if changes is not None:
                return changes
        if not (moveNew and listings[1]) and not self._namesValid():
            # no name cache (a session that opened the folder by its stamps, a sync after a
            # rename once the sessions are gone, another process's change): the listings and
            # the index's names compared as sets, at C speed (dot files in the listings are
            # not mail); the names kept as the cache if they match
            with _uncollected:
                rows = db.execute("SELECT name, innew FROM messages WHERE folder=?", (self.id,)).fetchall()
            names, innews = zip(*rows) if rows else ((), ())
            inCur, inNew = set(compress(names, map(not_, innews))), set(compress(names, innews))
            listedCur, listedNew = set(listings[0]), set(listings[1])
            if (inCur == listedCur and inNew == listedNew) or (
                    inCur <= listedCur and inNew <= listedNew
                    and all(n[0] == "." for n in (listedCur - inCur) | (listedNew - inNew))):
                if self.listeners:
                    self._names = dict(zip(map(itemgetter(0), map(str.partition, names, repeat(":"))),
                                           zip(names, map(bool, innews))))
                    self._namesKey, self._nameSets = self._indexKey(), (frozenset(inCur), frozenset(inNew))
                return Changes()
        onDisk: dict[str, tuple[str, bool]] = {}
        inNew: list[str] = []
        undecodable: list[tuple[str, str]] = []
        with _uncollected:
            for (sub, innew), listing in zip((("cur", False), ("new", True)), listings):
                for name in listing:
                    if name[0] == ".":
                        continue
                    if not name.isascii() and not _decodable(name):
                        undecodable.append((sub, name))
                        continue
                    base = name.partition(":")[0]  # FileName.parse's base, without the cost
                    if base not in onDisk:
                        onDisk[base] = (name, innew)
                        if innew:
                            inNew.append(base)
        if undecodable:
            self._leaveOut(undecodable, moveNew)
        if not (moveNew and inNew) and self._namesValid() and onDisk == self._names:
            return Changes()  # the directories are as the index has them (a dot file aside)
        with _uncollected:
            known = {
                name.partition(":")[0]: (uid, name, innew, flags, keywords)
                for uid, name, innew, flags, keywords in db.execute(
                    "SELECT uid, name, innew, flags, keywords FROM messages WHERE folder=?", (self.id,)
                )
            }
        changes = Changes()
        gone = [known[b][0] for b in known.keys() - onDisk.keys()]
        fresh = sorted(onDisk.keys() - known.keys(), key=_deliveryOrder)
        renamed = {}
        for base, k in known.items():
            now = onDisk.get(base)
            if now is not None and (k[1] != now[0] or bool(k[2]) != now[1]):
                renamed[base] = k

        # new/ -> cur/ first (file system before index: a crash leaves a rename the next scan sees)
        if moveNew and inNew:
            moved = False
            for base in inNew:
                name = onDisk[base][0]
                target = infoName(base, FileName.parse(name).letters)
                try:
                    os.rename(self.path / "new" / name, self.path / "cur" / target)
                except FileNotFoundError:
                    continue  # taken by someone else; the next scan sees where it went
                onDisk[base] = (target, False)
                moved = True
                if base in known:
                    renamed[base] = known[base]
            if moved:
                fsyncDirectory(self.path / "cur")

        with self.user.transaction():
            (uidnext, modseq) = db.execute(
                "SELECT uidnext, highestmodseq FROM folders WHERE id=?", (self.id,)
            ).fetchone()
            if gone or renamed:
                modseq += 1  # one MODSEQ for this sync's removals and flag changes
            self._forget(gone, modseq)
            changes.expunged = sorted(gone)
            unseen = 0
            for base, (uid, oldName, oldNew, oldFlags, oldKeywords) in renamed.items():
                name, innew = onDisk[base]
                fn = FileName.parse(name)
                flags, keywords = self._flagsFromName(fn, frozenset(oldKeywords.split()))
                if (flags, keywords) != (oldFlags, oldKeywords):
                    changes.flagsChanged.append(uid)
                    unseen += _unseenChange(oldFlags, flags)
                    db.execute(
                        "UPDATE messages SET name=?, innew=?, flags=?, keywords=?, modseq=? WHERE folder=? AND uid=?",
                        (name, innew, flags, keywords, modseq, self.id, uid),
                    )
                else:
                    db.execute(
                        "UPDATE messages SET name=?, innew=? WHERE folder=? AND uid=?", (name, innew, self.id, uid)
                    )
            self._countUnseen(unseen)
            if fresh:
                modseq += 1
                imported = self._imported
                taken = {k[0] for k in known.values()}
                rows = []
                flagCache: dict[str, tuple[str, str]] = {}
                for base in fresh:
                    name, innew = onDisk[base]
                    fn = FileName.parse(name)
                    size, vsize, date = fn.size, fn.vsize, None
                    if size is None or vsize is None:  # a name without ,S= and ,W=: look inside
                        path = os.path.join(self.path, "new" if innew else "cur", name)
                        try:
                            st = os.stat(path)
                        except FileNotFoundError:
                            continue
                        size = st.st_size if size is None else size
                        vsize = self._vsize(Path(path), size) if vsize is None else vsize
                        date = int(st.st_mtime)
                    uid = imported.pop(base, None)  # keep the UID Dovecot gave it
                    if uid is None or uid < 1 or uid in taken:
                        uid = uidnext
                    taken.add(uid)
                    flagsKeywords = flagCache.get(fn.letters)
                    if flagsKeywords is None:
                        flagsKeywords = flagCache[fn.letters] = self._flagsFromName(fn)
                    rows.append((self.id, uid, name, innew, *flagsKeywords, modseq, size, vsize, date))
                    uidnext = max(uidnext, uid + 1)
                db.executemany(
                    "INSERT INTO messages (folder, uid, name, innew, flags, keywords, modseq, size, vsize, internaldate)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._countAdded(len(rows), sum("\\Seen" not in r[4] for r in rows), sum(r[8] for r in rows))
                changes.added = sorted(r[1] for r in rows)
            db.execute(
                "UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, modseq, self.id)
            )
            if self.listeners:
                goneSet = set(gone)
                names = {b: (onDisk[b][0], bool(onDisk[b][1])) for b, k in known.items() if k[0] not in goneSet}
                if fresh:
                    names.update((r[2].partition(":")[0], (r[2], bool(r[3]))) for r in rows)
                self._names, self._namesKey, self._nameSets = names, self._indexKey(), None
                self.user.onRollback(self._dropNames)
        return changes

    def _leaveOut(self, undecodable: list[tuple[str, str]], moveNew: bool) -> None:
        """
        Files whose names are not UTF-8 (C{os.listdir} gave them lone surrogates: another
        program wrote them; pymaild, Dovecot and the usual MDAs write ASCII) cannot be index
        rows: they are left out of the folder, with a warning the first time this process meets
        each, naming it with its bytes escaped, so that the administrator can rename it (the
        next sync then finds it as new mail).  One in new/ moves to cur/ all the same (as
        delivered mail does when seen), so that new/ does not look full of mail at every open.
        """
        for sub, name in undecodable:
            base, colon, info = name.partition(":")  # (one base: one file, in new/ then in cur/)
            if base not in self._warned:
                self._warned.add(base)
                log.warn("{folder}: left out {path}: its name is not UTF-8", folder=self.name,
                         path=os.fsencode(self.path / sub / name).decode("ascii", "backslashreplace"))
            if sub == "new" and moveNew:
                try:
                    os.rename(self.path / "new" / name, self.path / "cur" / (base + (colon + info if colon else ":2,")))
                except OSError:
                    pass  # (taken by another process meanwhile, or unwritable: next time)

    def _indexAll(self, names: list[str]) -> Changes | None:
        """
        Index a whole C{cur/} for a folder whose index has no rows yet (a first open), at C
        speed: what the general path of L{_scan} does with a Python loop over every name, for
        names of the usual shape (L{_BULK_ARRAY}, which Dovecot, pymaild and most MDAs write
        since 2001); None when the index has rows or a name has another shape (the general path
        then does the work).  Same UIDs in the same order, same flags and sizes as that path
        (tests/store/test_index_bulk.py compares the two).  Caller holds the lock and a
        transaction.
        """
        db = self.user.db
        if db.execute("SELECT 1 FROM messages WHERE folder=? LIMIT 1", (self.id,)).fetchone() is not None:
            return None
        # The names go into the index as JSON arrays in delivery order (below), each of a slice
        # of names read by C regexes for the checks: the shape, the runs of names in one second,
        # the distinct flag texts; no Python object is made per name but the sorted list's (a
        # tuple and two strings per name, kept to the end, were a third of the build).
        names = sorted(names)  # seconds have ten digits: text order is time order, to the second
        # Within one second the microseconds and counters are numbers of any length: put each
        # run of names that share their second in the general path's order (pairs: i where names
        # i and i + 1 share their second).  Two names of one message (one base, two flag texts)
        # share their second, so are in one run: the general path keeps the first, and this one
        # leaves such a folder to it.
        checked = self._bulkChecks(names)
        if checked is not None:
            pairs, counts = checked
        else:
            # a name of another shape, or one with a quote, a backslash or a control character
            # (valid, JSON-escaped) or a line break (not)
            joined = "\n".join(names) + "\n"
            if joined.count("\n") != len(names) or _BULK_NAMES.fullmatch(joined) is None:
                return None
            if not joined.isascii() and not _decodable(joined):
                return None  # a name os.listdir could not decode: the general path leaves it out
            second = itemgetter(slice(0, 10))
            pairs = list(compress(range(len(names) - 1), map(eq, map(second, names), map(second, islice(names, 1, None)))))
        r = 0
        while r < len(pairs):
            i = j = pairs[r]
            while r < len(pairs) and pairs[r] == j:
                (r, j) = (r + 1, j + 1)
            run = names[i : j + 1]
            bases = [name.partition(":")[0] for name in run]
            if len(set(bases)) != len(bases):
                return None  # one message under two names (the general path keeps the first)
            order = sorted(range(len(run)), key=lambda n: _deliveryOrder(bases[n]))
            if order != sorted(order):
                names[i : j + 1] = [run[n] for n in order]
        if checked is None:
            # (ensure_ascii=False: a name os.listdir could not decode keeps its lone surrogates,
            # which binding refuses, rather than becoming a \udcXX escape sqlite would store as
            # invalid UTF-8)
            arrays = [(0, json.dumps(names, ensure_ascii=False))]
            counts = Counter(map(itemgetter(2), map(str.partition, names, repeat(":"))))
        else:  # (made again from the names as reordered, a slice at a time)
            arrays = _jsonSlices(names)
        if len(counts) > 500:
            return None
        common = counts.most_common()
        infos = [info for info, _ in common]  # "" (no ":2,") or "2,<letters>", the commonest first
        flagsKeywords = [self._flagsFromName(FileName("", info[2:], None, None)) for info in infos]
        unseen = sum(n for (_, n), (flags, _) in zip(common, flagsKeywords) if "\\Seen" not in flags)
        (uidnext, modseq) = db.execute(
            "SELECT uidnext, highestmodseq FROM folders WHERE id=?", (self.id,)).fetchone()
        modseq += 1
        self.user.holdCheckpoint()
        # The names go into the index in one statement per slice of _BULK_CHUNK names, as JSON
        # arrays (their keys 0, 1, ...: json_each; a statement a row cost twice as much, and a
        # scratch table filled by executemany a quarter of the build), sqlite taking the sizes
        # from the names (the shape guarantees ",S=<digits>,W=<digits>", 15 digits at most) and
        # the flags and keywords from a CASE on the text after ":" (one WHEN per distinct text,
        # the commonest first).  Both read the name as a BLOB (b), whose instr and substr count
        # bytes where a TEXT's walk its characters: the INSERT of 100,000 names 176 -> 158 ms.
        cases = {}
        for column, k in (("flags", 0), ("keywords", 1)):
            values = {fk[k] for fk in flagsKeywords}
            if len(values) == 1:  # (keywords: none in the folder, usually) one value for all
                cases[column] = ("?", list(values))
            else:
                # (a name without ":" gives its whole self, for the ELSE)
                whens = [x for info, fk in zip(infos, flagsKeywords) if info
                         for x in ((":" + info).encode(), fk[k])]
                other = [fk[k] for info, fk in zip(infos, flagsKeywords) if not info]
                cases[column] = ("CASE substr(b, instr(b, X'3A')) " + "WHEN ? THEN ? " * (len(whens) // 2)
                                 + "ELSE ? " * len(other) + "END", whens + other)
        insert = (
            "INSERT INTO messages (folder, uid, name, innew, flags, keywords, modseq, size, vsize, internaldate)"
            f" SELECT ?, key + ?, name, 0, {cases['flags'][0]}, {cases['keywords'][0]}, ?,"
            " CAST(substr(b, instr(b, X'2C533D') + 3, 15) AS INTEGER),"  # (",S=")
            " CAST(substr(b, instr(b, X'2C573D') + 3, 15) AS INTEGER), NULL"  # (",W=")
            " FROM (SELECT key, value AS name, CAST(value AS BLOB) AS b FROM json_each(?))"  # (in the array's order; the UID is its key)
        )
        params = (*cases["flags"][1], *cases["keywords"][1], modseq)
        for first, text in arrays:
            db.execute(insert, (self.id, uidnext + first, *params, text))
        # (the unseen count from the flag texts' counts above: a scan of the rows for it too took
        # 15.6 ms of 100,000 messages' build instead of 8.7)
        (vsize,) = db.execute("SELECT total(vsize) FROM messages WHERE folder=?", (self.id,)).fetchone()
        self._countAdded(len(names), unseen, int(vsize))
        db.execute("UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?",
                   (uidnext + len(names), modseq, self.id))
        self._dropNames()  # (made by the next sync that needs it)
        return Changes(added=list(range(uidnext, uidnext + len(names))))

    @staticmethod
    def _bulkChecks(names: list[str]) -> tuple[list[int], Counter] | None:
        """
        For L{_indexAll}, sorted names that need no JSON escape (L{_BULK_ARRAY}, checked on the
        JSON array of each slice of L{_BULK_CHUNK} names, so that no text of the whole listing
        is made): the indexes i where names i and i + 1 share their second, and the counts of the
        texts after ":" ("" for a name without); None when a name has another shape, needs an
        escape or is not valid Unicode.
        """
        pairs: list[int] = []
        counts: Counter = Counter()
        n = len(names)
        for a, text in _jsonSlices(names):
            if _BULK_ARRAY.fullmatch(text) is None:
                return None
            if not text.isascii() and not _decodable(text):
                return None  # (os.listdir could not decode it: the general path leaves it out)
            k, at = a, 0
            for m in _BULK_SAME_SECOND.finditer(text):
                k += text.count('","', at, m.start() + 1)  # (name k's quote ends the k-th ",")
                at = m.start() + 1
                pairs.append(k)
            b = a + _BULK_CHUNK
            if b < n and names[b - 1][:10] == names[b][:10]:
                pairs.append(b - 1)  # (a run across the slices' border)
            counts.update(_BULK_INFO.findall(text))  # (one per name that has ":2,")
        found = counts.total()
        if found < n:
            counts[""] = n - found
        return pairs, counts

    @staticmethod
    def _vsize(path: Path, size: int) -> int:
        lines = crlf = 0
        lastCR = False  # a CRLF cut in two by the chunking counts too
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                lines += chunk.count(b"\n")
                crlf += chunk.count(b"\r\n") + (lastCR and chunk[0] == 0x0A)
                lastCR = chunk[-1] == 0x0D
        return size + lines - crlf

    # --- changes -------------------------------------------------------------------------------

    def addListener(self, listener: Callable[[Folder, Changes], None]) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            with self.user.lock:
                self._dropNames()  # (memory only for folders in use)

    def _notify(self, changes: Changes) -> None:
        for listener in list(self.listeners):
            try:
                listener(self, changes)
            except Exception:
                log.failure("folder listener failed")

    def _indexKey(self) -> tuple | None:
        """
        What changes whenever anyone changes this folder's index rows (inserts move UIDNEXT,
        expunges and flag changes HIGHESTMODSEQ and the count; a folder made again under the
        same id has another UIDVALIDITY); None when another process deleted the folder.
        """
        row = self.user.db.execute(
            "SELECT uidnext, highestmodseq, messages, uidvalidity FROM folders WHERE id=?", (self.id,)).fetchone()
        return None if row is None else tuple(row)

    def _namesValid(self) -> bool:
        """
        Inside a transaction: the name cache mirrors the index as it is now.
        """
        return self._names is not None and self._namesKey == self._indexKey()

    def _namesUpdated(self, valid: bool, updates: dict) -> None:
        """
        Inside the transaction of an operation that changed the index: apply its name changes
        (base -> (name, in new/), or None for a removal) to the cache if the cache was valid
        when the operation began; else drop the cache.
        """
        self._nameSets = None
        if not valid or self._names is None:
            self._dropNames()
            return
        for base, entry in updates.items():
            if entry is None:
                self._names.pop(base, None)
            else:
                self._names[base] = entry
        self._namesKey = self._indexKey()
        self.user.onRollback(self._dropNames)

    def _dropNames(self) -> None:
        self._names = self._namesKey = self._nameSets = None

    def _nextModseq(self) -> int:
        db = self.user.db
        (modseq,) = db.execute("SELECT highestmodseq FROM folders WHERE id=?", (self.id,)).fetchone()
        modseq += 1
        db.execute("UPDATE folders SET highestmodseq=? WHERE id=?", (modseq, self.id))
        return modseq

    def _forget(self, uids: Iterable[int], modseq: int) -> None:
        """
        Remove messages from the index (their summaries and header fields go with them, by
        trigger) and record each UID as expunged at C{modseq}, for L{vanished}.  Caller holds
        the lock and a transaction, and has taken C{modseq} for this change.
        """
        rows = [(self.id, uid) for uid in uids]
        db = self.user.db
        db.executemany("DELETE FROM messages WHERE folder=? AND uid=?", rows)
        db.executemany(
            "INSERT OR REPLACE INTO expunged (folder, uid, modseq) VALUES (?, ?, ?)",
            [(f, u, modseq) for f, u in rows],
        )

    def _insert(self, name: str, flags: str, keywords: str, size: int, vsize: int, date: int) -> int:
        """
        Index a file already in C{cur/}; returns its new UID.  Caller holds the lock and a
        transaction.
        """
        db = self.user.db
        (uidnext,) = db.execute("SELECT uidnext FROM folders WHERE id=?", (self.id,)).fetchone()
        modseq = self._nextModseq()
        db.execute(
            "INSERT INTO messages (folder, uid, name, innew, flags, keywords, modseq, size, vsize, internaldate)"
            " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
            (self.id, uidnext, name, flags, keywords, modseq, size, vsize, date),
        )
        db.execute("UPDATE folders SET uidnext=? WHERE id=?", (uidnext + 1, self.id))
        self._countAdded(1, "\\Seen" not in flags, vsize)
        return uidnext

    def _countAdded(self, messages: int, unseen: int, vsize: int) -> None:
        """
        Add inserted messages to the folder's counters (deletes and flag changes are counted by
        triggers in the index).  Caller holds a transaction.
        """
        self.user.db.execute(
            "UPDATE folders SET messages = messages + ?, unseen = unseen + ?, vsize = vsize + ? WHERE id=?",
            (messages, int(unseen), vsize, self.id),
        )

    def _countUnseen(self, change: int) -> None:
        """
        Add a flag change's effect on the unseen counter (see L{_unseenChange}).  Caller holds
        a transaction.
        """
        if change:
            self.user.db.execute("UPDATE folders SET unseen = unseen + ? WHERE id=?", (change, self.id))

    # --- operations ----------------------------------------------------------------------------

    def append(self, source: bytes | BinaryIO, flags: Iterable[str] = (), internalDate: float | None = None) -> int:
        """
        Store a message with flags and internal date (IMAP APPEND); checks the quota first.

        @return: its UID (for APPENDUID).
        @raise quotamod.QuotaExceeded: over the storage or message limit (nothing is stored).
        """
        system, keywords = _splitFlags(flags)
        with self.user.lock:
            if self.deleted:
                raise StoreError("NONEXISTENT", f"Mailbox doesn't exist: {self.name}")
            letters = self._letters(system, keywords)
            tmp, unique, size, vsize = writeTmp(self.path, source)
            try:
                self.user.quota.check(size, 1)
            except BaseException:
                os.unlink(tmp)
                raise
            delivered = commitTmp(self.path, tmp, unique, size, vsize, letters, internalDate, toCur=True)
            date = int(internalDate if internalDate is not None else os.stat(delivered.path).st_mtime)
            with self.user.transaction():
                uid = self._insert(
                    delivered.path.name, " ".join(sorted(system)), " ".join(sorted(keywords)),
                    delivered.size, delivered.vsize, date,
                )
            self.user.quota.update(delivered.size, 1)
        self._notify(Changes(added=[uid]))
        return uid

    def store(self, uids: Iterable[int], flags: Iterable[str], mode: str = "set",
              unchangedSince: int | None = None,
              answer=None) -> tuple[dict[int, tuple[frozenset[str], int]], list[int]]:
        """
        Change flags (IMAP STORE): C{mode} is C{"set"}, C{"add"} or C{"remove"}.  A few files
        are renamed first, then their index rows get the new flags and a new MODSEQ; a bulk
        STORE (L{_QUIET_FROM} files or more) commits its rows first and renames after
        (L{_storeBulk}).

        @param unchangedSince: CONDSTORE's UNCHANGEDSINCE; messages modified later are not
            changed and are returned as failed.
        @param answer: if given, C{answer(changed, failed)} (the return value) is called once,
            in this thread, as soon as the index holds the change durably: for a bulk STORE
            before its files are renamed, under the user's lock (so that the caller can read
            the messages' flags and send its answer while the renames run); it must not raise.
        @return: C{({uid: (all flags, modseq)} of changed messages, [uids that failed])}.
        """
        system, keywords = _splitFlags(flags)
        changed: dict[int, tuple[frozenset[str], int]] = {}
        failed: list[int] = []
        with self.user.lock, _DirFds(self.path) as (curFd, newFd):
            db = self.user.db
            # a dense set (STORE 1:*; a range as the IMAP session passes it) is one BETWEEN; a
            # sparse one goes by IN lists; only the rows the change can affect are read (all of
            # them for UNCHANGEDSINCE, which fails a message modified since even when the change
            # would leave it as it is)
            where, params = ("", ()) if unchangedSince is not None else _mayChange(mode, system, keywords)
            query = "SELECT uid, name, innew, flags, keywords, modseq FROM messages WHERE folder=?" + where
            if isinstance(uids, range) and uids.step == 1:
                rows = self._select(query, (self.id, *params), uids)
            else:
                wanted = set(uids)
                span = range(min(wanted), max(wanted) + 1) if wanted else range(0)
                rows = self._select(query, (self.id, *params), span if len(span) < 2 * len(wanted) else wanted)
                if len(span) != len(wanted):
                    rows = [r for r in rows if r[0] in wanted]
            watched = self.quiet is not None
            announced = watched and len(rows) < _QUIET_FROM
            epoch = self._watchEpoch
            # (the reactor lifts the watch while the renames are worked out)
            quiet = self.quiet() if watched and not announced else nullcontext()
            with quiet as lifting:
                plans: list = []
                outcomes: dict[tuple[str, str], tuple | None] = {}  # per distinct flag pair, not per message
                self._planStore(rows, mode, system, keywords, unchangedSince, outcomes, plans, failed)
                bulk = len(plans) >= _QUIET_FROM
                before = self._dirStats((curFd, newFd)) if announced else None
                noted = self._ownStamps
                self._noteOwnStamps(epoch, None)  # (until the index has these renames too)
                if bulk:
                    changed = self._storeBulk(plans, failed, curFd, newFd, lifting, answer)
                    answer = None
                else:
                    if lifting is not None:
                        lifting.wait()
                    missed = bool(self._renamePlanned(plans, failed, curFd, newFd, announced))
                    if plans:
                        os.fsync(curFd)
                        with self.user.deferCheckpoint(bulk=False), self.user.transaction():
                            if announced:
                                # the directories agreed with the index before the renames (their
                                # stamps as this process or the last sync left them): they still
                                # do after (a file another process renamed or removed meanwhile:
                                # not as it was)
                                stamps = _stampsOf(before)
                                agreed = not missed and (stamps == noted or stamps == self._storedStamps())
                            modseq = self._writeStore(plans, lambda modseq: db.executemany(
                                "UPDATE messages SET name=?, innew=0, flags=?, keywords=?, modseq=? WHERE folder=? AND uid=?",
                                [(p[1], p[2][1], p[2][2], modseq, self.id, p[0]) for p in plans],
                            ))
                        after = self._dirStats((curFd, newFd)) if announced and agreed else None
                        self._noteOwnStamps(epoch, after and _stampsOf(after))
                        for p in plans:
                            changed[p[0]] = (p[2][3], modseq)
                    elif not missed:
                        self._noteOwnStamps(epoch, noted)  # (nothing renamed: the directories as they were)
        if answer is not None:
            answer(changed, failed)
        if changed:
            self._notify(Changes(flagsChanged=sorted(changed)))
        return changed, failed

    def _storeBulk(self, plans, failed, curFd, newFd, lifting, answer) -> dict:
        """
        A bulk STORE (the caller holds the lock; C{plans} as L{_planStore} made them): the index
        first, in one transaction that commits the new names, flags and MODSEQ of every row
        (one statement, L{_BULK_STORE}) and forgets the directories' stamps; then
        C{answer(changed, failed)}; then the renames and an fsync of C{cur/}, in a write
        transaction that writes nothing (another process's sync waits for them).  The renames
        were nearly all of a bulk STORE's time (1,520 of them, ~20-30 ms of ~33-47), and the
        client need not wait for them: what the index says is what IMAP answers from, durably
        (the COMMIT is synced).  What a crash in between leaves, index rows naming files not yet
        renamed, the next sync finds (the stamps are forgotten, so it lists the directories): it
        takes each message's flags from its file, as for another process's rename, with a new
        MODSEQ (so a MODSEQ seen never comes back with other flags).  A file gone before its
        rename (another process renamed or removed it) is left to the same sync.  Returns the
        changed messages.
        """
        db = self.user.db
        payload = json.dumps([(p[0], p[1], p[2][1], p[2][2]) for p in plans])
        with self.user.deferCheckpoint(bulk=len(plans) >= _BULK_CHECKPOINT), self.user.transaction():
            modseq = self._writeStore(plans, lambda modseq: db.execute(_BULK_STORE, (payload, modseq, self.id)))
            db.execute("UPDATE folders SET newstamp='', curstamp='' WHERE id=?", (self.id,))
        changed = {p[0]: (p[2][3], modseq) for p in plans}
        if answer is not None:
            answer(changed, failed)
        try:
            if lifting is not None:
                lifting.wait()
            with self.user.transaction():
                self._renamePlanned(plans, [], curFd, newFd)
                os.fsync(curFd)
        except Exception:
            # (the client has its answer: the index and the files disagree until a sync, which
            # the forgotten stamps make list the directories)
            log.failure("STORE: renaming {count} files of {path} after the index", count=len(plans), path=str(self.path))
            try:
                self.sync(force=True)
            except Exception:
                log.failure("STORE: the sync after a failed rename in {path}", path=str(self.path))
        return changed

    def _writeStore(self, plans, write) -> int:
        """
        Inside STORE's transaction: C{write(modseq)} writes the rows of C{plans} with a new
        MODSEQ; the unseen count, the name cache and the flag index take the change (a failure
        of the COMMIT rolls them back with the rows).  Returns the MODSEQ.
        """
        valid = self._namesValid()
        flagIndex = self._flagIndex if self._flagIndex is not None and self._flagIndex[0] == self._indexKey() else None
        modseq = self._nextModseq()
        write(modseq)
        self._countUnseen(sum(p[2][4] for p in plans))
        # (the name cache's updates only when it is kept: 100,000 entries cost ~80 ms)
        self._namesUpdated(valid, {p[3]: (p[1], False) for p in plans} if valid else {})
        self._flagIndexUpdated(flagIndex, plans, modseq)
        return modseq

    def _planStore(self, rows, mode, system, keywords, unchangedSince, outcomes, plans, failed) -> None:
        """
        What STORE makes of each row (C{rows}: C{(uid, name, innew, flags, keywords, modseq)} in
        UID order, read under the lock): C{plans} gets C{(uid, new name, outcome, unique base, old
        row)} for each message whose flags change,
        C{failed} the UIDs modified after C{unchangedSince}.  C{outcomes} keeps the outcome of
        each distinct (flags, keywords) pair: C{None} (no change) or C{(new info, flags,
        keywords, all flags, unseen change)}.
        """
        for row in rows:
            uid, name, innew, oldFlags, oldKeywords, modseq = row
            if unchangedSince is not None and modseq > unchangedSince:
                failed.append(uid)
                continue
            outcome = outcomes.get((oldFlags, oldKeywords), False)
            if outcome is False:
                f, k = set(oldFlags.split()), set(oldKeywords.split())
                if mode == "set":
                    nf, nk = set(system), set(keywords)
                elif mode == "add":
                    nf, nk = f | system, k | keywords
                else:
                    nf, nk = f - system, k - keywords
                newFlags = " ".join(sorted(nf))
                outcome = None if (nf, nk) == (f, k) else (
                    ":2," + self._letters(nf, nk), newFlags, " ".join(sorted(nk)), frozenset(nf | nk),
                    _unseenChange(oldFlags, newFlags))
                outcomes[(oldFlags, oldKeywords)] = outcome
            if outcome is None:
                continue
            base = name.partition(":")[0]
            plans.append((uid, base + outcome[0], outcome, base, row))

    def _renamePlanned(self, plans, failed, curFd, newFd, expect=False) -> list:
        """
        STORE's renames (the caller holds the lock): a plan whose file is gone (another process
        renamed or removed it meanwhile: the next sync) leaves C{plans} for C{failed}; returns
        the plans that left.  With C{expect}, the watcher is told of each rename's two events first
        (L{expectEvents}), so that this process's own renames do not cost a sync.
        """
        rename = os.rename
        gone = []
        for i, (uid, newName, _, _, (_, name, innew, _, _, _)) in enumerate(plans):
            announce = expect and (innew or newName != name)  # (the same name: no rename, no events)
            if announce:
                events = (("new" if innew else "cur", "from", name), ("cur", "to", newName))
                self.expectEvents(events)
            try:
                # names relative to open directories: no path walk per file
                rename(name, newName, src_dir_fd=newFd if innew else curFd, dst_dir_fd=curFd)
            except FileNotFoundError:
                if announce:
                    self.expectEvents(events, False)
                gone.append(i)
        dropped = [plans.pop(i) for i in reversed(gone)]
        if dropped:
            failed.extend(p[0] for p in dropped)
            failed.sort()
        return dropped

    def expectEvents(self, events, expected: bool = True) -> None:
        """
        This process is about to make these changes in the folder's directories (C{(directory,
        "from" | "to", file name)}: a rename's two ends): their inotify events are its own, and
        the watcher (L{pymaild.store.watch.FolderWatcher}) does not sync for them
        (L{ownEvent}).  C{expected=False} takes them back (the rename failed).  An expectation
        no event met within L{_EXPECT_SECONDS} is forgotten.
        """
        now = time.monotonic()
        with self._expectLock:
            table = self._expected
            for event in events:
                if expected:
                    table.setdefault(event, []).append(now + _EXPECT_SECONDS)
                else:
                    waiting = table.get(event)
                    if waiting:
                        waiting.pop()
                        if not waiting:
                            del table[event]
            if len(table) > 4096:  # events that never came (a watch lifted meanwhile)
                for key in [k for k, v in table.items() if v[-1] < now]:
                    del table[key]

    def ownEvent(self, directory: str, kind: str, name: str) -> bool:
        """
        Whether an inotify event (C{kind} "from", "to", "create" or "delete" of C{name} in
        C{directory}, "new" or "cur") is one this process announced with L{expectEvents}; each
        announcement matches one event.
        """
        now = time.monotonic()
        with self._expectLock:
            waiting = self._expected.get((directory, kind, name))
            while waiting and waiting[0] < now:
                waiting.pop(0)
            if not waiting:
                self._expected.pop((directory, kind, name), None)
                return False
            waiting.pop(0)
            if not waiting:
                del self._expected[(directory, kind, name)]
            return True

    def copy(self, uids: Iterable[int], dest: Folder) -> list[tuple[int, int]]:
        """
        Copy messages into C{dest} (a hard link where the file system allows, else a copy),
        keeping flags and internal date.

        @return: C{[(source uid, new uid)]} in source UID order (for COPYUID).
        """
        pairs = []
        with self.user.lock:
            wanted = self.messages(uids)
            total = sum(m.size for m in wanted)
            self.user.quota.check(total, len(wanted))
            made = []
            for m in wanted:
                src = self.filePath(m.uid)
                base = FileName.parse(src.name)
                newBase = f"{uniqueName()},S={m.size},W={m.vsize}"
                newName = infoName(newBase, base.systemLetters + dest._letters((), m.keywords))
                target = dest.path / "cur" / newName
                try:
                    os.link(src, target)
                except FileNotFoundError:
                    continue
                except OSError:
                    tmp = dest.path / "tmp" / newBase
                    shutil.copyfile(src, tmp)
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    os.utime(tmp, (m.internalDate, m.internalDate))
                    os.rename(tmp, target)
                made.append((m, newBase, newName))
            if made:
                fsyncDirectory(dest.path / "cur")
            with self.user.transaction():
                for m, newBase, newName in made:
                    newUid = dest._insert(
                        newName, " ".join(sorted(m.flags)), " ".join(sorted(m.keywords)),
                        m.size, m.vsize, m.internalDate,
                    )
                    pairs.append((m.uid, newUid))
            self.user.quota.update(sum(m.size for m, _, _ in made), len(made))
        if pairs:
            dest._notify(Changes(added=[n for _, n in pairs]))
        return pairs

    def move(self, uids: Iterable[int], dest: Folder) -> list[tuple[int, int]]:
        """
        Move messages into C{dest} (RFC 6851): each file is renamed, which is atomic, so after
        a crash the message is in exactly one of the two folders.

        @return: C{[(source uid, new uid)]}.
        """
        pairs = []
        with self.user.lock:
            moved = []
            for m in self.messages(uids):
                src = self.filePath(m.uid)
                fn = FileName.parse(src.name)
                newName = infoName(fn.base, fn.systemLetters + dest._letters((), m.keywords))
                try:
                    os.rename(src, dest.path / "cur" / newName)
                except FileNotFoundError:
                    continue
                moved.append((m, fn.base, newName))
            if moved:
                fsyncDirectory(dest.path / "cur")
                fsyncDirectory(src.parent)
            with self.user.transaction():
                if moved:
                    valid = self._namesValid()
                    self._forget([m.uid for m, _, _ in moved], self._nextModseq())
                    self._namesUpdated(valid, {base: None for _, base, _ in moved})
                for m, _, newName in moved:
                    newUid = dest._insert(
                        newName, " ".join(sorted(m.flags)), " ".join(sorted(m.keywords)),
                        m.size, m.vsize, m.internalDate,
                    )
                    pairs.append((m.uid, newUid))
        if pairs:
            self._notify(Changes(expunged=[o for o, _ in pairs]))
            dest._notify(Changes(added=[n for _, n in pairs]))
        return pairs

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """
        Remove the messages flagged \\Deleted (only those among C{uids}, if given: UID EXPUNGE).

        @return: the expunged UIDs, ascending.
        """
        with self.user.lock:
            db = self.user.db
            rows = db.execute(
                "SELECT uid, name, innew, size FROM messages WHERE folder=? AND instr(flags, '\\Deleted') > 0",
                (self.id,),
            ).fetchall()
            if uids is not None:
                allowed = set(uids)
                rows = [r for r in rows if r[0] in allowed]
            gone, freed = [], 0
            for uid, name, innew, size in rows:
                try:
                    os.unlink(self.path / ("new" if innew else "cur") / name)
                    freed += size
                except FileNotFoundError:
                    pass  # already gone: expunged either way
                gone.append(uid)
            if gone:
                fsyncDirectory(self.path / "cur")
                with self.user.transaction():
                    valid = self._namesValid()
                    self._forget(gone, self._nextModseq())
                    self._namesUpdated(valid, {name.partition(":")[0]: None for _, name, _, _ in rows})
                self.user.quota.update(-freed, -len(gone))
        if gone:
            self._notify(Changes(expunged=sorted(gone)))
        return sorted(gone)
