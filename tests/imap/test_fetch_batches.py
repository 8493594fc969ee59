"""
A long FETCH is loaded from the store in batches that grow (500, 1,000, 2,000, then 4,000 at a
time) while the previous batch is written: over a real server and TLS, a first FETCH of
ENVELOPE of a folder of never-summarized mail (headers read by the store's worker processes)
answers every message once, in order, with the right ENVELOPE; so does the FETCH that then
needs whole summaries.  That first FETCH also asks INTERNALDATE, which comes from the same
read of each file (its mtime).
"""

from __future__ import annotations

import datetime
import email.utils
import imaplib
import os
import re
import sqlite3

import pytest

from conftest import held_by_another_thread, postmaster_inbox, wait_for

COUNT = 4700  # batches of 500, 1000, 2000 and 1200


def test_long_fetches_answer_every_message_once_in_order(server):
    home = postmaster_inbox(server)
    for i in range(COUNT):
        data = (f"From: Sender {i} <s{i}@example.com>\nTo: postmaster@localhost\nSubject: number {i}\n"
                f"Message-ID: <m{i}@example.com>\n\nbody {i}\n").encode()
        # (with S= and W= the index is built from the names alone: no file is stat'ed before
        # the FETCH)
        path = home / "cur" / f"{1700000000 + i}.M{i}P1.test,S={len(data)},W={len(data) + data.count(10)}:2,S"
        path.write_bytes(data)
        os.utime(path, (1600000000 + 3601 * i,) * 2)
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=120)
    client.login("postmaster@localhost", server.postmaster_password())
    typ, data = client.select("INBOX")
    assert typ == "OK" and int(data[0]) == COUNT

    typ, lines = client.uid("FETCH", "1:*", "(UID INTERNALDATE ENVELOPE)")
    assert typ == "OK"
    text = b"\n".join(x if isinstance(x, bytes) else b"".join(x) for x in lines)
    subjects = [int(n) for n in re.findall(rb'"number (\d+)"', text)]
    assert subjects == list(range(COUNT))
    assert len(re.findall(rb"\(UID \d+ INTERNALDATE \"[^\"]+\" ENVELOPE", text)) == COUNT
    dates = [datetime.datetime.strptime(d.decode(), "%d-%b-%Y %H:%M:%S %z").timestamp()
             for d in re.findall(rb'INTERNALDATE "([^"]+)"', text)]
    assert dates == [1600000000 + 3601 * i for i in range(COUNT)]

    def kept():
        db = sqlite3.connect(home / "pymaild.index.sqlite")
        try:
            return (db.execute("SELECT count(*) FROM envelopes").fetchone()[0],
                    db.execute("SELECT count(*) FROM messages WHERE internaldate IS NOT NULL").fetchone()[0])
        finally:
            db.close()

    # (written after the answer, from memory: Folder.writeDeferred)
    wait_for(lambda: kept() == (COUNT, COUNT), what="the ENVELOPEs and internal dates the FETCH read, in the index")

    typ, lines = client.uid("FETCH", "1:*", "(ENVELOPE BODYSTRUCTURE)")
    assert typ == "OK"
    text = b"\n".join(x if isinstance(x, bytes) else b"".join(x) for x in lines)
    assert [int(n) for n in re.findall(rb'"number (\d+)"', text)] == list(range(COUNT))
    assert text.count(b'BODYSTRUCTURE ("text" "plain"') == COUNT
    client.logout()


