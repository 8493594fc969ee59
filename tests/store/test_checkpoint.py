"""
A write of many rows (the first index of a large folder, a STORE on thousands of messages)
commits without sqlite's automatic checkpoint and leaves it to the checkpoint thread
(L{UserStore.deferCheckpoint}, L{pymaild.store.index.checkpointLater}); small writes keep
sqlite's own.  Whether the commit carried a checkpoint is read from the files: a checkpoint
copies the WAL's pages into the database file, which grows from its few schema pages to the
index's size.  The tests lower sqlite's threshold (1,000 pages of WAL, 4 MB) to 10 pages, so
that a few thousand messages cross it.
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from pymaild.store import index, maildir
from pymaild.store.maildir import INDEX_NAME, MaildirStore

HOST = "mail.example.com"
MESSAGES = 3000
PAGES = 10


@pytest.fixture
def later(monkeypatch):
    """The checkpoints asked for, not run (until the test runs them)."""
    asked = []
    monkeypatch.setattr(maildir, "checkpointLater", asked.append)
    return asked


def fill(root, n: int) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(root / sub, exist_ok=True)
    for i in range(n):
        (root / "cur" / f"{1_600_000_000 + i}.M{i}P1.{HOST},S=10,W=11:2,").touch()
    hour = os.stat(root).st_mtime - 3600
    for sub in ("cur", "new"):
        os.utime(root / sub, (hour, hour))


def open_user(tmp_path):
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    user.db.execute(f"PRAGMA wal_autocheckpoint={PAGES}")
    user._autocheckpoint = PAGES
    return user


def sizes(user) -> tuple[int, int]:
    path = user.root / INDEX_NAME
    return os.path.getsize(path), os.path.getsize(str(path) + "-wal")


def autocheckpoint(user) -> int:
    return user.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]


def test_a_first_index_commits_without_a_checkpoint_and_asks_for_one(tmp_path, later):
    user = open_user(tmp_path)
    fill(user.root, MESSAGES)
    folder = user.folder("INBOX")
    before = sizes(user)[0]
    assert len(folder.sync().added) == MESSAGES
    database, wal = sizes(user)
    assert later == [user.root / INDEX_NAME]
    assert database == before and wal > 4 * PAGES * 4096  # every page still in the WAL
    assert autocheckpoint(user) == PAGES  # (sqlite's own again for what follows)
    index.checkpointLater(user.root / INDEX_NAME)  # the real one, in its thread
    index.waitForCheckpoints()
    assert sizes(user)[0] > before + 4 * PAGES * 4096
    assert folder.status()["messages"] == MESSAGES
    user.close()
    # a new connection (another process) finds every row
    db = sqlite3.connect(user.root / INDEX_NAME)
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == MESSAGES
    db.close()


def test_a_store_on_many_messages_commits_without_a_checkpoint(tmp_path, later):
    user = open_user(tmp_path)
    fill(user.root, MESSAGES)
    folder = user.folder("INBOX")
    folder.sync()
    later.clear()
    user.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = sizes(user)
    assert before[1] == 0
    changed, failed = folder.store(range(1, MESSAGES + 1), ["\\Seen"], "add")
    assert len(changed) == MESSAGES and not failed
    assert later == [user.root / INDEX_NAME]
    assert sizes(user)[0] == before[0] and autocheckpoint(user) == PAGES
    # a small STORE keeps sqlite's automatic checkpoint, which the WAL's size now calls for
    changed, _ = folder.store([1, 2], ["\\Flagged"], "add")
    assert len(changed) == 2 and later == [user.root / INDEX_NAME]
    assert sizes(user)[0] > before[0]
    user.close()


def test_small_syncs_ask_for_no_checkpoint(tmp_path, later):
    user = open_user(tmp_path)
    fill(user.root, 10)
    folder = user.folder("INBOX")
    assert len(folder.sync().added) == 10
    (user.root / "new" / f"1700000000.M1P1.{HOST},S=9,W=9").write_bytes(b"Subject: x\n\nx\n")
    assert folder.sync().added == [11]
    folder.store([1], ["\\Seen"], "add")
    assert later == []
    user.close()


def test_a_checkpoint_of_a_removed_index_creates_none(tmp_path):
    gone = tmp_path / "gone" / INDEX_NAME
    gone.parent.mkdir()  # (the user's directory is there, its index is not: sqlite could create one)
    index.checkpointLater(gone)
    index.waitForCheckpoints()
    assert not gone.exists()
