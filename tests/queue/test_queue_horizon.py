"""
The queue's due times on disk and the runner's horizon: every envelope file is dated with its
message's next due time (held: L{files.UNSCHEDULED}), the runner loads the queue from those
dates without reading an envelope, keeps in memory only what is due within L{runner.HORIZON},
and finds the rest by scanning the directory again before it is due.  Over the real sockets and
fake DNS of tests/queue/test_queue_runner.py, on a C{task.Clock}.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from twisted.internet import defer

from pymaild import cli
from pymaild.queue import runner as runnermod
from pymaild.queue.files import FAILED, PENDING, UNSCHEDULED, Envelope, QueueFiles, Recipient, dueStamp

sys.path.insert(0, str(Path(__file__).parent))
import test_queue_runner  # noqa: E402
from test_queue_runner import MESSAGE, _Base  # noqa: E402

HORIZON, RESCAN = runnermod.HORIZON, runnermod.RESCAN


def mtime(files: QueueFiles, id: str) -> int:
    return files.paths(id)[1].stat().st_mtime_ns


def enqueueFile(files: QueueFiles, recipients, **kw) -> str:
    """A message queued by another process (nothing told the runner)."""
    return files.enqueue(MESSAGE, Envelope(id="", sender="alice@here.test", recipients=recipients, **kw))


class StampCase(_Base):
    """What an envelope file's mtime says, whoever wrote it."""

    def test_written_envelopes_carry_their_due_time(self):
        """
        prepare/commit, save, a held message, a message with only a report owed: the mtime is
        the next due time to the nanosecond (new mail: 0, due at once), the far-future
        sentinel, 0.
        """
        t = 1_700_000_123.456789
        new = enqueueFile(self.files, [Recipient("a@accept.test")])
        self.assertEqual(mtime(self.files, new), 0)
        later = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=t),
                                         Recipient("b@accept.test", next_attempt=t + 60)])
        self.assertEqual(round(mtime(self.files, later), -3), 1_700_000_123_456_789_000)
        self.assertEqual(mtime(self.files, later) / 1_000_000_000, t)  # (the same float, read back)
        envelope = self.files.load(later)
        envelope.recipients[0].state = FAILED
        self.files.save(envelope)
        self.assertEqual(mtime(self.files, later) / 1_000_000_000, t + 60)
        envelope.held = True
        self.files.save(envelope)
        self.assertEqual(mtime(self.files, later), UNSCHEDULED)
        self.assertEqual(dict(self.files.schedule())[later], None)
        envelope.held = False
        envelope.recipients[1].state = FAILED  # (nothing pending; a report still owed)
        self.files.save(envelope)
        self.assertEqual(mtime(self.files, later), 0)
        self.assertEqual(dict(self.files.schedule()), {new: 0.0, later: 0.0})
        self.assertEqual(os.listdir(self.files.tmp), [])

    @defer.inlineCallbacks
    def test_the_runners_writes_carry_the_next_attempt(self):
        """A deferred recipient: the envelope the runner rewrote is dated with its retry."""
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        [r] = self.envelope(id).recipients
        self.assertEqual((r.state, r.next_attempt), (PENDING, self.clock.seconds() + 300))
        self.assertEqual(mtime(self.files, id), dueStamp(self.envelope(id)))
        self.assertEqual(mtime(self.files, id) / 1_000_000_000, self.clock.seconds() + 300)

    def test_pymaildctl_dates_what_it_writes(self):
        """hold: the sentinel; release and retry: now; the server's files are what it reads."""
        config = self.tmp / "pymaild.toml"
        config.write_text('[domains]\nlocal = ["here.test"]\n')
        ctl = ["--config", str(config), "--data-dir", str(self.tmp)]
        id = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=time.time() + 86400)])
        self.assertEqual(cli.run(ctl + ["queue", "hold", id]), 0)
        self.assertEqual(mtime(self.files, id), UNSCHEDULED)
        before = time.time_ns()
        self.assertEqual(cli.run(ctl + ["queue", "release", id]), 0)
        self.assertTrue(before - 1000 <= mtime(self.files, id) <= time.time_ns())
        envelope = self.envelope(id)
        envelope.recipients[0].next_attempt = time.time() + 86400
        self.files.save(envelope)
        before = time.time_ns()
        self.assertEqual(cli.run(ctl + ["queue", "retry", id]), 0)
        self.assertTrue(before - 1000 <= mtime(self.files, id) <= time.time_ns())


