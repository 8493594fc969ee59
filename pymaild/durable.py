# -*- test-case-name: tests.store.test_delivery -*-
"""
Making things durable: fsync of a directory after a rename into it, shared between threads
(group commit), and atomic replacement of a small file.

Both the store (maildir deliveries) and the outbound queue (message and envelope files) need
that a file created or renamed into a directory survives a crash once the call returns: on
Linux that takes an fsync of the file and then of the directory that holds its name.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def fsyncDirectory(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """
    Group commit for one directory's fsync: threads that need the directory synced after their
    rename share one fsync.  A caller needs an fsync that I{starts} after its call; while one is
    running (it may have started before the caller's rename) the caller waits for it, then
    either finds that a later one covered it or runs the next one itself, for everybody waiting.
    Ten deliveries into one INBOX at once cost one or two directory fsyncs instead of ten.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.running = False
        self.started = 0  # fsyncs begun
        self.finished = 0  # the number of the last fsync that completed

    def sync(self, path: Path | str) -> None:
        with self.cond:
            need = self.started + 1
            while self.running:
                self.cond.wait()
            if self.finished >= need:
                return
            self.running = True
            self.started += 1
            mine = self.started
        ok = False
        try:
            fsyncDirectory(path)
            ok = True
        finally:
            with self.cond:
                self.running = False
                if ok and mine > self.finished:
                    self.finished = mine  # (a failed fsync covers nobody: they try their own)
                self.cond.notify_all()


_groupSyncs: dict[str, _GroupSync] = {}
_groupSyncsLock = threading.Lock()


def syncDirectory(path: Path | str) -> None:
    """L{fsyncDirectory}, shared with the other threads syncing the same directory now."""
    key = os.fspath(path)
    with _groupSyncsLock:
        group = _groupSyncs.get(key)
        if group is None:
            if len(_groupSyncs) > 10000:
                _groupSyncs.clear()  # (idle groups hold nothing: any thread may start a new one)
            group = _groupSyncs[key] = _GroupSync()
    group.sync(path)


def writeNew(path: Path | str, data: bytes, mtimeNs: int | None = None) -> None:
    """
    A new file at C{path} (mode 0600) holding C{data}, fsynced; with C{mtimeNs}, dated so
    (nanoseconds) before the fsync, which makes the date durable too.  Removed if any of it
    fails.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if mtimeNs is not None:
            os.utime(fd, ns=(time.time_ns(), mtimeNs))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def atomicWrite(path: Path | str, data: bytes, tmpDir: Path | str | None = None, mtimeNs: int | None = None) -> None:
    """
    Replace the file at C{path} with C{data} (dated C{mtimeNs}, if given: L{writeNew}),
    durably: write a temporary file (in C{tmpDir}, on the same file system, or next to
    C{path}), fsync it, rename it over C{path}, fsync C{path}'s directory.  Readers see the old
    content or the new, never a mix.
    """
    path = Path(path)
    directory = Path(tmpDir) if tmpDir is not None else path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    writeNew(tmp, data, mtimeNs)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    syncDirectory(path.parent)
