"""
Folder.flagIndex: every message's UID, flags and MODSEQ as arrays, kept between calls while
the index's key (UIDNEXT, HIGHESTMODSEQ, count) is unchanged, updated in a copy by this
process's STOREs, read again after anything else (an expunge, a delivery, another process).
Its answers always equal the index rows (Folder.messages()).
"""

from __future__ import annotations

from pymaild.store.maildir import MaildirStore


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
