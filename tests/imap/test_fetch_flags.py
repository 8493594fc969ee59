"""
A FETCH of only UID, FLAGS and MODSEQ (what a client syncing a folder's flags sends) reads the
index's flags alone (C{FetchRequest.flagsOnly}, C{Folder.flagRows}): over a real server and TLS
its answers are those of a FETCH that also reads sizes (the general path), for system flags,
keywords, \\Recent, MODSEQ, CHANGEDSINCE, sequence sets with gaps, and after an EXPUNGE.
"""

from __future__ import annotations

import imaplib
import random
import re
from array import array
from types import SimpleNamespace

import pytest
from conftest import postmaster_inbox

from pymaild.imap import fetch
from pymaild.imap.fetch import parseFetch, renderFlagRun, renderMessage
from pymaild.store.maildir import FlagIndex, Message

COUNT = 1300  # more than the first FETCH batch (500)
LINE = re.compile(rb"(\d+) \((.*)\)$")  # as imaplib gives "* 5 FETCH (...)"


def fetched(client, *args, uid=False):
    """C{{sequence number: (UID or None, sorted flags, MODSEQ or None)}} of one FETCH."""
    typ, lines = client.uid("FETCH", *args) if uid else client.fetch(*args)
    assert typ == "OK", lines
    out = {}
    for line in lines:
        if line is None:
            continue
        if isinstance(line, tuple):
            line = b"".join(line)
        m = LINE.match(line)
        assert m, line
        seq = int(m[1])
        items = m[2]
        uid = re.search(rb"UID (\d+)", items)
        uid = int(uid[1]) if uid else None
        flags = sorted(re.search(rb"FLAGS \(([^)]*)\)", items)[1].split())
        modseq = re.search(rb"MODSEQ \((\d+)\)", items)
        out[seq] = (uid, flags, int(modseq[1]) if modseq else None)
    assert len(out) == len([x for x in lines if x is not None])
    return out


def test_request_kinds():
    assert parseFetch(b"(FLAGS)").flagsOnly
    assert parseFetch(b"(UID FLAGS)").flagsOnly
    assert parseFetch(b"(FLAGS) (CHANGEDSINCE 5)").flagsOnly
    assert parseFetch(b"(MODSEQ)").flagsOnly
    assert not parseFetch(b"(FLAGS RFC822.SIZE)").flagsOnly
    assert not parseFetch(b"(FLAGS INTERNALDATE)").flagsOnly
    assert not parseFetch(b"FAST").flagsOnly
    assert not parseFetch(b"(FLAGS BODY[])").flagsOnly
    # (dates the index lacks are read from the files only for INTERNALDATE, which the macros have)
    assert all(parseFetch(x).wantsDates for x in (b"ALL", b"FAST", b"FULL", b"(INTERNALDATE)", b"(UID INTERNALDATE FLAGS)"))
    assert not any(parseFetch(x).wantsDates for x in (b"(BODY.PEEK[])", b"(ENVELOPE)", b"(RFC822.SIZE FLAGS)", b"(BODYSTRUCTURE)"))


PAIRS = [("", ""), ("\\Seen", ""), ("\\Flagged \\Seen", "$Work"), ("\\Answered", "Junk later $Label1"),
         ("", "zeta alpha"), ("\\Deleted \\Draft", "")]


