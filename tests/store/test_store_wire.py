"""
The index keeps a summary's FETCH-ready ENVELOPE, BODYSTRUCTURE and BODY in their own table
(C{wire}), apart from the JSON summary: what a warm C{FETCH 1:* (ENVELOPE)} reads.  Summaries
cached in the JSON by an older version are still read, and go with their message.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

from pymaild.store.maildir import INDEX_NAME, MaildirStore
from pymaild.store.summary import summarize, toJSON

MESSAGE = (b"From: Ann <a@example.com>\r\nTo: b@example.com\r\nSubject: hello %d\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody %d\r\n")


def make(tmp_path, n=4):
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(n):
        inbox.append(MESSAGE % (i, i))
    return user, inbox


def expected(i):
    return summarize((MESSAGE % (i, i)).replace(b"\r\n", b"\n"))  # stored with LF line ends


def test_fields_are_kept_apart_from_the_json(tmp_path):
    user, inbox = make(tmp_path)
    uids = inbox.uids()
    got = inbox.summaryFields(uids, ("envelope", "bodystructure", "body"))
    for i, uid in enumerate(uids):
        s = expected(i)
        assert got[uid] == (s.envelope, s.bodystructure, s.body)
    for text, in user.db.execute("SELECT summary FROM summaries"):
        assert not {"envelope", "bodystructure", "body"} & set(json.loads(text))
    rows = user.db.execute("SELECT uid, envelope FROM wire ORDER BY uid").fetchall()
    assert rows == [(uid, expected(i).envelope) for i, uid in enumerate(uids)]
    # the whole summary comes back together, one at a time or many
    assert inbox.summary(uids[1]) == expected(1)
    assert inbox.summaries(uids) == {uid: expected(i) for i, uid in enumerate(uids)}
    # they go with the message
    inbox.store([uids[0]], ["\\Deleted"], "add")
    inbox.expunge()
    assert [r[0] for r in user.db.execute("SELECT uid FROM wire ORDER BY uid")] == uids[1:]
    user.close()


def test_summaries_cached_by_an_older_version_are_still_read(tmp_path):
    """
    A summary cached with its fields inside the JSON (schema 4, and what a migrated index
    holds) has no C{wire} row: the fields come from the JSON, nothing is recomputed.
    """
    user, inbox = make(tmp_path)
    uids = inbox.uids()
    inbox.summaries(uids)
    db = user.db
    db.execute("DELETE FROM wire")
    marker = b'"SUBJECT FROM THE OLD JSON"'
    for i, uid in enumerate(uids):
        s = dataclasses.replace(expected(i), envelope=marker)  # so that a recomputed field would show
        db.execute("UPDATE summaries SET summary=? WHERE uid=?", (toJSON(s), uid))
    got = inbox.summaryFields(uids, ("envelope", "body"))
    assert got == {uid: (marker, expected(i).body) for i, uid in enumerate(uids)}
    assert inbox.summary(uids[2]).envelope == marker
    assert {u: s.envelope for u, s in inbox.summaries(uids).items()} == dict.fromkeys(uids, marker)
    user.close()


def test_a_summary_without_its_fields_anywhere_is_computed_again(tmp_path):
    user, inbox = make(tmp_path)
    uids = inbox.uids()
    inbox.summaries(uids)
    user.db.execute("DELETE FROM wire WHERE uid=?", (uids[1],))  # JSON without them, no wire row
    assert inbox.summaryFields(uids, ("envelope",))[uids[1]] == (expected(1).envelope,)
    assert inbox.summaries([uids[1]])[uids[1]] == expected(1)
    assert user.db.execute("SELECT count(*) FROM wire").fetchone() == (len(uids),)
    user.close()


def test_schema_4_index_gets_the_wire_table(tmp_path):
    user, inbox = make(tmp_path)
    uids = inbox.uids()
    inbox.summaries(uids)
    root = user.root
    user.close()
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.executescript("DROP TABLE wire; DROP TRIGGER messages_delete; PRAGMA user_version=4;")
    db.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    assert inbox.summaries(uids)[uids[0]].envelope == expected(0).envelope
    inbox.store([uids[0]], ["\\Deleted"], "add")
    inbox.expunge()
    assert [r[0] for r in user.db.execute("SELECT uid FROM wire ORDER BY uid")] == uids[1:]
    user.close()
