"""
The in-process name cache that lets a sync of an unchanged folder skip reading the index: it
must never hide a change made by another tool or another process.
"""

from __future__ import annotations

import os

import pytest

from pymaild.store.delivery import FileName
from pymaild.store.maildir import MaildirStore


def msg(i: int) -> bytes:
    return b"From: a@example.com\r\nSubject: hello %d\r\n\r\nbody %d\r\n" % (i, i)


@pytest.fixture
def inbox(tmp_path):
    folder = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    for i in range(6):
        folder.append(msg(i))
    folder.addListener(lambda f, changes: None)  # a session has it open: the cache is kept
    folder.sync()
    return folder


def valid(folder) -> bool:
    with folder.user.lock, folder.user.transaction():
        return folder._namesValid()


def rename(folder, uid: int, letters: str) -> None:
    path = folder.filePath(uid)
    fn = FileName.parse(path.name)
    os.rename(path, folder.path / "cur" / f"{fn.base}:2,{letters}")


def test_own_operations_keep_the_cache_and_syncs_stay_empty(inbox):
    assert valid(inbox)
    inbox.store([1, 2], ["\\Seen"], "add")
    assert valid(inbox) and not inbox.sync()
    inbox.store([3], ["\\Deleted"], "add")
    assert inbox.expunge() == [3]
    assert valid(inbox) and not inbox.sync()
    dest = inbox.user.folder("Archive") if inbox.user.exists("Archive") else inbox.user.createFolder("Archive")
    inbox.move([4], dest)
    assert valid(inbox) and not inbox.sync()
    assert [m.uid for m in inbox.messages()] == [1, 2, 5, 6]


def test_a_rename_by_another_tool_is_seen(inbox):
    assert valid(inbox)
    rename(inbox, 5, "F")
    changes = inbox.sync()
    assert changes.flagsChanged == [5]
    assert "\\Flagged" in inbox.messages([5])[0].flags
    # after our own change, another tool puts the old name back: still seen
    inbox.store([6], ["\\Answered"], "add")
    rename(inbox, 6, "")
    assert inbox.sync().flagsChanged == [6]
    assert inbox.messages([6])[0].flags == frozenset()


def test_deletes_and_new_files_by_others_are_seen(inbox):
    os.unlink(inbox.filePath(2))
    assert inbox.sync().expunged == [2]
    (inbox.path / "new" / "1700000000.M1P1Q1.host").write_bytes(msg(99))
    assert len(inbox.sync().added) == 1


def test_another_process_changing_the_index_invalidates_the_cache(inbox, tmp_path):
    """
    A second store object (another process: its own sqlite connection) changes flags and
    expunges; this process's cache no longer matches the index and is not trusted.
    """
    other = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    other.store([1], ["\\Deleted"], "add")
    other.expunge()
    assert not valid(inbox)
    inbox.sync()
    assert [m.uid for m in inbox.messages()] == [2, 3, 4, 5, 6]
    assert valid(inbox)  # rebuilt by the full scan


def test_no_listener_no_name_cache(inbox):
    inbox.listeners.clear()
    inbox.removeListener(None)
    assert inbox._names is None
    rename(inbox, 1, "S")
    assert inbox.sync().flagsChanged == [1]


def test_summary_fields_equal_the_decoded_summaries(tmp_path):
    """
    ENVELOPE/BODYSTRUCTURE/BODY read with json_extract are the same bytes as the decoded
    summary's, for quotes, backslashes, 8-bit and UTF-8 headers, cached or not.
    """
    folder = MaildirStore(tmp_path / "mail").user("bob@example.com").folder("INBOX")
    specimens = [
        b'From: "Q \\"uote\\" \\\\ back" <a@example.com>\r\nSubject: tab\there\r\n\r\nx\r\n',
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>\r\nSubject: caf\xc3\xa9 \xe9\xff\r\n\r\nbody\r\n",
        b"Subject: multi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=\"iso-8859-1\"\r\n\r\n\xe9\r\n--b--\r\n",
    ]
    uids = [folder.append(m) for m in specimens]
    fields = ("envelope", "bodystructure", "body")
    computed = folder.summaryFields(uids[:1], fields)  # not cached yet: computed and kept
    cached = folder.summaryFields(uids, fields)
    full = folder.summaries(uids)
    for uid in uids:
        assert cached[uid] == tuple(getattr(full[uid], name) for name in fields)
    assert computed[uids[0]] == cached[uids[0]]
    assert folder.summaryFields(range(1, 10), ("envelope",))[uids[1]] == (full[uids[1]].envelope,)
    with pytest.raises(ValueError):
        folder.summaryFields(uids, ("parts",))