class LoadCase(_Base):
    """Start-up and the scans: due times from the directory, envelopes read only when due."""

    def restart(self):
        """A new runner over the queue as it is (the old one stopped), counting envelope reads."""
        self.reads = []
        load = QueueFiles.load
        self.patch(QueueFiles, "load", lambda files, id, **kw: (self.reads.append(id), load(files, id, **kw))[1])
        d = self.runner.stopService()
        self.runner = self.makeRunner()
        return d

    @defer.inlineCallbacks
    def test_start_reads_no_envelope(self):
        """
        Due soon, due beyond the horizon, held: nothing is read at start (two envelopes that
        are not even JSON stay where they are: nobody looked inside), only the first is in
        memory, with its time from the file's date.
        """
        now = self.clock.seconds()
        soon = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=now + 60)])
        far = enqueueFile(self.files, [Recipient("b@accept.test", next_attempt=now + 86400)])
        held = enqueueFile(self.files, [Recipient("c@accept.test", next_attempt=now)], held=True)
        for id in (soon, far):
            stamp = mtime(self.files, id)
            self.files.paths(id)[1].write_bytes(b"{not json")
            os.utime(self.files.paths(id)[1], ns=(stamp, stamp))
        yield self.restart()
        yield self.runner.ready
        self.assertEqual(self.reads, [])
        self.assertEqual(self.runner.due, {soon: now + 60})
        self.assertEqual(sorted(self.files.ids()), sorted([soon, far, held]))
        self.assertEqual(os.listdir(self.files.corrupt), [])
        yield self.runDue(60)  # (due: read, found damaged, set aside)
        self.assertEqual(self.reads, [soon])
        self.assertTrue((self.files.corrupt / f"{soon}.json").exists())

    @defer.inlineCallbacks
    def test_beyond_the_horizon_waits_on_disk_and_goes_on_time(self):
        """
        A message due in an hour is not in memory; the scans every RESCAN seconds find it
        before it is due, and it goes exactly when due, not a moment before.
        """
        now = self.clock.seconds()
        id = enqueueFile(self.files, [Recipient("bob@accept.test", next_attempt=now + 3600)])
        yield self.restart()
        while id not in self.runner.due:
            self.assertLess(self.clock.seconds() + RESCAN, now + 3600)  # (found before it is due)
            yield self.runDue(RESCAN)
        self.assertGreaterEqual(self.clock.seconds(), now + 3600 - HORIZON)  # (and not long before)
        self.assertEqual(self.runner.due, {id: now + 3600})
        yield self.runDue(now + 3600 - self.clock.seconds() - 1)
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        self.assertEqual(self.reads, [])
        yield self.runDue(1)
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_a_retry_beyond_the_horizon_is_forgotten_until_a_scan_finds_it(self):
        """
        Deferred with a backoff longer than the horizon: not in memory after the attempt, its
        envelope dated with the retry; a later scan puts it back and it is retried on time.
        """
        self.runner.policy = runnermod.Policy(**dict(self.runner.policy.__dict__, minBackoff=HORIZON + 300))
        yield self.runner.ready
        start = self.clock.seconds()
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        retry = start + HORIZON + 300
        self.assertEqual(self.envelope(id).recipients[0].next_attempt, retry)
        self.assertEqual(mtime(self.files, id) / 1_000_000_000, retry)
        self.assertNotIn(id, self.runner.due)
        self.assertEqual(self.runner.heap, [])
        yield self.runDue(RESCAN)
        self.assertEqual(self.runner.due, {id: retry})
        yield self.runDue(retry - self.clock.seconds() - 1)
        self.assertEqual(self.sinks["127.0.0.3"].transactions, 1)
        yield self.runDue(1)
        self.assertEqual(len(self.sinks["127.0.0.3"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_an_old_style_envelope_is_tried_at_once(self):
        """
        Envelopes written before their date meant anything (dated when written): all are tried
        at start; the one due is delivered, the one not due yet and the held one are only
        dated (with the due time, as held) and forgotten, and the scans leave them alone.
        """
        now = self.clock.seconds()
        due = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=now - 100)])
        later = enqueueFile(self.files, [Recipient("b@accept.test", next_attempt=now + 86400)])
        held = enqueueFile(self.files, [Recipient("c@accept.test", next_attempt=now - 100)], held=True)
        written = int((now - 3600) * 1e9)
        for id in (due, later, held):
            os.utime(self.files.paths(id)[1], ns=(written, written))
        yield self.restart()
        self.assertEqual(set(self.runner.due), {due, later, held})
        yield self.settle()
        self.assertEqual([r["rcpts"][0][0] for r in self.sinks["127.0.0.2"].received], ["a@accept.test"])
        self.assertEqual(self.files.ids(), sorted([later, held]))
        self.assertEqual(self.envelope(later).recipients[0].attempts, 0)
        self.assertEqual(mtime(self.files, later) / 1_000_000_000, now + 86400)
        self.assertEqual(mtime(self.files, held), UNSCHEDULED)
        self.assertEqual(self.runner.due, {})
        reads = len(self.reads)
        yield self.runDue(RESCAN)
        self.assertEqual((self.runner.due, len(self.reads)), ({}, reads))

    @defer.inlineCallbacks
    def test_held_messages_stay_untried(self):
        """Held at start and through a day of scans: never read, never tried, never in memory."""
        now = self.clock.seconds()
        id = enqueueFile(self.files, [Recipient("bob@accept.test", next_attempt=now)], held=True)
        yield self.restart()
        for _ in range(int(86400 / RESCAN)):
            yield self.runDue(RESCAN)
            self.assertEqual(self.runner.due, {})
        self.assertEqual(self.reads, [])
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        self.assertEqual(self.files.ids(), [id])

    @defer.inlineCallbacks
    def test_a_scan_leaves_alone_what_is_being_tried_or_was_rescheduled(self):
        """
        What is being tried, and what the runner scheduled while the scan ran, is known better
        than the scan knew it: not put in the heap a second time.
        """
        now = self.clock.seconds()
        busy = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=now + 60)])
        moved = enqueueFile(self.files, [Recipient("b@accept.test", next_attempt=now + 60)])
        yield self.runner.ready
        self.runner.busy.add(busy)
        scanning = defer.Deferred()
        run = self.runner.run
        self.runner.run = lambda f, *a: scanning.addCallback(lambda _: run(f, *a))
        self.runner._scan()
        self.runner.run = run
        self.runner.schedule(moved, now + 5000)  # (beyond the horizon: forgotten, as after an attempt)
        scanning.callback(None)
        self.assertEqual(self.runner.due, {})
        self.runner.busy.discard(busy)

    @defer.inlineCallbacks
    def test_flush_reaches_what_is_not_in_memory(self):
        now = self.clock.seconds()
        far = enqueueFile(self.files, [Recipient("a@accept.test", next_attempt=now + 86400)])
        held = enqueueFile(self.files, [Recipient("b@accept.test", next_attempt=now)], held=True)
        yield self.runner.ready
        self.assertEqual(self.runner.due, {})
        yield self.runner.flush()
        self.assertEqual(self.runner.due, {far: now})
        self.assertEqual(self.files.ids(), sorted([far, held]))


