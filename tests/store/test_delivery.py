"""
Maildir delivery: tmp/ -> new/ (or cur/), LF line ends, sizes in the file name, and nothing
half-written ever visible.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import pytest

from pymaild.store.delivery import FileName, deliver, infoName


@pytest.fixture
def maildir(tmp_path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    return tmp_path


def test_crlf_is_stored_as_lf_with_both_sizes(maildir):
    """
    CRLF becomes LF on disk; ,S= is the size on disk and ,W= the size with CRLF (RFC822.SIZE).
    """
    message = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
    d = deliver(maildir, message)
    assert d.path.parent == maildir / "new"
    assert d.path.read_bytes() == message.replace(b"\r\n", b"\n")
    fn = FileName.parse(d.path.name)
    assert fn.size == len(message) - 4 == d.size
    assert fn.vsize == len(message) == d.vsize
    assert list((maildir / "tmp").iterdir()) == []


def test_flags_go_to_cur_sorted(maildir):
    """
    With flag letters the file lands in cur/ with a sorted :2, suffix.
    """
    d = deliver(maildir, b"x\n", letters="SFa")
    assert d.path.parent == maildir / "cur"
    assert d.path.name.endswith(":2,FSa")
    assert FileName.parse(d.path.name).letters == "FSa"


def test_internal_date_is_the_mtime(maildir):
    """
    The internal date given is the file's modification time.
    """
    d = deliver(maildir, b"x\n", internalDate=1_000_000_000)
    assert d.path.stat().st_mtime == 1_000_000_000


class Trickle(io.RawIOBase):
    """
    A source that hands out a few bytes per read, splitting CR from LF.
    """

    def __init__(self, data: bytes, step: int):
        self.data, self.step = data, step

    def readable(self):
        return True

    def read(self, n=-1):
        chunk, self.data = self.data[: self.step], self.data[self.step :]
        return chunk


@pytest.mark.parametrize("step", [1, 2, 3, 7, 65536])
def test_streamed_source_with_crlf_split_across_reads(maildir, step):
    """
    CRLF split across two reads is still one LF; a lone CR stays a CR.
    """
    message = b"A: b\r\n\r\nx\ry\r\n" * 50
    d = deliver(maildir, Trickle(message, step))
    assert d.path.read_bytes() == message.replace(b"\r\n", b"\n")
    assert d.vsize == len(message)


def test_failing_source_leaves_nothing(maildir):
    """
    A source that fails halfway: no file in tmp/, new/ or cur/.
    """

    class Broken(io.RawIOBase):
        calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 2:
                raise OSError("connection lost")
            return b"x" * 100

    with pytest.raises(OSError, match="connection lost"):
        deliver(maildir, Broken())
    for sub in ("tmp", "new", "cur"):
        assert list((maildir / sub).iterdir()) == []


def _deliver_many(path: str, count: int) -> None:
    for i in range(count):
        deliver(Path(path), f"Subject: {os.getpid()} {i}\n\nbody\n".encode())


def test_concurrent_processes_get_unique_names(maildir):
    """
    Four processes delivering 50 messages each at once: 200 distinct files, none lost.
    """
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_deliver_many, args=(str(maildir), 50)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = list((maildir / "new").iterdir())
    assert len(files) == 200
    assert len({f.read_bytes() for f in files}) == 200


@pytest.mark.parametrize(
    "name, base, letters, size, vsize",
    [
        ("1.M2P3.host,S=10,W=12:2,FS", "1.M2P3.host,S=10,W=12", "FS", 10, 12),
        ("1.M2P3.host", "1.M2P3.host", "", None, None),
        ("1.M2P3.host:2,", "1.M2P3.host", "", None, None),
        ("1.M2P3.host,S=x:2,Sab", "1.M2P3.host,S=x", "Sab", None, None),
        ("weird:1,stuff", "weird", "", None, None),
        ("1.M2P3.host,S=10,W=12,X=5:2,S", "1.M2P3.host,S=10,W=12,X=5", "S", 10, 12),
        ("1.M2P3.host,W=12,S=10", "1.M2P3.host,W=12,S=10", "", 10, 12),
        ("1.M2P3.host,S=10", "1.M2P3.host,S=10", "", 10, None),
        ("1.M2P3.host,S=10,W=", "1.M2P3.host,S=10,W=", "", 10, None),
    ],
)
def test_file_name_parsing(name, base, letters, size, vsize):
    """
    Base, info letters and the ,S=/,W= sizes are read from any maildir name.
    """
    fn = FileName.parse(name)
    assert (fn.base, fn.letters, fn.size, fn.vsize) == (base, letters, size, vsize)
    if letters:
        assert infoName(base, letters) == f"{base}:2,{''.join(sorted(letters))}"


def test_directory_fsyncs_are_shared_but_never_skipped(tmp_path, monkeypatch):
    """
    Threads that need the same directory synced share fsyncs, and each returns only after an
    fsync that started after it asked (one already running when it asked does not count).
    """
    import threading
    import time

    from pymaild import durable
    from pymaild.store import delivery

    log = []  # (start, end) of each fsync
    lock = threading.Lock()
    everyone = threading.Event()

    def slow_fsync(path):
        start = time.monotonic()
        everyone.wait(5)  # the first fsync lasts until every thread has asked
        with lock:
            log.append((start, time.monotonic()))

    monkeypatch.setattr(durable, "fsyncDirectory", slow_fsync)
    asked, returned = {}, {}

    def worker(i):
        asked[i] = time.monotonic()
        if len(asked) == 40:
            everyone.set()
        delivery.syncDirectory(tmp_path)
        returned[i] = time.monotonic()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) < 40  # shared
    for i in range(40):  # covered by an fsync that started after the call and ended before the return
        assert any(asked[i] <= start and end <= returned[i] for start, end in log), i


def test_a_failed_shared_fsync_covers_nobody(tmp_path, monkeypatch):
    """
    When the fsync other threads waited on fails, they do not return as if it had worked: each
    runs one of its own (here they succeed) and only the thread that ran the failed one sees it.
    """
    import threading
    import time

    from pymaild import durable
    from pymaild.store import delivery

    calls = []
    started = threading.Event()
    arrived = []
    allArrived = threading.Event()

    def fsync(path):
        calls.append(path)
        if len(calls) == 1:
            started.set()
            allArrived.wait(5)  # the others arrive while this one runs
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "fsyncDirectory", fsync)
    errors, done = [], []

    def worker():
        arrived.append(1)
        if len(arrived) == 6:
            allArrived.set()
        try:
            delivery.syncDirectory(tmp_path)
            done.append(True)
        except OSError as e:
            errors.append(e)

    first = threading.Thread(target=worker)
    first.start()
    started.wait(5)
    others = [threading.Thread(target=worker) for _ in range(5)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    assert len(errors) == 1 and len(done) == 5 and len(calls) >= 2


def test_concurrent_deliveries_never_pass_the_quota(tmp_path):
    """Deliveries to one user at once are checked and counted together: the limit holds."""
    import threading

    from pymaild.store.delivery import deliverToUsers
    from pymaild.store.maildir import MaildirStore
    from pymaild.store.quota import QuotaExceeded

    store = MaildirStore(tmp_path / "mail", storageLimit=10000)
    store.user("bob@example.org")
    results = []

    def worker():
        try:
            deliverToUsers(store, b"x" * 6000, ["bob@example.org"])
            results.append("ok")
        except QuotaExceeded:
            results.append("full")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1, results
    home = store.userDirectory("bob@example.org")
    assert len(list((home / "new").iterdir())) == 1


def test_a_maildir_removed_after_its_first_delivery_is_made_again(tmp_path):
    """The store remembers a user's maildir once made (no mkdir per delivery); a delivery that
    finds it (or its new/) gone makes it again and delivers once."""
    import shutil

    from pymaild.store.delivery import deliverToUsers
    from pymaild.store.maildir import MaildirStore

    store = MaildirStore(tmp_path / "mail")
    user = "carol@example.org"
    [first] = deliverToUsers(store, b"Subject: 1\n\none\n", [user])
    home = first.path.parent.parent
    shutil.rmtree(home)
    [second] = deliverToUsers(store, b"Subject: 2\n\ntwo\n", [user])
    assert second.path.read_bytes() == b"Subject: 2\n\ntwo\n"
    assert sorted(p.name for p in home.iterdir()) == ["cur", "maildirsize", "new", "tmp"]

    shutil.rmtree(home / "new")
    before = store.user(user).quota.usage()
    [third] = deliverToUsers(store, b"Subject: 3\n\nthree\n", [user])
    assert third.path.parent == home / "new" and third.path.read_bytes() == b"Subject: 3\n\nthree\n"
    assert list((home / "tmp").iterdir()) == []  # the first try left nothing behind
    assert store.user(user).quota.usage() == (before[0] + third.size, before[1] + 1)  # counted once