def summaryWorkers(server) -> list[int]:
    """The server's child processes that are summary workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue  # (gone meanwhile)
        if ppid == server.proc.pid and b"pymaild.store.summaryworker" in command:
            found.append(int(entry))
    return found


def test_an_imap_login_starts_the_summary_workers(server):
    """
    The workers start at the first IMAP login, before any SELECT, so that their own start does
    not hold up the first FETCH of ENVELOPE; not before.
    """
    assert summaryWorkers(server) == []
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=60)
    client.login("postmaster@localhost", server.postmaster_password())
    wait_for(lambda: len(summaryWorkers(server)) == 2, what="the two summary workers ([store] summary_processes)")
    typ, _ = client.select("INBOX")  # (an empty INBOX: nothing more to start)
    assert typ == "OK" and len(summaryWorkers(server)) == 2
    client.logout()


def test_a_fetch_without_internaldate_reads_no_date_from_the_files(server):
    """
    FETCH BODY.PEEK[] of a folder whose index has no internal dates yet (built from the file
    names) stats no file for them: they stay unknown in the index, and a FETCH of INTERNALDATE
    afterwards reads them, right.
    """
    import sqlite3

    home = postmaster_inbox(server)
    for i in range(40):
        data = f"From: s{i}@example.com\nSubject: n {i}\n\nbody {i}\n".encode()
        path = home / "cur" / f"{1700000000 + i}.M{i}P1.test,S={len(data)},W={len(data) + data.count(10)}:2,S"
        path.write_bytes(data)
        os.utime(path, (1600000000 + 86400 * i,) * 2)
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=60)
    client.login("postmaster@localhost", server.postmaster_password())
    assert client.select("INBOX")[0] == "OK"

    def unknown() -> int:
        db = sqlite3.connect(home / "pymaild.index.sqlite")
        try:
            return db.execute("SELECT count(*) FROM messages WHERE internaldate IS NULL").fetchone()[0]
        finally:
            db.close()

    assert unknown() == 40
    typ, lines = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    assert typ == "OK" and sum(1 for x in lines if isinstance(x, tuple)) == 40
    assert unknown() == 40
    typ, lines = client.uid("FETCH", "1:*", "(INTERNALDATE)")
    dates = [datetime.datetime.strptime(d.decode(), "%d-%b-%Y %H:%M:%S %z").timestamp()
             for d in re.findall(rb'INTERNALDATE "([^"]+)"', b"\n".join(lines))]
    assert dates == [1600000000 + 86400 * i for i in range(40)]
    assert unknown() == 0
    client.logout()


def test_a_small_fetch_reads_its_rows_without_a_store_thread(tmp_path):
    """
    A FETCH of a few messages that needs no summary and sets no \\Seen (BODY.PEEK[],
    RFC822.SIZE, INTERNALDATE) gets its index rows on the reactor (StoreMailbox.fetchNow):
    the same messages, files and sizes as the store call, in this view's numbers; None (the
    caller makes the store call) while a store thread holds the user's lock, and when an
    internal date would have to be read from a file.
    """
    from twisted.internet import defer

    from pymaild.imap.mailbox import StoreMailbox
    from pymaild.store.maildir import MaildirStore

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(6):
        inbox.append(b"Subject: %d\n\n%s\n" % (i, b"x" * i), ["\\Seen"] if i % 2 else [])
    calls = []

    def run(f, *args):
        calls.append(f)
        return defer.succeed(f(*args))

    mbox = StoreMailbox(inbox, run, True, {}, inbox.uids())
    mbox.recentRanges = [(5, 7)]

    def shown(found):
        return [(seq, m.getUID(), m.getSize(), m.path, sorted(m.getFlags()), m.getInternalDate()) for seq, m in found]

    now = mbox.fetchNow([2, 3, 5], None, dates=False)
    viaThread = []
    mbox.fetchBatch([2, 3, 5], False, False, dates=False).addCallback(viaThread.append)
    assert len(calls) == 1 and now is not None and shown(now) == shown(viaThread[0])
    assert [seq for seq, _ in now] == [2, 3, 5] and now[2][1].recent and not now[0][1].recent
    since = inbox.messages([2])[0].modseq  # CHANGEDSINCE: as the store call leaves out
    viaThread.clear()
    mbox.fetchBatch([1, 2, 3], False, False, since, dates=False).addCallback(viaThread.append)
    assert shown(mbox.fetchNow([1, 2, 3], since, dates=False)) == shown(viaThread[0]) and 0 < len(viaThread[0]) < 3
    calls.clear()

    with held_by_another_thread(user.lock):
        assert mbox.fetchNow([2], None, dates=False) is None
    user.db.execute("UPDATE messages SET internaldate=NULL WHERE uid=4")
    assert mbox.fetchNow([4], None, dates=True) is None  # (the date is in the file's mtime)
    assert mbox.fetchNow([4], None, dates=False) is not None and calls == []
    user.close()


def test_a_first_fetch_of_envelopes_is_parsed_in_one_store_call_and_finished_in_another(tmp_path, monkeypatch):
    """
    With a C{prepared} Deferred, a batch that reads ENVELOPEs from never-summarized files takes
    two store calls: the first parses (and writes nothing), then C{prepared} fires, so that a
    FETCH starts its next batch, whose parsing overlaps the second call: the rows read, with
    the internal dates the parse brought (no stat).  The ENVELOPEs and dates go to the index
    in a third call, which C{fetchDone} makes after the answer.  The answer is the one a
    single call gives.
    """
    import sqlite3

    from twisted.internet import defer

    from pymaild.imap.mailbox import StoreMailbox
    from pymaild.store.maildir import Folder, MaildirStore

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(80):  # (past the summarizer's MIN_BATCH, parsed without worker processes here)
        data = f"From: s{i}@example.com\nSubject: number {i}\n\nbody {i}\n".encode()
        path = inbox.path / "cur" / f"{1700000000 + i}.M{i}P1.test,S={len(data)},W={len(data) + data.count(10)}:2,S"
        path.write_bytes(data)
        os.utime(path, (1600000000 + 3601 * i,) * 2)
    inbox.sync()
    uids = inbox.uids()
    queued = []

    def run(f, *args):
        d = defer.Deferred()
        queued.append((f, args, d))
        return d

    def step():
        f, args, d = queued.pop(0)
        d.callback(f(*args))

    def written():
        db = sqlite3.connect(inbox.user.root / "pymaild.index.sqlite")
        try:
            return (db.execute("SELECT count(*) FROM envelopes").fetchone()[0],
                    db.execute("SELECT count(*) FROM messages WHERE internaldate IS NOT NULL").fetchone()[0])
        finally:
            db.close()

    mbox = StoreMailbox(inbox, run, True, {}, uids)
    prepared, answers = defer.Deferred(), []
    mbox.fetchBatch(list(uids), True, False, None, ("envelope",), False, True, prepared).addCallback(answers.append)
    assert len(queued) == 1 and not prepared.called
    step()
    assert prepared.called and not answers and len(queued) == 1 and written() == (0, 0)
    with monkeypatch.context() as m:
        m.setattr(Folder, "_internalDates", lambda self, missing: pytest.fail(f"stat of {missing}"))
        step()
    assert written() == (0, 0) and len(answers) == 1 and not queued
    mbox.fetchDone()
    assert len(queued) == 1
    step()
    assert written() == (80, 80)
    mbox.fetchDone()
    assert not queued  # (nothing left to write: no store call)

    def shown(found):
        return [(seq, m.getUID(), m.getInternalDate(), m.summary.envelope) for seq, m in found]

    assert [seq for seq, _ in answers[0]] == list(range(1, 81))
    assert [int(re.search(rb'"number (\d+)"', m.summary.envelope).group(1)) for _, m in answers[0]] == list(range(80))
    assert [email.utils.parsedate_to_datetime(m.getInternalDate()).timestamp()
            for _, m in answers[0]] == [1600000000 + 3601 * i for i in range(80)]
    single = []
    mbox.fetchBatch(list(uids), True, False, None, ("envelope",), False, True).addCallback(single.append)
    step()
    assert not queued and shown(single[0]) == shown(answers[0])
    user.close()
