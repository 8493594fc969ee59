"""
The store side of CONDSTORE/QRESYNC (RFC 7162): every removal of a message is recorded with
the MODSEQ of that removal (expunge, move away, a file gone in a sync), L{Folder.vanished} and
L{Folder.changedSince} answer from the index, MODSEQs only grow (also for changes made by other
processes), and a version-3 index is migrated in place.  Also the header fields SEARCH reads in
bulk (L{Folder.headerFields}).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pymaild.store import index
from pymaild.store.delivery import deliver
from pymaild.store.maildir import INDEX_NAME, MaildirStore, UserStore
from pymaild.store.summary import summarize, toJSON

MESSAGE = b"From: a%d@example.com\r\nTo: b@example.com\r\nSubject: hello %d\r\n\r\nbody\r\n"


def msg(i: int) -> bytes:
    return MESSAGE % (i, i)


@pytest.fixture
def user(tmp_path) -> UserStore:
    return MaildirStore(tmp_path / "mail").user("alice@example.com")


def filled(user, name="INBOX", n=5):
    folder = user.folder(name) if name == "INBOX" or user.exists(name) else user.createFolder(name)
    for i in range(n):
        folder.append(msg(i))
    return folder


def touched(folder):
    """Make cur/ look changed (a rename within one clock tick may leave its mtime as it was)."""
    os.utime(folder.path / "cur", ns=(0, 0))
    return folder


def highest(folder) -> int:
    return folder.status()["highestmodseq"]


def allModseqs(folder) -> list[int]:
    return [m.modseq for m in folder.messages()]


def test_expunge_is_recorded_with_a_new_modseq(user):
    inbox = filled(user)
    inbox.store([2, 4], ["\\Deleted"], "add")
    before = highest(inbox)
    assert inbox.vanished(0) == []
    assert inbox.expunge() == [2, 4]
    after = highest(inbox)
    assert after > before
    assert inbox.vanished(before) == [2, 4]
    assert inbox.vanished(after) == []
    # a second expunge, later: each UID keeps the MODSEQ of its own removal
    inbox.store([5], ["\\Deleted"], "add")
    inbox.expunge([5])
    assert inbox.vanished(after) == [5]
    assert inbox.vanished(before) == [2, 4, 5]
    assert highest(inbox) > after


def test_vanished_limited_to_uids(user):
    inbox = filled(user, n=8)
    inbox.store([1, 3, 6, 8], ["\\Deleted"], "add")
    inbox.expunge()
    assert inbox.vanished(0) == [1, 3, 6, 8]
    assert inbox.vanished(0, [3, 4, 5, 6, 100]) == [3, 6]
    assert inbox.vanished(0, range(2, 7)) == [3, 6]
    assert inbox.vanished(0, range(4, 4)) == []
    assert inbox.vanished(0, iter([8, 1])) == [1, 8]
    assert inbox.vanished(0, []) == []


def test_move_records_the_source_side(user):
    inbox = filled(user)
    other = user.createFolder("Other")
    before, otherBefore = highest(inbox), highest(other)
    pairs = inbox.move([1, 3], other)
    assert [o for o, _ in pairs] == [1, 3]
    assert highest(inbox) > before and highest(other) > otherBefore
    assert inbox.vanished(before) == [1, 3]
    assert other.vanished(0) == []
    assert [m.uid for m in other.changedSince(otherBefore)] == [n for _, n in pairs]


def test_files_gone_behind_the_stores_back_are_recorded(user):
    """
    A file deleted by another tool, and one moved into another folder by another tool, are
    recorded as expunged by the next sync with a new MODSEQ.
    """
    inbox = filled(user, n=4)
    other = user.createFolder("Other")
    paths = inbox.paths([1, 2, 3, 4])
    before = highest(inbox)
    subprocess.run(["rm", str(paths[2])], check=True)
    subprocess.run(["mv", str(paths[4]), str(other.path / "cur" / os.path.basename(paths[4]))], check=True)
    changes = touched(inbox).sync()
    assert changes.expunged == [2, 4]
    assert highest(inbox) > before
    assert inbox.vanished(before) == [2, 4]
    assert inbox.vanished(highest(inbox)) == []
    assert touched(other).sync().added == [1]
    assert other.vanished(0) == []


def test_modseq_grows_for_changes_by_other_processes(user, tmp_path):
    """
    Every flag change gets a MODSEQ greater than any before: our STORE, a rename of the file
    by another program noticed by a sync, and STORE by another pymaild process sharing the
    index; appended and delivered messages get new ones too.
    """
    inbox = filled(user, n=3)
    seqs = allModseqs(inbox)
    assert seqs == sorted(set(seqs)) and highest(inbox) == max(seqs)

    changed, _ = inbox.store([1], ["\\Flagged"], "add")
    assert changed[1][1] > max(seqs) and highest(inbox) == changed[1][1]

    path = inbox.paths([2])[2]
    before = highest(inbox)
    subprocess.run(["mv", str(path), str(path).replace(":2,", ":2,S")], check=True)
    assert touched(inbox).sync().flagsChanged == [2]
    (m2,) = inbox.changedSince(before)
    assert m2.uid == 2 and m2.flags == {"\\Seen"} and m2.modseq > before
    assert highest(inbox) == m2.modseq

    before = highest(inbox)
    code = (
        "import sys; from pymaild.store.maildir import UserStore;"
        "f = UserStore(sys.argv[1]).folder('INBOX'); f.sync(); print(f.store([3], ['\\\\Answered'], 'add')[0][3][1])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(user.root)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    theirs = int(out.stdout)
    assert theirs > before
    assert [m.uid for m in inbox.changedSince(before)] == [3]
    assert highest(inbox) == theirs

    deliver(inbox.path, msg(9))
    before = highest(inbox)
    assert inbox.sync().added == [4]
    (m4,) = inbox.changedSince(before)
    assert m4.uid == 4 and m4.modseq > before


def test_changed_since(user):
    inbox = filled(user, n=6)
    mark = highest(inbox)
    assert inbox.changedSince(mark) == []
    inbox.store([2, 5], ["\\Seen"], "add")
    assert [m.uid for m in inbox.changedSince(mark)] == [2, 5]
    assert [m.uid for m in inbox.changedSince(mark, [1, 2, 3])] == [2]
    assert [m.uid for m in inbox.changedSince(mark, range(3, 7))] == [5]
    assert [m.uid for m in inbox.changedSince(0)] == [1, 2, 3, 4, 5, 6]
    (m,) = inbox.changedSince(mark, [5])
    assert m.flags == {"\\Seen"} and m.modseq == highest(inbox)
    assert inbox.changedSince(mark) == [x for x in inbox.messages() if x.modseq > mark]


def test_folder_delete_drops_and_rename_carries(user):
    foo = filled(user, "Foo", n=3)
    foo.store([2], ["\\Deleted"], "add")
    foo.expunge()
    user.renameFolder("Foo", "Bar")
    bar = user.folder("Bar")
    assert bar.id == foo.id and bar.vanished(0) == [2]
    user.deleteFolder("Bar")
    assert user.db.execute("SELECT count(*) FROM expunged WHERE folder=?", (foo.id,)).fetchone() == (0,)
    again = user.createFolder("Bar")
    assert again.vanished(0) == [] and again.changedSince(0) == []


def test_inbox_rename_records_the_moved_messages(user):
    inbox = filled(user, n=3)
    before = highest(inbox)
    user.renameFolder("INBOX", "Old")
    assert inbox.vanished(before) == [1, 2, 3]
    assert user.folder("Old").vanished(0) == []


def test_header_fields_in_bulk(user):
    inbox = user.folder("INBOX")
    inbox.append(b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\nSubject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
                 b"Cc: c1@example.com\r\nCc: c2@example.com\r\n\r\nbody\r\n")
    inbox.append(b"Subject: no sender\r\n\r\nbody\r\n")
    fields = inbox.headerFields(["from", "subject", "cc", "bcc"])
    assert fields == {
        "from": {1: "Jörg <j@example.com>"},
        "subject": {1: "Grüße", 2: "no sender"},
        "cc": {1: "c1@example.com\nc2@example.com"},
        "bcc": {},
    }
    for uid in (1, 2):
        kept = inbox.summary(uid).headerFields
        assert {n: v for n in fields if (v := fields[n].get(uid)) is not None} == \
            {n: kept[n] for n in fields if n in kept}
    assert inbox.headerFields(["subject"], [2]) == {"subject": {2: "no sender"}}
    with pytest.raises(ValueError):
        inbox.headerFields(["received"])
    inbox.store([1], ["\\Deleted"], "add")
    inbox.expunge()
    assert user.db.execute("SELECT count(*) FROM fields").fetchone() == (1,)


def test_header_fields_computed_once(user):
    """
    The first call keeps the fields of every message: read from the headers of those never
    summarized (no summary made), from the summary of one summarized before; later calls read
    the index.
    """
    inbox = filled(user, n=3)
    inbox.summaries([2])
    assert user.db.execute("SELECT count(*) FROM summaries").fetchone() == (1,)
    assert inbox.headerFields(["from"])["from"] == {i + 1: f"a{i}@example.com" for i in range(3)}
    assert user.db.execute("SELECT count(*) FROM summaries").fetchone() == (1,)
    assert user.db.execute("SELECT count(*) FROM fields").fetchone() == (3,)
    for path in inbox.paths([1, 2, 3]).values():
        Path(path).write_bytes(b"Subject: changed\n\n")  # were a file read again, this would show
    assert inbox.headerFields(["subject"])["subject"] == {1: "hello 0", 2: "hello 1", 3: "hello 2"}
    assert user.db.execute("SELECT count(*) FROM fields").fetchone() == (3,)
    # a summary cached without its fields (as by an older pymaild): filled in from the summary
    user.db.execute("DELETE FROM fields WHERE uid=2")
    assert inbox.headerFields(["from"])["from"][2] == "a1@example.com"
    assert user.db.execute("SELECT count(*) FROM fields").fetchone() == (3,)


# --- migration from schema 3 ---------------------------------------------------------------------

V3_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special TEXT,
    newstamp TEXT NOT NULL DEFAULT '',
    curstamp TEXT NOT NULL DEFAULT '',
    messages INTEGER NOT NULL DEFAULT 0,
    unseen INTEGER NOT NULL DEFAULT 0,
    vsize INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    name TEXT NOT NULL,
    innew INTEGER NOT NULL,
    flags TEXT NOT NULL,
    keywords TEXT NOT NULL,
    modseq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    vsize INTEGER NOT NULL,
    internaldate INTEGER,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS summaries (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS messages_delete AFTER DELETE ON messages BEGIN
    UPDATE folders SET messages = messages - 1, unseen = unseen - (instr(OLD.flags, '\\Seen') = 0),
        vsize = vsize - OLD.vsize WHERE id = OLD.folder;
    DELETE FROM summaries WHERE folder = OLD.folder AND uid = OLD.uid;
END;
CREATE TRIGGER IF NOT EXISTS messages_flags AFTER UPDATE OF flags ON messages BEGIN
    UPDATE folders SET unseen = unseen - (instr(OLD.flags, '\\Seen') = 0) + (instr(NEW.flags, '\\Seen') = 0)
        WHERE id = NEW.folder;
END;
CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY);
"""

