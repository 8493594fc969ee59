"""
The first index of a large C{cur/} (L{Folder._indexAll}: names checked by one regex, sorted as
text, sizes parsed by sqlite) gives the index the general path of C{Folder._scan} gives: the same
UIDs for the same files, flags, keywords, sizes, counters, UIDNEXT and MODSEQ.  The general path
is the oracle: each folder is indexed twice, once each way, and the two indexes compared.
"""

from __future__ import annotations

import os
import random

import pytest

from pymaild.store import maildir
from pymaild.store.maildir import MaildirStore

HOST = "mail.example.com"

INDEX_ALL = maildir.Folder._indexAll


def dovecotName(rng: random.Random, secs: int, n: int, letters: str = "SFRTDabc") -> str:
    usecs = rng.choice([rng.randrange(10), rng.randrange(1000), rng.randrange(1_000_000)])
    counter = "" if rng.random() < 0.3 else f"Q{rng.choice([n, rng.randrange(1, 20)])}"
    size = rng.randrange(1, 400_000)
    vsize = size + rng.randrange(0, 5000)
    letters = "".join(sorted(rng.sample(letters, rng.randrange(0, min(4, len(letters) + 1)))))
    info = "" if rng.random() < 0.05 else f":2,{letters}"
    return f"{secs}.M{usecs}P{rng.randrange(1, 99999)}{counter}.{HOST},S={size},W={vsize}{info}"


@pytest.fixture(params=[None, 7, 1], ids=["slices-4096", "slices-7", "slices-1"])
def chunk(request, monkeypatch):
    """
    The fast path checks and inserts the names a slice at a time (_BULK_CHUNK, 4,096): these
    folders of 300-900 names are one slice, or 7 names a slice, or one, so that runs of a second
    and duplicate names lie across the slices' borders.
    """
    if request.param is not None:
        monkeypatch.setattr(maildir, "_BULK_CHUNK", request.param)
    return request.param


def makeFolder(root, names: list[str], keywords: str | None = "$Work\n$Later\nJunk\n"):
    """
    A maildir whose cur/ holds C{names} (empty files: the sizes come from the names), each
    with one fixed mtime (the internal date of a name without one: two folders made a second
    apart would differ).
    """
    for sub in ("cur", "new", "tmp"):
        os.makedirs(root / sub, exist_ok=True)
    for name in names:
        (root / "cur" / name).touch()
        os.utime(root / "cur" / name, (1_600_000_000, 1_600_000_000))
    if keywords is not None:
        (root / "dovecot-keywords").write_text("".join(f"{i} {k}\n" for i, k in enumerate(keywords.split())))
    hour = os.stat(root).st_mtime - 3600
    for sub in ("cur", "new"):
        os.utime(root / sub, (hour, hour))


def indexed(tmp_path, label: str, names: list[str], bulk: bool, monkeypatch, **kw):
    """Index C{names} in a fresh store; return its rows, the folder row and what sync said."""
    store = MaildirStore(tmp_path / label)
    user = store.user("alice@example.com")
    makeFolder(user.root, names, **kw)
    used = []

    def spy(self, listing):
        result = INDEX_ALL(self, listing)
        used.append(result is not None)
        return result

    monkeypatch.setattr(maildir.Folder, "_indexAll", spy)
    monkeypatch.setattr(maildir, "_BULK_FROM", 1 if bulk else 10**9)
    try:
        folder = user.folder("INBOX")
        changes = folder.sync()
        rows = user.db.execute(
            "SELECT uid, name, innew, flags, keywords, modseq, size, vsize, internaldate FROM messages"
            " WHERE folder=? ORDER BY uid", (folder.id,)).fetchall()
        counters = user.db.execute(
            "SELECT uidnext, highestmodseq, messages, unseen, vsize FROM folders WHERE id=?", (folder.id,)).fetchone()
        status = folder.status()
        messages = folder.messages()
    finally:
        user.close()
    assert (status["messages"], status["unseen"]) == (
        len(messages), sum("\\Seen" not in m.flags for m in messages))
    return rows, counters, changes, used


@pytest.mark.parametrize("letters", ["SFRTDabc", "SFRTD", "S"])  # with keywords, without, one flag
@pytest.mark.parametrize("seed", range(6))
def test_bulk_index_equals_the_general_path(tmp_path, monkeypatch, seed, letters, chunk):
    rng = random.Random(seed)
    names, secs = [], 1_600_000_000 + seed
    for n in range(rng.randrange(300, 900)):
        # runs of names in one second (microseconds of every length), and gaps
        secs += rng.choice([0, 0, 0, 1, 7, 3600])
        names.append(dovecotName(rng, secs, n, letters))
    rng.shuffle(names)
    general = indexed(tmp_path, "general", names, False, monkeypatch)
    bulk = indexed(tmp_path, "bulk", names, True, monkeypatch)
    assert bulk[3] == [True] and general[3] == []
    assert any(r[4] for r in bulk[0]) == ("a" in letters)  # keywords (dovecot-keywords letters) or none
    assert bulk[0] == general[0]
    assert bulk[1] == general[1]
    assert bulk[2].added == general[2].added == list(range(1, len(names) + 1))
    # UIDs in delivery order: seconds, then microseconds and counter as numbers
    assert any(r[1].startswith(str(secs)) for r in bulk[0])


