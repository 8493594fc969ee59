"""
A FETCH of ENVELOPE alone, on mail never summarized, reads only the message's header
(L{pymaild.store.summary.envelopePath}) and keeps the answer in the index's C{envelopes} table
(schema 6); the whole summary comes when something needs it, and then replaces it.  The
header-only ENVELOPE must be byte for byte the whole summary's (which
C{tests/store/test_summary.py} compares with Dovecot's).
"""

from __future__ import annotations

import sqlite3

import pytest

from pymaild.store import index
from pymaild.store.maildir import INDEX_NAME, MaildirStore
from pymaild.store.summary import _HEAD_MAX, _HEAD_READ, envelopeOf, envelopePath, headerFieldsPath, summarize
from test_store_wire import expected, make
from test_summary_corpus import randomMessage
from test_summary import GARBAGE, SPECIMENS, damaged, specimen

ODD = {
    **GARBAGE,
    "crlf-header": b"From: a@b\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nTo: c@d\r\n\r\nbody\r\n",
    "header-past-the-first-read": b"Received: " + b"x" * 70 + b"\n" + b"X-Long: " + b"y" * (_HEAD_READ * 3)
                                  + b"\nFrom: late@example.com\nSubject: far\n\nbody\n",
    "blank-line-at-the-read-edge": b"Subject: edge\nX: " + b"z" * (_HEAD_READ - 18) + b"\n\nbody\n",
    "crlf-blank-line-at-the-read-edge": b"Subject: edge\r\nX: " + b"z" * (_HEAD_READ - 20) + b"\r\n\r\nb\r\n",
    "starts-with-a-blank-line": b"\nFrom: not@header\n\nbody\n",
    "all-header-no-blank-line": b"From: a@b\nSubject: only\nTo: c@d\n",
    "nul-in-subject": b"Subject: a\x00b\nFrom: a@b\n\nbody\n",
    "repeated-address-headers": b"To: a@b\nTo: c@d\nCc: e@f\nCc: (x) g@h\nSubject: one\nSubject: two\n\nb\n",
}


def cases():
    for name in SPECIMENS:
        yield name, specimen(name)
    yield from ODD.items()
    for seed in range(40):
        yield f"damaged-{seed}", damaged(seed)


CASES = dict(cases())


@pytest.mark.parametrize("name", sorted(CASES) + [f"random-{seed}" for seed in range(150)])
def test_header_only_envelope_and_search_fields_are_the_summary_s(name, tmp_path):
    """
    The ENVELOPE of a first FETCH and the header fields of a first SEARCH FROM of mail never
    summarized (envelopePath, headerFieldsPath: the header alone) are the whole summary's, on
    these cases and 150 random MIME messages of the summary corpus (encoded words, folding,
    repeated fields, NULs, 8-bit).
    """
    data = CASES[name] if name in CASES else randomMessage(int(name.split("-")[1]))
    want = summarize(data)
    assert envelopeOf(data) == want.envelope
    path = tmp_path / "m"
    path.write_bytes(data)
    got = envelopePath(str(path)), headerFieldsPath(str(path))
    if got[0] is None:  # only when the header is longer than the most it reads
        assert data.find(b"\n\n") < 0 or data.find(b"\n\n") > _HEAD_MAX
        assert got[1] is None
    else:
        assert got == (want.envelope, want.headerFields)


