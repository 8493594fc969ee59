# -*- test-case-name: tests.queue.test_queue_files -*-
"""
The outbound queue on disk: one message file and one JSON envelope per message, under
C{<data_dir>/queue/}, readable with C{ls} and C{cat}:

    queue/tmp/          files being written (what is here at start-up was never acknowledged)
    queue/messages/     ID.eml (the message, LF line ends, as the store keeps messages)
                        ID.json (the envelope: sender, every recipient with its own state)
    queue/corrupt/      files that could not be read, moved aside (logged, never retried)

A message is in the queue when its C{ID.json} is in C{messages/}: L{QueueFiles.prepare} writes
and fsyncs both files in C{tmp/}, L{Prepared.commit} renames the message and then the envelope
into C{messages/} and fsyncs that directory, and only then does SMTP answer C{250}.  A crash
before the envelope's rename leaves at most an C{ID.eml} without envelope, which
L{QueueFiles.recover} removes (its sender was not told it was accepted, and sends it again).

Every change of state rewrites the envelope atomically (L{QueueFiles.writeEnvelope}: a
temporary file, fsynced, renamed over C{ID.json}, the directory fsynced); a message whose
recipients are all delivered or failed (and reported) is removed: the envelope first, then the
message file.

An envelope file's mtime is the message's next due time (L{dueStamp}, as Postfix dates its
deferred queue files), set on the temporary file before its fsync and rename, so the durable
file carries it: the runner learns what is due from a directory scan and C{stat}, without
reading 100,000 envelopes (L{QueueFiles.schedule}).  A held message's envelope is dated
L{UNSCHEDULED} (2100-01-01), which the scan reads as "not scheduled"; new mail (next attempt
0) and a message with nothing pending (a report still owed) are dated 1970-01-01: due at
once.  An envelope written otherwise (by an older pymaild, or by hand) is dated when it was
written, a time already past: that message is tried at once, which is harmless, as the runner
reads the envelope before it does anything, goes by what it says, and writes it back dated.

Idle cost: nothing in memory per message here; a scan is one C{stat} a message (about 0.5 s
of CPU for 100,000).

Whoever changes a message holds an exclusive C{flock} on its C{ID.eml} (the runner while it
delivers and updates it, C{pymaildctl queue} while it edits it), so the server and the admin
tool never overwrite each other's changes.

Envelope fields (C{version} 1): C{id}, C{sender} (C{""} for the null sender), C{arrival},
C{size} (octets as sent, with CRLF line ends), C{body} (C{"7BIT"}, C{"8BITMIME"}, C{"BINARYMIME"} or null), C{smtputf8}, C{ret}
(C{"FULL"}, C{"HDRS"} or null), C{envid}, C{held}, C{warned} (delay warning sent), C{client}
(who handed it to us, for logs), and C{recipients}: a list of objects with C{address},
C{orcpt}, C{notify} (a list of C{"SUCCESS"}, C{"FAILURE"}, C{"DELAY"}, or C{["NEVER"]}; null
when the sender did not say), C{state} (C{"pending"}, C{"delivered"}, C{"failed"}),
C{attempts}, C{next_attempt}, C{last_attempt}, C{status} (enhanced code), C{reply} (the last
remote reply or local reason), C{remote_mta}, C{reported} (a DSN was sent or is not wanted).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Iterator

from twisted.logger import Logger

from pymaild.durable import atomicWrite, fsyncDirectory, syncDirectory, writeNew

log = Logger()

VERSION = 1
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY", "NEVER"}


#: the mtime (nanoseconds) of the envelope of a held message, read as "not scheduled": 2100-01-01
#: 00:00:00 UTC, far beyond any due time and well within what ext4 (256-byte inodes, to 2446),
#: XFS with bigtime, btrfs and tmpfs store.  (A file system that clamps it to 2038 makes it an
#: ordinary date in 2038: the message would be read then, found held, and left alone.)
UNSCHEDULED = 4102444800 * 1_000_000_000


def dueStamp(envelope: Envelope) -> int:
    """
    The mtime (nanoseconds) that C{envelope}'s file carries: its next due time to the nearest
    nanosecond (read back, divided by 10**9, it is the same float for any time since 1970-04:
    a float of such a time is coarser than a nanosecond), L{UNSCHEDULED} when it is held, 0
    (due at once) when nothing is pending.  (A file system with coarser time stamps dates it
    a little earlier: the message is read a moment early, finds nothing due, and is
    rescheduled from its envelope.)
    """
    if envelope.held:
        return UNSCHEDULED
    due = envelope.due()
    if due is None or due <= 0:
        return 0
    seconds = math.floor(due)
    return min(seconds * 1_000_000_000 + round((due - seconds) * 1e9), UNSCHEDULED - 1_000_000_000)


class CorruptEnvelope(Exception):
    """An envelope file that cannot be read or makes no sense."""


class Busy(Exception):
    """Someone else (the runner, or another C{pymaildctl}) holds the message's lock."""