@pytest.mark.parametrize("seed", range(40))
def test_flag_runs_render_as_render_message(seed):
    """
    The columns formatted at once give, byte for byte, what renderMessage gives message by
    message: every request form flagsOnly allows, \\Recent ranges, CHANGEDSINCE, any run.
    """
    rng = random.Random(seed)
    n = rng.randrange(1, 300)
    uids = sorted(rng.sample(range(1, 5 * n), n))
    codes = [rng.randrange(len(PAIRS)) for _ in uids]
    modseqs = [rng.randrange(1, 1 << rng.choice([8, 40, 63])) for _ in uids]
    index = FlagIndex(array("I", uids), array("I", codes), array("Q", modseqs), list(PAIRS))
    request = parseFetch(rng.choice([b"(FLAGS)", b"FLAGS", b"(UID FLAGS)", b"(FLAGS UID)", b"(MODSEQ)",
                                     b"(FLAGS MODSEQ)", b"(UID)", b"(FLAGS FLAGS)"])
                         + rng.choice([b"", b" (CHANGEDSINCE %d)" % rng.choice(modseqs)]))
    assert request.flagsOnly
    uid, modseq = rng.random() < 0.5, request.modseq or rng.random() < 0.5
    recent = [tuple(sorted(rng.sample(range(0, 5 * n + 2), 2))) for _ in range(rng.randrange(0, 3))]
    start = rng.randrange(0, n)
    count = rng.randrange(1, n - start + 1)
    first = rng.randrange(1, 1000)
    got = renderFlagRun(index, start, count, first, request, uid, modseq, recent, request.changedSince)
    want = []
    for k in range(start, start + count):
        flags, keywords = PAIRS[codes[k]]
        meta = Message(uids[k], frozenset(flags.split()), frozenset(keywords.split()), modseqs[k], 0, 0, 0)
        if request.changedSince is not None and meta.modseq <= request.changedSince:
            continue
        msg = SimpleNamespace(meta=meta, path=None, summary=None,
                              recent=any(low <= uids[k] < high for low, high in recent))
        want += renderMessage(first + k - start, msg, request, uid, modseq, None)
    assert got == b"".join(want)


