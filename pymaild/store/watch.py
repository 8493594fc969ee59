# -*- test-case-name: tests.store.test_watch -*-
"""
Noticing changes other processes make: an MDA delivering into C{new/}, Dovecot or mutt
renaming or deleting files.

L{FolderWatcher} watches the C{new/} and C{cur/} directories of the folders sessions have open
(IMAP IDLE, several sessions on one folder) with Linux inotify through Twisted's
C{twisted.internet.inotify}.  A burst of events is collapsed into one sync (after C{delay}
seconds), run in the store's thread pool; the sync reports the changes to the folder's
listeners (L{pymaild.store.maildir.Folder.addListener}), exactly as changes made in this
process are reported.  Listeners are called in the thread that made the change: a protocol
hands the call to its reactor with C{callFromThread}.

Changes made through this process's store are reported at once without inotify; their
inotify events find nothing new at the sync that follows, and a STORE's renames are announced
to the watcher beforehand (C{Folder.expectEvents}), so that their events cost no sync at all (a
sync of a folder of 100,000 messages lists its directory: 60-140 ms).  While a folder is watched,
the directories' stamps this process leaves behind (its syncs, its announced STOREs) spare the
next sync its listing (C{Folder.watchChanged}, C{Folder._noteOwnStamps}); in exchange the
watcher's own syncs list the directories whatever their stamps (another process's change in
the same clock tick as this one's moves no mtime).  A STORE on many messages lifts the
watch around its renames (C{Folder.quiet}, set while a folder is watched): events for a
directory being watched cost each rename about as much again.  The watch comes back
L{QUIET_RESUME_DELAY} after the renames (the STORE's answer first), and one sync after that
(L{QUIET_RESYNC_DELAY} later, so that the client's next commands go first) catches what other
processes did meanwhile.
"""

from __future__ import annotations

import os
import struct
import threading

from twisted.internet import inotify
from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()

_MASK = inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM | inotify.IN_DELETE
_KINDS = {inotify.IN_MOVED_FROM: "from", inotify.IN_MOVED_TO: "to", inotify.IN_CREATE: "create",
          inotify.IN_DELETE: "delete"}


#: the start of the event the kernel queues when it drops events (watch descriptor -1)
_OVERFLOW = struct.pack("=lL", -1, inotify.IN_Q_OVERFLOW)


class _Notifier(inotify.INotify):
    """
    Twisted's C{INotify}, which skips the kernel's queue-overflow event (its watch descriptor,
    -1, is no watch), telling C{overflowed} of it: events were lost, and what they would have
    told has to be found by listing the directories.  (The event's bytes cannot occur within
    another event: names carry no NUL before their padding.)
    """

    def __init__(self, reactor, overflowed):
        super().__init__(reactor)
        self._overflowed = overflowed
        self._reading = False

    def _doRead(self, in_):
        self._reading = True
        try:
            super()._doRead(in_)
        finally:
            self._reading = False
        if _OVERFLOW in in_:
            self._overflowed()

    def loseConnection(self):
        # Twisted's _doRead closes the whole notifier when one watched directory is deleted
        # (IN_DELETE_SELF: a folder deleted while selected), after removing that watch: every
        # other folder would be deaf from then on, and the next watch() would fail
        if not self._reading:
            super().loseConnection()


#: seconds after a bulk STORE put the watch back before the sync that catches what other
#: processes did meanwhile (it lists the directories: 0.1-0.3 s of a store thread, holding the
#: user's lock, at 100,000 messages): the client's next commands, which usually follow at
#: once (a STORE -FLAGS after +FLAGS, the next UID set of a long one), go first
QUIET_RESYNC_DELAY = 1.0

#: seconds between the end of a bulk STORE's renames and the watch's return: the reactor then
#: answers the STORE first (putting the watch back, two inotify calls with their Python, ran on
#: the reactor while the store thread still wanted the interpreter for its last steps: ~1 ms
#: on the STORE's answer), and a bulk STORE that follows at once (-FLAGS after +FLAGS) finds
#: the watch lifted still.  Nothing is missed meanwhile: the sync after the return lists the
#: directories.
QUIET_RESUME_DELAY = 0.05


class _Quiet:
    """
    A bulk STORE's lifting of the watch (L{FolderWatcher._quiet}), in a store thread: asked for
    on entry, without waiting, so that the reactor lifts it while the store works out its
    renames; L{wait} before the first rename; on exit the watch comes back
    L{QUIET_RESUME_DELAY} later.
    """

    def __init__(self, watcher, folder):
        self.watcher, self.folder = watcher, folder
        self.lifted = threading.Event()

    def __enter__(self):
        self.watcher.reactor.callFromThread(self.watcher._suspend, self.folder, self.lifted)
        return self

    def wait(self) -> None:
        """
        Wait for the reactor to lift the watch, for at most half a second (waiting without a
        limit could deadlock a shutdown that joins the store's threads; renames made before the
        watch is lifted only cost their events).
        """
        self.lifted.wait(0.5)

    def __exit__(self, *exc):
        self.watcher.reactor.callFromThread(self.watcher._resumeSoon, self.folder)