def test_uid_array_follows_changes_by_others(inbox, tmp_path):
    assert inbox.uidArray().tolist() == [1, 2, 3, 4, 5, 6]
    other = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    other.store([2], ["\\Deleted"], "add")
    other.expunge()
    assert inbox.uidArray().tolist() == [1, 3, 4, 5, 6]
    other.store([3], ["\\Deleted"], "add")
    other.expunge()
    other.append(msg(7))  # one out, one in: the count is the same, UIDNEXT is not
    assert inbox.uidArray().tolist() == [1, 4, 5, 6, 7]
    copy = inbox.uidArray()
    copy.append(99)  # a copy: the cache is not the caller's
    assert inbox.uids() == [1, 4, 5, 6, 7]


def test_uid_arrays_stay_within_the_budget(tmp_path, monkeypatch):
    """
    UID arrays are kept without listeners too, least recently used dropped first when the
    process-wide budget is exceeded.
    """
    from pymaild.store import maildir

    budget = maildir._CacheBudget(3 * 4 * 2)  # room for two folders of three messages
    monkeypatch.setattr(maildir, "_uidCaches", budget)
    user = MaildirStore(tmp_path / "mail").user("carol@example.com")
    folders = [user.folder("INBOX")] + [user.createFolder(f"F{i}") for i in range(2)]
    for folder in folders:
        for i in range(3):
            folder.append(msg(i))
    for folder in folders:
        assert folder.uidArray().tolist() == [1, 2, 3]
    assert folders[0]._uidArray is None  # the oldest went
    assert folders[1]._uidArray is not None and folders[2]._uidArray is not None
    assert budget.used == 2 * 3 * 4
    folders[1].uidArray()  # used again: now the newest
    folders[0].uidArray()
    assert folders[2]._uidArray is None and folders[1]._uidArray is not None


def test_a_session_opened_by_the_stamps_builds_the_cache_from_names_alone(inbox, tmp_path):
    """
    A folder another store object (a fresh process) opens by its directory stamps has no
    cache; its first sync after a change compares the names alone, keeps them when they
    match, and still sees another tool's rename when they do not.
    """
    import time

    past = time.time() - 60  # (stamps are trusted only once settled: dated back, not waited for)
    for sub in ("cur", "new"):
        os.utime(inbox.path / sub, (past, past))
    inbox.sync()
    fresh = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    fresh.addListener(lambda f, changes: None)
    assert not fresh.sync() and fresh._names is None  # opened by the stamps: nothing read
    fresh.store([1], ["\\Flagged"], "add")  # (its own change: cur/'s stamp moves)
    assert fresh._names is None and not fresh.sync()
    assert valid(fresh)  # the names matched: they are the cache now

    other = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    other.addListener(lambda f, changes: None)
    assert other._names is None
    other.store([2], ["\\Seen"], "add")
    rename(other, 3, "F")  # another tool, before this process's next sync
    changes = other.sync()
    assert changes.flagsChanged == [3] and "\\Flagged" in other.messages([3])[0].flags


def test_the_listing_compared_as_sets_sees_a_swap_of_names(inbox):
    """The fast comparison (sets of names): a rename keeps the count; it is seen anyway, and so
    is a file replaced by another with the same count; a dot file is no message."""
    assert not inbox.sync() and inbox._nameSets is not None
    rename(inbox, 2, "RS")
    assert inbox.sync().flagsChanged == [2]
    assert not inbox.sync()
    (inbox.path / "cur" / ".hidden").write_bytes(b"not mail")
    assert not inbox.sync()
    assert [m.uid for m in inbox.messages()] == [1, 2, 3, 4, 5, 6]
    os.unlink(inbox.filePath(6))
    (inbox.path / "cur" / "1800000000.M2P2Q2.host:2,S").write_bytes(msg(7))
    changes = inbox.sync()
    assert changes.expunged == [6] and len(changes.added) == 1
