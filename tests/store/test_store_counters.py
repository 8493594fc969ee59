"""
The folder counters (messages, unseen, size) kept in the index's C{folders} row, which SELECT
and STATUS read instead of counting, and STORE's narrowed read of the rows a change may alter:
every kind of flag change (STORE set/add/remove, system flags and keywords, UNCHANGEDSINCE, a
rename by another program seen by sync) leaves the counters equal to a count of the messages.
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from pymaild.store import index
from pymaild.store.delivery import FileName
from pymaild.store.maildir import INDEX_NAME, MaildirStore

MESSAGE = b"From: a@example.com\r\nSubject: %d\r\n\r\nbody %d\r\n"


@pytest.fixture
def inbox(tmp_path):
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    folder = user.folder("INBOX")
    for i in range(12):
        flags = ["\\Seen"] if i % 3 else []
        if i % 4 == 0:
            flags.append("$Work")
        folder.append(MESSAGE % (i, i), flags)
    yield folder
    user.close()


def assertCounted(folder):
    messages = folder.messages()
    status = folder.status()
    assert (status["messages"], status["unseen"], status["size"]) == (
        len(messages), sum("\\Seen" not in m.flags for m in messages), sum(m.vsize for m in messages))


def flagsOf(folder):
    return {m.uid: (frozenset(m.flags), frozenset(m.keywords)) for m in folder.messages()}


@pytest.mark.parametrize("mode, flags", [
    ("add", ["\\Seen"]), ("remove", ["\\Seen"]), ("set", ["\\Seen"]), ("set", []),
    ("add", ["\\Seen", "\\Flagged"]), ("remove", ["\\Seen", "$Work"]), ("add", ["$Work"]),
    ("remove", ["$Work"]), ("set", ["$Work"]), ("add", []), ("remove", ["\\Draft"]),
])
def test_store_changes_exactly_what_it_should_and_counts_unseen(inbox, mode, flags):
    """
    STORE reads only the rows it may change: the result is the same as applying the change to
    every message in Python, the changed set is exactly the messages whose flags moved, and the
    unseen counter follows.
    """
    before = flagsOf(inbox)
    uids = sorted(before)[1:]  # not the first one: it must stay as it was
    system = {f for f in flags if f.startswith("\\")}
    keywords = {f for f in flags if not f.startswith("\\")}
    expected = {}
    for uid, (f, k) in before.items():
        if uid in uids:
            f, k = {"add": (f | system, k | keywords), "remove": (f - system, k - keywords),
                    "set": (frozenset(system), frozenset(keywords))}[mode]
        expected[uid] = (frozenset(f), frozenset(k))
    changed, failed = inbox.store(uids, flags, mode)
    assert failed == []
    assert sorted(changed) == sorted(u for u in uids if expected[u] != before[u])
    assert flagsOf(inbox) == expected
    for uid in uids:  # the file names carry the same flags
        letters = FileName.parse(inbox.filePath(uid).name).systemLetters
        assert ("S" in letters) == ("\\Seen" in expected[uid][0])
    assertCounted(inbox)


def test_unchangedsince_fails_a_modified_message_even_when_the_change_is_void(inbox):
    """RFC 7162: the UNCHANGEDSINCE test applies to every message of the set."""
    modseq = inbox.status()["highestmodseq"]
    inbox.store([2], ["\\Flagged"], "add")
    seenAlready = [m.uid for m in inbox.messages() if "\\Seen" in m.flags]
    assert 2 in seenAlready
    changed, failed = inbox.store(seenAlready, ["\\Seen"], "add", unchangedSince=modseq)
    assert changed == {} and failed == [2]
    assertCounted(inbox)


def test_sync_counts_unseen_changed_by_another_program(inbox):
    """A mail program renaming files (marking read, unread) is counted at the next sync."""
    unseen = inbox.status()["unseen"]
    cur = inbox.path / "cur"
    renamed = 0
    for name in sorted(os.listdir(cur))[:6]:
        fn = FileName.parse(name)
        letters = fn.systemLetters
        new = letters.replace("S", "") if "S" in letters else "".join(sorted(letters + "S"))
        os.rename(cur / name, cur / (name.partition(":")[0] + ":2," + new))
        renamed += 1 if "S" in letters else -1
    changes = inbox.sync()
    assert len(changes.flagsChanged) == 6
    assert inbox.status()["unseen"] == unseen + renamed
    assertCounted(inbox)


def test_schema_4_index_loses_its_flag_trigger_and_keeps_its_counters(tmp_path):
    """
    An index of schema 4 (with the per-row trigger that counted unseen messages) is migrated in
    place: same UIDs and counters, the trigger gone (else unseen would be counted twice).
    """
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(5):
        inbox.append(MESSAGE % (i, i), ["\\Seen"] if i % 2 else [])
    uids, validity = inbox.uids(), inbox.status()["uidvalidity"]
    root = user.root
    user.close()
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.executescript("""
        CREATE TRIGGER messages_flags AFTER UPDATE OF flags ON messages BEGIN
            UPDATE folders SET unseen = unseen - (instr(OLD.flags, '\\Seen') = 0)
                + (instr(NEW.flags, '\\Seen') = 0) WHERE id = NEW.folder;
        END;
        PRAGMA user_version=4;""")
    db.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    assert user.db.execute("PRAGMA user_version").fetchone() == (index.SCHEMA_VERSION,) == (6,)
    triggers = [r[0] for r in user.db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    assert "messages_flags" not in triggers
    inbox = user.folder("INBOX")
    assert inbox.uids() == uids and inbox.status()["uidvalidity"] == validity
    inbox.store(uids, ["\\Seen"], "remove")
    assert inbox.status()["unseen"] == 5
    assertCounted(inbox)
    user.close()
