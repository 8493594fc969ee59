# -*- test-case-name: tests.queue.test_queue_runner -*-
"""
The queue runner: takes due messages from L{pymaild.queue.files.QueueFiles}, sends them, and
records what happened to each recipient.  Everything is driven by Deferreds and an injected
clock (C{IReactorTime}), so tests run retries and expiry without waiting.

How one message is tried (L{Runner._attempt}):

  1. its lock and envelope are taken in a thread (a message C{pymaildctl} is editing waits);
  2. its due recipients are grouped by destination (the domain, or the relay host) into
     L{pymaild.queue.client.Job}s, each added to its L{Destination};
  3. a destination runs up to C{connections_per_destination} connections (and all of them
     together at most C{connections}); a connection resolves the MX hosts (all of them, by
     preference, equal ones shuffled; L{pymaild.queue.mx}), tries their addresses in order
     until one talks, and carries the destination's jobs one after another (several messages
     per connection; with none waiting, it waits up to L{PARK_WAIT} for one on its way while
     envelopes are being read and no other destination waits for a connection place);
  4. each job's result is written to the envelope at once (so a crash after a remote C{250}
     re-sends at most the recipients of that one transaction): C{2xx} delivered, C{5xx}
     failed, C{4xx} or no answer retried later with backoff (C{min_backoff}, doubling, at most
     C{max_backoff}) until C{max_lifetime} after arrival, then failed;
  5. failures the sender wants to hear of (DSN C{NOTIFY}, by default failures and delays) are
     reported in one RFC 3464 DSN (L{pymaild.queue.dsn}) handed to C{bounce} (which delivers
     it like any other message, to a local mailbox or back into this queue), never for a
     message from the null sender; an optional delay warning goes out once after
     C{delay_warning};
  6. a message with nothing left to do is removed; otherwise it is scheduled for its next
     due recipient.

What is due (L{Runner.schedule}): the runner keeps in memory only the messages due before its
horizon (L{HORIZON}, 15 minutes ahead of its last scan of the queue directory), in a heap with
one timer for the earliest.  Every envelope file's mtime is its due time
(L{pymaild.queue.files.dueStamp}), so a message due later (deferred with a longer backoff, or
queued a while ago) needs nothing in memory: a scan of C{messages/} (L{QueueFiles.schedule}:
one C{stat} a message, no envelope read, in a thread) every L{RESCAN} seconds picks it up
before it is due, as Postfix's queue manager picks up its deferred queue files by their mtime.
At start the same scan loads the queue.  New mail, pymaildctl's changes (heard through inotify)
and a message retried soon are put in the heap at once.

Idle cost: for 100,000 deferred messages due later than 15 minutes, nothing in memory and a
scan of about 0.5 s of CPU every 7.5 minutes; the start-up scan takes as long.  A message due
within the horizon costs a dict entry and a heap entry (about 200 bytes); nothing is read from
disk until a message is due.
"""

from __future__ import annotations

import heapq
import math
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from pymaild.pipeline.stages import QueueEvent
from pymaild.queue import dsn as dsnmod
from pymaild.queue.client import Job, QueueClient
from pymaild.queue.files import DELIVERED, FAILED, PENDING, Busy, CorruptEnvelope, Envelope, QueueFiles, dueStamp
from pymaild.queue.mx import DNSProblem

log = Logger()

#: the reply given to jobs put back because pymaild is stopping (not counted as an attempt)
STOPPING = "pymaild is stopping"
#: a destination with more than C{SATURATED} x its connection limit jobs waiting takes no more:
#: further recipients for it wait C{SATURATED_WAIT} seconds (not counted as an attempt)
SATURATED = 20
SATURATED_WAIT = 60.0
#: a message locked by pymaildctl (which holds the lock for a moment) is tried again this soon
BUSY_WAIT = 2.0
#: seconds at most that a connection whose destination has no job waiting stays open for one
#: on its way (a message whose envelope is being read), instead of QUIT (L{_Session.park})
PARK_WAIT = 0.5
#: seconds an MX answer is reused by further connections (far below usual TTLs)
ROUTE_CACHE = 30.0
#: seconds ahead of its last scan of the queue directory up to which the runner keeps every due
#: message in memory; a message due later is left to the envelope's mtime and a later scan.
#: 15 minutes: the first retries (min_backoff 5 minutes, then 10) and greylisting's short waits
#: stay in memory and never wait for a scan, while what has been deferred for longer (backoff
#: grown towards max_backoff, an hour, for up to max_lifetime, 5 days) stays on disk.
HORIZON = 900.0
#: seconds between scans (half the horizon: a message is loaded 7.5 to 15 minutes before it is
#: due, so a scan may be slow, or fail and be tried again, without making anything late; about
#: 0.5 s of CPU for 100,000 queued, every 7.5 minutes)
RESCAN = HORIZON / 2
#: seconds before a scan that failed is tried again
SCAN_RETRY = 60.0