def test_search_fields_of_mail_never_summarized_come_from_the_headers(tmp_path, monkeypatch):
    """
    headerFields on mail never summarized reads the headers alone and keeps the fields, no
    summary; a message whose header is too long, and one summarized before, go the summary's
    way; the values are those of a store that computed every summary.
    """
    from pymaild.store import summary

    user, inbox = make(tmp_path, 6)
    uids = inbox.uids()
    inbox.summaries(uids[:1])  # summarized before: its fields are kept with it
    long = inbox.paths(uids[1:2])[uids[1]]
    with open(long, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(b"X-Long: " + b"q" * (_HEAD_MAX + 10) + b"\n" + data)
    parsed = []
    real = summary.summarizePath
    monkeypatch.setattr(summary, "summarizePath", lambda path: parsed.append(path) or real(path))
    got = inbox.headerFields(["from", "subject"])
    assert count(user, "fields") == 6 and count(user, "summaries") == 2
    assert parsed == [long]  # (the one summarized before was not parsed again)
    whole = {uid: summarize(open(p, "rb").read()).headerFields for uid, p in inbox.paths(uids).items()}
    assert got == {name: {uid: f[name] for uid, f in whole.items() if name in f} for name in ("from", "subject")}
    assert inbox.headerFields(["from"]) == {"from": got["from"]} and parsed == [long]  # (kept: no file read)


def test_a_failure_reading_the_fields_leaves_them_to_the_summary(tmp_path, monkeypatch):
    """Anything failing in the header-only reading: the summary's way, which salvages."""
    from pymaild.store import summary

    user, inbox = make(tmp_path, 2)
    monkeypatch.setattr(summary, "_decodedField", lambda text: 1 / 0)
    assert headerFieldsPath(inbox.paths([1])[1]) is None
    monkeypatch.undo()
    monkeypatch.setattr(summary, "headerFieldsPath", lambda path: None)
    assert inbox.headerFields(["subject"]) == {"subject": {1: "hello 0", 2: "hello 1"}}
    assert count(user, "summaries") == 2


def test_a_header_over_the_limit_is_left_to_the_whole_summary(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"Subject: big\nX: " + b"q" * (_HEAD_MAX + 10) + b"\n\nbody\n")
    assert envelopePath(str(path)) is None
    assert headerFieldsPath(str(path)) is None


def count(user, table):
    return user.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_fetch_of_envelope_alone_keeps_only_envelopes(tmp_path):
    user, inbox = make(tmp_path, 5)
    uids = inbox.uids()
    got = inbox.summaryFields(uids, ("envelope",))
    assert got == {uid: (expected(i).envelope,) for i, uid in enumerate(uids)}
    assert (count(user, "envelopes"), count(user, "summaries"), count(user, "wire")) == (5, 0, 0)
    # the second FETCH reads the table, not the files
    paths = inbox.paths(uids)
    for path in paths.values():
        with open(path, "wb") as f:
            f.write(b"Subject: changed under our feet\n\n")
    assert inbox.summaryFields(uids, ("envelope",)) == got
    user.close()


def test_envelopes_read_from_the_files_bring_their_internal_dates(tmp_path, monkeypatch):
    """
    The header-only ENVELOPE's read also gives the file's mtime: internal dates the index did
    not have are kept with it (a first FETCH of ENVELOPE and INTERNALDATE stats no file); one
    it had stays as it was.
    """
    import os

    from pymaild.store.maildir import Folder

    user, inbox = make(tmp_path, 5)
    uids = inbox.uids()
    paths = inbox.paths(uids)
    for n, uid in enumerate(uids):
        os.utime(paths[uid], (1600000000 + n * 86400,) * 2)
    user.db.execute("UPDATE messages SET internaldate=NULL WHERE uid != ?", (uids[0],))
    (known,) = user.db.execute("SELECT internaldate FROM messages WHERE uid=?", (uids[0],)).fetchone()
    assert known != 1600000000
    inbox.summaryFields(uids, ("envelope",))
    monkeypatch.setattr(Folder, "_internalDates", lambda self, missing: pytest.fail(f"stat of {missing}"))
    dates = {m.uid: m.internalDate for m in inbox.messages(uids)}
    assert dates == {uid: known if n == 0 else 1600000000 + n * 86400 for n, uid in enumerate(uids)}
    user.close()


def test_envelopes_kept_later_are_written_when_the_caller_says(tmp_path, monkeypatch):
    """
    With C{deferWrite} (a FETCH, whose answer does not wait for the index's write),
    summaryFields answers at once but writes nothing: the ENVELOPEs and internal dates wait in
    memory, where the folder's readers find them (no file read again, no stat), until
    writeDeferred writes them, of the messages still in the index only.
    """
    import os

    from pymaild.store import summarizer
    from pymaild.store.maildir import Folder

    user, inbox = make(tmp_path, 6)
    uids = inbox.uids()
    paths = inbox.paths(uids)
    for n, uid in enumerate(uids):
        os.utime(paths[uid], (1600000000 + n * 86400,) * 2)
    user.db.execute("UPDATE messages SET internaldate=NULL")
    got = inbox.summaryFields(range(uids[0], uids[-1] + 1), ("envelope",), deferWrite=True)
    assert got == {uid: (expected(i).envelope,) for i, uid in enumerate(uids)}
    assert inbox.deferredCount() == 6 and count(user, "envelopes") == 0
    assert user.db.execute("SELECT count(*) FROM messages WHERE internaldate IS NOT NULL").fetchone()[0] == 0
    with monkeypatch.context() as m:  # (found in memory: neither parsed nor stat'ed again)
        m.setattr(Folder, "_internalDates", lambda self, missing: pytest.fail(f"stat of {missing}"))
        m.setattr(summarizer.Summarizer, "envelopes", lambda self, paths: pytest.fail(f"parse of {paths}"))
        assert inbox.summaryFields(uids, ("envelope",), deferWrite=True) == got
        dates = {m.uid: m.internalDate for m in inbox.messages()}
        assert dates == {uid: 1600000000 + n * 86400 for n, uid in enumerate(uids)}
    inbox.store([uids[2]], ["\\Deleted"], "add")
    assert inbox.expunge() == [uids[2]]  # (between the parse and the write)
    inbox.writeDeferred(above=6)  # (not more than 6 wait: nothing written)
    assert count(user, "envelopes") == 0
    inbox.writeDeferred()
    assert inbox.deferredCount() == 0
    kept = dict(user.db.execute("SELECT uid, envelope FROM envelopes"))
    assert kept == {uid: expected(i).envelope for i, uid in enumerate(uids) if uid != uids[2]}
    kept = dict(user.db.execute("SELECT uid, internaldate FROM messages"))
    assert kept == {uid: 1600000000 + n * 86400 for n, uid in enumerate(uids) if uid != uids[2]}
    assert inbox.summaryFields(uids, ("envelope",)) == {u: e for u, e in got.items() if u != uids[2]}
    user.close()


def test_a_whole_summary_computed_meanwhile_replaces_an_envelope_not_written_yet(tmp_path):
    user, inbox = make(tmp_path, 4)
    uids = inbox.uids()
    inbox.summaryFields(uids, ("envelope",), deferWrite=True)
    inbox.summaries(uids[:2])  # (a SEARCH, say, before the FETCH's write)
    inbox.writeDeferred()
    assert [r[0] for r in user.db.execute("SELECT uid FROM envelopes ORDER BY uid")] == uids[2:]
    assert (count(user, "envelopes"), count(user, "wire")) == (2, 2)
    user.close()


def test_the_whole_summary_replaces_the_envelope_and_expunge_removes_it(tmp_path):
    user, inbox = make(tmp_path, 5)
    uids = inbox.uids()
    inbox.summaryFields(uids, ("envelope",))
    inbox.summaries(uids[:2])  # (SEARCH, SORT, BODYSTRUCTURE ... compute whole summaries)
    assert (count(user, "envelopes"), count(user, "wire")) == (3, 2)
    both = inbox.summaryFields(uids, ("envelope", "bodystructure"))
    assert both[uids[4]] == (expected(4).envelope, expected(4).bodystructure)
    assert (count(user, "envelopes"), count(user, "wire")) == (0, 5)

    inbox.summaryFields(uids, ("envelope",))
    user.db.execute("DELETE FROM wire")
    user.db.execute("DELETE FROM summaries")
    inbox.summaryFields(uids, ("envelope",))
    assert count(user, "envelopes") == 5
    inbox.store(uids[:3], ["\\Deleted"], "add")
    inbox.expunge()
    assert [r[0] for r in user.db.execute("SELECT uid FROM envelopes ORDER BY uid")] == uids[3:]
    user.close()


def test_a_message_gone_meanwhile_is_left_out(tmp_path):
    user, inbox = make(tmp_path, 3)
    uids = inbox.uids()
    import os

    os.unlink(inbox.paths([uids[1]])[uids[1]])
    got = inbox.summaryFields(uids, ("envelope",))
    assert set(got) == {uids[0], uids[2]}
    user.close()


def test_schema_5_index_gets_the_envelopes_table(tmp_path):
    user, inbox = make(tmp_path, 3)
    uids = inbox.uids()
    inbox.summaries(uids)
    root = user.root
    user.close()
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.executescript("""
        DROP TABLE envelopes; DROP TRIGGER messages_delete;
        CREATE TRIGGER messages_delete AFTER DELETE ON messages BEGIN
            UPDATE folders SET messages = messages - 1, unseen = unseen - (instr(OLD.flags, '\\Seen') = 0),
                vsize = vsize - OLD.vsize WHERE id = OLD.folder;
            DELETE FROM summaries WHERE folder = OLD.folder AND uid = OLD.uid;
            DELETE FROM wire WHERE folder = OLD.folder AND uid = OLD.uid;
            DELETE FROM fields WHERE folder = OLD.folder AND uid = OLD.uid;
        END;
        PRAGMA user_version=5;""")
    db.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    assert user.db.execute("PRAGMA user_version").fetchone() == (index.SCHEMA_VERSION,) == (6,)
    inbox = user.folder("INBOX")
    assert inbox.uids() == uids  # migrated, not rebuilt
    user.db.execute("DELETE FROM wire")
    user.db.execute("DELETE FROM summaries")
    inbox.summaryFields(uids, ("envelope",))
    inbox.store([uids[0]], ["\\Deleted"], "add")
    inbox.expunge()
    assert [r[0] for r in user.db.execute("SELECT uid FROM envelopes ORDER BY uid")] == uids[1:]
    user.close()


def test_a_uid_the_index_no_longer_has_costs_no_open(tmp_path, monkeypatch):
    """
    A session's view may still hold UIDs another session expunged (it is told at its next
    command): their summaries are not looked for message by message (no open(), no sync).
    """
    from pymaild.store.maildir import Folder

    user, inbox = make(tmp_path, 3)
    uids = inbox.uids()
    monkeypatch.setattr(Folder, "open", lambda self, uid: pytest.fail(f"open({uid})"))
    got = inbox.summaryFields(uids + [uids[-1] + 1, uids[-1] + 7], ("envelope",))
    assert set(got) == set(uids)
    assert set(inbox.summaries(uids + [uids[-1] + 1])) == set(uids)
    user.close()