def test_flags_only_fetch_answers_as_the_general_one(server):
    home = postmaster_inbox(server)
    for i in range(COUNT):
        data = f"From: s{i}@example.com\nSubject: {i}\n\nbody {i}\n".encode()
        letters = "S" if i % 3 else ("FS" if i % 5 else "")
        (home / "cur" / f"{1700000000 + i}.M{i}P1.test,S={len(data)}:2,{letters}").write_bytes(data)
    (home / "new" / "1800000000.M1P1.test").write_bytes(b"Subject: new\n\nrecent\n")
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=120)
    client.login("postmaster@localhost", server.postmaster_password())
    typ, data = client.select("INBOX")
    assert typ == "OK" and int(data[0]) == COUNT + 1
    assert client.uid("STORE", "7:9", "+FLAGS.SILENT", "($Work Junk)")[0] == "OK"
    assert client.store("10", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"

    for args in [("1:*", "(FLAGS)"), ("2,5:40,600:1250,*", "(UID FLAGS)")]:
        general = fetched(client, args[0], "(UID FLAGS RFC822.SIZE)")
        only = fetched(client, *args)
        assert len(only) >= 40
        for seq, (uid, flags, modseq) in only.items():
            assert (flags, modseq) == general[seq][1:] and uid in (None, general[seq][0])
    everything = fetched(client, "1:*", "(FLAGS)")
    assert len(everything) == COUNT
    assert everything[COUNT][1] == [b"\\Recent"]  # the one from new/, no flags
    assert everything[7][1] == [b"$Work", b"Junk", b"\\Flagged", b"\\Recent", b"\\Seen"]

    before = fetched(client, "1:*", "(FLAGS MODSEQ)", uid=True)  # enables CONDSTORE (RFC 7162 3.1)
    assert all(m is not None for _, _, m in before.values())
    assert client.uid("STORE", "100:102", "+FLAGS.SILENT", "(\\Answered)")[0] == "OK"
    since = max(m for _, _, m in before.values())
    general = fetched(client, "1:*", "(FLAGS RFC822.SIZE) (CHANGEDSINCE %d)" % since, uid=True)
    only = fetched(client, "1:*", "(FLAGS) (CHANGEDSINCE %d)" % since, uid=True)
    assert only == general and sorted(u for u, _, _ in only.values()) == [100, 101, 102]
    assert all(b"\\Answered" in f for _, f, _ in only.values())

    # Another session expunges a message this session still has in its view (the EXPUNGE waits
    # for a command that allows it): the index no longer matches the view, and the answer is the
    # general path's, without that message.
    other = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=120)
    other.login("postmaster@localhost", server.postmaster_password())
    other.select("INBOX")
    assert other.uid("STORE", "500", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
    assert other.expunge()[0] == "OK"
    other.logout()
    general = fetched(client, "1:*", "(UID FLAGS RFC822.SIZE)")
    only = fetched(client, "1:*", "(UID FLAGS)")
    assert only == {seq: v for seq, v in general.items()} and len(only) == COUNT - 1
    assert 500 not in {u for u, _, _ in only.values()} and max(only) == COUNT
    client.logout()


def test_small_flag_fetches_from_the_kept_index_stay_current(server):
    """
    A FETCH of flags for a few messages is answered from the kept flag index on the reactor:
    it still shows at once a change another process made (the index key moved), this
    session's own STORE, and the general path's answer where the index and the view part.
    """
    from pymaild.store.maildir import MaildirStore

    def plain(answers):  # (every message is \\Recent in this, the first session)
        return {seq: (uid, [f for f in flags if f != b"\\Recent"]) for seq, (uid, flags, _) in answers.items()}

    home = postmaster_inbox(server)
    for i in range(30):
        data = f"Subject: {i}\n\nbody {i}\n".encode()
        (home / "cur" / f"{1700000000 + i}.M{i}P1.test,S={len(data)}:2,S").write_bytes(data)
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=120)
    client.login("postmaster@localhost", server.postmaster_password())
    assert client.select("INBOX")[0] == "OK"
    assert len(fetched(client, "1:*", "(FLAGS)")) == 30  # (the index is read and kept)

    other = MaildirStore(server.data_dir / "mail").user("postmaster@localhost")  # another process
    try:
        other.folder("INBOX").store([3], ["$Elsewhere"], "add")
        assert plain(fetched(client, "3", "(FLAGS)")) == {3: (None, [b"$Elsewhere", b"\\Seen"])}
        other.folder("INBOX").store([3], ["\\Seen"], "remove")
        assert plain(fetched(client, "2:4", "(UID FLAGS)")) == {2: (2, [b"\\Seen"]), 3: (3, [b"$Elsewhere"]),
                                                                4: (4, [b"\\Seen"])}
    finally:
        other.close()
    assert client.store("5", "+FLAGS.SILENT", "(\\Flagged)")[0] == "OK"
    assert plain(fetched(client, "5", "(FLAGS)")) == {5: (None, [b"\\Flagged", b"\\Seen"])}
    for args in [("5:9", "(FLAGS MODSEQ)"), ("1,3,30", "(UID FLAGS)"), ("29:*", "(FLAGS)")]:
        general = fetched(client, args[0], args[1][:-1] + " RFC822.SIZE)")
        assert fetched(client, *args) == general
    # another session expunges message 10, not yet announced here: the run 9:11 no longer
    # matches the index, and the answer is the general path's (10 still in the view, gone)
    second = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=120)
    second.login("postmaster@localhost", server.postmaster_password())
    second.select("INBOX")
    assert second.store("10", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK" and second.expunge()[0] == "OK"
    second.logout()
    assert plain(fetched(client, "9:11", "(UID FLAGS)")) == {9: (9, [b"\\Seen"]), 11: (11, [b"\\Seen"])}
    client.logout()


def test_a_small_flag_fetch_needs_no_store_thread(tmp_path):
    """
    flagRunNow answers from the kept, current flag index without a store call (what spares
    a polling client the thread's two wake-ups), as the store call would; it says None (the
    caller then makes the store call) when no index is kept, and when the index and the
    session's view part.
    """
    from twisted.internet import defer

    from pymaild.imap.mailbox import StoreMailbox
    from pymaild.store.maildir import MaildirStore

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(12):
        inbox.append(b"Subject: %d\n\nx\n" % i, ["\\Seen"] if i % 2 else [])
    calls = []

    def run(f, *args):
        calls.append(f)
        return defer.succeed(f(*args))

    mbox = StoreMailbox(inbox, run, True, {}, inbox.uids())
    request = parseFetch(b"(UID FLAGS)")
    assert mbox.flagRunNow([4, 5, 6], request, False, False) is None and calls == []
    viaThread = []
    mbox.fetchFlagRun([4, 5, 6], request, False, False).addCallback(viaThread.append)
    assert len(calls) == 1 and viaThread[0].count(b"FETCH") == 3
    assert mbox.flagRunNow([4, 5, 6], request, False, False) == viaThread[0] and len(calls) == 1
    assert mbox.flagRunNow([4, 6], request, False, False) is None  # not a run of the view
    inbox.store([5], ["\\Deleted"], "add")
    inbox.expunge()  # (not announced to this view: 5 is still message 5 here)
    inbox.flagIndex()
    assert mbox.flagRunNow([4, 5, 6], request, False, False) is None
    assert mbox.flagRunNow([6, 7], request, False, False) == b"* 6 FETCH (UID 6 FLAGS (\\Seen))\r\n* 7 FETCH (UID 7 FLAGS ())\r\n"
    assert len(calls) == 1
    user.close()


def test_a_large_folders_stale_flag_index_is_not_read_again_for_a_few_messages(tmp_path, monkeypatch):
    """
    In a folder over FLAG_INDEX_READ_FOR_FEW messages a FETCH of flags for a few messages
    reads a flag index none is kept of (once), but not one that a delivery made stale (a
    large folder's whole index again after each new message): it reads their rows then.
    """
    from pymaild.imap.mailbox import StoreMailbox
    from pymaild.store.maildir import MaildirStore

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(12):
        inbox.append(b"Subject: %d\n\nx\n" % i)
    mbox = StoreMailbox(inbox, None, True, {}, inbox.uids())
    assert mbox.flagIndexWorthReading()  # none kept
    inbox.flagIndex()
    inbox.append(b"Subject: new\n\nx\n")  # stale now
    assert inbox.keptFlagIndex() is None and mbox.flagIndexWorthReading()  # 12 messages: cheap
    monkeypatch.setattr(StoreMailbox, "FLAG_INDEX_READ_FOR_FEW", 10)
    assert not mbox.flagIndexWorthReading()
    inbox._dropFlagIndex()
    assert mbox.flagIndexWorthReading()
    user.close()


def test_flag_runs_stop_where_the_index_and_the_view_part():
    """
    When a later run finds the index and the session's view apart (fetchFlagRun says None),
    the runs written so far stand and the caller answers the rest the general way.
    """
    from twisted.internet import defer

    from pymaild.imap.server import PymaildIMAP4Server

    written, calls = [], []

    class Mailbox:
        def fetchFlagRun(self, uids, request, uid, modseq, changedSince):
            calls.append(list(uids))
            return defer.succeed(None if len(calls) == 2 else b"run %d\r\n" % len(calls))

    server = SimpleNamespace(mbox=Mailbox(), FLAG_RUN=3, transport=SimpleNamespace(write=written.append),
                             _gone=lambda: False)
    producer = SimpleNamespace(stopped=False, wait=lambda: defer.succeed(None))
    done = []
    PymaildIMAP4Server._writeFlagRuns(server, parseFetch(b"(FLAGS)"), list(range(1, 9)), True, False,
                                      producer).addCallback(done.append)
    assert done == [3] and written == [b"run 1\r\n"] and calls == [[1, 2, 3], [4, 5, 6]]
    calls.clear(), written.clear(), done.clear()
    Mailbox.fetchFlagRun = lambda self, uids, *a: calls.append(list(uids)) or defer.succeed(b"%d " % len(uids))
    PymaildIMAP4Server._writeFlagRuns(server, parseFetch(b"(FLAGS)"), list(range(1, 9)), True, False,
                                      producer).addCallback(done.append)
    assert done == [8] and written == [b"3 ", b"3 ", b"2 "] and calls == [[1, 2, 3], [4, 5, 6], [7, 8]]


def test_another_sessions_flag_change_is_announced_from_the_kept_index(tmp_path):
    """
    A session told that flags changed elsewhere reads them from the kept flag index on the
    reactor (C{Folder.flagRowsNow}), without a store call (with ten sessions on a folder, each
    STORE cost the other nine one each), and announces what the index rows say; with no index
    kept, or one another change made stale, it makes the store call as before.
    """
    from twisted.internet import defer, task

    from pymaild.imap.mailbox import StoreMailbox
    from pymaild.store.maildir import Changes, MaildirStore

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(12):
        inbox.append(b"Subject: %d\n\nx\n" % i, ["\\Seen"] if i % 2 else [])
    clock = task.Clock()
    clock.callFromThread = lambda f, *args: f(*args)
    calls, heard = [], []

    def run(f, *args):
        calls.append(f)
        return defer.succeed(f(*args))

    class Listener:
        def flagsChanged(self, update):
            heard.append(update)

        def newMessages(self, exists, recent):
            pass

    mbox = StoreMailbox(inbox, run, True, {}, inbox.uids(), reactor=clock)
    mbox.attach()
    mbox.addListener(Listener())

    def expected(uids):
        return {mbox.sequenceNumber(m.uid): (mbox._flagList(m), m.uid, m.modseq) for m in inbox.flagRows(uids)}

    inbox.flagIndex()
    inbox.store([3, 4], ["\\Flagged", "$Work"], "add")
    clock.advance(0.05)
    assert calls == [] and heard == [expected([3, 4])]
    assert heard[0][3][0] == ["$Work", "\\Flagged"] and heard[0][4][0] == ["$Work", "\\Flagged", "\\Seen"]
    inbox.store([4, 40], ["\\Seen"], "remove")  # (40: no such message)
    clock.advance(0.05)
    assert calls == [] and heard[1] == expected([4])

    other = MaildirStore(tmp_path / "mail").user("alice@example.com")  # another process
    try:
        other.folder("INBOX").store([6], ["\\Answered"], "add")  # (the kept index is stale now)
    finally:
        other.close()
    mbox._folderChanged(inbox, Changes(flagsChanged=[6]))  # (as the watcher's sync reports it)
    clock.advance(0.05)
    assert calls == [inbox.flagRows] and heard[2] == expected([6]) and "\\Answered" in heard[2][6][0]
    inbox._dropFlagIndex()
    inbox.store([8], ["\\Draft"], "add")
    clock.advance(0.05)
    assert calls == [inbox.flagRows] * 2 and heard[3] == expected([8])
    inbox.flagIndex()
    mbox.FLAG_ROWS_NOW = 2  # (more changed messages than that: a store call, off the reactor)
    inbox.store([9, 10, 11], ["\\Flagged"], "add")
    clock.advance(0.05)
    assert calls == [inbox.flagRows] * 3 and heard[4] == expected([9, 10, 11])
    inbox.store([9, 10], ["\\Flagged"], "remove")
    clock.advance(0.05)
    assert calls == [inbox.flagRows] * 3 and heard[5] == expected([9, 10])
    user.close()


def test_flag_texts_kept_per_index_follow_its_pairs_and_recent():
    """
    The FLAGS texts of an index's pairs are made once and kept (L{fetch._flagTable}): a run
    rendered with \\Recent does not leave \\Recent in the kept texts for the next one, and a
    pair appended to the index's list (an index updated in place) is rendered.
    """
    pairs = list(PAIRS)
    index = FlagIndex(array("I", [3, 5, 8]), array("I", [1, 2, 3]), array("Q", [1, 2, 3]), pairs)
    request = parseFetch(b"(FLAGS)")
    plain = b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS ($Work \\Flagged \\Seen))\r\n" \
            b"* 3 FETCH (FLAGS ($Label1 Junk \\Answered later))\r\n"
    assert renderFlagRun(index, 0, 3, 1, request, False, False, []) == plain
    withRecent = renderFlagRun(index, 0, 3, 1, request, False, False, [(5, 9)])
    assert withRecent == plain.replace(b"Seen))\r\n* 3", b"Seen \\Recent))\r\n* 3").replace(
        b"later))", b"later \\Recent))")
    assert renderFlagRun(index, 0, 3, 1, request, False, False, []) == plain
    assert len(fetch._flagTable(pairs)) == len(pairs)  # (the kept list was not extended in place)
    pairs.append(("\\Draft", "new"))
    grown = FlagIndex(array("I", [3, 5, 8, 9]), array("I", [1, 2, 3, len(pairs) - 1]), array("Q", [1, 2, 3, 4]), pairs)
    assert renderFlagRun(grown, 3, 1, 4, request, False, False, []) == b"* 4 FETCH (FLAGS (\\Draft new))\r\n"