@dataclass(frozen=True)
class Policy:
    """The C{[queue]} settings the runner uses."""

    relayHost: tuple[str, int] | None = None
    remotePort: int = 25
    tls: str = "may"  # "may", "encrypt" or "verify"
    authUser: str | None = None
    authPassword: str | None = None
    minBackoff: float = 300.0
    maxBackoff: float = 3600.0
    maxLifetime: float = 5 * 86400.0
    delayWarning: float = 0.0
    connections: int = 100
    perDestination: int = 20
    connectTimeout: float = 30.0
    commandTimeout: float = 300.0

    def backoff(self, attempts: int) -> float:
        return min(self.minBackoff * (2 ** min(max(0, attempts - 1), 40)), self.maxBackoff)


def _status(code: int, reply: str, temporary: bool) -> str:
    """The enhanced status code in a reply, or one made from its basic code."""
    first = reply.split(None, 1)[0] if reply else ""
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245":
        return first
    if code < 0:
        return "4.4.1" if temporary else "5.4.4"
    return f"{str(code)[0]}.0.0"


class Destination:
    """The jobs waiting for one domain (or the relay host), and its connections."""

    def __init__(self, key: str):
        self.key = key
        self.jobs: deque[Job] = deque()
        self.workers = 0
        #: connections waiting for a job on its way (L{_Session.park}): session -> its timer
        self.parked: dict = {}