UIDVALIDITY = 1234567


def v3Index(root):
    """
    A user directory with three messages in INBOX (UIDs 10, 11, 12; UIDs 1-9 long gone) and an
    index written with schema 3 as pymaild 3 left it, two summaries cached and one broken.
    """
    bodies = [b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\nSubject: first\n\nx\n",
              b"From: b@example.com\nSubject: =?iso-8859-1?q?caf=E9?=\n\ny\n",
              b"Subject: third\n\nz\n"]
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.executescript("BEGIN;" + V3_SCHEMA + "PRAGMA user_version=3; COMMIT;")
    db.execute("INSERT INTO folders (id, name, uidvalidity, uidnext, highestmodseq, messages, unseen, vsize)"
               " VALUES (1, 'INBOX', ?, 13, 40, 3, 3, 0)", (UIDVALIDITY,))
    for i, body in enumerate(bodies):
        uid, name = 10 + i, f"100000000{i}.M1P1.host,S={len(body)}:2,"
        (root / "cur" / name).write_bytes(body)
        db.execute("INSERT INTO messages VALUES (1, ?, ?, 0, '', '', ?, ?, ?, 100000000)",
                   (uid, name, 30 + i, len(body), len(body) + body.count(b"\n")))
        if i < 2:
            with open(root / "cur" / name, "rb") as f:
                db.execute("INSERT INTO summaries VALUES (1, ?, ?)", (uid, toJSON(summarize(f))))
        else:  # a broken cached summary must not fail the migration
            db.execute("INSERT INTO summaries VALUES (1, ?, '{\"v\": 1, trunc')", (uid,))
    db.close()