@dataclass
class Recipient:
    address: str
    orcpt: str | None = None
    notify: list[str] | None = None
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    status: str | None = None
    reply: str | None = None
    remote_mta: str | None = None
    reported: bool = False

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def wants(self, what: str) -> bool:
        """
        Whether the sender asked for (or, with no NOTIFY, gets by default) a DSN of kind
        C{what} (C{"FAILURE"}, C{"DELAY"}, C{"SUCCESS"}) for this recipient (RFC 3461 4.1).
        """
        if self.notify is None:
            return what in ("FAILURE", "DELAY")
        return what in self.notify


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[Recipient]
    arrival: float = field(default_factory=time.time)
    size: int = 0
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    held: bool = False
    warned: bool = False
    client: dict = field(default_factory=dict)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def due(self) -> float | None:
        """When the next attempt is due (None: nothing left to try)."""
        times = [r.next_attempt for r in self.recipients if r.state == PENDING]
        return min(times) if times else None

    def finished(self) -> bool:
        """Nothing left to try and every failure reported: the message can go."""
        return all(r.state != PENDING and (r.state != FAILED or r.reported) for r in self.recipients)

    def toJSON(self) -> bytes:
        data = asdict(self)
        data["version"] = VERSION
        return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def fromJSON(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.pop("version", None) != VERSION:
                raise CorruptEnvelope("not a version 1 envelope")
            known = {f.name for f in fields(Recipient)}
            recipients = []
            for r in raw.pop("recipients"):
                if not isinstance(r, dict) or set(r) - known or not isinstance(r.get("address"), str):
                    raise CorruptEnvelope(f"bad recipient {r!r}")
                recipient = Recipient(**r)
                if recipient.state not in (PENDING, DELIVERED, FAILED):
                    raise CorruptEnvelope(f"bad state {recipient.state!r}")
                if recipient.notify is not None and not set(recipient.notify) <= _NOTIFY:
                    raise CorruptEnvelope(f"bad NOTIFY {recipient.notify!r}")
                if not isinstance(recipient.next_attempt, (int, float)) or not isinstance(recipient.attempts, int) \
                        or not isinstance(recipient.reported, bool):
                    raise CorruptEnvelope("bad next_attempt, attempts or reported")
                recipients.append(recipient)
            known = {f.name for f in fields(cls)} - {"recipients"}
            if set(raw) - known:
                raise CorruptEnvelope(f"unknown fields {sorted(set(raw) - known)}")
            envelope = cls(recipients=recipients, **raw)
            if not isinstance(envelope.id, str) or not isinstance(envelope.sender, str) or not recipients:
                raise CorruptEnvelope("id, sender or recipients missing")
            if not isinstance(envelope.arrival, (int, float)) or not isinstance(envelope.size, int) \
                    or not isinstance(envelope.held, bool) or not isinstance(envelope.client, dict):
                raise CorruptEnvelope("bad arrival, size, held or client")
            return envelope
        except CorruptEnvelope:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptEnvelope(str(e)) from None


def _validId(name: str) -> bool:
    return 8 <= len(name) <= 40 and name.isalnum() and name.isascii()


def newId() -> str:
    """A queue ID: time-ordered (so C{ls} lists in arrival order) and unique."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(3).upper()}"


class Prepared:
    """
    A message written to C{tmp/} and fsynced, not yet in the queue: L{commit} or L{abort}.
    """

    def __init__(self, queue: QueueFiles, envelope: Envelope, message: Path, envelopeFile: Path):
        self.queue = queue
        self.envelope = envelope
        self._message = message
        self._envelopeFile = envelopeFile
        self.done = False

    @property
    def id(self) -> str:
        return self.envelope.id

    def commit(self) -> None:
        """Into C{messages/}, durably: after this returns the message will be delivered."""
        eml, env = self.queue.paths(self.id)
        os.rename(self._message, eml)
        os.rename(self._envelopeFile, env)
        self.done = True
        syncDirectory(self.queue.messages)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        for path in (self._envelopeFile, self._message):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class MessageLock:
    """
    An exclusive C{flock} on a message's C{ID.eml}; a context manager.  Non-blocking unless a
    C{wait} (seconds) is given; L{Busy} when someone else holds it, C{FileNotFoundError} when
    the message is gone.
    """

    def __init__(self, path: Path, wait: float = 0.0):
        self.path = path
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> MessageLock:
        fd = os.open(self.path, os.O_RDONLY)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Busy(self.path.stem) from None
                time.sleep(0.05)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # (closing releases the lock)
            self.fd = None


class QueueFiles:
    """
    The queue directory.  Every method blocks on the disk: call them in a thread.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.messages = self.root / "messages"
        self.corrupt = self.root / "corrupt"

    def create(self) -> None:
        for d in (self.root, self.tmp, self.messages, self.corrupt):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def paths(self, id: str) -> tuple[Path, Path]:
        if not _validId(id):
            raise KeyError(id)
        return self.messages / f"{id}.eml", self.messages / f"{id}.json"

    # --- writing ------------------------------------------------------------------------

    def prepare(self, source: bytes | Path | str | BinaryIO, envelope: Envelope, skip: int = 0) -> Prepared:
        """
        Write the message (bytes, a path or an open file; without its first C{skip} bytes) and
        its envelope into C{tmp/}, both fsynced.  The envelope's C{id} is chosen here if it is
        empty or already taken.
        """
        if not envelope.id or not _validId(envelope.id) or self.paths(envelope.id)[1].exists():
            envelope.id = newId()
        message = self.tmp / f"{envelope.id}.eml"
        try:
            fd = os.open(message, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            envelope.id = newId()
            message = self.tmp / f"{envelope.id}.eml"
            fd = os.open(message, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        envelopeFile = self.tmp / f"{envelope.id}.json"
        try:
            size = 0
            for chunk in _chunks(source):
                view = memoryview(chunk)
                if skip:
                    dropped = min(skip, len(view))
                    view, skip = view[dropped:], skip - dropped
                size += len(view) + view.tobytes().count(b"\n")  # (as sent: CRLF line ends)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
            envelope.size = size
            writeNew(envelopeFile, envelope.toJSON(), dueStamp(envelope))
        except BaseException:
            os.close(fd)
            for path in (message, envelopeFile):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        os.close(fd)
        return Prepared(self, envelope, message, envelopeFile)

    def enqueue(self, source, envelope: Envelope) -> str:
        """L{prepare} and commit at once; the ID."""
        prepared = self.prepare(source, envelope)
        try:
            prepared.commit()
        except BaseException:
            prepared.abort()
            raise
        return prepared.id

    def save(self, envelope: Envelope) -> None:
        """Replace the envelope on disk (the caller holds the message's lock)."""
        self.writeEnvelope(envelope.id, envelope.toJSON(), dueStamp(envelope))

    def writeEnvelope(self, id: str, data: bytes, stamp: int) -> None:
        """
        Replace the envelope of C{id} with C{data} (L{Envelope.toJSON}) dated C{stamp}
        (L{dueStamp}), durably: a temporary file in C{tmp/}, dated and fsynced, renamed over
        C{ID.json}, then C{messages/} fsynced.  Readers see the old envelope or the new one,
        each with its own date.  (The runner makes C{data} and C{stamp} on the reactor and
        calls this in a thread.)
        """
        atomicWrite(self.paths(id)[1], data, self.tmp, mtimeNs=stamp)

    def remove(self, id: str) -> None:
        """The message is done: envelope first (then it is no longer queued), then the file."""
        self.removeMany([id])

    def removeMany(self, ids: list[str], locks=()) -> None:
        """
        L{remove} for several messages with one directory fsync; then each of C{locks} (their
        L{MessageLock}s) is released, which frees the inodes.
        """
        pairs = [self.paths(id) for id in ids]
        for eml, env in pairs:
            try:
                os.unlink(env)
            except FileNotFoundError:
                pass
        for eml, env in pairs:
            try:
                os.unlink(eml)
            except FileNotFoundError:
                pass
        syncDirectory(self.messages)
        for lock in locks:
            lock.__exit__()

    # --- reading ------------------------------------------------------------------------

    def load(self, id: str, locked: bool = False) -> Envelope:
        """
        The envelope of C{id}.  C{KeyError} when it is not queued; L{CorruptEnvelope} when it
        cannot be read, or its message file is missing (not looked for when C{locked}: the
        caller's L{MessageLock} has the file open).
        """
        eml, env = self.paths(id)
        try:
            data = env.read_bytes()
        except FileNotFoundError:
            raise KeyError(id) from None
        envelope = Envelope.fromJSON(data)
        if envelope.id != id:
            raise CorruptEnvelope(f"envelope names {envelope.id!r}")
        if not locked and not eml.exists():
            raise CorruptEnvelope("message file missing")
        return envelope

    def open(self, id: str) -> BinaryIO:
        return open(self.paths(id)[0], "rb")

    def lock(self, id: str, wait: float = 0.0) -> MessageLock:
        return MessageLock(self.paths(id)[0], wait)

    def ids(self) -> list[str]:
        """The IDs of every queued message (those with an envelope), oldest first."""
        out = []
        for name in os.listdir(self.messages):
            if name.endswith(".json") and _validId(name[:-5]):
                out.append(name[:-5])
        out.sort()
        return out

    def schedule(self) -> Iterator[tuple[str, float | None]]:
        """
        C{(id, due)} of every queued message, in no order, C{due} None when it is held: what the
        runner needs, from one directory scan and a C{stat} a message, without reading any
        envelope (the due time is the envelope's mtime, L{dueStamp}; 100,000 messages in about
        0.5 s of CPU).  A damaged envelope is found when it is due and read (L{load}).
        """
        with os.scandir(self.messages) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(".json") or not _validId(name[:-5]):
                    continue
                try:
                    stamp = entry.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue  # (delivered or deleted meanwhile)
                yield name[:-5], None if stamp >= UNSCHEDULED else stamp / 1_000_000_000

    def scan(self) -> Iterator[Envelope]:
        """Every readable envelope; damaged ones are moved to C{corrupt/} on the way."""
        for id in self.ids():
            try:
                yield self.load(id)
            except KeyError:
                continue  # (delivered or deleted meanwhile)
            except CorruptEnvelope as e:
                self.quarantine(id, str(e))

    def quarantine(self, id: str, why: str) -> None:
        """Move a damaged message's files to C{corrupt/}; it is never tried again."""
        log.error("queue: {id} is damaged ({why}); moved to {where}", id=id, why=why, where=str(self.corrupt))
        for path in self.paths(id):
            try:
                os.rename(path, self.corrupt / path.name)
            except FileNotFoundError:
                pass
        fsyncDirectory(self.messages)

    def recover(self) -> int:
        """
        At start-up, before anything can be queued: empty C{tmp/}, remove message files that
        never got their envelope (their sender was never told they were accepted), move
        anything else that is not a message and its envelope to C{corrupt/}.  The number of
        messages queued.
        """
        self.create()
        for name in os.listdir(self.tmp):
            _removeQuietly(self.tmp / name)
        # (os.scandir's types come from the directory itself: no stat of 200,000 names)
        entries = {e.name: e.is_file(follow_symlinks=False) for e in os.scandir(self.messages)}
        count = 0
        for name, isFile in entries.items():
            # (no Path per name unless it has to go: building 200,000 of them was half the time)
            stem, dot, ext = name.rpartition(".")
            valid = isFile and ext in ("eml", "json") and _validId(stem)
            if valid and ext == "json":
                if entries.get(stem + ".eml"):  # (a message file, not something else by that name)
                    count += 1
                else:
                    self.quarantine(stem, "message file missing")
            elif valid:
                if not entries.get(stem + ".json"):
                    log.info("queue: removing {name}, which never got its envelope", name=name)
                    _removeQuietly(self.messages / name)
            else:
                log.error("queue: {name} is not a queue file; moved to {where}", name=name, where=str(self.corrupt))
                try:
                    os.rename(self.messages / name, self.corrupt / name)
                except OSError as e:
                    log.error("queue: cannot move {name}: {error}", name=name, error=e)
        fsyncDirectory(self.messages)
        return count


def _removeQuietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("queue: cannot remove {path}: {error}", path=str(path), error=e)


def _chunks(source, size: int = 1 << 16):
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield source
        return
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            yield from iter(lambda: f.read(size), b"")
        return
    yield from iter(lambda: source.read(size), b"")
