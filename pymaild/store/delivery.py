# -*- test-case-name: tests.store.test_delivery -*-
"""
Lock-free maildir delivery and maildir file names, usable from any process.

L{deliver} writes a message to C{tmp/} under a unique name, fsyncs it, renames it into C{new/}
(or C{cur/} with flags) and fsyncs that directory.  Only when it returns is the message
"stored": a crash before leaves at most a file in C{tmp/}, never a half message in C{new/}.
No index or lock is involved, so the SMTP side, an LMTP server or an external MDA can deliver
while IMAP sessions read; the index notices the file at its next sync.

Messages are stored with LF line ends, as Dovecot stores them (C{mail_save_crlf = no}); the
file name carries the physical size (C{,S=}) and the size with CRLF line ends (C{,W=}, what
IMAP calls RFC822.SIZE), so listing a folder needs no C{stat}.

File names follow Dovecot: C{<secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>,W=<vsize>[:2,<flags>]}.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, NamedTuple

from twisted.logger import Logger

from pymaild.durable import fsyncDirectory, syncDirectory  # noqa: F401  (the store's modules import them from here)
from pymaild.store import names

log = Logger()

#: maildir flag letters <-> IMAP system flags (Maildir spec, as Dovecot maps them)
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}

_counter = itertools.count(1)
_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def uniqueName(clock=time.time) -> str:
    """
    A maildir base name no other delivery on this host can produce.
    """
    now = clock()
    secs = int(now)
    usecs = int((now - secs) * 1_000_000)
    return f"{secs}.M{usecs}P{os.getpid()}Q{next(_counter)}.{_hostname}"


_SIZES = re.compile(r",S=(\d+),W=(\d+)(?:,|$)")


def _field(base: str, key: str) -> int | None:
    """
    The number after C{,S=} or C{,W=} in a base name, if there is one.
    """
    i = base.find(key)
    if i < 0:
        return None
    j = base.find(",", i + 3)
    text = base[i + 3 : j] if j >= 0 else base[i + 3 :]
    return int(text) if text.isdigit() else None


class FileName(NamedTuple):
    """
    A maildir file name split into its parts (a tuple: a sync parses 100,000 of them).

    @ivar base: the unique part (before C{:2,}), including C{,S=} and C{,W=} fields.
    @ivar letters: the info flags after C{:2,} (system flag letters and keyword letters).
    """

    base: str
    letters: str
    size: int | None
    vsize: int | None

    @classmethod
    def parse(cls, name: str) -> FileName:
        base, _, rest = name.partition(":")  # the spec forbids ":" in the unique part
        info = rest[2:] if rest.startswith("2,") else ""
        m = _SIZES.search(base)
        if m is not None:  # the usual ",S=<size>,W=<vsize>", in one step
            return cls(base, info, int(m[1]), int(m[2]))
        return cls(base, info, _field(base, ",S="), _field(base, ",W="))

    @property
    def systemLetters(self) -> str:
        return "".join(c for c in self.letters if c.isupper())

    @property
    def keywordLetters(self) -> str:
        return "".join(c for c in self.letters if c.islower())


def infoName(base: str, letters: Iterable[str]) -> str:
    """
    The file name in C{cur/} for C{base} with these flag letters (sorted, as the spec wants).
    """
    return f"{base}:2,{''.join(sorted(set(letters)))}"


@dataclass(frozen=True)
class Delivered:
    """
    What L{deliver} stored: the final path, the base name and both sizes.
    """

    path: Path
    base: str
    size: int
    vsize: int


def _chunks(source: bytes | BinaryIO, size: int = 65536):
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        for i in range(0, len(data), size):
            yield data[i : i + size]
        return
    while True:
        chunk = source.read(size)
        if not chunk:
            return
        yield chunk


def writeTmp(maildir: Path, source: bytes | BinaryIO, clock=time.time) -> tuple[Path, str, int, int]:
    """
    Write C{source} to C{tmp/} with LF line ends, fsynced.

    @return: C{(tmp path, unique name, physical size, virtual size)}.
    """
    unique = uniqueName(clock)
    tmp = maildir / "tmp" / unique
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = lines = 0
    pendingCR = False
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            # in memory: one write, and no pass for CRLFs when it has no CR (SMTP's spool
            # holds LF line ends already)
            data = bytes(source)
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            lines, size = data.count(b"\n"), len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            source = b""
        for chunk in _chunks(source):
            if pendingCR:
                chunk = b"\r" + chunk
                pendingCR = False
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                pendingCR = True
            chunk = chunk.replace(b"\r\n", b"\n")
            lines += chunk.count(b"\n")
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        if pendingCR:
            os.write(fd, b"\r")
            size += 1
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    return tmp, unique, size, size + lines


def deliver(
    maildir: Path | str,
    source: bytes | BinaryIO,
    letters: str = "",
    internalDate: float | None = None,
    clock=time.time,
    toCur: bool = False,
) -> Delivered:
    """
    Store one message in a maildir, durably.

    @param maildir: the folder's directory (holding C{cur/ new/ tmp/}).
    @param source: the message, bytes or a binary file; CRLF line ends are stored as LF.
    @param letters: maildir flag letters; with any (or with C{toCur}), the message goes to
        C{cur/}, else to C{new/} (a new message, as an MDA delivers it).
    @param internalDate: the IMAP internal date (the file's mtime); default now.
    @return: L{Delivered}, once the file and its directory are fsynced.
    """
    maildir = Path(maildir)
    tmp, unique, size, vsize = writeTmp(maildir, source, clock)
    return commitTmp(maildir, tmp, unique, size, vsize, letters, internalDate, toCur)


def commitTmp(
    maildir: Path,
    tmp: Path,
    unique: str,
    size: int,
    vsize: int,
    letters: str = "",
    internalDate: float | None = None,
    toCur: bool = False,
) -> Delivered:
    """
    The second half of L{deliver}: move a file written by L{writeTmp} into C{new/} or C{cur/}
    and fsync the directory.  Between the two halves a caller can check a quota against the
    exact size without the file being counted yet.  On failure the tmp file is removed.
    """
    base = f"{unique},S={size},W={vsize}"
    try:
        if internalDate is not None:
            os.utime(tmp, (internalDate, internalDate))
        if letters or toCur:
            final = maildir / "cur" / infoName(base, letters)
        else:
            final = maildir / "new" / base
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    syncDirectory(final.parent)
    return Delivered(final, base, size, vsize)


@dataclass(frozen=True)
class Placement:
    """
    Where one user's copy goes, as a delivery plugin chose (L{deliverToUsers}).

    @ivar folder: the folder's name (C{None} or a folder that does not exist: INBOX).
    @ivar flags: IMAP system flags (C{\\Seen} ...) the copy starts with.
    @ivar headers: header lines (LF ends) inserted into this copy at byte C{at} of the message.
    """

    folder: str | None = None
    flags: tuple = ()
    headers: bytes = b""
    at: int = 0


class _Spliced:
    """A message with C{insert} put in at byte C{at}, read in chunks (never all in memory)."""

    def __init__(self, source, at: int, insert: bytes):
        self._source = source
        self._before = at  # (bytes of the source still to give before the insert)
        self._insert = insert

    def read(self, n: int) -> bytes:
        if self._before:
            chunk = self._source.read(min(n, self._before))
            self._before = self._before - len(chunk) if chunk else 0
            return chunk
        if self._insert:
            chunk, self._insert = self._insert, b""
            return chunk
        return self._source.read(n)


def _placed(userStore, home: Path, placement: Placement | None):
    """(the maildir to write into, the flag letters) of one copy."""
    if placement is None:
        return home, ""
    letters = "".join(sorted(FLAG_LETTERS[f] for f in placement.flags if f in FLAG_LETTERS))
    if placement.folder and placement.folder.upper() != "INBOX":
        try:
            path = userStore._path(names.validate(placement.folder))
        except Exception:
            path = None
        if path is not None and (path / "cur").is_dir():
            return path, letters
        log.info("delivery into {folder}: no such folder, INBOX instead", folder=placement.folder)
    return home, letters


def _writeCopy(home: Path, source, placement: Placement | None):
    """L{writeTmp} of the message (bytes or a file's path) into C{home}, with the placement's
    header fields if it has any."""
    if placement is not None and placement.headers:
        with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f:
            return writeTmp(home, _Spliced(f, placement.at, placement.headers))
    if isinstance(source, bytes):
        return writeTmp(home, source)
    with open(source, "rb") as f:
        return writeTmp(home, f)


def _deliverCopy(userStore, home: Path, source, placement: Placement | None, letters: str) -> Delivered:
    """One user's copy, fsynced and counted in the quota; nothing left behind if it fails."""
    # the file and its fsync outside the user's lock: deliveries to one mailbox run side by
    # side (the lock serialised them: 10 SMTP clients to one user went at 1 fsync at a time);
    # the quota is checked and counted under it
    tmp, unique, size, vsize = _writeCopy(home, source, placement)
    try:
        with userStore.lock:  # checked and counted at once: concurrent ones see it
            userStore.quota.check(size, 1)
            userStore.quota.update(size, 1)
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        return commitTmp(home, tmp, unique, size, vsize, letters=letters)
    except BaseException:
        with userStore.lock:
            userStore.quota.update(-size, -1)
        raise


def deliverToUsers(store, source: bytes | Path | str, users, placements: dict | None = None) -> list[Delivered]:
    """
    The message (bytes, or the file at that path; LF line ends, trace headers included) into
    the INBOX of each
    of C{users} (account names) of C{store} (a C{MaildirStore}), each copy fsynced (file and
    directory) and counted in the user's quota.  All or none: if one copy fails (a quota
    reached meanwhile, a full disk), those already made are removed and the error goes up, so
    the sender is told to retry and nobody gets the message twice.

    @param placements: C{{user: L{Placement}}} for copies that go elsewhere than INBOX, with
        flags, or with header fields of their own (delivery plugins).
    @raise pymaild.store.quota.QuotaExceeded: a user has no room for it (nothing is stored).
    """
    done: list[tuple[object, Delivered]] = []
    placements = placements or {}
    try:
        for user in users:
            userStore = store.user(user)
            placement = placements.get(user)
            inbox = store.userDirectory(user)
            home, letters = _placed(userStore, inbox, placement)
            try:
                delivered = _deliverCopy(userStore, home, source, placement, letters)
            except FileNotFoundError:
                if home != inbox:
                    raise
                # the maildir (or a directory of it) went since it was made: make it again
                home = store.userDirectory(user, check=True)
                delivered = _deliverCopy(userStore, home, source, placement, letters)
            done.append((userStore, delivered))
    except BaseException:
        for userStore, delivered in done:
            try:
                os.unlink(delivered.path)
                userStore.quota.update(-delivered.size, -1)
            except OSError:
                pass
        raise
    return [d for _, d in done]


def hasRoom(store, user: str) -> bool:
    """Whether C{user}'s quota leaves room for one more (small) message."""
    from pymaild.store.quota import QuotaExceeded

    try:
        store.user(user).quota.check(1, 1)
    except QuotaExceeded:
        return False
    return True
