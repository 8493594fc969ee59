"""
Folder.flagIndex: every message's UID, flags and MODSEQ as arrays, kept between calls while
the index's key (UIDNEXT, HIGHESTMODSEQ, count) is unchanged, updated in a copy by this
process's STOREs, read again after anything else (an expunge, a delivery, another process).
Its answers always equal the index rows (Folder.messages()).  A large folder's is stored in the
index file (table flagindex) for the next process, under the key and UIDVALIDITY.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from array import array

import pytest

from conftest import held_by_another_thread

from pymaild.store import index as indexmod
from pymaild.store import maildir
from pymaild.store.maildir import INDEX_NAME, MaildirStore


def decoded(index):
    out = {}
    for uid, code, modseq in zip(index.uids, index.codes, index.modseqs):
        flags, keywords = index.pairs[code]
        out[uid] = (frozenset(flags.split()), frozenset(keywords.split()), modseq)
    return out


def rows(folder):
    return {m.uid: (m.flags, m.keywords, m.modseq) for m in folder.messages()}


def makeInbox(tmp_path, n=40):
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    for i in range(n):
        flags = (["\\Seen"] if i % 2 else []) + (["$Work"] if i % 5 == 0 else [])
        inbox.append(b"Subject: %d\n\nbody\n" % i, flags)
    return user, inbox


def test_flag_index_is_the_index_rows_and_is_kept(tmp_path):
    user, inbox = makeInbox(tmp_path)
    index = inbox.flagIndex()
    assert decoded(index) == rows(inbox)
    assert list(index.uids) == sorted(index.uids) and len(index.uids) == 40
    assert inbox.flagIndex() is index  # nothing changed: kept
    user.close()


def test_a_store_updates_a_copy(tmp_path):
    user, inbox = makeInbox(tmp_path, 200)
    before = inbox.flagIndex()
    frozen = decoded(before)
    inbox.store([3, 4, 7], ["\\Flagged", "Later"], "add")
    after = inbox.flagIndex()
    assert after is not before and after is inbox._flagIndex[1]  # updated, not read again
    assert decoded(before) == frozen  # the arrays a session may be reading did not change
    assert decoded(after) == rows(inbox)
    inbox.store([4], ["\\Flagged"], "remove")
    assert decoded(inbox.flagIndex()) == rows(inbox)
    inbox.store(range(1, 201), ["\\Seen"], "add")  # 100 of 200, over a quarter: dropped, read again
    assert inbox._flagIndex is None
    assert decoded(inbox.flagIndex()) == rows(inbox)
    user.close()


def test_other_changes_read_it_again(tmp_path):
    user, inbox = makeInbox(tmp_path)
    first = inbox.flagIndex()
    inbox.store([2], ["\\Deleted"], "add")
    inbox.expunge()
    assert decoded(inbox.flagIndex()) == rows(inbox) and 2 not in inbox.flagIndex().uids
    inbox.append(b"Subject: new\n\nx\n", ["\\Draft"])
    assert decoded(inbox.flagIndex()) == rows(inbox) and len(inbox.flagIndex().uids) == 40
    # another process (its own connection to the index) changes a flag
    other = MaildirStore(tmp_path / "mail").user("alice@example.com")
    other.folder("INBOX").store([5], ["$Other"], "add")
    other.close()
    index = inbox.flagIndex()
    assert decoded(index) == rows(inbox) and "$Other" in decoded(index)[5][1]
    assert first is not index
    user.close()


def test_kept_flag_index_is_given_only_current_and_without_waiting(tmp_path):
    """
    keptFlagIndex (what the reactor may call): the kept index while it is current, else None,
    never reading it (the caller then goes through a store thread), and None at once while a
    store thread holds the user's lock.
    """
    user, inbox = makeInbox(tmp_path)
    assert inbox.keptFlagIndex() is None  # not read yet: not read here
    index = inbox.flagIndex()
    assert inbox.keptFlagIndex() is index
    inbox.store([3], ["\\Flagged"], "add")  # this process's STORE updates the kept copy
    kept = inbox.keptFlagIndex()
    assert kept is not None and kept is not index and decoded(kept) == rows(inbox)
    other = MaildirStore(tmp_path / "mail").user("alice@example.com")  # another process's change
    other.folder("INBOX").store([5], ["$Other"], "add")
    other.close()
    assert inbox.keptFlagIndex() is None
    assert "$Other" in decoded(inbox.flagIndex())[5][1] and inbox.keptFlagIndex() is not None
    inbox.append(b"Subject: new\n\nx\n")  # a delivery moves the key
    assert inbox.keptFlagIndex() is None
    inbox.flagIndex()

    with held_by_another_thread(user.lock):
        assert inbox.keptFlagIndex() is None  # (a blocking acquire would wait 10 s, then get it)
    assert inbox.keptFlagIndex() is not None
    user.close()


def test_the_next_process_reads_the_stored_flag_index(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "FLAG_INDEX_STORED_FROM", 10)
    user, inbox = makeInbox(tmp_path)
    first = decoded(inbox.flagIndex())
    assert user.db.execute("SELECT count(*) FROM flagindex").fetchone() == (1,)
    root = user.root
    user.close()
    # the next process trusts the stored row while the key holds: shown by a row changed by hand
    db = sqlite3.connect(root / INDEX_NAME)
    (codes,) = db.execute("SELECT codes FROM flagindex").fetchone()
    changed = array("I")
    changed.frombytes(codes)
    changed[0] = 1 - changed[0] if changed[0] < 2 else 0
    db.execute("UPDATE flagindex SET codes=?", (changed.tobytes(),))
    db.commit()
    db.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    read = inbox.flagIndex()
    assert read.codes == changed and decoded(read) != first
    user.close()
    # any change moves the key: the stored row is not used, the rows are read and stored again
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    inbox.store([7], ["\\Answered"], "add")
    user.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    assert decoded(inbox.flagIndex()) == rows(inbox) != first
    user.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    assert decoded(inbox.flagIndex()) == rows(inbox)  # (read from the row stored just before)
    user.close()


def test_a_deleted_folder_takes_its_stored_flag_index_along(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "FLAG_INDEX_STORED_FROM", 10)
    user, _ = makeInbox(tmp_path, 0)
    work = user.createFolder("Work")
    for i in range(20):
        work.append(b"Subject: %d\n\nx\n" % i, ["\\Seen"])
    work.flagIndex()
    assert user.db.execute("SELECT count(*) FROM flagindex").fetchone() == (1,)
    user.deleteFolder("Work")
    assert user.db.execute("SELECT count(*) FROM flagindex").fetchone() == (0,)
    user.close()


def test_an_index_without_the_flagindex_table_gets_it_and_stays_schema_6(tmp_path):
    """
    The table is a cache an older pymaild ignores: added to a version-6 index without a new
    schema version (a new version would make an older pymaild rebuild the index, new UIDs).
    """
    user, inbox = makeInbox(tmp_path)
    uids = inbox.uids()
    root = user.root
    user.close()
    db = sqlite3.connect(root / INDEX_NAME, isolation_level=None)
    db.executescript("""
        DROP TABLE flagindex; DROP TRIGGER folders_delete;
        CREATE TRIGGER folders_delete AFTER DELETE ON folders BEGIN
            DELETE FROM expunged WHERE folder = OLD.id;
        END;""")
    db.close()
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    assert user.db.execute("PRAGMA user_version").fetchone() == (indexmod.SCHEMA_VERSION,) == (6,)
    inbox = user.folder("INBOX")
    assert inbox.uids() == uids  # not rebuilt
    assert decoded(inbox.flagIndex()) == rows(inbox)
    assert "flagindex" in user.db.execute(
        "SELECT sql FROM sqlite_master WHERE name='folders_delete'").fetchone()[0]
    user.close()


def test_a_flag_index_read_while_another_process_writes(tmp_path, monkeypatch):
    """
    Reading the flag index takes no write lock: another process holding one does not hold it
    up (storing the row for the next process is skipped after 0.1 s), and a folder another
    process deleted gives an empty flag index, not an error.
    """
    monkeypatch.setattr(maildir, "FLAG_INDEX_STORED_FROM", 10)
    user, inbox = makeInbox(tmp_path)
    other = sqlite3.connect(user.root / INDEX_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE folders SET newstamp = newstamp")
    import time

    started = time.monotonic()
    assert decoded(inbox.flagIndex()) == rows(inbox)
    assert time.monotonic() - started < 5
    assert user.db.execute("SELECT count(*) FROM flagindex").fetchone() == (0,)  # not stored
    assert user.db.execute("PRAGMA busy_timeout").fetchone() == (indexmod.BUSY_TIMEOUT * 1000,)
    other.execute("DELETE FROM folders WHERE name='INBOX'")
    other.execute("COMMIT")
    other.close()
    assert len(inbox.flagIndex().uids) == 0
    user.close()


def test_a_store_that_does_not_commit_leaves_no_cache_behind(tmp_path):
    """
    A STORE whose COMMIT fails (denied here by an sqlite authorizer; a full disk in life) is
    rolled back, and the flag index and name cache it had updated are dropped: the next change
    (here another process's) takes the same MODSEQ, so a kept copy would have looked current
    while saying what the index never held.  Then the messages read from their files as the
    next sync finds them.
    """
    user, inbox = makeInbox(tmp_path)
    inbox.addListener(lambda folder, changes: None)  # (names are kept for folders in use)
    inbox.sync(force=True)
    inbox.flagIndex()
    assert inbox.keepsFlagIndex() and inbox._names is not None

    def noCommit(action, arg1, *rest):
        return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" else sqlite3.SQLITE_OK

    before = rows(inbox)
    user.db.set_authorizer(noCommit)
    try:
        with pytest.raises(sqlite3.DatabaseError):
            inbox.store(range(1, 6), ["\\Flagged"], "add")
    finally:
        user.db.set_authorizer(None)
    assert not user.db.in_transaction and rows(inbox) == before
    assert not inbox.keepsFlagIndex() and inbox._names is None
    # another process's change takes the MODSEQ the failed one had taken: the same index key
    other = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    other.store([20], ["\\Answered"], "add")
    assert decoded(inbox.flagIndex()) == rows(inbox) == rows(other)
    assert inbox.open(3).read() == b"Subject: 2\n\nbody\n"  # (renamed on disk: found by a sync)
    assert decoded(inbox.flagIndex()) == rows(inbox) and "\\Flagged" in rows(inbox)[3][0]


@pytest.mark.parametrize("reopenFailsOnce", [False, True])
def test_a_transaction_whose_rollback_fails_too_leaves_a_working_connection(tmp_path, monkeypatch, reopenFailsOnce):
    """
    A STORE whose COMMIT fails and whose ROLLBACK fails after it (both denied here) would leave
    the connection in its transaction, every later BEGIN refused: the connection is dropped
    (which rolls back) and the index opened again, and the next STORE works.  Should that
    reopening fail, the next transaction tries it again before its BEGIN.
    """
    if reopenFailsOnce:
        calls = []

        def flaky(path):
            calls.append(path)
            if len(calls) == 1:
                raise sqlite3.OperationalError("disk I/O error")
            return indexmod.reopen(path)

        monkeypatch.setattr(maildir, "reopen", flaky)
    user, inbox = makeInbox(tmp_path)
    inbox.flagIndex()
    first = user.db

    def noEnd(action, arg1, *rest):
        denied = action == sqlite3.SQLITE_TRANSACTION and arg1 in ("COMMIT", "ROLLBACK")
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    before = rows(inbox)
    user.db.set_authorizer(noEnd)
    with pytest.raises(sqlite3.DatabaseError):
        inbox.store(range(1, 6), ["\\Flagged"], "add")
    if reopenFailsOnce:
        assert user.db is first and first.in_transaction
        first.set_authorizer(None)
        with user.transaction():  # (reopens first)
            pass
    assert user.db is not first and not user.db.in_transaction
    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")  # (closed)
    raw = sqlite3.connect(user.root / "pymaild.index.sqlite")
    committed = dict(raw.execute("SELECT uid, modseq FROM messages"))
    raw.close()
    assert committed == {u: m for u, (_, _, m) in before.items()}  # (nothing of it committed)
    changed, _ = inbox.store([7], ["\\Answered"], "add")
    other = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    assert list(changed) == [7]
    assert decoded(inbox.flagIndex()) == rows(inbox) == rows(other)
    user.close()


def test_a_bulk_store_answers_from_the_committed_index_before_its_renames(tmp_path, monkeypatch):
    """
    A bulk STORE commits its rows first and calls C{answer} before any file is renamed: another
    connection to the index (another process) already reads the new flags, and C{answer} may
    read the messages (the user's lock is held); then the files are renamed and C{cur/}
    fsynced after the last rename, before C{store} returns.  A small STORE renames first and
    answers at its end.
    """
    user, inbox = makeInbox(tmp_path, 120)
    inbox.flagIndex()
    events, seen = [], {}
    realRename, realFsync = os.rename, os.fsync

    def rename(*args, **kwargs):
        events.append("rename")
        return realRename(*args, **kwargs)

    def fsync(fd):
        events.append("fsync")
        return realFsync(fd)

    monkeypatch.setattr(maildir.os, "rename", rename)
    monkeypatch.setattr(maildir.os, "fsync", fsync)

    def answer(changed, failed):
        events.append("answer")
        other = sqlite3.connect(user.root / INDEX_NAME)
        try:
            seen["other"] = other.execute(
                "SELECT count(*) FROM messages WHERE folder=? AND flags LIKE '%Flagged%'", (inbox.id,)).fetchone()[0]
        finally:
            other.close()
        seen["here"] = sum("\\Flagged" in f for f, _, _ in rows(inbox).values())
        seen["answered"] = (changed, failed)

    changed, failed = inbox.store(range(1, 121), ["\\Flagged"], "add", answer=answer)
    assert seen == {"other": 120, "here": 120, "answered": (changed, failed)}
    assert len(changed) == 120 and not failed
    assert events[0] == "answer" and events.count("rename") == 120 and events[-1] == "fsync"
    for uid in changed:
        assert "F" in inbox.filePath(uid).name.partition(":2,")[2]
    assert decoded(inbox.flagIndex()) == rows(inbox)
    events.clear()
    small, _ = inbox.store([1, 2, 3], ["\\Answered"], "add", answer=lambda c, f: events.append("answer"))
    assert len(small) == 3 and events == ["rename"] * 3 + ["fsync", "answer"]
    user.close()


class Crash(BaseException):
    """The process ends here."""


def test_a_crash_between_a_bulk_stores_commit_and_its_renames_is_found_by_the_next_sync(tmp_path, monkeypatch):
    """
    The process dies after a bulk STORE's COMMIT (its answer may have gone out) and before its
    renames: the next process's first sync lists the directories (the STORE forgot their
    stamps), takes each message's flags from its file, as after another process's rename, and
    gives them a MODSEQ above the STORE's, so that no MODSEQ a client saw comes back with other
    flags; the index's names are the files' again.
    """
    user, inbox = makeInbox(tmp_path, 120)
    before = rows(inbox)
    past = time.time() - 60
    for sub in ("new", "cur"):
        os.utime(inbox.path / sub, (past, past))
    inbox.sync(force=True)  # (the directories' stamps recorded, settled: a plain sync would not list them)
    assert all(inbox._storedStamps())

    def crash(self, *args, **kwargs):
        raise Crash()

    monkeypatch.setattr(maildir.Folder, "_renamePlanned", crash)
    answered = {}
    with pytest.raises(Crash):
        inbox.store(range(1, 121), ["\\Flagged"], "add", answer=lambda c, f: answered.update(c))
    monkeypatch.undo()
    stored = max(m for _, m in answered.values())
    assert len(answered) == 120
    user.close()

    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    inbox = user.folder("INBOX")
    inbox.sync()
    after = rows(inbox)
    assert sorted(after) == sorted(before)
    for uid, (flags, keywords, modseq) in after.items():
        assert (flags, keywords) == before[uid][:2] and modseq > stored
        path = inbox.filePath(uid)
        assert path.exists() and "F" not in path.name.partition(":2,")[2]
    assert inbox.status()["highestmodseq"] > stored
    assert inbox.status()["unseen"] == sum("\\Seen" not in f for f, _, _ in after.values())
    user.close()


def test_a_bulk_store_leaves_the_files_another_process_took_to_the_next_sync(tmp_path, monkeypatch):
    """
    Files another process removed or renamed between a bulk STORE's COMMIT and its renames:
    the STORE has answered that they changed; its other renames are done, and the next sync
    (which lists the directories: the STORE forgot their stamps) sees what became of the
    others, with the caches and counters agreeing with the rows.
    """
    user, inbox = makeInbox(tmp_path, 120)
    inbox.flagIndex()
    taken = {7: "unlink", 8: "rename", 90: "unlink"}
    real = maildir.Folder._renamePlanned
    paths = {uid: inbox.filePath(uid) for uid in taken}  # (the STORE holds the user's lock)

    def otherProcess(self, *args, **kwargs):
        for uid, how in taken.items():
            path = paths[uid]
            if how == "unlink":
                path.unlink()
            else:
                path.rename(path.with_name(path.name.partition(":")[0] + ":2,T"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(maildir.Folder, "_renamePlanned", otherProcess)
    before = rows(inbox)
    changed, failed = inbox.store(range(1, 121), ["\\Answered"], "add")
    assert not failed and sorted(changed) == list(range(1, 121))
    monkeypatch.setattr(maildir.Folder, "_renamePlanned", real)
    for uid in changed:
        if uid not in taken:
            assert inbox.filePath(uid).exists()
    stored = max(m for _, m in changed.values())
    inbox.sync()
    now = rows(inbox)
    assert 7 not in now and 90 not in now and now[8][0] == {"\\Deleted"}  # (the other process's ":2,T")
    assert now[8][2] > stored
    assert all("\\Answered" in now[u][0] and now[u][2] > before[u][2] for u in now if u != 8)
    assert decoded(inbox.flagIndex()) == now
    assert inbox.status()["unseen"] == sum("\\Seen" not in f for f, _, _ in now.values())
    user.close()


def test_a_bulk_store_writes_its_rows_by_key(tmp_path):
    """
    The bulk STORE's one UPDATE goes through its JSON array and finds each row by the primary
    key (without the subquery's LIMIT, sqlite scanned the array once per row of the folder).
    """
    user, inbox = makeInbox(tmp_path, 5)
    plan = " / ".join(r[3] for r in user.db.execute("EXPLAIN QUERY PLAN " + maildir._BULK_STORE, ("[]", 1, inbox.id)))
    assert "SEARCH messages USING PRIMARY KEY (folder=? AND uid=?)" in plan, plan
    user.close()


@pytest.mark.parametrize("failing", ["rename", "update"])
def test_a_bulk_store_that_fails_midway_leaves_index_and_files_agreeing(tmp_path, monkeypatch, failing):
    """
    An UPDATE that sqlite refuses fails a bulk STORE before anything is renamed: nothing of it
    is in the index or the caches, and the connection is out of its transaction.  A rename that
    fails with an I/O error half way comes after the COMMIT (the STORE has answered): it is
    logged and a sync at once takes the flags of the files as they are (those renamed before
    the failure have the change, the others are as they were, with a new MODSEQ).  Either
    way the next STORE works.
    """
    user, inbox = makeInbox(tmp_path, 120)
    inbox.flagIndex()
    before = rows(inbox)
    if failing == "rename":
        real, count = os.rename, [0]

        def rename(*args, **kwargs):
            count[0] += 1
            if count[0] == 50:
                raise OSError(errno.EIO, "I/O error")
            return real(*args, **kwargs)

        monkeypatch.setattr(maildir.os, "rename", rename)
        changed, failed = inbox.store(range(1, 121), ["\\Flagged"], "add")
        assert len(changed) == 120 and not failed
        stored = max(m for _, m in changed.values())
    else:
        def deny(action, table, column, db, trigger):
            return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_UPDATE and table == "messages" else sqlite3.SQLITE_OK

        user.db.set_authorizer(deny)
        with pytest.raises(sqlite3.DatabaseError):
            inbox.store(range(1, 121), ["\\Flagged"], "add")
    monkeypatch.undo()
    user.db.set_authorizer(None)
    assert not user.db.in_transaction
    now = rows(inbox)
    assert decoded(inbox.flagIndex()) == now
    if failing == "update":
        assert now == before
    assert sorted(now) == sorted(before)
    for uid, (flags, _, modseq) in now.items():
        path = inbox.filePath(uid)  # (the index's name is the file's)
        assert path.exists() and ("F" in path.name.partition(":2,")[2]) == ("\\Flagged" in flags)
        if failing == "rename" and "\\Flagged" not in flags:
            assert modseq > stored
    assert sum("\\Flagged" in f for f, _, _ in now.values()) == (49 if failing == "rename" else 0)
    changed, failed = inbox.store(range(1, 121), ["\\Flagged"], "add")
    assert not failed and all("\\Flagged" in f for f, _, _ in rows(inbox).values())
    assert decoded(inbox.flagIndex()) == rows(inbox)
    user.close()
