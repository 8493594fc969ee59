# -*- test-case-name: tests.store.test_summarizer -*-
"""
Message summaries computed in bulk in worker processes.

A folder whose messages were never summarized (mail copied in from another server, a rebuilt
index) makes its first C{FETCH 1:* (ENVELOPE)} parse every message: about 120 us of pure Python
per message of office mail, under the GIL, while the reactor and the store threads wait for
the same core.  L{Summarizer} sends such batches to a few worker processes, so that parsing
runs on every core while the IMAP server writes the previous batch to the client (see
C{pymaild.imap.server}'s C{FETCH_BATCH}).

The same goes for the ENVELOPEs of never-summarized mail that a FETCH of ENVELOPE alone reads
from the messages' headers (L{Summarizer.envelopes}, about 40 us a message), and for SEARCH
TEXT and BODY: reading, screening and decoding every message of a folder (L{Summarizer.texts}).

The workers are plain child processes (L{pymaild.store.summaryworker}) that read
pickled lists of C{(uid, path)} on stdin and write pickled summaries (or envelopes) on stdout,
one request at a time: started at the first IMAP login (L{Summarizer.start}), when a session
opens a large folder (L{Summarizer.warmUp}) or at the first batch that needs them, kept for the
next, gone when their stdin closes (at shutdown, or when the server dies).  Not
C{multiprocessing}: its workers re-import the main module of the server's process, whatever it
is.

Small batches (a new message, a few unread ones) are parsed in the calling thread: handing
them to a process costs more than it saves.  A worker that dies (killed, out of memory) loses
nothing: its piece is parsed in the calling thread and a fresh worker starts next time; a
worker busy for another thread is not waited for either.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.logger import Logger

from pymaild.store.summaryworker import HEADER as _HEADER, KINDS as _KINDS

if TYPE_CHECKING:
    from pymaild.store.summary import MessageSummary

log = Logger()

#: batches smaller than this are parsed in the calling thread
MIN_BATCH = 64
#: seconds L{Summarizer.start} (at each IMAP login) waits after a worker failed to start
START_RETRY = 60.0
#: the least a worker is sent at a time (a batch is cut into one piece per worker and one for
#: the calling thread, which parses too rather than wait)
MIN_PIECE = 16

_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # where this pymaild is imported from


class WorkerDied(Exception):
    pass


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = _SOURCE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pymaild.store.summaryworker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True,
        )

    def send(self, piece: list) -> None:
        data = pickle.dumps(piece, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(_HEADER.pack(len(data)) + data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise WorkerDied(str(e)) from None

    def receive(self) -> list:
        header = self.process.stdout.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise WorkerDied("no answer")
        (size,) = _HEADER.unpack(header)
        data = self.process.stdout.read(size)
        if len(data) < size:
            raise WorkerDied("a cut answer")
        return pickle.loads(data)

    def stop(self) -> None:
        self.closeInput()
        self.reap()

    def closeInput(self) -> None:
        """Tell the worker to exit (at the end of the request it is answering, if any)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def reap(self) -> None:
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class Summarizer:
    """
    @param processes: worker processes (0: parse in the calling thread, always).
    """

    def __init__(self, processes: int = 0):
        self.processes = processes
        self._idle: list[_Worker] = []
        self._started = 0
        self._lock = threading.Lock()
        self._closed = False
        self._retryAt = 0.0  # (monotonic) L{start} starts no worker before this, after a failure

    def summarize(self, paths: dict[int, str]) -> dict[int, tuple[MessageSummary, str] | None]:
        """
        The summaries of the messages at C{paths} (uid -> file path), each with its JSON text
        for the index; None for a file that could not be read (renamed or expunged meanwhile:
        the caller looks again).  Blocking: call it from a store thread.
        """
        return self._map("summary", paths)

    def envelopes(self, paths: dict[int, str]) -> dict[int, tuple[bytes | None, int] | None]:
        """
        The ENVELOPEs of the messages at C{paths} from their headers alone, each with its file's
        mtime (L{pymaild.store.summary.envelopeAndMtime}); None for a file that could not be
        read, an ENVELOPE of None for a header too long for that.  Blocking: call it from a
        store thread.
        """
        return self._map("envelope", paths)

    def headerFields(self, paths: dict[int, str]) -> dict[int, dict[str, str] | None]:
        """
        The header fields SEARCH reads of the messages at C{paths}, from their headers alone
        (L{pymaild.store.summary.headerFieldsPath}); None for a file that could not be read, a
        header too long for that, or one that failed to parse.  Blocking: call it from a store
        thread.
        """
        return self._map("fields", paths)

    def texts(self, items: dict[int, tuple]) -> dict[int, object]:
        """
        For SEARCH TEXT and BODY: C{match(data, parts)} of the messages of C{items} (uid ->
        C{(path, limit, match)}: L{pymaild.store.summaryworker.textAll}); None for a file
        larger than its limit or one that could not be read.  Blocking: call it from a store
        thread.
        """
        return self._map("text", items, paths=False)

    def warmUp(self, messages: int) -> None:
        """
        A session opened a folder of C{messages}: if that is a batch for the workers, start
        those not started yet (L{start}; one that died since the first login).
        """
        if messages >= MIN_BATCH:
            self.start()

    def start(self) -> None:
        """
        Start the workers not started yet, to wait idle for the first batch (an IMAP login:
        its client may soon SELECT a folder never parsed and FETCH its ENVELOPEs, and a
        worker's start, a Python process and the parser's imports, a tenth of a second, would
        hold up that first batch).  Returns at once (the processes start on their own);
        nothing to do when all run.
        """
        self._giveBack(self._startMissing(patient=True))  # (the idle ones stay where a batch finds them)

    def _startMissing(self, patient: bool) -> list[_Worker]:
        """
        The workers not started yet, started (counted in C{_started} first, so that two threads
        do not both start them); C{patient}: none within START_RETRY of a failed start.
        """
        with self._lock:
            missing = self.processes - self._started
            if missing < 1 or self._closed or (patient and time.monotonic() < self._retryAt):
                return []
            self._started += missing
        return [worker for worker in (self._start() for _ in range(missing)) if worker is not None]

    def _start(self) -> _Worker | None:
        """A new worker (counted in C{_started} by the caller), or None (then uncounted)."""
        try:
            return _Worker()
        except OSError as e:
            log.warn("store: cannot start a summary worker process: {error}", error=e)
            with self._lock:
                self._started -= 1
                self._retryAt = time.monotonic() + START_RETRY  # (not again at every login)
            return None

    def _map(self, kind: str, requests: dict, paths: bool = True) -> dict:
        """C{_KINDS[kind]} over C{requests} (uid -> file path, or with C{paths} False uid ->
        the kind's own item), split between the idle workers and this thread."""
        work = _KINDS[kind]
        items = [(uid, str(item) if paths else item) for uid, item in requests.items()]
        if self.processes < 1 or len(items) < MIN_BATCH:
            return dict(work(items))
        workers = self._take()
        if not workers:
            return dict(work(items))
        size = max(MIN_PIECE, -(-len(items) // (len(workers) + 1)))
        pieces = [items[i : i + size] for i in range(0, len(items), size)]
        mine, sent, spare = pieces[0], [], []
        for i, worker in enumerate(workers):
            if i + 1 >= len(pieces):
                spare.append(worker)
                continue
            try:
                worker.send((kind, pieces[i + 1]))
                sent.append((worker, pieces[i + 1]))
            except WorkerDied:
                self._lost(worker)
                mine = mine + pieces[i + 1]
        try:
            out = dict(work(mine))  # this thread parses its share meanwhile
            while sent:
                worker, piece = sent.pop(0)
                try:
                    out.update(worker.receive())
                    spare.append(worker)
                except (WorkerDied, pickle.UnpicklingError, EOFError) as e:
                    log.warn("store: a summary worker process died ({error}); parsing in the server process",
                             error=str(e))
                    self._lost(worker)
                    out.update(work(piece))
        finally:
            for worker, _ in sent:  # (an exception here: their answers would be read by the next batch)
                self._lost(worker)
            self._giveBack(spare)
        return out

    def _take(self) -> list[_Worker]:
        """Every idle worker, starting the missing ones; [] when they are all busy."""
        with self._lock:
            if self._closed:
                return []
            workers, self._idle = self._idle, []
        return workers + self._startMissing(patient=False)

    def _giveBack(self, workers: list[_Worker]) -> None:
        with self._lock:
            if not self._closed:
                self._idle.extend(workers)
                return
        for worker in workers:
            worker.stop()

    def _lost(self, worker: _Worker) -> None:
        with self._lock:
            self._started -= 1
        try:
            worker.process.kill()
        except OSError:
            pass
        worker.process.wait()

    def pids(self) -> list[int]:
        """The idle workers' process ids (for tests and monitoring)."""
        with self._lock:
            return [w.process.pid for w in self._idle]

    def close(self) -> None:
        """Stop the workers (at shutdown); busy ones stop when their batch ends."""
        with self._lock:
            self._closed = True
            workers, self._idle = self._idle, []
        for worker in workers:  # all told first, then waited for: shutdown waits at most once
            worker.closeInput()
        for worker in workers:
            worker.reap()