class _Session:
    """What a L{QueueClient} reports to the connection attempt that made it."""

    def __init__(self, destination: Destination, hostName: str, runner=None):
        self.destination = destination
        self.hostName = hostName
        self.runner = runner
        self.failure: tuple[int, str] | None = None
        self.ended = Deferred()
        self._resume = None

    def park(self, resume) -> bool:
        """
        The connection has no job: whether it waits for one instead of QUIT.  It does while
        messages are being opened (their envelopes read in a thread: their jobs may be for
        this destination) and no destination waits for a connection place, for
        L{PARK_WAIT} seconds at most; C{resume()} is called when a job comes for the
        destination or the wait ends (then L{nextJob} may still find none).  A connection
        that quit at every gap cost three to four times the sessions when messages were sent
        faster than their envelopes were read.
        """
        runner = self.runner
        if runner is None or not runner._opening or runner.waiting or runner.stopping:
            return False
        self._resume = resume
        self.destination.parked[self] = runner.clock.callLater(PARK_WAIT, self.unpark)
        return True

    def unpark(self) -> None:
        """End the wait (a job came, the wait is over, or nothing more is on its way)."""
        timer = self.destination.parked.pop(self, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        resume, self._resume = self._resume, None
        resume()

    def nextJob(self) -> Job | None:
        jobs = self.destination.jobs
        while jobs:
            job = jobs.popleft()
            if not job.finished.called:
                return job
        return None

    def sessionFailed(self, code: int, reply: str) -> None:
        self.failure = (code, reply)

    def sessionEnded(self) -> None:
        timer = self.destination.parked.pop(self, None)
        if timer is not None and timer.active():
            timer.cancel()
        if not self.ended.called:
            self.ended.callback(None)


class Runner(service.Service):
    """
    @param files: the L{QueueFiles}.
    @param resolver: has C{resolve(domain)} -> Deferred of a list of L{Host}.
    @param run: C{run(f, *args)} -> Deferred: calls C{f} in a bounded thread pool.
    @param bounce: C{bounce(path, recipient)} -> Deferred: deliver the DSN at C{path} to
        C{recipient} through the normal routing (the message comes from the null sender).
    @param connect: C{connect(host, address, port, protocol)} -> Deferred, for tests; by
        default a TCP connection with C{connectTimeout} (implicit TLS on a relay port 465).
    """

    name = "queue"

    def __init__(self, files: QueueFiles, resolver, run, clock, policy: Policy, hostname: str, bounce,
                 tlsOptions=None, connect=None, shuffle=random.shuffle, stopTimeout: float = 30.0):
        self.files = files
        self.resolver = resolver
        self.run = run
        self.clock = clock
        self.policy = policy
        self.hostname = hostname
        self.bounce = bounce
        self.tlsOptions = tlsOptions  # callable(hostname) -> client TLS options, or None
        self._connect = connect or self._tcpConnect
        self.shuffle = shuffle
        self.stopTimeout = stopTimeout
        # id -> when it is due next, for what is due before L{horizon} (the heap may hold stale
        # entries; both share the ID's string and the time's float)
        self.due: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []
        # every message due before this is in L{due} (or L{busy}); what is due later is
        # forgotten (its envelope's mtime has it, for the next scan)
        self.horizon = math.inf
        self._scanTimer = None
        self._touched: set[str] | None = None  # scheduled or forgotten while a scan runs
        self.busy: set[str] = set()
        self._passedOver: set[str] = set()  # due while being tried (L{_wake})
        self.destinations: dict[str, Destination] = {}
        self.active = 0  # connections, all destinations
        self.waiting: deque[Destination] = deque()
        #: attempts whose envelope is being read (their jobs not made yet: L{_Session.park})
        self._opening = 0
        self._timer = None
        self.maxInFlight = max(100, policy.connections * 10)
        self.attempts: dict[str, Deferred] = {}
        self.working: set[Deferred] = set()  # the connection loops (L{_work}) running
        self.clients: set[QueueClient] = set()
        self._rereads: dict[str, Deferred] = {}  # the last re-read of each message heard changed
        self._routes: dict[str, tuple[float, list]] = {}  # name -> (until, MX hosts)
        #: name -> (the lookup under way, the Deferreds of the connection loops waiting for it)
        self._resolving: dict[str, tuple[Deferred, list[Deferred]]] = {}
        self._started = False
        self.stopping = False
        self._remover = _Remover(files, run)

    # --- life cycle -----------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._started = True
        self.ready = self._scan(first=True)

    @inlineCallbacks
    def stopService(self):
        """
        Stop taking messages: jobs not yet on a connection are put back untouched (still due,
        no attempt counted); transactions under way may finish for C{stopTimeout}, then their
        connections are cut (those messages were not acknowledged, so they stay queued and go
        at the next start: nothing is lost, nothing sent twice).
        """
        super().stopService()
        self._started = False
        self.stopping = True
        if getattr(self, "_notifier", None) is not None:
            self._notifier.loseConnection()
            self._notifier = None
        for timer in (self._timer, self._scanTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._scanTimer = None
        for destination in list(self.destinations.values()):
            self._failQueued(destination, -1, STOPPING)
        self._unparkAll()  # (no job: QUIT)
        from twisted.internet import reactor

        cut = reactor.callLater(self.stopTimeout, self._abortAll)
        try:
            yield defer.DeferredList(list(self.attempts.values()))
            # (connections QUIT after their last job; connection loops still waiting for DNS
            # or a TCP connect are left to time out on their own)
            closing = defer.DeferredList([d for d in self.working])
            closing.addTimeout(self.stopTimeout + 1, reactor, onTimeoutCancel=lambda *a: None)
            yield closing
        finally:
            if cut.active():
                cut.cancel()

    def _abortAll(self) -> None:
        for destination in list(self.destinations.values()):
            self._failQueued(destination, -1, STOPPING)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abortConnection()

    # --- scans of the queue directory ------------------------------------------------------

    def _scan(self, first: bool = False) -> Deferred:
        """
        Read from the queue directory (in a thread: a C{stat} a message, no envelope) what is
        due before the new horizon, L{HORIZON} from now, and put what is not in memory yet in
        the heap; then scan again in L{RESCAN} seconds.  (At start L{QueueFiles.recover} has
        run before anything could be queued: L{service.build}.)
        """
        if self._scanTimer is not None and self._scanTimer.active():
            self._scanTimer.cancel()
        self._scanTimer = None
        start = self.clock.seconds()
        # (from now on a message scheduled before the new horizon stays in memory: the scan may
        # have seen its envelope before the runner rewrote it)
        self.horizon = start + HORIZON
        self._touched = set()
        d = self.run(self._dueBefore, self.horizon)
        d.addCallback(self._scanned, first)
        d.addErrback(self._scanFailed, first)
        d.addBoth(self._nextScan, start)
        return d

    def _dueBefore(self, horizon: float):
        """(In a thread.)  How many messages are queued, and C{(due, id)} of those due before C{horizon}."""
        count, due = 0, []
        for id, when in self.files.schedule():
            count += 1
            if when is not None and when < horizon:
                due.append((when, id))
        # (the scan's garbage, and at start what start-up left free, back to the system: 2.5 MB
        # of RSS with an empty queue, more after a scan of a large one; a fraction of a ms)
        _trim()
        return count, due

    def _scanned(self, result, first: bool) -> bool:
        count, entries = result
        touched, self._touched = self._touched, None
        if first:
            log.info("queue: {count} messages queued", count=count)
        if not self._started:
            return True
        # what is being tried, re-read or was (re)scheduled meanwhile is known better than the
        # scan knew it
        rereads = self._rereads
        added = 0
        for due, id in entries:
            if id not in self.due and id not in self.busy and id not in touched and id not in rereads:
                self.due[id] = due
                self.heap.append((due, id))
                added += 1
        if added:
            heapq.heapify(self.heap)
        self._arm()
        if first:
            self._watch()
        return True

    def _scanFailed(self, failure: Failure, first: bool) -> bool:
        self._touched = None
        log.failure("queue: reading the queue directory failed (tried again in {delay:g} s)", failure,
                    delay=SCAN_RETRY)
        if first and self._started:
            self._watch()
        return False

    def _nextScan(self, scanned: bool, start: float) -> None:
        if not self._started or self._scanTimer is not None:
            return
        delay = RESCAN if scanned else SCAN_RETRY
        self._scanTimer = self.clock.callLater(max(0.0, start + delay - self.clock.seconds()), self._scan)

    # --- changes made by pymaildctl -------------------------------------------------------

    def _watch(self) -> None:
        """
        Hear envelopes replaced by C{pymaildctl queue} (retry, hold, release, bounce, flush)
        through inotify on C{messages/}: each is re-read and rescheduled.  The runner's own
        writes happen while it holds the message (L{busy}) and are ignored.
        """
        try:
            from twisted.internet import inotify

            self._notifier = inotify.INotify(self._reactor())
            self._notifier.startReading()
            self._notifier.watch(FilePath(os.fsencode(self.files.messages)), inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
                                 callbacks=[self._heard])
        except Exception as e:  # (no inotify: changes are seen by the scans, or when the message is due)
            log.warn("queue: cannot watch {path} ({error}); pymaildctl changes take effect within {minutes:g} "
                     "minutes", path=str(self.files.messages), error=e, minutes=HORIZON / 60)
            self._notifier = None

    def _reactor(self):
        from twisted.internet import reactor

        return reactor

    def _heard(self, watch, path, mask) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not name.endswith(".json") or not self._started:
            return
        id = name[:-5]
        if id in self.busy:
            return
        # re-read one at a time per message, in the order heard (a hold then a release must
        # not be applied the other way round)
        previous = self._rereads.get(id)
        d = Deferred()
        self._rereads[id] = d
        d.addBoth(lambda _: self.run(self.files.load, id))
        d.addBoth(self._rereadDone, id, d)
        if previous is None:
            d.callback(None)
        else:
            previous.addBoth(lambda _: d.callback(None))

        def reread(envelope):
            if id in self.busy:
                return
            if envelope.held:
                self.forget(id)
            else:
                due = envelope.due()
                self.schedule(id, min(due, self.due.get(id, due)) if due is not None else self.clock.seconds())

        d.addCallbacks(reread, lambda f: f.trap(KeyError, CorruptEnvelope, FileNotFoundError))
        d.addErrback(lambda f: log.failure("queue: re-reading {id}", f, id=id))

    def _rereadDone(self, result, id, d):
        if self._rereads.get(id) is d:
            del self._rereads[id]
        return result

    # --- scheduling -----------------------------------------------------------------------

    def add(self, id: str, due: float | None = None) -> None:
        """A message just queued (or changed): try it at C{due} (now by default)."""
        self.schedule(id, self.clock.seconds() if due is None else due)

    def schedule(self, id: str, due: float) -> None:
        """
        Try C{id} at C{due}.  Due at or after the L{horizon} it is forgotten instead: its
        envelope's mtime carries that time, or an earlier one (the runner's own writes date it
        with its next due time, pymaildctl's too), and the scan that moves the horizon past it
        puts it back in the heap before it is due.
        """
        if self._touched is not None:
            self._touched.add(id)
        if due >= self.horizon:
            self.due.pop(id, None)
            return
        self.due[id] = due
        heapq.heappush(self.heap, (due, id))
        self._arm()

    def forget(self, id: str) -> None:
        """Not to be tried (held): its envelope says so to the scans too (L{files.UNSCHEDULED})."""
        if self._touched is not None:
            self._touched.add(id)
        self.due.pop(id, None)

    def _arm(self) -> None:
        if not self._started:
            return
        while self.heap and self.due.get(self.heap[0][1]) != self.heap[0][0]:
            heapq.heappop(self.heap)  # stale
        if not self.heap:
            return
        delay = max(0.0, self.heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self.heap and self.heap[0][0] <= now and len(self.busy) < self.maxInFlight:
            due, id = heapq.heappop(self.heap)
            if self.due.get(id) != due:
                continue  # stale
            if id in self.busy:
                self._passedOver.add(id)  # (being tried: put back in the heap when that ends)
                continue
            del self.due[id]
            self.attempts[id] = d = self._attempt(id)
            d.addBoth(lambda _, id=id: self.attempts.pop(id, None) and None)
        if self.heap and len(self.busy) >= self.maxInFlight:
            return  # (an attempt that ends re-arms)
        self._arm()

    def flush(self) -> Deferred:
        """
        Everything queued (and not held) is due now: what is in memory at once, the rest once
        a scan of the queue directory (in a thread) has found it.  A Deferred that fires then.
        """
        now = self.clock.seconds()
        for id in list(self.due):
            self.schedule(id, now)

        def found(entries):
            now = self.clock.seconds()
            for id, due in entries:
                if due is not None and id not in self.due and id not in self.busy:
                    self.schedule(id, now)

        return self.run(lambda: list(self.files.schedule())).addCallback(found)

    # --- one message ----------------------------------------------------------------------

    def _open(self, id):
        lock = self.files.lock(id)
        lock.__enter__()
        try:
            return lock, self.files.load(id, locked=True)
        except BaseException:
            lock.__exit__()
            raise

    @inlineCallbacks
    def _attempt(self, id: str):
        self.busy.add(id)
        self._opening += 1
        try:
            try:
                try:
                    lock, envelope = yield self.run(self._open, id)
                finally:
                    self._opening -= 1
            except Busy:
                self._unparkIfNothingComes()
                self.schedule(id, self.clock.seconds() + BUSY_WAIT)  # pymaildctl is editing it (briefly)
                return
            except (KeyError, FileNotFoundError):
                self._unparkIfNothingComes()
                return  # delivered, deleted meanwhile
            except CorruptEnvelope as e:
                self._unparkIfNothingComes()
                yield self.run(self.files.quarantine, id, str(e))
                return
            try:
                delivering = self._deliver(envelope, lock)  # (its jobs are handed out now)
                self._unparkIfNothingComes()
                yield delivering
            finally:
                if lock.fd is not None:
                    # (in a thread: closing the last descriptor of a removed file frees its inode)
                    yield self.run(lock.__exit__)
        except Exception:
            log.failure("queue: attempt on {id}", id=id)
            self.schedule(id, self.clock.seconds() + self.policy.minBackoff)
        finally:
            self.busy.discard(id)
            if id in self._passedOver:  # (it came up in the heap while this attempt ran)
                self._passedOver.discard(id)
                if id in self.due:
                    heapq.heappush(self.heap, (self.due[id], id))
            self._arm()

    def _unparkIfNothingComes(self) -> None:
        """No envelope is being read any more: connections waiting for a job QUIT now."""
        if not self._opening:
            self._unparkAll()

    def _unparkAll(self) -> None:
        """Every connection waiting for a job goes on (it QUITs when none is there)."""
        for destination in list(self.destinations.values()):
            for session in list(destination.parked):
                session.unpark()

    @inlineCallbacks
    def _deliver(self, envelope: Envelope, lock=None):
        if envelope.held:
            # (due only when its envelope was not dated as held, by an older pymaild: dated now,
            # the scans pass it over)
            yield self._save(envelope)
            return
        now = self.clock.seconds()
        groups: dict[str, list] = {}
        postponed = False
        for recipient in envelope.pending():
            if recipient.next_attempt <= now:
                key = "[relay]" if self.policy.relayHost else recipient.domain
                destination = self.destinations.get(key)
                if destination is not None and len(destination.jobs) >= self.policy.perDestination * SATURATED:
                    # a slow destination with a long line already: this message does not wait
                    # in it holding one of the in-flight places (no attempt counted)
                    recipient.next_attempt = now + SATURATED_WAIT
                    postponed = True
                    continue
                groups.setdefault(key, []).append(recipient)
        saving = _Saver(self, envelope)
        if postponed:
            saving.save()
        waits = []
        for key, recipients in groups.items():
            job = Job(envelope.id, envelope.sender, recipients, str(self.files.paths(envelope.id)[0]),
                      envelope.size, envelope.body, envelope.smtputf8, envelope.ret, envelope.envid,
                      fd=lock.fd if lock is not None else None)
            d = job.finished
            d.addCallback(self._results, envelope, job)
            # (a message that is now done is removed instead: that records the result)
            d.addCallback(lambda _: None if envelope.finished() else saving.save())
            d.addErrback(lambda f: log.failure("queue: recording a result of {id}", f, id=envelope.id))
            waits.append(d)
            self._addJob(key, job)
        if waits:
            yield defer.DeferredList(waits)
        yield self._report(envelope)
        if envelope.finished():
            yield self._remover.remove(envelope.id, lock)
            log.info("queue: {id} done", id=envelope.id)
            return
        yield saving.save()
        due = envelope.due()
        if due is None:  # only a report is owed (its delivery failed): try that again later
            due = self.clock.seconds() + self.policy.minBackoff
        self.schedule(envelope.id, due)

    def _save(self, envelope: Envelope):
        data = envelope.toJSON()  # (here, on the reactor: the thread only writes)
        return self.run(self.files.writeEnvelope, envelope.id, data, dueStamp(envelope))


    def _results(self, results, envelope: Envelope, job: Job) -> None:
        now = self.clock.seconds()
        byAddress = {}
        for address, code, reply in results:
            byAddress.setdefault(address, (code, reply))
        for recipient in job.recipients:
            code, reply = byAddress.get(recipient.address, (-1, "no result"))
            if code < 0 and self.stopping:
                continue  # (not tried, or cut off: still due at the next start)
            recipient.last_attempt = now
            recipient.attempts += 1
            recipient.remote_mta = job.remoteMta
            recipient.reply = reply if code < 0 else f"{code} {reply}"
            if 200 <= code < 300:
                recipient.state = DELIVERED
                recipient.status = _status(code, reply, False)
                # NOTIFY=SUCCESS: a server with DSN got the request and reports itself
                recipient.reported = not (recipient.wants("SUCCESS") and not job.remoteDSN)
                log.info("queue: {id} to <{rcpt}> delivered via {mta}: {reply}", id=envelope.id,
                         rcpt=recipient.address, mta=job.remoteMta, reply=recipient.reply)
                self._event("delivered", envelope, recipient)
            elif code >= 500:
                recipient.state = FAILED
                recipient.status = _status(code, reply, False)
                recipient.reported = not recipient.wants("FAILURE") or not envelope.sender
                log.info("queue: {id} to <{rcpt}> failed: {reply}", id=envelope.id, rcpt=recipient.address,
                         reply=recipient.reply)
                self._event("bounced", envelope, recipient)
            else:
                recipient.status = _status(code, reply, True)
                retry = now + self.policy.backoff(recipient.attempts)
                if retry > envelope.arrival + self.policy.maxLifetime:
                    recipient.state = FAILED
                    recipient.reply = f"message expired after {_days(now - envelope.arrival)}: {recipient.reply}"
                    recipient.reported = not recipient.wants("FAILURE") or not envelope.sender
                    log.info("queue: {id} to <{rcpt}> expired: {reply}", id=envelope.id, rcpt=recipient.address,
                             reply=recipient.reply)
                    self._event("bounced", envelope, recipient)
                else:
                    recipient.next_attempt = retry
                    log.info("queue: {id} to <{rcpt}> deferred until {when}: {reply}", id=envelope.id,
                             rcpt=recipient.address, when=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(retry)),
                             reply=recipient.reply)
                    self._event("deferred", envelope, recipient)

    #: C{onEvent(QueueEvent)}: told of each recipient's result (the plugins' queue stage)
    onEvent = None

    def _event(self, kind: str, envelope: Envelope, recipient) -> None:
        if self.onEvent is not None:
            try:
                self.onEvent(QueueEvent(kind, envelope.id, envelope.sender, recipient.address, recipient.reply or ""))
            except Exception:
                log.failure("queue: reporting a {kind} event", kind=kind)

    # --- DSNs -----------------------------------------------------------------------------

    @inlineCallbacks
    def _report(self, envelope: Envelope):
        """Send the DSNs that are owed: failures (and successes asked for), then a delay warning."""
        now = self.clock.seconds()
        owed = [r for r in envelope.recipients if r.state != PENDING and not r.reported]
        if owed and envelope.sender:
            try:
                yield self._sendDSN(envelope, owed, now)
            except Exception:
                log.failure("queue: DSN for {id} not delivered (tried again later)", id=envelope.id)
                return
        for r in owed:
            r.reported = True
        warn = self.policy.delayWarning
        if (warn and not envelope.warned and envelope.sender and now - envelope.arrival >= warn):
            delayed = [r for r in envelope.pending() if r.wants("DELAY")]
            if delayed:
                try:
                    yield self._sendDSN(envelope, delayed, now, delayed=True)
                except Exception:
                    log.failure("queue: delay warning for {id} not delivered", id=envelope.id)
                    return
            envelope.warned = True

    @inlineCallbacks
    def _sendDSN(self, envelope: Envelope, recipients, now: float, delayed: bool = False):
        reports = []
        for r in recipients:
            if delayed:
                action = "delayed"
            elif r.state == DELIVERED:
                action = "relayed"
            else:
                action = "failed"
            reports.append(dsnmod.RecipientReport(
                address=r.address, action=action, status=r.status or ("4.0.0" if delayed else "5.0.0"),
                original=r.orcpt, remoteMta=r.remote_mta, diagnostic=r.reply, lastAttempt=r.last_attempt,
                willRetryUntil=envelope.arrival + self.policy.maxLifetime if delayed else None))
        path = self.files.tmp / f"{envelope.id}.dsn.{int(now)}"
        messageId = f"{envelope.id}.{int(now)}.dsn@{self.hostname}"

        def write():
            with open(path, "wb") as out, self.files.open(envelope.id) as original:
                dsnmod.writeDSN(out, reportingMta=self.hostname, sender=envelope.sender, recipients=reports,
                                original=original, ret=envelope.ret, envid=envelope.envid,
                                arrival=envelope.arrival, now=now, messageId=messageId)

        yield self.run(write)
        try:
            yield self.bounce(path, envelope.sender)
            log.info("queue: {id}: {kind} report sent to <{sender}>", id=envelope.id,
                     kind="delay" if delayed else "delivery", sender=envelope.sender)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # --- destinations and connections -----------------------------------------------------

    def _addJob(self, key: str, job: Job) -> None:
        destination = self.destinations.get(key)
        if destination is None:
            destination = self.destinations[key] = Destination(key)
        destination.jobs.append(job)
        if destination.parked:
            next(iter(destination.parked)).unpark()  # (it takes the job)
        self._startWorkers(destination)

    def _startWorkers(self, destination: Destination) -> None:
        while (destination.jobs and destination.workers < self.policy.perDestination
               and destination.workers < len(destination.jobs)):
            if self.active >= self.policy.connections:
                if destination not in self.waiting:
                    self.waiting.append(destination)
                self._unparkAll()  # (their places are wanted: they QUIT)
                return
            destination.workers += 1
            self.active += 1
            d = self._work(destination)
            if not d.called:
                self.working.add(d)
                d.addBoth(lambda _, d=d: self.working.discard(d))

    def _route(self, destination: Destination):
        if self.policy.relayHost:
            host, port = self.policy.relayHost
            name = host if not _isAddress(host) else f"[{host}]"
        else:
            name, port = destination.key, self.policy.remotePort
        shuffle = getattr(self.resolver, "shuffle", None)
        cached = self._routes.get(name)
        now = self.clock.seconds()
        if cached is not None and cached[0] > now:
            return defer.succeed([(h, port) for h in _reshuffle(cached[1], shuffle)])
        # The connection loops a destination starts together share one lookup, instead of each
        # asking DNS for the MX and its addresses (queue_bench, 10 domains: 42-60 queries ->
        # 30); each gets its own Deferred, and the lookup is cancelled only when every one of
        # them is.
        lookup = self._resolving.get(name)
        fresh = lookup is None
        if fresh:
            lookup = self._resolving[name] = (self.resolver.resolve(name), [])

            def answered(result):
                if self._resolving.get(name) is lookup:
                    del self._resolving[name]
                if not isinstance(result, Failure):
                    # (kept briefly: the connection loops of a busy destination do not each ask DNS)
                    if len(self._routes) > 10000:
                        self._routes.clear()
                    self._routes[name] = (self.clock.seconds() + ROUTE_CACHE, result)
                for i, waiter in enumerate(list(lookup[1])):
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback([(h, port) for h in (result if i == 0 else _reshuffle(result, shuffle))])

        def cancel(waiter):
            waiting = lookup[1]
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                lookup[0].cancel()  # (answered then, with nobody left to tell)

        waiter = Deferred(cancel)
        lookup[1].append(waiter)
        if fresh:  # (after the first waiter is in the list: a literal address answers at once)
            lookup[0].addBoth(answered)
        return waiter

    @inlineCallbacks
    def _work(self, destination: Destination):
        try:
            try:
                hosts = yield self._route(destination)
            except DNSProblem as problem:
                code = 450 if problem.temporary else 550
                self._failQueued(destination, code, f"{problem.status} {problem.text}")
                return
            last = (-1, f"no mail host for {destination.key} answered")
            worked = False  # a session carried a transaction: the destination is alive
            for host, port in hosts:
                for address in host.addresses:
                    if not destination.jobs:
                        return
                    tls = self._tlsFor(host.name)
                    while True:
                        session = _Session(destination, host.name, self)
                        client = QueueClient(session, self.hostname, tls, self._requireTLS(),
                                             *self._credentials(), timeout=self.policy.commandTimeout)
                        try:
                            yield self._connect(host.name, address, port, client)
                        except Exception as e:
                            last = (-1, f"connect to {host.name}[{address}]:{port}: {_reason(e)}")
                            log.info("queue: {what}", what=last[1])
                            break
                        self.clients.add(client)
                        try:
                            yield session.ended
                        finally:
                            self.clients.discard(client)
                        if session.failure is None or client.transactions:
                            worked = True
                            return  # (done; if jobs came meanwhile, the finally starts a loop for them)
                        # (refused before any transaction - greeting, EHLO, STARTTLS, AUTH -:
                        # temporary whatever the code, as Postfix has it; the next host may do)
                        code, reply = session.failure
                        last = (-1, f"{host.name}[{address}] said: {code} {reply}" if code > 0 else reply)
                        log.info("queue: session with {host}[{address}] failed: {reply}", host=host.name,
                                 address=address, reply=reply)
                        if not (client.tlsFailed and tls is not None and not self._requireTLS()
                                and destination.jobs):
                            break
                        # opportunistic TLS whose handshake failed: the same server in plain
                        # text (RFC 7435 3; as Postfix does at its "may" level)
                        log.info("queue: TLS with {host}[{address}] failed; trying again without TLS",
                                 host=host.name, address=address)
                        tls = None
            # every address tried and none took a message: the destination is down for now;
            # what waits for it is deferred (not handed to another loop, which would try the
            # same dead hosts again at once)
            self._failQueued(destination, *last)
        except Exception:
            log.failure("queue: connection to {key}", key=destination.key)
            self._failQueued(destination, -1, "internal error")
        finally:
            destination.workers -= 1
            self.active -= 1
            if not destination.jobs and not destination.workers:
                self.destinations.pop(destination.key, None)
            elif destination.jobs and worked:
                self._startWorkers(destination)
            while self.waiting and self.active < self.policy.connections:
                self._startWorkers(self.waiting.popleft())

    def _failQueued(self, destination: Destination, code: int, reply: str) -> None:
        """Every job waiting for C{destination} gets C{code} (temporary unless 5xx)."""
        jobs, destination.jobs = destination.jobs, deque()
        for job in jobs:
            job.failAll(code, reply)

    def _requireTLS(self) -> bool:
        # (credentials never go over plain text: AUTH needs TLS whatever the policy)
        return self.policy.tls in ("encrypt", "verify") or self.policy.authUser is not None

    def _tlsFor(self, hostName: str):
        if self.tlsOptions is None:
            return None
        return self.tlsOptions(_tlsName(hostName), self.policy.tls == "verify")

    def _credentials(self):
        if self.policy.authUser is None:
            return (None, None)
        return (self.policy.authPassword.encode("utf-8"), self.policy.authUser.encode("utf-8"))

    def _tcpConnect(self, hostName: str, address: str, port: int, protocol):
        from twisted.internet import endpoints, reactor  # (endpoints: ~18 ms of imports, not before the first delivery)

        if ":" in address:
            endpoint = endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=self.policy.connectTimeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=self.policy.connectTimeout)
        if self.policy.relayHost and port == 465 and self.tlsOptions is not None:
            endpoint = endpoints.wrapClientTLS(self._tlsFor(hostName), endpoint)
            protocol._tlsMode = True
        factory = _OneProtocol(protocol)
        return endpoint.connect(factory)


def _trim() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim), where there is one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reshuffle(hosts: list, shuffle) -> list:
    """A cached MX list with each run of equal preferences put in a new random order."""
    if shuffle is None:
        return list(hosts)
    out, run = [], []
    for host in hosts:
        if run and run[0].preference != host.preference:
            shuffle(run)
            out += run
            run = []
        run.append(host)
    shuffle(run)
    return out + run