def test_migration_from_schema_3(tmp_path):
    root = tmp_path / "alice"
    v3Index(root)
    user = UserStore(root)
    assert user.db.execute("PRAGMA user_version").fetchone() == (index.SCHEMA_VERSION,) == (6,)
    inbox = user.folder("INBOX")
    status = inbox.status()
    assert (status["uidvalidity"], status["uidnext"], status["highestmodseq"]) == (UIDVALIDITY, 13, 40)
    assert inbox.uids() == [10, 11, 12]
    assert inbox.sync().expunged == []  # the files and the migrated index agree
    assert inbox.uids() == [10, 11, 12] and inbox.uidvalidity == UIDVALIDITY
    # the cached summaries' fields were extracted by the migration, without reading files
    rows = user.db.execute("SELECT uid, h_from, h_subject, h_to FROM fields ORDER BY uid").fetchall()
    assert rows == [(10, "Jörg <j@example.com>", "first", None), (11, "b@example.com", "café", None)]
    assert inbox.headerFields(["subject"])["subject"] == {10: "first", 11: "café", 12: "third"}
    # the new triggers are in place: expunge records, deletes the fields
    inbox.store([11], ["\\Deleted"], "add")
    assert inbox.expunge() == [11]
    assert inbox.vanished(40) == [11] and highest(inbox) > 41
    assert user.db.execute("SELECT uid FROM fields ORDER BY uid").fetchall() == [(10,), (12,)]
    assert user.db.execute("SELECT uid FROM summaries ORDER BY uid").fetchall() == [(10,), (12,)]
    user.close()
    assert not list(root.glob("*.corrupt*"))


def test_migration_is_idempotent(tmp_path):
    """
    Two processes may both see version 3 and migrate one after the other: running the
    migration over a migrated index changes nothing.
    """
    root = tmp_path / "alice"
    v3Index(root)
    UserStore(root).close()
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.execute("PRAGMA user_version=3")
    db.close()
    user = UserStore(root)
    inbox = user.folder("INBOX")
    assert inbox.uids() == [10, 11, 12] and inbox.uidvalidity == UIDVALIDITY
    assert user.db.execute("SELECT count(*) FROM fields").fetchone() == (2,)
    triggers = [r[0] for r in user.db.execute("SELECT name FROM sqlite_master WHERE type='trigger' ORDER BY name")]
    assert triggers == ["folders_delete", "messages_delete"]