@pytest.mark.parametrize("odd", [
    "1600000000.M12P3.host,S=5,W=6:1,S",                  # info that is not ":2,"
    "1600000000.M12P3V99I7.host,S=5,W=6:2,S",             # Courier's fields
    "1600000000.M12P3.host:2,S",                          # no sizes: the general path stats it
    "999999999.M12P3.host,S=5,W=6:2,S",                   # nine digits of seconds (2001)
    "1600000000.M012P3.host,S=5,W=6:2,S",                 # a leading zero, fine either way
    "1600000000.M12P3.host,S=5,W=6,X=1:2,S",              # a field after the sizes
    "1600000000.M12P3.host,S=12345678901234567,W=6:2,S",  # a size beyond sqlite's integers
    "1600000000.M12P3.host,S=123456789012345,W=987654321098765:2,S",  # the longest sizes it takes
    ".hidden",
    '1600000000.M12P3.ho"st,S=5,W=6:2,S',                 # a quote (escaped in the JSON array)
    "1600000000.M12P3.ho\\st,S=5,W=6:2,S",                # a backslash (escaped too)
    "1600000000.M12P3.ho\tst,S=5,W=6:2,S",                 # a control character (sqlite refuses it unescaped)
    '1600000000.M12P3.host,S=5,W=6:2,S","T',               # a quote that would split the array unescaped
    "1600000000.M12P3.ho\\nst,S=5,W=6:2,S",               # a backslash that would read as an escape
    "1600000000.M12P3.hóst,S=5,W=6:2,S",                 # not ASCII
    "1600000000.M12P3.host,S=5,W=6:2,S\n1600000000.M13P3.host,S=5,W=6:2,S",  # a line break
    "1600000000.M12P3.host,S=5,W=6:2,S:T",                # a colon in the flags (the first one counts)
    "1600000000.M12P3.host,S=5,W=6",                      # no flags at all (the CASE's ELSE)
])
def test_names_of_other_shapes_take_the_general_path_or_agree(tmp_path, monkeypatch, odd, chunk):
    """
    A folder with one name of another shape is indexed as the general path indexes it,
    whichever path takes it; only names of the checked shape go the fast way.
    """
    rng = random.Random(1)
    names = [dovecotName(rng, 1_600_000_000 + i // 3, i) for i in range(300)]
    names.append(odd)
    general = indexed(tmp_path, "general", names, False, monkeypatch)
    bulk = indexed(tmp_path, "bulk", names, True, monkeypatch)
    assert bulk[0] == general[0]
    assert bulk[1] == general[1]
    if odd in ("1600000000.M012P3.host,S=5,W=6:2,S", "1600000000.M12P3.hóst,S=5,W=6:2,S",
               '1600000000.M12P3.ho"st,S=5,W=6:2,S', "1600000000.M12P3.ho\\st,S=5,W=6:2,S",
               "1600000000.M12P3.ho\tst,S=5,W=6:2,S", '1600000000.M12P3.host,S=5,W=6:2,S","T',
               "1600000000.M12P3.ho\\nst,S=5,W=6:2,S", "1600000000.M12P3.host,S=5,W=6:2,S:T",
               "1600000000.M12P3.host,S=5,W=6", "1600000000.M12P3.host,S=123456789012345,W=987654321098765:2,S"):
        assert bulk[3] == [True]
    else:
        assert bulk[3] == [False]  # the check sent it the general way


def test_an_undecodable_name_is_left_out_with_one_warning(tmp_path, monkeypatch):
    """
    A name os.listdir could not decode (lone surrogates: bytes that are not UTF-8) next to one
    that needs JSON escapes: the folder opens on both paths with every other message, the fast
    path declining the listing; the file is left out (sqlite's binding refuses such a name, and
    the sync raised before), with one warning however many syncs; one in new/ moves to cur/.
    """
    from twisted.logger import globalLogPublisher

    rng = random.Random(1)
    names = [dovecotName(rng, 1_600_000_000 + i // 3, i) for i in range(300)]
    names += ['1600000000.M12P3.ho"st,S=5,W=6:2,S']
    bad = "1600000000.M13P3.h\udcf3st,S=5,W=6:2,S"
    tried, warnings = [], []

    def spy(self, listing):
        result = INDEX_ALL(self, listing)
        tried.append("declined" if result is None else "indexed")
        return result

    def observe(event):
        if event.get("log_namespace") == "pymaild.store.maildir" and "not UTF-8" in event.get("log_format", ""):
            warnings.append(event["path"])

    monkeypatch.setattr(maildir.Folder, "_indexAll", spy)
    globalLogPublisher.addObserver(observe)
    try:
        for label, bulk in (("general", False), ("bulk", True)):
            monkeypatch.setattr(maildir, "_BULK_FROM", 1 if bulk else 10**9)
            user = MaildirStore(tmp_path / label).user("alice@example.com")
            makeFolder(user.root, names + [bad])
            inbox = user.folder("INBOX")
            inbox.sync()
            assert sorted(r[0] for r in user.db.execute("SELECT name FROM messages")) == sorted(names)
            assert tried == (["declined"] if bulk else [])
            (user.root / "new" / "1600000001.M1P3.h\udcf3st,S=5,W=6").touch()
            inbox.sync()
            assert os.listdir(user.root / "new") == []
            assert sorted(os.listdir(user.root / "cur")) == sorted(names + [bad, "1600000001.M1P3.h\udcf3st,S=5,W=6:2,"])
            (user.root / "cur" / names[0]).unlink()  # another sync, which meets the two again
            inbox.sync()
            assert len(inbox.messages()) == len(names) - 1
            assert sorted(warnings) == sorted(f"{user.root}/{sub}/{n}".replace("\udcf3", "\\xf3")
                                              for sub, n in (("cur", bad), ("new", "1600000001.M1P3.h\udcf3st,S=5,W=6")))
            tried.clear()
            warnings.clear()
            user.close()
    finally:
        globalLogPublisher.removeObserver(observe)


def test_duplicate_base_names_take_the_general_path(tmp_path, monkeypatch, chunk):
    rng = random.Random(2)
    names = [dovecotName(rng, 1_600_000_000 + i, i) for i in range(300)]
    base = names[10].partition(":")[0]
    names.append(base + ":2,FS" if not names[10].endswith(":2,FS") else base + ":2,")
    general = indexed(tmp_path, "general", names, False, monkeypatch)
    bulk = indexed(tmp_path, "bulk", names, True, monkeypatch)
    assert bulk[3] == [False]
    assert bulk[0] == general[0] and len(bulk[0]) == 300


def test_a_folder_with_rows_or_new_mail_takes_the_general_path(tmp_path, monkeypatch):
    """
    Only a first index of cur/ alone goes the fast way: a folder the index already has rows
    for, or one with mail in new/, is the general path's (renames, Dovecot's UIDs, expunges).
    """
    rng = random.Random(3)
    names = [dovecotName(rng, 1_600_000_000 + i, i) for i in range(300)]
    monkeypatch.setattr(maildir, "_BULK_FROM", 1)
    user = MaildirStore(tmp_path / "mail").user("alice@example.com")
    makeFolder(user.root, names)
    (user.root / "new" / f"1700000000.M1P1.{HOST},S=9,W=9").touch()
    folder = user.folder("INBOX")
    calls = []
    monkeypatch.setattr(maildir.Folder, "_indexAll",
                        lambda self, listing: calls.append(INDEX_ALL(self, listing)))
    assert len(folder.sync().added) == 301
    assert calls == []  # mail in new/: not even tried
    (user.root / "cur" / f"1700000001.M1P1.{HOST},S=9,W=9:2,S").touch()
    os.utime(user.root / "cur", (0, 0))
    assert folder.sync().added == [302]
    assert calls == [None]  # tried, and it found the index's rows
    user.close()


@pytest.mark.parametrize("host", [HOST, 'ho"st'])  # (the JSON-escaped way too)
def test_duplicate_base_names_apart_in_text_order_take_the_general_path(tmp_path, monkeypatch, host, chunk):
    """
    One message under two names that text order puts apart: the name without flags, then
    another message's (its W= one digit longer: "1" sorts before ":"), then the flagged name.
    The fast path looks for such pairs only within a run of one second: they are in one.
    """
    rng = random.Random(4)
    names = [dovecotName(rng, 1_600_000_000 + i, i) for i in range(300)]
    base = f"1600000100.M5P7.{host},S=6,W=6"
    names += [base, f"1600000100.M5P7.{host},S=6,W=61:2,", base + ":2,S"]
    assert sorted(names).index(base + ":2,S") == sorted(names).index(base) + 2
    general = indexed(tmp_path, "general", names, False, monkeypatch)
    bulk = indexed(tmp_path, "bulk", names, True, monkeypatch)
    assert bulk[3] == [False]
    assert bulk[0] == general[0] and len(bulk[0]) == 302


@pytest.mark.parametrize("names", [["a"], ["a", "b"], [f"1600000000.M{i}P1.h,S=1,W=1:2,S" for i in range(300)]])
def test_the_json_array_is_the_names_and_leaves_them_as_they_were(names):
    """
    _jsonArray makes the array the INSERT reads in one join, with the brackets put on the first
    and last names for the while: the same text as json.dumps, and the list unchanged after.
    """
    import json

    before = list(names)
    assert maildir._jsonArray(names) == json.dumps(names, separators=(",", ":"))
    assert names == before