class FolderWatcher:
    """
    @ivar delay: seconds to wait after the first event of a burst before syncing.
    """

    def __init__(self, reactor, threads, delay: float = 0.05):
        self.reactor = reactor
        self.threads = threads
        self.delay = delay
        self._notifier = _Notifier(reactor, self._overflowed)
        self._notifier.startReading()
        self._watched: dict[int, tuple[object, int]] = {}  # id(folder) -> (folder, users)
        self._pending: dict[int, object] = {}
        self._quieted: set[int] = set()  # folders whose watch a bulk STORE has lifted
        self._resuming: dict[int, object] = {}  # id(folder) -> the call that puts its watch back
        self._stopped = False

    def watch(self, folder) -> None:
        """
        Start watching C{folder} (counted: each session that calls this calls L{unwatch}).
        """
        key = id(folder)
        if key in self._watched:
            f, count = self._watched[key]
            self._watched[key] = (f, count + 1)
            return
        self._watched[key] = (folder, 1)
        self._add(folder)
        folder.quiet = lambda: self._quiet(folder)
        folder.watchChanged(True)

    def _add(self, folder) -> None:
        for sub in ("new", "cur"):
            self._notifier.watch(
                FilePath(str(folder.path / sub)), mask=_MASK,
                callbacks=[lambda _, path, mask, f=folder, sub=sub: self._event(f, sub, path, mask)],
            )

    def _event(self, folder, sub: str, path, mask: int) -> None:
        """
        One inotify event: a sync soon, unless this process announced it (a STORE's rename:
        C{Folder.expectEvents}), as the store told the sessions of that change already.
        """
        ownEvent = getattr(folder, "ownEvent", None)
        if ownEvent is not None:
            kind = _KINDS.get(mask & _MASK)
            if kind is not None and ownEvent(sub, kind, os.fsdecode(path.basename())):  # (bytes from inotify)
                return
        self._changed(folder)

    def _remove(self, folder) -> None:
        for sub in ("new", "cur"):
            try:
                self._notifier.ignore(FilePath(str(folder.path / sub)))
            except KeyError:
                pass  # (the directory was deleted: its watch went with it)

    def _quiet(self, folder) -> _Quiet:
        """
        From a store thread, around this process's own renames of many files: the watch is
        lifted (each rename in a watched directory queues two events, which about doubled the
        cost of a rename), then put back, and one sync catches whatever another process did
        meanwhile (L{_Quiet}).
        """
        return _Quiet(self, folder)

    def _suspend(self, folder, lifted=None) -> None:
        try:
            key = id(folder)
            resuming = self._resuming.pop(key, None)
            if resuming is not None and resuming.active():
                resuming.cancel()  # (lifted still: it stays so)
            if key in self._watched and key not in self._quieted:
                self._quieted.add(key)
                self._remove(folder)
                folder.watchChanged(False)
        finally:
            if lifted is not None:
                lifted.set()

    def _resumeSoon(self, folder) -> None:
        key = id(folder)
        if key not in self._resuming and not self._stopped:
            self._resuming[key] = self.reactor.callLater(QUIET_RESUME_DELAY, self._resume, folder)

    def _resume(self, folder) -> None:
        key = id(folder)
        resuming = self._resuming.pop(key, None)
        if resuming is not None and resuming.active():
            resuming.cancel()  # (called directly)
        if key in self._quieted:
            self._quieted.discard(key)
            if key in self._watched:
                try:
                    self._add(folder)
                except (OSError, inotify.INotifyError):  # the folder went away: nothing to watch
                    self._watched.pop(key, None)
                    folder.quiet = None
                    return
                folder.watchChanged(True)
                self._changed(folder, max(self.delay, QUIET_RESYNC_DELAY))

    def unwatch(self, folder) -> None:
        key = id(folder)
        entry = self._watched.get(key)
        if entry is None:
            return
        if entry[1] > 1:
            self._watched[key] = (folder, entry[1] - 1)
            return
        del self._watched[key]
        folder.quiet = None
        resuming = self._resuming.pop(key, None)
        if resuming is not None and resuming.active():
            resuming.cancel()
        if key in self._quieted:
            self._quieted.discard(key)  # lifted already
        else:
            self._remove(folder)
            folder.watchChanged(False)

    def _overflowed(self) -> None:
        """
        The kernel dropped inotify events: every folder watched forgets the directory stamps it
        noted (which trust the watch to hear other processes) and is synced, listing its
        directories.
        """
        log.warn("inotify: the event queue overflowed; syncing every watched folder")
        for key, (folder, _) in list(self._watched.items()):
            folder.watchChanged(key not in self._quieted)
            self._changed(folder)

    def _changed(self, folder, delay: float | None = None) -> None:
        key = id(folder)
        if key in self._pending or key not in self._watched:
            return
        self._pending[key] = self.reactor.callLater(self.delay if delay is None else delay, self._sync, folder)

    def _sync(self, folder) -> None:
        self._pending.pop(id(folder), None)
        if id(folder) in self._quieted:
            return  # another bulk STORE has lifted the watch again: its end schedules the sync
        d = self.threads.run(folder.sync, False, force=True)  # (listed even if the stamps agree)
        d.addErrback(lambda f: log.failure("syncing {folder} after a change on disk", f, folder=folder.name))

    def stop(self) -> None:
        self._stopped = True
        for call in [*self._pending.values(), *self._resuming.values()]:
            if call.active():
                call.cancel()
        self._pending.clear()
        self._resuming.clear()
        self._notifier.loseConnection()