def _tlsName(hostName: str) -> str:
    """The name a certificate must carry: a domain literal's address without its brackets."""
    if hostName.startswith("[") and hostName.endswith("]"):
        hostName = hostName[1:-1]
        if hostName[:5].lower() == "ipv6:":
            hostName = hostName[5:]
    return hostName


def _isAddress(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def _reason(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, defer.TimeoutError)):
        return "connection timed out"
    return str(e) or type(e).__name__


def _days(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{int(seconds)} seconds"


class _Remover:
    """
    Removes the messages that are done, in batches: one store thread at a time unlinks
    everything handed in meanwhile, syncs the directory once, and releases the messages'
    locks.  A message handed in while a batch runs goes with the next.  (Each done message in
    a store thread of its own had four threads unlinking, closing and syncing in one
    directory at once, mostly waiting for each other's directory fsync: a quarter of the
    store threads' time when the queue was emptied to sinks.)
    """

    def __init__(self, files: QueueFiles, run):
        self.files = files
        self.run = run
        self._pending: list[tuple[str, object, Deferred]] = []
        self._running = False

    def remove(self, id: str, lock=None) -> Deferred:
        """A Deferred that fires once C{id} is removed, durably, and C{lock} released."""
        d = Deferred()
        self._pending.append((id, lock, d))
        if not self._running:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True
        locks = [lock for _, lock, _ in batch if lock is not None]
        self.run(self.files.removeMany, [id for id, _, _ in batch], locks).addBoth(self._done, batch)

    def _done(self, result, batch) -> None:
        self._running = False
        if self._pending:
            self._next()
        for _, _, d in batch:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)


class _Saver:
    """
    The envelope of one attempt written after each result, in order, and coalesced: results
    that come while a write runs are covered by one more write after it (a message to 1,000
    domains is not rewritten 1,000 times).
    """

    def __init__(self, runner: Runner, envelope: Envelope):
        self.runner = runner
        self.envelope = envelope
        self.running = False
        self.current: list[Deferred] = []  # waiting for the write that runs now
        self.next: list[Deferred] = []  # waiting for the write after it

    def save(self) -> Deferred:
        """A Deferred that fires once a write that began after this call has finished."""
        d = Deferred()
        if self.running:
            self.next.append(d)
        else:
            self.current.append(d)
            self._start()
        return d

    def _start(self) -> None:
        self.running = True
        self.runner._save(self.envelope).addBoth(self._done)

    def _done(self, result) -> None:
        waiters, self.current = self.current, []
        self.running = False
        if self.next:
            self.current, self.next = self.next, []
            self._start()
        for d in waiters:
            d.callback(None) if not isinstance(result, Failure) else d.errback(result)


class _OneProtocol(protocol.Factory):
    """The factory of one outbound connection, without Twisted's start/stop log lines."""

    noisy = False

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto
