"""
Bulk summaries in worker processes (L{pymaild.store.summarizer}): the same summaries as the
server's own parse, from other processes, and nothing lost when a worker dies.
"""

from __future__ import annotations

import os
import signal

import pytest

from pymaild.store import summarizer as summarizermod
from pymaild.store.maildir import MaildirStore
from pymaild.store.summarizer import Summarizer
from pymaild.store.summary import summarizePath, toJSON


def expected(paths: dict) -> dict:
    out = {}
    for uid, path in paths.items():
        s = summarizePath(path)
        out[uid] = (s, toJSON(s, wire=False))
    return out


def message(i: int) -> bytes:
    parts = [
        b"From: Sender %d <s%d@example.com>\nTo: r@example.org\nSubject: message %d\n" % (i, i, i),
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b%d\n\n" % i,
        b"--b%d\nContent-Type: text/plain\n\nhello %d\n" % (i, i),
        b"--b%d\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\nAAAA\n" % i,
        b"--b%d--\n" % i,
    ]
    return b"".join(parts)


@pytest.fixture
def files(tmp_path):
    out = {}
    for i in range(150):
        path = tmp_path / f"m{i}"
        path.write_bytes(message(i))
        out[i + 1] = path
    return out


@pytest.fixture
def summarizer():
    s = Summarizer(2)
    yield s
    s.close()


def counted(monkeypatch, kind: str) -> list[int]:
    """The sizes of the pieces this process parses itself of C{kind}, from now on."""
    calls = []
    real = summarizermod._KINDS[kind]
    monkeypatch.setitem(summarizermod._KINDS, kind, lambda piece: calls.append(len(piece)) or real(piece))
    return calls


def test_workers_give_the_servers_own_summaries(files, summarizer, monkeypatch):
    calls = counted(monkeypatch, "summary")
    got = summarizer.summarize(files)
    assert got == expected(files)
    pids = summarizer.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    assert calls == [50]  # this process parsed its third; the workers the rest


def test_small_batches_stay_in_the_server(files, summarizer):
    few = dict(list(files.items())[: summarizermod.MIN_BATCH - 1])
    assert summarizer.summarize(few) == expected(few)
    assert summarizer.pids() == []


def test_a_file_gone_meanwhile_is_none(files, summarizer):
    os.unlink(files[7])
    got = summarizer.summarize(files)
    assert got[7] is None and got[8] == expected({8: files[8]})[8] and len(got) == len(files)


def test_a_dead_worker_loses_nothing(files, summarizer):
    summarizer.summarize(files)
    dead = summarizer.pids()
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    got = summarizer.summarize(files)  # their pieces are parsed here instead
    assert got == expected(files)
    assert summarizer.pids() == []
    again = summarizer.summarize(files)  # and fresh workers take the next batch
    assert again == got and len(summarizer.pids()) == 2 and not set(summarizer.pids()) & set(dead)


def test_workers_stop_at_close(files):
    summarizer = Summarizer(2)
    summarizer.summarize(files)
    pids = summarizer.pids()
    summarizer.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: gone
    assert summarizer.summarize(files) == expected(files)
    assert summarizer.pids() == []


def test_a_folder_first_fetch_through_workers(tmp_path, summarizer):
    """The store's bulk path: cached once, equal to what a store without workers computes."""
    plain = MaildirStore(tmp_path / "a").user("alice@example.com")
    pooled = MaildirStore(tmp_path / "b", summarizer=summarizer).user("alice@example.com")
    for user in (plain, pooled):
        inbox = user.folder("INBOX")
        for i in range(100):
            inbox.append(message(i))
    a, b = plain.folder("INBOX"), pooled.folder("INBOX")
    assert b.summaryFields(b.uids(), ("envelope", "bodystructure")) == a.summaryFields(a.uids(), ("envelope", "bodystructure"))
    assert len(summarizer.pids()) == 2
    assert b.summaries(b.uids()) == a.summaries(a.uids())
    assert pooled.db.execute("SELECT count(*) FROM wire").fetchone() == (100,)
    plain.close()
    pooled.close()


def test_workers_give_the_header_only_envelopes(files, summarizer, monkeypatch):
    from pymaild.store.summary import envelopePath

    calls = counted(monkeypatch, "envelope")
    got = summarizer.envelopes(files)
    assert got == {uid: (envelopePath(str(path)), int(os.stat(path).st_mtime)) for uid, path in files.items()}
    assert {uid: e for uid, (e, _) in got.items()} == {uid: s.envelope for uid, (s, _) in expected(files).items()}
    assert calls == [50] and len(summarizer.pids()) == 2
    os.kill(summarizer.pids()[0], 9)  # a dead worker: its piece is read here instead
    assert summarizer.envelopes(files) == got


def test_workers_give_the_header_only_search_fields(files, summarizer, monkeypatch):
    calls = counted(monkeypatch, "fields")
    got = summarizer.headerFields(files)
    assert got == {uid: s.headerFields for uid, (s, _) in expected(files).items()}
    assert calls == [50] and len(summarizer.pids()) == 2


def test_workers_run_searchs_text_match_with_the_part_trees(files, summarizer, monkeypatch):
    """
    The "text" kind: SEARCH's match function (pickled by name) gets each file's bytes and its
    part tree, and answers in the workers as it does here over the summary's own part tree;
    a file over the limit, or gone, gives None.
    """
    import functools
    import io

    from pymaild.imap.search import matchText, readMessageText

    calls = counted(monkeypatch, "text")
    needles = ("hello 1", "sender 2", "message", "aaaa")
    match = functools.partial(matchText, needles, (True, True, False, True), 10 << 20)
    items = {uid: (str(path), 10 << 20, match) for uid, path in files.items()}
    files[3].write_bytes(message(3) + b"y" * 5000)
    items[3] = (str(files[3]), 4000, match)  # over this limit
    os.unlink(files[4])
    got = summarizer.texts(items)
    assert calls == [50] and len(summarizer.pids()) == 2
    assert got[3] is None and got[4] is None
    for uid in set(files) - {3, 4}:
        data = files[uid].read_bytes()
        text = readMessageText(io.BytesIO(data), summarizePath(str(files[uid])).parts)
        body = sum(1 << k for k, n in enumerate(needles) if n in text.folded("body"))
        header = sum(1 << k for k, n in enumerate(needles)
                     if k != 2 and not body & 1 << k and n in text.folded("header"))
        assert got[uid] == (body, header), uid
    # (uid n is message n - 1: "hello 1" in the bodies of 1 and 10-19, "Sender 2" in the From of
    # 2 and 20-29; "message" only in headers, not looked for there; "AAAA" only in an attachment)
    assert (got[2], got[12], got[21], got[50]) == ((1, 0), (1, 0), (0, 2), (0, 0))


def test_warm_up_starts_the_workers_a_batch_then_uses(files, summarizer, monkeypatch):
    """
    warmUp (a session opened a large folder) starts the workers, idle; the next batch is cut
    for them; a second warmUp starts nothing more.
    """
    assert summarizer.pids() == []
    summarizer.warmUp(10)  # a small folder: its batches stay in the server
    assert summarizer.pids() == []
    summarizer.warmUp(100)
    pids = summarizer.pids()
    assert len(pids) == 2
    summarizer.warmUp(100)
    assert summarizer.pids() == pids
    got = summarizer.summarize(files)
    assert len(got) == len(files) and all(v is not None for v in got.values())
    assert sorted(summarizer.pids()) == sorted(pids)  # the same processes did the work


def test_start_leaves_the_idle_workers_where_a_batch_finds_them(summarizer, monkeypatch):
    """
    start() (every IMAP login) starts only the missing workers: the idle ones stay idle for a
    batch meanwhile, and none is started twice.
    """
    summarizer.start()
    pids = summarizer.pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    summarizer._lost(summarizer._idle.pop(0))  # (as a batch finds it dead)
    seen = []
    real = summarizermod._Worker

    def starting():
        seen.append(summarizer.pids())  # what a batch would find while it starts
        return real()

    monkeypatch.setattr(summarizermod, "_Worker", starting)
    summarizer.start()
    assert seen == [[pids[1]]]
    assert len(summarizer.pids()) == 2 and pids[1] in summarizer.pids()
    summarizer.start()
    assert len(seen) == 1


def test_a_worker_that_cannot_start_is_not_tried_at_every_login(monkeypatch):
    """
    A failed start (a process limit, the interpreter gone after an upgrade) is logged and not
    tried again by start() for START_RETRY seconds; a batch still tries (and parses itself).
    """
    tries = []

    def failing():
        tries.append(1)
        raise OSError("no more processes")

    monkeypatch.setattr(summarizermod, "_Worker", failing)
    s = Summarizer(2)
    try:
        s.start()
        assert len(tries) == 2 and s.pids() == []
        s.start()
        assert len(tries) == 2
        s._retryAt = 0.0  # (START_RETRY seconds later)
        s.start()
        assert len(tries) == 4
    finally:
        s.close()