class PymaildctlCase(_Base):
    """pymaildctl on a running runner whose clock is the real time (pymaildctl's 'now')."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        yield self.runner.stopService()
        self.clock.advance(time.time() - self.clock.seconds())
        self.runner = self.makeRunner()
        yield self.runner.ready
        self.config = self.tmp / "pymaild.toml"
        self.config.write_text('[domains]\nlocal = ["here.test"]\n')

    waitFor = test_queue_runner.ChangesCase.waitFor

    @defer.inlineCallbacks
    def test_retry_of_a_message_due_tomorrow_goes_at_once(self):
        """
        Deferred until tomorrow (on disk only); pymaildctl queue retry: heard, re-read, sent.
        """
        self.runner.policy = runnermod.Policy(**dict(self.runner.policy.__dict__, minBackoff=86400, maxBackoff=86400))
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        self.assertNotIn(id, self.runner.due)
        self.assertEqual(self.sinks["127.0.0.3"].transactions, 1)
        ctl = ["--config", str(self.config), "--data-dir", str(self.tmp), "queue", "retry", id]
        self.assertEqual(cli.run(ctl), 0)
        yield self.waitFor(lambda: self.runner.due.get(id) is not None)
        yield self.runDue(max(0.0, time.time() - self.clock.seconds()))  # (pymaildctl's now)
        self.assertEqual(len(self.sinks["127.0.0.3"].received), 1)
        self.assertEqual(self.files.ids(), [])
