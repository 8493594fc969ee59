# -*- test-case-name: tests.store.test_quota -*-
"""
Maildir++ quota: the C{maildirsize} file in the user's root, as Courier's maildirquota
specification describes it and as Dovecot's C{quota = maildir} reads and writes it.

The file's first line holds the limits, C{<bytes>S,<messages>C}, either part optional and 0
meaning unlimited (written as Dovecot writes it: C{1048576S,100C}, C{1048576S}, C{100C}, or
C{0S} when there is no limit).  Every further line is C{<bytes> <messages>}: a recalculation
writes the totals as the second line and every delivery, append, copy or expunge appends its
delta; the usage is the sum of all these lines.

Appends are one C{write} on a descriptor opened with C{O_APPEND}, so writers in several
processes (pymaild's, Dovecot's, an MDA's) never lose each other's lines.  The file is
recalculated from the messages themselves, and replaced (written to a temporary file that is
renamed over it), when:

  - it does not exist;
  - its limits line differs from the configured limits (the limits changed);
  - it has grown over 5120 bytes (the specification's rule, which also repairs drift from
    changes made without updating the file);
  - it cannot be read (a garbled line) or sums to a negative usage;
  - a L{Quota.check} would fail and the file has not changed for 15 minutes (the
    specification's rule: never refuse mail on stale figures).

A recalculation counts every file in C{cur/} and C{new/} of the root (INBOX) and of every
C{.Folder} directory, Trash included (as Dovecot does by default), taking the size from the
C{,S=<size>} in the file name when there is one and from C{stat} otherwise; names starting
with C{.} are not messages.

Between pymaild's processes an advisory lock (C{flock}) on C{maildirsize} keeps an append
from landing in a file that a recalculation is replacing: appenders take it shared, the
recalculation exclusive, and both re-open the file if it was replaced while they waited.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import threading
import time
import uuid
from pathlib import Path

from pymaild.store.delivery import fsyncDirectory
from pymaild.errors import MailError

__all__ = ["Quota", "QuotaExceeded", "FILENAME", "MAX_FILE_SIZE", "STALE_SECONDS"]

FILENAME = "maildirsize"
MAX_FILE_SIZE = 5120
"""Bytes; a larger C{maildirsize} is recalculated."""
STALE_SECONDS = 15 * 60
"""A file unchanged for this long is recalculated before it refuses a message."""

_SIZE = re.compile(r",S=(\d+)(?=,|$)")
_LIMIT = re.compile(rb"(\d+)([SC])")
_SCAN_ATTEMPTS = 3


class QuotaExceeded(MailError):
    """
    The message would take the user over a quota limit.

    SMTP answers C{552 5.2.2 Mailbox is full}; IMAP answers C{NO [OVERQUOTA]}.

    @ivar cause: which limit, with the figures, for the log.
    """

    def __init__(self, cause: object = None):
        super().__init__(552, "5.2.2", "Mailbox is full", cause)


def _messageSize(directory: str, name: str) -> int | None:
    """
    The size of the message file C{name} in C{directory}: from C{,S=} in its name, else from
    C{stat}; C{None} if it is not a message (a dot file, gone, or not a regular file).
    """
    if name.startswith("."):
        return None
    match = _SIZE.search(name.partition(":")[0])
    if match:
        return int(match.group(1))
    try:
        st = os.lstat(os.path.join(directory, name))
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _mtime(directory: str) -> int | None:
    try:
        return os.stat(directory).st_mtime_ns
    except FileNotFoundError:
        return None


class Quota:
    """
    One user's Maildir++ quota.

    Safe to share between threads (one lock per instance) and between processes (see the
    module documentation).

    @ivar root: the user's Maildir++ root (INBOX's directory).
    @ivar storageLimit: bytes allowed, 0 for no limit.
    @ivar messageLimit: messages allowed, 0 for no limit.
    """

    def __init__(self, root: os.PathLike | str, storageLimit: int = 0, messageLimit: int = 0):
        for value, what in ((storageLimit, "storage limit"), (messageLimit, "message limit")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{what} must be a whole number, 0 for none: {value!r}")
        self.root = Path(root)
        self._file = os.path.join(os.fspath(self.root), FILENAME)  # (a str: a delivery opens it)
        self.storageLimit = storageLimit
        self.messageLimit = messageLimit
        self._lock = threading.RLock()

    @property
    def path(self) -> Path:
        """
        The C{maildirsize} file.
        """
        return self.root / FILENAME

    def limitsLine(self) -> str:
        """
        The first line of the file for the configured limits, as Dovecot writes it.
        """
        parts = []
        if self.storageLimit or not self.messageLimit:
            parts.append(f"{self.storageLimit}S")
        if self.messageLimit:
            parts.append(f"{self.messageLimit}C")
        return ",".join(parts)

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> tuple[int, int] | None:
        """
        The usage the file records, or C{None} if it must be recalculated.
        """
        try:
            with open(self._file, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_FILE_SIZE:
                    return None
                data = f.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_FILE_SIZE:
            return None
        lines = data.split(b"\n")
        # The last piece is b"" after a final newline, or a line still being appended.
        if len(lines) < 2 or _parseLimits(lines[0]) != (self.storageLimit, self.messageLimit):
            return None
        totalBytes = totalCount = 0
        for line in lines[1:-1]:
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                return None
            try:
                deltaBytes, deltaCount = int(fields[0]), int(fields[1])
            except ValueError:
                return None
            totalBytes += deltaBytes
            totalCount += deltaCount
        if totalBytes < 0 or totalCount < 0:
            return None
        return totalBytes, totalCount

    def usage(self) -> tuple[int, int]:
        """
        C{(bytes, messages)} in use, from the file, recalculating first if it is missing,
        has other limits, is over 5120 bytes, garbled or negative.
        """
        with self._lock:
            used = self._read()
            if used is None:
                used = self.recalculate()
            return used

    def _excess(self, used: tuple[int, int], addBytes: int, addCount: int) -> str | None:
        usedBytes, usedCount = used
        if self.storageLimit and addBytes > 0 and usedBytes + addBytes > self.storageLimit:
            return f"storage: {usedBytes} + {addBytes} > {self.storageLimit} bytes"
        if self.messageLimit and addCount > 0 and usedCount + addCount > self.messageLimit:
            return f"messages: {usedCount} + {addCount} > {self.messageLimit}"
        return None

    def check(self, addBytes: int, addCount: int = 1) -> tuple[int, int]:
        """
        Check that C{addBytes} more bytes in C{addCount} more messages fit in the limits;
        call before committing a delivery, append or copy.

        A usage exactly at a limit is allowed.  Nothing is recorded: call L{update} once
        the messages are stored.

        @return: the usage checked against, C{(bytes, messages)}; C{(0, 0)} without limits
            (the file is then not read).
        @raise QuotaExceeded: the addition would exceed a limit.
        """
        if not self.storageLimit and not self.messageLimit:
            return 0, 0
        with self._lock:
            used = self.usage()
            excess = self._excess(used, addBytes, addCount)
            if excess is not None and self._stale():
                used = self.recalculate()
                excess = self._excess(used, addBytes, addCount)
            if excess is not None:
                raise QuotaExceeded(excess)
            return used

    def _stale(self) -> bool:
        try:
            changed = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        return time.time() - changed > STALE_SECONDS

    # -- writing ---------------------------------------------------------------------------

    def _openLocked(self, flags: int, operation: int) -> int | None:
        """
        The file opened with C{flags} and C{flock}ed with C{operation}, re-opened if it was
        replaced while waiting for the lock; C{None} if it does not exist.
        """
        while True:
            try:
                fd = os.open(self._file, flags | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, operation)
                opened = os.fstat(fd)
                try:
                    current = os.stat(self._file)
                except FileNotFoundError:
                    current = None
            except BaseException:
                os.close(fd)
                raise
            if current is not None and (current.st_dev, current.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                return fd
            os.close(fd)
            if current is None:
                return None

    def update(self, deltaBytes: int, deltaCount: int) -> None:
        """
        Record that messages were added (positive deltas) or removed (negative deltas):
        append one line C{<bytes> <messages>} in a single write.

        If the file does not exist it is recalculated instead (which counts the change,
        since the caller made it before calling).
        """
        if deltaBytes == 0 and deltaCount == 0:
            return
        line = f"{int(deltaBytes)} {int(deltaCount)}\n".encode("ascii")
        with self._lock:
            fd = self._openLocked(os.O_WRONLY | os.O_APPEND, fcntl.LOCK_SH)
            if fd is None:
                self.recalculate()
                return
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
            if written != len(line):
                raise OSError(errno.EIO, f"{self.path}: short write of a quota update")

    def _scan(self) -> tuple[int, int]:
        """
        C{(bytes, messages)} counted from the message files.  If a directory changes while
        it is counted, count again (a message moving from new/ to cur/ could be counted
        twice or not at all), a few times at most.
        """
        root = os.fspath(self.root)
        for _ in range(_SCAN_ATTEMPTS):
            folders = [root]
            try:
                with os.scandir(root) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
            except FileNotFoundError:
                return 0, 0
            directories = [os.path.join(f, sub) for f in folders for sub in ("cur", "new")]
            before = [_mtime(d) for d in directories]
            totalBytes = totalCount = 0
            for directory, changed in zip(directories, before):
                if changed is None:
                    continue
                try:
                    names = os.listdir(directory)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for name in names:
                    size = _messageSize(directory, name)
                    if size is not None:
                        totalBytes += size
                        totalCount += 1
            if [_mtime(d) for d in directories] == before:
                break
        return totalBytes, totalCount

    def recalculate(self) -> tuple[int, int]:
        """
        Count the messages and replace the file with the limits line and the totals,
        atomically (a temporary file renamed over it).

        @return: the new usage, C{(bytes, messages)}.
        """
        with self._lock:
            fd = self._openLocked(os.O_RDONLY, fcntl.LOCK_EX)
            try:
                used = self._scan()
                self._replace(f"{self.limitsLine()}\n{used[0]} {used[1]}\n".encode("ascii"))
            finally:
                if fd is not None:
                    os.close(fd)
            return used

    def _replace(self, data: bytes) -> None:
        tmpdir = self.root / "tmp"
        if not tmpdir.is_dir():
            tmpdir = self.root
        temporary = tmpdir / f"{FILENAME}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        fsyncDirectory(self.root)


def _parseLimits(line: bytes) -> tuple[int, int] | None:
    """
    C{(bytes, messages)} from a limits line (0 for a missing part), or C{None} if it is
    garbled.
    """
    limits = {b"S": 0, b"C": 0}
    seen = set()
    for part in line.strip().split(b","):
        part = part.strip()
        if not part:
            continue
        match = _LIMIT.fullmatch(part)
        if match is None or match.group(2) in seen:
            return None
        seen.add(match.group(2))
        limits[match.group(2)] = int(match.group(1))
    return limits[b"S"], limits[b"C"]
