"""
The Maildir++ store over real files: layout as Dovecot has it, sync with other writers, every
operation the protocols need, UIDs and MODSEQs, hostile names, quota, index rebuild.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from pymaild.store import maildir, names
from pymaild.store.delivery import FLAG_LETTERS, LETTER_FLAGS, FileName, deliver
from pymaild.store.dovecot import writeUidlist
from pymaild.store.maildir import INDEX_NAME, MaildirStore, StoreError, UserStore
from pymaild.store.quota import QuotaExceeded

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello %d\r\n\r\nbody %d\r\n"


def msg(i: int) -> bytes:
    return MESSAGE % (i, i)


@pytest.fixture
def user(tmp_path) -> UserStore:
    return MaildirStore(tmp_path / "mail").user("alice@example.com")


def files(folder, sub="cur"):
    return sorted(os.listdir(folder.path / sub))


def test_layout_is_dovecots(user, tmp_path):
    """
    <mail>/<domain>/<local>/ holds INBOX's cur/new/tmp; folders are .Name dirs with a
    maildirfolder file; children are .Parent.Child; names are modified UTF-7.
    """
    root = tmp_path / "mail" / "example.com" / "alice"
    assert user.root == root
    for sub in ("cur", "new", "tmp"):
        assert (root / sub).is_dir()
    user.createFolder("Sent")
    user.createFolder("Projects/2026")
    user.createFolder("Entwürfe")
    assert (root / ".Sent" / "cur").is_dir() and (root / ".Sent" / "maildirfolder").exists()
    assert (root / ".Projects" / "cur").is_dir()
    assert (root / ".Projects.2026" / "new").is_dir()
    assert (root / ".Entw&APw-rfe" / "tmp").is_dir()
    assert [f.name for f in user.listFolders()] == ["INBOX", "Entwürfe", "Projects", "Projects/2026", "Sent"]


def test_sync_assigns_uids_in_delivery_order_and_moves_new_to_cur(user):
    """
    Messages delivered by another process get UIDs 1..n in delivery order at the next sync,
    and move from new/ to cur/; a second sync with nothing changed reports nothing.
    """
    inbox = user.folder("INBOX")
    delivered = [deliver(inbox.path, msg(i)) for i in range(3)]
    changes = inbox.sync()
    assert changes.added == [1, 2, 3]
    assert files(inbox, "new") == []
    # (the same files, moved; their order is the UIDs' below: sorted as text, names of one second
    # are not in delivery order when the microseconds pass from 5 to 6 digits, M92234 / M100929)
    assert sorted(FileName.parse(n).base for n in files(inbox)) == sorted(d.base for d in delivered)
    assert inbox.sync().added == []
    assert [inbox.open(u).read() for u in (1, 2, 3)] == [msg(i).replace(b"\r\n", b"\n") for i in range(3)]
    status = inbox.status()
    assert status["messages"] == 3 and status["uidnext"] == 4 and status["unseen"] == 3
    assert status["size"] == sum(len(msg(i)) for i in range(3))


def test_delivery_order_of_names():
    """
    The store's delivery-order key (which conftest.maildir_files sorts by too) puts names in time
    order where text order does not: microseconds are not padded, so M92234 sorts after M100929
    as text.
    """
    names = ["1700000000.M100929P7Q2.host,S=1,W=1:2,", "1700000000.M92234P7Q1.host:2,S",
             "1699999999.M999999P1Q9.host", "1700000000.M92234P7Q3.host:2,"]
    assert sorted(names, key=maildir._deliveryOrder) == [names[2], names[1], names[3], names[0]]
    assert sorted(names) != sorted(names, key=maildir._deliveryOrder)


def test_changes_by_other_tools_are_noticed(user):
    """
    A flag change (rename), a deletion and a new file made behind the store's back are seen by
    the next sync; an expunged UID is never given again.
    """
    inbox = user.folder("INBOX")
    for i in range(3):
        deliver(inbox.path, msg(i))
    inbox.sync()
    # (by UID, not by name: see test_delivery_order_of_names)
    first, second, third = (inbox.filePath(uid) for uid in (1, 2, 3))
    before = inbox.status()["highestmodseq"]
    os.rename(first, str(first).replace(":2,", ":2,FS"))
    os.unlink(third)
    # mtimes may not move within a clock tick: force the directories to look changed
    os.utime(inbox.path / "cur", ns=(0, 0))
    changes = inbox.sync()
    assert changes.flagsChanged == [1] and changes.expunged == [3]
    m1 = inbox.messages([1])[0]
    assert m1.flags == {"\\Seen", "\\Flagged"} and m1.modseq > before
    deliver(inbox.path, msg(9))
    assert inbox.sync().added == [4]
    assert inbox.uids() == [1, 2, 4]


def test_append_with_flags_keywords_and_date(user):
    """
    APPEND stores in cur/ with flag letters, keywords through dovecot-keywords, the internal
    date as mtime, and returns the new UID.
    """
    inbox = user.folder("INBOX")
    uid = inbox.append(msg(1), ["\\Seen", "\\Draft", "$Label1", "Work"], internalDate=1_600_000_000)
    assert uid == 1
    (name,) = files(inbox)
    assert FileName.parse(name).letters == "DSab"
    keywords = (inbox.path / "dovecot-keywords").read_text().split("\n")
    assert "0 $Label1" in keywords and "1 Work" in keywords
    m = inbox.messages()[0]
    assert m.flags == {"\\Seen", "\\Draft"} and m.keywords == {"$Label1", "Work"}
    assert m.internalDate == 1_600_000_000 and m.vsize == len(msg(1))
    assert inbox.append(msg(2)) == 2


@pytest.mark.parametrize("mode", ["add", "remove"])
def test_store_of_thousands_of_keywords(user, mode):
    """
    A STORE naming 3,000 keywords is done (sqlite refused the one OR term a name that picks the
    rows it may change: "Expression tree is too large"); the 26 with letters reach the file name.
    """
    inbox = user.folder("INBOX")
    inbox.append(msg(1))
    inbox.append(msg(2), ["\\Seen"])
    many = [f"k{i}" for i in range(3000)]
    if mode == "remove":
        inbox.store([1, 2], many, "add")
    changed, failed = inbox.store([1, 2], many, mode)
    assert sorted(changed) == [1, 2] and failed == []
    kept = {m.uid: m.keywords for m in inbox.messages()}
    assert kept == ({1: set(many), 2: set(many)} if mode == "add" else {1: set(), 2: set()})
    assert len(FileName.parse(files(inbox)[0]).keywordLetters) == (26 if mode == "add" else 0)


def test_store_flags_and_modseq(user):
    """
    STORE set/add/remove renames the file and bumps MODSEQ; UNCHANGEDSINCE refuses messages
    modified after it.
    """
    inbox = user.folder("INBOX")
    for i in range(3):
        inbox.append(msg(i))
    changed, failed = inbox.store([1, 2], ["\\Seen"], "add")
    assert sorted(changed) == [1, 2] and failed == []
    modseq = changed[1][1]
    # (not by sorted name: unpadded microseconds in names do not sort by time)
    assert sorted(FileName.parse(n).letters for n in files(inbox)) == ["", "S", "S"]
    changed, failed = inbox.store([1], ["\\Flagged", "Urgent"], "add")
    assert changed[1][0] == {"\\Seen", "\\Flagged", "Urgent"} and changed[1][1] > modseq
    changed, failed = inbox.store([1, 2], ["\\Seen"], "remove", unchangedSince=modseq)
    assert list(changed) == [2] and failed == [1]
    changed, _ = inbox.store([3], [], "set")
    assert changed == {}  # nothing to change, no new MODSEQ
    assert inbox.messages([1])[0].flags == {"\\Seen", "\\Flagged"}


@pytest.mark.parametrize("bulkFrom", [None, 1])
def test_store_changes_exactly_what_the_definition_says(user, monkeypatch, bulkFrom):
    """
    400 random STOREs (set, add, remove; system flags, and keywords that are parts of other
    keywords: "a", "ab", "b"; on UID lists, lists with repeats, and ranges) against a plain model of each message's flags: the messages
    reported changed are those whose flags changed, and the index and the file names end as the
    model does.  (The SQL condition that picks the rows a change may alter must never leave
    one out; no system flag's name is in another's, which lets it look for them unpadded.)
    With C{bulkFrom} 1 every STORE goes the bulk way (renames in a helper thread, one UPDATE
    per outcome whose new names sqlite makes from the old).
    """
    if bulkFrom is not None:
        monkeypatch.setattr(maildir, "_QUIET_FROM", bulkFrom)
    assert not [a for a in FLAG_LETTERS for b in FLAG_LETTERS if a != b and a in b]
    rng = random.Random(5)
    inbox = user.folder("INBOX")
    names_ = ["\\Seen", "\\Flagged", "\\Deleted", "\\Answered", "\\Draft", "a", "ab", "b", "ba"]
    model = {}
    for i in range(30):
        start = set(rng.sample(names_, rng.randint(0, 4)))
        model[inbox.append(msg(i), sorted(start))] = start
    for _ in range(400):
        shape = rng.randrange(3)
        if shape == 0:  # a range, as an IMAP session passes a dense set (1:*)
            low = rng.randint(1, 30)
            uids = range(low, rng.randint(low, 30) + 1)
        else:
            uids = rng.sample(sorted(model), rng.randint(1, 30))
            if shape == 2:  # any iterable: repeats, in any order
                uids = uids + uids[: rng.randint(0, len(uids))]
        flags = set(rng.sample(names_, rng.randint(0, 3)))
        mode = rng.choice(["set", "add", "remove"])
        changed, failed = inbox.store(uids, sorted(flags), mode)
        expected = {}
        for uid in set(uids):
            new = flags if mode == "set" else model[uid] | flags if mode == "add" else model[uid] - flags
            if new != model[uid]:
                expected[uid] = model[uid] = set(new)
        assert failed == [] and {u: set(f) for u, (f, _) in changed.items()} == expected, (mode, flags)
    assert {m.uid: m.flags | m.keywords for m in inbox.messages()} == model
    system = {u: {f for f in flags if f.startswith("\\")} for u, flags in model.items()}
    assert {m.uid: {LETTER_FLAGS[c] for c in FileName.parse(inbox.filePath(m.uid).name).systemLetters}
            for m in inbox.messages()} == system
    assert sorted(inbox.filePath(m.uid).name for m in inbox.messages()) == sorted(os.listdir(inbox.path / "cur"))


def test_copy_hard_links_and_move_renames(user):
    """
    COPY hard-links the file into the target with a new name and new UIDs; MOVE renames it so
    the message is in exactly one folder.
    """
    inbox = user.folder("INBOX")
    archive = user.createFolder("Archive")
    for i in range(3):
        inbox.append(msg(i), ["\\Seen"])
    pairs = inbox.copy([1, 3], archive)
    assert pairs == [(1, 1), (3, 2)]
    assert os.stat(inbox.filePath(1)).st_ino == os.stat(archive.filePath(1)).st_ino
    assert archive.messages()[0].flags == {"\\Seen"}
    inode = os.stat(inbox.filePath(2)).st_ino
    assert inbox.move([2], archive) == [(2, 3)]
    assert inbox.uids() == [1, 3]
    assert os.stat(archive.filePath(3)).st_ino == inode
    assert archive.open(3).read() == msg(1).replace(b"\r\n", b"\n")


def test_expunge_only_deleted(user):
    """
    EXPUNGE removes the \\Deleted messages; UID EXPUNGE only those among the given UIDs.
    """
    inbox = user.folder("INBOX")
    for i in range(4):
        inbox.append(msg(i))
    inbox.store([1, 2, 4], ["\\Deleted"], "add")
    assert inbox.expunge([2, 3]) == [2]
    assert inbox.expunge() == [1, 4]
    assert inbox.uids() == [3]
    assert len(files(inbox)) == 1


def test_index_is_a_cache(user, tmp_path):
    """
    Delete the index: the next open rebuilds it from the files, flags and keywords included.
    """
    inbox = user.folder("INBOX")
    inbox.append(msg(1), ["\\Seen", "Work"])
    inbox.append(msg(2), ["\\Flagged"])
    user.createFolder("Sent").append(msg(3))
    user.close()
    for f in user.root.glob(INDEX_NAME + "*"):
        f.unlink()
    again = UserStore(user.root)
    inbox = again.folder("INBOX")
    inbox.sync()
    assert [(m.flags, m.keywords) for m in inbox.messages()] == [
        ({"\\Seen"}, {"Work"}), ({"\\Flagged"}, frozenset())
    ]
    sent = again.folder("Sent")
    sent.sync()
    assert len(sent.uids()) == 1


def test_corrupt_index_is_moved_aside(user):
    """
    A garbage index file does not stop the store: it is set aside and rebuilt.
    """
    user.folder("INBOX").append(msg(1))
    user.close()
    (user.root / INDEX_NAME).write_bytes(b"this is not sqlite" * 100)
    for f in user.root.glob(INDEX_NAME + "-*"):
        f.unlink()
    again = UserStore(user.root)
    inbox = again.folder("INBOX")
    inbox.sync()
    assert inbox.uids() == [1]
    assert (user.root / (INDEX_NAME + ".corrupt")).exists()


def test_dovecot_uidlist_is_imported(tmp_path):
    """
    A folder migrated from Dovecot keeps its UIDVALIDITY and every message its UID; files
    Dovecot never saw get UIDs after Dovecot's next UID.
    """
    root = tmp_path / "alice"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    a = deliver(root, msg(1), "S")
    b = deliver(root, msg(2), "")
    writeUidlist(root / "dovecot-uidlist", 1234567, 100, {a.base: 17, b.base: 42})
    c = deliver(root, msg(3))
    inbox = UserStore(root).folder("INBOX")
    inbox.sync()
    status = inbox.status()
    assert status["uidvalidity"] == 1234567
    assert inbox.uids() == [17, 42, 100]
    assert inbox.open(100).read() == msg(3).replace(b"\r\n", b"\n")
    assert status["uidnext"] == 101 or inbox.status()["uidnext"] == 101


def test_folders_create_delete_rename_subscribe(user):
    """
    Folder operations, with the errors IMAP needs (ALREADYEXISTS, NONEXISTENT, INBOX rules).
    """
    user.createFolder("Work/Clients")
    with pytest.raises(StoreError) as e:
        user.createFolder("Work")
    assert e.value.code == "ALREADYEXISTS"
    user.subscribe("Work/Clients")
    user.renameFolder("Work", "Jobs")
    assert [f.name for f in user.listFolders()] == ["INBOX", "Jobs", "Jobs/Clients"]
    assert user.subscriptions() == {"Jobs/Clients"}
    assert (user.root / "subscriptions").read_text() == "Jobs/Clients\n"
    with pytest.raises(StoreError, match="children"):
        user.deleteFolder("Jobs")
    user.deleteFolder("Jobs/Clients")
    user.deleteFolder("Jobs")
    assert [f.name for f in user.listFolders()] == ["INBOX"]
    with pytest.raises(StoreError) as e:
        user.deleteFolder("INBOX")
    with pytest.raises(StoreError) as e:
        user.folder("Jobs")
    assert e.value.code == "NONEXISTENT"
    inbox = user.folder("INBOX")
    inbox.append(msg(1))
    user.renameFolder("INBOX", "Old")
    assert inbox.uids() == [] and len(user.folder("Old").uids()) == 1


def test_special_use_folders(tmp_path):
    """
    First login creates Drafts, Sent, Trash, Junk and Archive (configurable names) with their
    RFC 6154 attributes; running it again changes nothing.
    """
    store = MaildirStore(tmp_path / "mail", specialFolders={"\\Sent": "Gesendet", "\\Trash": "Papierkorb"})
    user = store.user("bob@example.com")
    user.ensureSpecialFolders()
    user.ensureSpecialFolders()
    folders = {f.name: f.special for f in user.listFolders()}
    assert folders == {"INBOX": None, "Gesendet": "\\Sent", "Papierkorb": "\\Trash"}


HOSTILE = ["..", "../x", "a/../b", "a/./b", ".hidden", "a\x00b", "a\x01b", "a\x7fb", "/abs", "a//b",
           "a/", "", "x" * 600, "*", "a%", "a\\b", "/".join(["d"] * 40)]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(user, tmp_path, name):
    """
    Names that could escape the user's directory, or that are malformed, are refused with
    InvalidName; nothing is created outside the user's directory.
    """
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(names.InvalidName):
        user.createFolder(name)
    with pytest.raises(names.InvalidName):
        user.folder(name)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_summary_is_computed_once(user):
    """
    The summary (ENVELOPE etc.) is computed on first need and then read from the index.
    """
    inbox = user.folder("INBOX")
    inbox.append(msg(1))
    first = inbox.summary(1)
    assert b"hello 1" in first.envelope
    os.unlink(inbox.filePath(1))  # the cached copy no longer needs the file
    assert inbox.summary(1).envelope == first.envelope


def test_summaries_follow_files_renamed_by_others(user):
    """
    summaries() finds a message whose file another process renamed (a flag change) since the
    index last saw it, and leaves out one whose file is gone.
    """
    inbox = user.folder("INBOX")
    for i in (1, 2, 3):
        inbox.append(msg(i))
    renamed = inbox.filePath(2)
    os.rename(renamed, str(renamed) + "F")
    os.unlink(inbox.filePath(3))
    summaries = inbox.summaries([1, 2, 3])
    assert sorted(summaries) == [1, 2]
    assert b"hello 2" in summaries[2].envelope
    assert inbox.filePath(2).name.endswith("F")


def test_with_file_reads_a_message_where_its_file_is_now(user):
    """
    withFile (for a reader whose file name went stale) finds a file this process's STORE
    renamed, and one another process renamed (after a sync), under the user's lock; a file
    gone is EXPUNGEISSUED.
    """
    inbox = user.folder("INBOX")
    for i in (1, 2, 3):
        inbox.append(msg(i))
    stale = str(inbox.filePath(1))
    inbox.store([1], ["\\Flagged"], "add")
    assert not os.path.exists(stale)
    locked = []

    def read(path):
        def tryLock():  # (from another thread: fails while this one holds the lock)
            free = user.lock.acquire(blocking=False)
            if free:
                user.lock.release()
            locked.append(not free)

        other = threading.Thread(target=tryLock)
        other.start()
        other.join()
        with open(path, "rb") as f:
            return f.read()

    assert inbox.withFile(1, read) == msg(1).replace(b"\r\n", b"\n") and locked == [True]
    other = inbox.filePath(2)
    os.rename(other, str(other) + "F")  # (another process: the index does not know)
    assert inbox.withFile(2, read) == msg(2).replace(b"\r\n", b"\n")
    assert inbox.filePath(2).name.endswith("F")
    os.unlink(inbox.filePath(3))
    with pytest.raises(StoreError) as e:
        inbox.withFile(3, read)
    assert e.value.code == "EXPUNGEISSUED"
    with pytest.raises(StoreError) as e:
        inbox.withFile(99, read)
    assert e.value.code == "EXPUNGEISSUED"


def test_summary_from_an_older_version_is_computed_again(user):
    """
    A cached summary an older pymaild wrote (another JSON version) is not used: summary() and
    summaries() compute it again from the file and replace it.
    """
    import json

    inbox = user.folder("INBOX")
    inbox.append(msg(1))
    inbox.append(msg(2))
    inbox.summaries([1, 2])
    with user.lock:
        for (text,) in user.db.execute("SELECT summary FROM summaries").fetchall():
            old = json.loads(text)
            old.update(v=1, sortSubject="stale")
            user.db.execute("UPDATE summaries SET summary=? WHERE summary=?", (json.dumps(old), text))
    assert inbox.summary(1).sortSubject == "HELLO 1"
    assert {uid: s.sortSubject for uid, s in inbox.summaries([1, 2]).items()} == {
        1: "HELLO 1", 2: "HELLO 2"}
    with user.lock:
        texts = [t for (t,) in user.db.execute("SELECT summary FROM summaries")]
    assert len(texts) == 2 and not any("stale" in t for t in texts)


def test_quota_refuses_and_counts(tmp_path):
    """
    Over the message limit an APPEND is refused and nothing is stored; maildirsize tracks
    usage and expunge gives the space back.
    """
    store = MaildirStore(tmp_path / "mail", storageLimit=10_000, messageLimit=2)
    inbox = store.user("carol@example.com").folder("INBOX")
    inbox.append(msg(1))
    inbox.append(msg(2))
    with pytest.raises(QuotaExceeded):
        inbox.append(msg(3))
    assert len(files(inbox)) == 2
    user = store.user("carol@example.com")
    assert user.quota.usage()[1] == 2
    inbox.store([1], ["\\Deleted"], "add")
    inbox.expunge()
    assert user.quota.usage()[1] == 1
    assert inbox.append(msg(4)) == 3
    assert (user.root / "maildirsize").read_text().startswith("10000S,2C\n")


def test_listener_hears_changes(user):
    """
    In-process listeners hear appends, flag changes and expunges on their folder.
    """
    inbox = user.folder("INBOX")
    heard = []
    inbox.addListener(lambda folder, changes: heard.append((changes.added, changes.flagsChanged, changes.expunged)))
    inbox.append(msg(1))
    inbox.store([1], ["\\Deleted"], "add")
    inbox.expunge()
    assert heard == [([1], [], []), ([], [1], []), ([], [], [1])]


def test_threads_and_a_deliverer_never_share_a_uid(user):
    """
    Four threads appending, flagging and syncing while another writer delivers into new/:
    every message ends with exactly one UID, UIDs strictly increase, none is reused.
    """
    inbox = user.folder("INBOX")
    errors = []

    def appender(n):
        try:
            for i in range(40):
                inbox.append(msg(n * 1000 + i))
                inbox.store([inbox.uids()[-1]], ["\\Seen"], "add")
                inbox.sync()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def deliverer():
        for i in range(80):
            deliver(inbox.path, msg(9_000_000 + i))

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(4)] + [threading.Thread(target=deliverer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    inbox.sync()
    uids = inbox.uids()
    assert len(uids) == 4 * 40 + 80 == len(set(uids))
    assert uids == sorted(uids)
    bodies = {inbox.open(u).read() for u in uids}
    assert len(bodies) == len(uids)
    messages = inbox.messages()
    status = inbox.status()
    assert status["messages"] == len(messages)
    assert status["unseen"] == sum("\\Seen" not in m.flags for m in messages)
    assert status["size"] == sum(m.vsize for m in messages)
    assert inbox.status()["uidnext"] > max(uids)


def _sync_loop(root: str, rounds: int) -> None:
    store = UserStore(Path(root))
    inbox = store.folder("INBOX")
    for i in range(rounds):
        deliver(inbox.path, msg(os.getpid() * 1000 + i))
        inbox.sync()
    store.close()


def test_two_processes_syncing_one_folder_agree(tmp_path):
    """
    Two processes each deliver and sync the same folder 60 times: the index (shared through
    sqlite's locking) gives every message one UID, and both see the same ones.
    """
    import multiprocessing

    root = tmp_path / "bob"
    UserStore(root).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_sync_loop, args=(str(root), 60)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    inbox = UserStore(root).folder("INBOX")
    inbox.sync()
    uids = inbox.uids()
    assert len(uids) == 120 == len(set(uids))
    assert len({inbox.open(u).read() for u in uids}) == 120


def test_uids_follow_delivery_order_not_string_order(user):
    """
    Files delivered within one second get UIDs in microsecond order: "M5000" before "M12000"
    (a string sort would swap them).
    """
    inbox = user.folder("INBOX")
    for usecs, subject in ((12000, b"second"), (5000, b"first"), (999999, b"third")):
        (inbox.path / "new" / f"1700000000.M{usecs}P1.host,S=9,W=9").write_bytes(b"Subject: " + subject)
    inbox.sync()
    assert [inbox.open(u).read() for u in inbox.uids()] == [b"Subject: first", b"Subject: second", b"Subject: third"]


def test_vsize_counts_a_crlf_cut_by_the_reading_chunks(tmp_path):
    """
    The size with CRLF line ends of a file stored with CRLF, where a CRLF straddles the
    64 KiB pieces the file is read in, is its own size (each CRLF counted once).
    """
    from pymaild.store.maildir import Folder

    data = b"x" * 65535 + b"\r\n" + b"y" * 10 + b"\n"
    path = tmp_path / "m"
    path.write_bytes(data)
    assert Folder._vsize(path, len(data)) == len(data) + 1  # only the bare LF grows


def test_listing_gives_uid_size_and_current_file(user):
    """listing(): every message by UID with its CRLF size and its file as it is now."""
    inbox = user.folder("INBOX")
    for i in range(3):
        inbox.append(msg(i))
    inbox.store([2], ["\\Seen"], "add")  # renamed: the listing has the new name
    rows = inbox.listing()
    assert [r[0] for r in rows] == [1, 2, 3]
    for uid, vsize, path in rows:
        data = open(path, "rb").read()
        assert vsize == len(data.replace(b"\n", b"\r\n"))
    assert rows[1][2].endswith(":2,S")


def test_recent_count_from_either_side(user):
    """
    RECENT in status() is right whether most messages are recent (counted from the older side)
    or few are, with expunged messages on both sides of the first recent UID.
    """
    folder = user.folder("INBOX")
    for i in range(10):
        folder.append(msg(i))
    assert folder.status()["recent"] == 10  # (no session has claimed any)
    folder.claimRecent()
    for i in range(10, 13):
        folder.append(msg(i))
    status = folder.status()
    assert (status["messages"], status["recent"]) == (13, 3)
    uids = [m.uid for m in folder.messages()]
    folder.store([uids[0], uids[11]], ["\\Deleted"], "add")
    folder.expunge()
    assert folder.status()["recent"] == 2
    for i in range(13, 40):  # (now most are recent again: the other way of counting)
        folder.append(msg(i))
    status = folder.status()
    assert (status["messages"], status["recent"]) == (38, 29)
    folder.claimRecent()
    assert folder.status()["recent"] == 0


def test_claiming_recent_messages(user):
    """
    claimRecent hands each UID to one claimer; with nothing new to claim it reads without a
    write transaction.
    """
    folder = user.folder("INBOX")
    for i in range(3):
        folder.append(msg(i))
    assert folder.claimRecent() == (0, 4)
    statements: list[str] = []
    user.db.set_trace_callback(statements.append)
    try:
        assert folder.claimRecent() == (4, 4)
    finally:
        user.db.set_trace_callback(None)
    assert not [s for s in statements if s.startswith("BEGIN")], statements
    folder.append(msg(3))
    assert folder.claimRecent() == (4, 5)
    assert folder.claimRecent() == (5, 5)
    assert folder.status()["recent"] == 0


def _commits(user, action) -> list[tuple[str, str]]:
    """(synchronous level, the transaction's statements) of each COMMIT that C{action} makes,
    as sqlite saw them (the connection's trace)."""
    trace: list[str] = []
    user.db.set_trace_callback(trace.append)
    try:
        action()
    finally:
        user.db.set_trace_callback(None)
    level, statements, out = "FULL", [], []
    for statement in (t.strip() for t in trace):
        upper = statement.upper()
        if upper.startswith("PRAGMA SYNCHRONOUS="):
            level = upper.split("=", 1)[1]
        elif upper.startswith("BEGIN"):
            statements = []
        elif upper == "COMMIT":
            out.append((level, " ".join(statements)))
        else:
            statements.append(statement)
    return out


def test_caches_are_committed_unsynced_and_changes_synced(user):
    """
    What only caches what the files say (internal dates, summaries, directory stamps) is
    committed without an fsync (synchronous=NORMAL); what assigns a UID or a MODSEQ with a
    full one (synchronous=FULL), the connection's level after either.
    """
    inbox = user.folder("INBOX")
    for i in range(3):
        deliver(inbox.path, msg(i))
    commits = _commits(user, inbox.sync)
    assert [level for level, sql in commits if "INSERT INTO messages" in sql] == ["FULL"]
    assert [level for level, sql in commits if "newstamp" in sql] == ["NORMAL"]
    commits = _commits(user, lambda: (inbox.messages(), inbox.summary(1)))
    assert [level for level, sql in commits if "internaldate" in sql] == ["NORMAL"]
    assert [level for level, sql in commits if "INTO summaries" in sql] == ["NORMAL"]
    commits = _commits(user, lambda: inbox.store([1], ["\\Seen"], "add"))
    assert [level for level, sql in commits if "UPDATE messages SET name" in sql] == ["FULL"]
    assert user.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    with pytest.raises(ZeroDivisionError):
        with user.cacheTransaction():
            1 / 0
    assert user.db.execute("PRAGMA synchronous").fetchone() == (2,)


def test_caches_are_synced_outside_wal_mode(user):
    """synchronous=NORMAL is safe in WAL mode only: an index sqlite could not put in WAL mode
    (a file system without shared memory) commits caches with a full sync too."""
    assert user._wal
    inbox = user.folder("INBOX")
    deliver(inbox.path, msg(0))
    inbox.sync()
    user._wal = False
    commits = _commits(user, inbox.messages)
    assert [level for level, sql in commits if "internaldate" in sql] == ["FULL"]
