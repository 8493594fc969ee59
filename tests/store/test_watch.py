"""
FolderWatcher: a delivery made by another process reaches the folder's listeners through
inotify, with the sync done in the store's thread pool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pymaild.store.maildir import MaildirStore
from pymaild.store.threads import StoreThreads
from pymaild.store.watch import FolderWatcher


class _WatcherCase(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.user = MaildirStore(self.tmp / "mail").user("alice@example.com")
        self.inbox = self.user.folder("INBOX")
        self.threads = StoreThreads(reactor, 2)
        self.threads.start()
        self.watcher = FolderWatcher(reactor, self.threads, delay=0.01)

    def tearDown(self):
        self.watcher.stop()
        self.threads.stop()
        self.user.close()


class FolderWatcherTests(_WatcherCase):

    @defer.inlineCallbacks
    def test_delivery_by_another_process_is_heard(self):
        """
        Another process delivers into new/; the listener hears the new UID, from a store
        thread (not the reactor's), without anyone calling sync.
        """
        heard = defer.Deferred()
        threads = []

        def listener(folder, changes):
            threads.append(threading.current_thread())
            if changes.added and not heard.called:
                reactor.callFromThread(heard.callback, changes.added)

        self.inbox.addListener(listener)
        self.watcher.watch(self.inbox)
        code = (
            "import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
            "deliver(Path(sys.argv[1]), b'Subject: x\\n\\nhi\\n')"
        )
        yield deferToProcess(code, str(self.inbox.path))
        added = yield withTimeout(heard, 10)
        self.assertEqual(added, [1])
        self.assertIsNot(threads[0], threading.main_thread())

    @defer.inlineCallbacks
    def test_unwatched_folder_is_not_synced(self):
        """
        After the last unwatch, changes on disk trigger nothing.
        """
        self.watcher.watch(self.inbox)
        self.watcher.watch(self.inbox)
        self.watcher.unwatch(self.inbox)
        self.assertIn(id(self.inbox), self.watcher._watched)
        self.watcher.unwatch(self.inbox)
        self.assertNotIn(id(self.inbox), self.watcher._watched)
        heard = []
        self.inbox.addListener(lambda f, c: heard.append(c))
        other = self.user.createFolder("Other")
        otherHeard = defer.Deferred()
        other.addListener(lambda f, c: reactor.callFromThread(otherHeard.callback, None) if not otherHeard.called else None)
        self.watcher.watch(other)
        deliverBoth = (
            "import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
            "deliver(Path(sys.argv[1]), b'x\\n'); deliver(Path(sys.argv[2]), b'y\\n')"
        )
        yield deferToProcess(deliverBoth, str(self.inbox.path), str(other.path))
        # inotify reports events in order: once Other's sync ran, INBOX's would have been queued
        yield withTimeout(otherHeard, 10)
        self.assertEqual(heard, [])


def deferToProcess(code, *args):
    from twisted.internet import threads

    return threads.deferToThread(subprocess.run, [sys.executable, "-c", code, *args], check=True)


def withTimeout(d, seconds):
    return d.addTimeout(seconds, reactor)


class QuietTests(_WatcherCase):
    """
    Lifting the watch around bulk renames (Folder.quiet): the watch comes back, and a folder
    that vanished meanwhile is dropped, not an error.
    """

    def test_lift_and_restore(self):
        folder = self.user.createFolder("Work")
        self.watcher.watch(folder)
        self.assertIsNotNone(folder.quiet)
        self.watcher._suspend(folder)
        self.assertIn(id(folder), self.watcher._quieted)
        self.watcher._resume(folder)
        self.assertNotIn(id(folder), self.watcher._quieted)
        self.assertIn(id(folder), self.watcher._watched)
        self.watcher.unwatch(folder)
        self.assertIsNone(folder.quiet)

    @defer.inlineCallbacks
    def test_what_happened_while_lifted_is_found_a_moment_after(self):
        """
        Another process's delivery while the watch was lifted is found by the sync that
        follows its return, QUIET_RESYNC_DELAY later (the client's next command first).
        """
        from pymaild.store import watch

        heard = defer.Deferred()
        self.inbox.addListener(
            lambda f, c: reactor.callFromThread(heard.callback, c.added) if c.added and not heard.called else None)
        self.watcher.watch(self.inbox)
        self.watcher._suspend(self.inbox)
        yield deferToProcess("import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
                             "deliver(Path(sys.argv[1]), b'x\\n')", str(self.inbox.path))
        self.assertFalse(heard.called)
        start = reactor.seconds()
        self.watcher._resume(self.inbox)
        pending = self.watcher._pending[id(self.inbox)]
        self.assertGreaterEqual(pending.getTime() - start, watch.QUIET_RESYNC_DELAY - 0.01)
        added = yield withTimeout(heard, 10)
        self.assertEqual(added, [1])
        self.assertGreaterEqual(reactor.seconds() - start, watch.QUIET_RESYNC_DELAY - 0.01)
        # a sync that falls due while another bulk STORE has lifted the watch does nothing: the
        # end of that STORE schedules it
        heard = defer.Deferred()
        runs = []
        run = self.threads.run
        self.patch(self.threads, "run", lambda f, *a, **k: runs.append(f) or run(f, *a, **k))
        self.watcher._suspend(self.inbox)
        yield deferToProcess("import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
                             "deliver(Path(sys.argv[1]), b'y\\n')", str(self.inbox.path))
        self.watcher._sync(self.inbox)  # (what the pending call does when it falls due)
        self.assertEqual(runs, [])
        self.assertFalse(heard.called)
        self.watcher._resume(self.inbox)
        self.assertEqual((yield withTimeout(heard, 10)), [2])
        self.assertEqual(len(runs), 1)
        self.watcher.unwatch(self.inbox)

    def test_folder_gone_while_lifted(self):
        import shutil

        folder = self.user.createFolder("Gone")
        self.watcher.watch(folder)
        self.watcher._suspend(folder)
        shutil.rmtree(folder.path)
        self.watcher._resume(folder)  # was: an OSError from inotify's add_watch
        self.assertNotIn(id(folder), self.watcher._watched)
        self.watcher.unwatch(folder)  # and a later unwatch is a no-op, not a KeyError

    @defer.inlineCallbacks
    def test_a_bulk_store_waits_for_the_lift_and_answers_before_the_watch_is_back(self):
        """
        A bulk STORE (three renames here) has the reactor lift the watch while it works out
        its renames, and renames only once it is lifted; the watch comes back
        QUIET_RESUME_DELAY after the STORE ends (its answer first), and a bulk STORE before then
        finds it lifted still: no inotify calls in between.
        """
        from twisted.internet import threads

        from pymaild.store import maildir, watch

        self.patch(maildir, "_QUIET_FROM", 2)
        for i in range(3):
            self.inbox.append(b"Subject: %d\n\nbody\n" % i)
        self.watcher.watch(self.inbox)
        key = id(self.inbox)
        calls = []
        add, remove, rename = self.watcher._add, self.watcher._remove, os.rename
        self.patch(self.watcher, "_add", lambda f: (calls.append("add"), add(f))[1])
        self.patch(self.watcher, "_remove", lambda f: (calls.append("remove"), remove(f))[1])
        self.patch(os, "rename", lambda *a, **k: (
            calls.append("lifted" if key in self.watcher._quieted else "heard"), rename(*a, **k))[1])
        suspend = self.watcher._suspend  # (a reactor slow to get to it: the renames wait)
        self.patch(self.watcher, "_suspend", lambda *a: reactor.callLater(0.05, suspend, *a))
        changed, _ = yield threads.deferToThread(self.inbox.store, [1, 2, 3], ["\\Seen"], "add")
        self.assertEqual(sorted(changed), [1, 2, 3])
        self.assertEqual(calls, ["remove", "lifted", "lifted", "lifted"])
        pending = self.watcher._resuming[key]
        self.assertIn(key, self.watcher._quieted)
        self.assertTrue(0 < pending.getTime() - reactor.seconds() <= watch.QUIET_RESUME_DELAY)
        self.watcher._suspend = suspend
        yield threads.deferToThread(self.inbox.store, [1, 2, 3], ["\\Seen"], "remove")
        self.assertEqual(calls[4:], ["lifted", "lifted", "lifted"])
        self.assertFalse(pending.active())
        self.assertTrue(self.watcher._resuming[key].active())
        self.watcher._resume(self.inbox)  # (what the call does when it falls due)
        self.assertEqual(calls[-1], "add")
        self.assertNotIn(key, self.watcher._resuming)
        self.assertNotIn(key, self.watcher._quieted)
        self.assertIn(key, self.watcher._pending)  # the sync that catches what was not heard
        self.watcher.unwatch(self.inbox)

    def test_stop_cancels_the_watchs_return(self):
        self.watcher.watch(self.inbox)
        self.watcher._suspend(self.inbox)
        self.watcher._resumeSoon(self.inbox)
        pending = self.watcher._resuming[id(self.inbox)]
        self.watcher.stop()
        self.assertFalse(pending.active())
        self.watcher._resumeSoon(self.inbox)  # (a store thread's STORE ending after the stop)
        self.assertEqual(self.watcher._resuming, {})


class _OwnCase(_WatcherCase):
    """INBOX with three messages and a folder Other, both watched; INBOX's syncs recorded."""

    def setUp(self):
        super().setUp()
        for i in range(3):
            self.inbox.append(b"Subject: %d\n\nbody\n" % i)
        self.other = self.user.createFolder("Other")
        self.syncs = []
        original = self.inbox.sync
        self.inbox.sync = lambda *a, **k: (self.syncs.append((a, k)), original(*a, **k))[1]
        self.watcher.watch(self.inbox)
        self.watcher.watch(self.other)

    @defer.inlineCallbacks
    def _eventsSoFarHandled(self):
        """
        A delivery into Other by another process, heard: inotify reports events in order, so
        every INBOX event before it has been seen (and its sync scheduled, if any).
        """
        heard = defer.Deferred()
        self.other.addListener(
            lambda f, c: reactor.callFromThread(heard.callback, None) if c.added and not heard.called else None)
        code = ("import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
                "deliver(Path(sys.argv[1]), b'x\\n')")
        yield deferToProcess(code, str(self.other.path))
        yield withTimeout(heard, 10)


class OwnEventsTests(_OwnCase):
    """
    A STORE's renames are announced to the watcher beforehand (Folder.expectEvents): their
    inotify events cost no sync (a sync lists the whole directory), while another process's
    rename, even of the same file just after, is still synced.
    """

    @defer.inlineCallbacks
    def test_own_store_costs_no_sync(self):
        changed, failed = self.inbox.store([1, 2], ["\\Flagged"], "add")
        self.assertEqual((sorted(changed), failed), ([1, 2], []))
        self.inbox.store([2], ["\\Flagged"], "remove")
        yield self._eventsSoFarHandled()
        self.assertEqual(self.syncs, [])
        self.assertNotIn(id(self.inbox), self.watcher._pending)
        self.assertEqual(self.inbox._expected, {})  # each announcement met its event

    @defer.inlineCallbacks
    def test_another_process_renaming_the_same_file_is_synced(self):
        self.inbox.store([1], ["\\Flagged"], "add")
        heard = defer.Deferred()  # (the store told its own change to the listeners already)
        self.inbox.addListener(
            lambda f, c: reactor.callFromThread(heard.callback, c.flagsChanged)
            if c.flagsChanged and not heard.called else None)
        path = self.inbox.filePath(1)
        # another program marks it \Seen too, at once: F -> FS
        code = "import os, sys; os.rename(sys.argv[1], sys.argv[1][:-1] + 'FS')"
        self.assertTrue(str(path).endswith(":2,F"))
        yield deferToProcess(code, str(path))
        changed = yield withTimeout(heard, 10)
        self.assertEqual(changed, [1])
        self.assertEqual(self.inbox.messages([1])[0].flags, frozenset({"\\Flagged", "\\Seen"}))
        self.assertEqual(len(self.syncs), 1)

    def test_an_announcement_no_event_meets_is_forgotten(self):
        from pymaild.store import maildir

        event = ("cur", "to", "1.M1P1.h:2,S")
        self.inbox.expectEvents([event])
        self.inbox.expectEvents([event], False)
        self.assertEqual(self.inbox._expected, {})
        self.patch(maildir, "_EXPECT_SECONDS", -1.0)
        self.inbox.expectEvents([event])
        self.assertFalse(self.inbox.ownEvent(*event))  # too old: a sync, to be safe
        self.assertEqual(self.inbox._expected, {})


#: another program renames a file (adds a flag) and sets its directory's mtime back to what it
#: was: a change within the same clock tick as the last one, which no mtime shows
_SAME_TICK_RENAME = (
    "import os, sys\n"
    "path = sys.argv[1]; st = os.stat(os.path.dirname(path))\n"
    "os.rename(path, path + sys.argv[2])\n"
    "os.utime(os.path.dirname(path), ns=(st.st_atime_ns, st.st_mtime_ns))\n"
)


class OwnStampsTests(_OwnCase):
    """
    After this process's own STORE (announced renames) or sync under a watch, the next sync
    finds the directories as it left them and lists nothing (a SELECT after a flag change on a
    folder of 100,000 messages: no 60-140 ms listing), while a change by another process, even
    one no mtime shows, is still found: by the watch's sync, which lists the directories
    whatever their stamps.
    """

    def setUp(self):
        super().setUp()
        self.scans = []
        original = self.inbox._scan
        self.inbox._scan = lambda *a: (self.scans.append(a), original(*a))[1]

    def test_sync_after_own_store_lists_nothing(self):
        self.inbox.sync()
        self.inbox.store([1], ["\\Flagged"], "add")
        del self.scans[:]
        self.assertFalse(self.inbox.sync())
        self.assertFalse(self.inbox.sync(moveNew=False))
        self.inbox.store([2, 3], ["\\Seen"], "add")
        self.inbox.store([2], ["\\Seen"], "remove")
        self.assertFalse(self.inbox.sync())
        self.assertEqual(self.scans, [])

    @defer.inlineCallbacks
    def test_same_tick_change_by_another_process_is_synced(self):
        self.inbox.sync()
        self.inbox.store([1], ["\\Flagged"], "add")
        heard = defer.Deferred()
        self.inbox.addListener(
            lambda f, c: reactor.callFromThread(heard.callback, c.flagsChanged)
            if c.flagsChanged and not heard.called else None)
        path = self.inbox.filePath(2)
        self.assertTrue(str(path).endswith(":2,"))
        yield deferToProcess(_SAME_TICK_RENAME, str(path), "S")
        changed = yield withTimeout(heard, 10)
        self.assertEqual(changed, [2])
        self.assertEqual(self.inbox.messages([2])[0].flags, frozenset({"\\Seen"}))
        self.assertEqual(self.syncs, [((), {}), ((False,), {"force": True})])  # the test's, the watch's

    def test_own_stamps_are_forgotten_with_the_watch(self):
        """
        Unwatched, nobody would hear another process's same-tick change: the next sync lists
        the directories.
        """
        self.inbox.sync()
        self.inbox.store([1], ["\\Flagged"], "add")
        self.assertIsNotNone(self.inbox._ownStamps)
        self.watcher.unwatch(self.inbox)
        path = self.inbox.filePath(2)
        subprocess.run([sys.executable, "-c", _SAME_TICK_RENAME, str(path), "S"], check=True)
        changes = self.inbox.sync(moveNew=False)
        self.assertEqual(changes.flagsChanged, [2])

    def test_unwatched_syncs_note_no_stamps(self):
        self.watcher.unwatch(self.inbox)
        self.inbox.sync()
        path = self.inbox.filePath(2)
        subprocess.run([sys.executable, "-c", _SAME_TICK_RENAME, str(path), "S"], check=True)
        self.assertEqual(self.inbox.sync(moveNew=False).flagsChanged, [2])

    def test_a_lifted_watch_notes_no_stamps(self):
        from pymaild.store import maildir

        self.patch(maildir, "_QUIET_FROM", 2)
        self.inbox.sync()
        self.inbox.store([1], ["\\Flagged"], "add")
        self.assertIsNotNone(self.inbox._ownStamps)
        self.watcher._suspend(self.inbox)  # (what a bulk STORE has the reactor do)
        self.assertIsNone(self.inbox._ownStamps)
        self.inbox.sync(force=True)  # a sync while nothing is heard notes nothing either
        self.assertIsNone(self.inbox._ownStamps)
        self.watcher._resume(self.inbox)
        self.inbox.store([1, 2, 3], ["\\Seen"], "add")  # a bulk STORE (the watch is lifted: no notes)
        self.assertIsNone(self.inbox._ownStamps)

    def test_new_mail_moves_to_cur_whatever_the_stamps(self):
        """
        The watch's sync indexes a delivery but leaves it in new/ (no session opened the folder);
        a SELECT's sync after it moves it to cur/ although the stamps are its own.
        """
        self.inbox.sync()
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from pymaild.store.delivery import deliver; deliver(Path(sys.argv[1]), b'x\\n')",
                        str(self.inbox.path)], check=True)
        self.assertEqual(self.inbox.sync(False, force=True).added, [4])
        self.assertEqual(len(os.listdir(self.inbox.path / "new")), 1)
        self.assertIsNotNone(self.inbox._ownStamps)
        self.inbox.sync(moveNew=True)
        self.assertEqual(os.listdir(self.inbox.path / "new"), [])
        self.assertEqual(self.inbox.messages([4])[0].uid, 4)

    def test_a_failed_forced_sync_leaves_no_stamps(self):
        self.inbox.sync()
        self.assertIsNotNone(self.inbox._ownStamps)
        scan = self.inbox._scan
        self.inbox._scan = lambda *a: 1 / 0
        self.assertRaises(ZeroDivisionError, self.inbox.sync, False, force=True)
        self.inbox._scan = scan
        subprocess.run([sys.executable, "-c", _SAME_TICK_RENAME, str(self.inbox.filePath(2)), "S"], check=True)
        self.assertEqual(self.inbox.sync(moveNew=False).flagsChanged, [2])

    def test_a_store_that_meets_another_process_notes_nothing(self):
        """
        A STORE finds a file gone (another program renamed it just before, within the same
        tick): that change is not its own, and the next sync lists the directories.
        """
        self.inbox.sync()
        path = self.inbox.filePath(2)
        subprocess.run([sys.executable, "-c", _SAME_TICK_RENAME, str(path), "S"], check=True)
        changed, failed = self.inbox.store([1, 2], ["\\Flagged"], "add")
        self.assertEqual((sorted(changed), failed), ([1], [2]))
        self.assertIsNone(self.inbox._ownStamps)
        self.assertEqual(self.inbox.sync(moveNew=False).flagsChanged, [2])

    def test_a_store_that_changes_nothing_keeps_the_stamps(self):
        self.inbox.sync()
        noted = self.inbox._ownStamps
        self.assertEqual(self.inbox.store([1], ["\\Flagged"], "remove"), ({}, []))
        self.assertEqual(self.inbox._ownStamps, noted)

    @defer.inlineCallbacks
    def test_an_overflowing_event_queue_syncs_every_watched_folder(self):
        """
        The kernel drops events when its queue is full and queues an overflow event (watch
        descriptor -1) instead: the stamps noted no longer count, and every watched folder is
        synced, listing its directories.
        """
        import struct

        from twisted.internet import inotify

        self.inbox.sync()
        self.assertIsNotNone(self.inbox._ownStamps)
        heard = defer.Deferred()
        self.inbox.addListener(
            lambda f, c: reactor.callFromThread(heard.callback, c.flagsChanged)
            if c.flagsChanged and not heard.called else None)
        # a same-tick change whose events the kernel then dropped: the watch is lifted around it
        self.watcher._remove(self.inbox)
        subprocess.run([sys.executable, "-c", _SAME_TICK_RENAME, str(self.inbox.filePath(2)), "S"], check=True)
        self.watcher._add(self.inbox)
        self.assertIsNotNone(self.inbox._ownStamps)
        self.assertFalse(self.inbox.sync(moveNew=False))  # (the stamps agree: nothing listed)
        self.watcher._notifier._doRead(struct.pack("=lLLL", -1, inotify.IN_Q_OVERFLOW, 0, 0))
        self.assertIsNone(self.inbox._ownStamps)
        changed = yield withTimeout(heard, 10)
        self.assertEqual(changed, [2])
