"""
SEARCH over a real store folder in bulk (pymaild.imap.search.searchFolder): the same answers
as the per-message evaluator for every key of test_search.py, and only what the keys need is
read: flag/size/date/UID keys no summary, header keys one column of the index and no summary.
"""

from __future__ import annotations

import calendar
import itertools

import pytest
from twisted.mail.imap4 import parseNestedParens

from pymaild.imap import search as S
from pymaild.store.maildir import MaildirStore

from tests.imap.test_search import KEYS, LAZY, MESSAGES

FLAGS = [(), ("\\Seen",), ("\\Seen", "\\Flagged"), ("\\Answered",), ("\\Deleted", "\\Seen"),
         ("\\Draft",), ("$Forwarded",), ("\\Seen", "$Junk")]
NAMES = sorted(p.stem for p in MESSAGES.glob("*.eml"))


def q(text: str):
    return S.compile(parseNestedParens(text.encode()))


@pytest.fixture
def folder(tmp_path):
    """Every specimen message, with varied flags and internal dates; UIDs 3 and 7 expunged."""
    inbox = MaildirStore(tmp_path / "mail").user("alice@example.com").folder("INBOX")
    days = itertools.cycle([(2025, 1, 13), (2025, 1, 14), (2025, 1, 15), (2025, 3, 3)])
    for i, (name, flags) in enumerate(zip(NAMES, itertools.cycle(FLAGS))):
        when = calendar.timegm((*next(days), 12 + i % 12, 0, 0))
        inbox.append((MESSAGES / f"{name}.eml").read_bytes(), flags, internalDate=when)
    inbox.store([3, 7], ["\\Deleted"], "add")
    inbox.expunge([3, 7])
    inbox.store([2, 5, 9], ["\\Flagged"], "add")  # some MODSEQs apart
    return inbox


def oneByOne(predicate, folder, view):
    """The per-message evaluator, as the mailbox used it before searchFolder."""
    metas = {m.uid: m for m in folder.messages()}
    paths = folder.paths(view)
    contexts = [
        S.SearchContext.fromFile(seq, metas[uid], paths[uid], lambda u=uid: folder.summary(u),
                                 len(view), view[-1])
        for seq, uid in enumerate(view, 1) if uid in metas
    ]
    return S.search(predicate, contexts)


QUERIES = sorted({k[0] for k in KEYS} | {k[0] for k in LAZY} | {
    "NOT FROM alice", "OR NOT FROM alice SEEN", "NOT (FROM alice SUBJECT lunch)",
    "OR SUBJECT lunch BODY café", "NOT BODY café", "OR OR FROM a FROM b HEADER X-Mailer ancient",
    "NOT HEADER X-Mailer ancient", "MODSEQ 30", "NOT MODSEQ 30", "UID 4:9 NOT SEEN", "2:5 FROM e",
    "SENTSINCE 1-Jan-2025 NOT SENTON 14-Jan-2025", 'FROM ""', 'NOT TO ""', "TEXT example BODY the",
})


def test_same_answers_as_one_by_one(folder):
    view = folder.uids()
    assert len(view) == len(NAMES) - 2
    differ = {}
    for text in QUERIES:
        predicate = q(text)
        bulk = S.searchFolder(predicate, folder, view)
        if bulk != oneByOne(predicate, folder, view):
            differ[text] = (bulk, oneByOne(predicate, folder, view))
    assert differ == {}
    # and they are not trivial answers
    assert 0 < len(S.searchFolder(q("FROM e"), folder, view)) < len(view)
    assert S.searchFolder(q("NOT FROM e"), folder, view) == [
        s for s in range(1, len(view) + 1) if s not in S.searchFolder(q("FROM e"), folder, view)]


def test_text_and_body_in_the_summary_workers_answer_as_one_by_one(folder, monkeypatch):
    """
    TEXT and BODY over a folder go to the summary workers (each file read, screened and, if
    need be, decoded there: C{Folder.textMatches}): the same answers as message by message,
    with a text limit some files exceed (those are read here, as before), and with keys that
    mix TEXT, BODY and other keys.  The workers did take their share.
    """
    from pymaild.store import summarizer as summarizermod

    monkeypatch.setattr(summarizermod, "MIN_BATCH", 2)
    monkeypatch.setattr(summarizermod, "MIN_PIECE", 1)
    here = []
    real = summarizermod._KINDS["text"]
    monkeypatch.setitem(summarizermod._KINDS, "text", lambda piece: here.append(len(piece)) or real(piece))
    folder.user.summarizer = summarizermod.Summarizer(2)
    try:
        view = folder.uids()
        queries = [text for text in QUERIES if "TEXT" in text or "BODY" in text] + [
            "OR TEXT lunch BODY example", "TEXT lunch TEXT example NOT BODY the", "BODY café FROM e",
            # the same needle as BODY in one branch and TEXT in the other: each branch is
            # searched on its own, and TEXT must still look at the headers
            "OR (BODY alice FLAGGED) (TEXT alice NOT FLAGGED)", "OR (TEXT eve FLAGGED) (BODY eve NOT FLAGGED)"]
        assert len(queries) >= 10
        differ = {}
        for limit in (S.MAX_TEXT, 900):
            for text in queries:
                bulk = S.searchFolder(q(text), folder, view, textLimit=limit)
                metas = {m.uid: m for m in folder.messages()}
                paths = folder.paths(view)
                one = S.search(q(text), [
                    S.SearchContext.fromFile(seq, metas[uid], paths[uid], lambda u=uid: folder.summary(u),
                                             len(view), view[-1], textLimit=limit)
                    for seq, uid in enumerate(view, 1)])
                if bulk != one:
                    differ[(text, limit)] = (bulk, one)
        assert differ == {}
        assert here and sum(here) < len(queries) * 2 * len(view) // 2  # (a third here, at most)
        assert 0 < len(S.searchFolder(q("BODY the"), folder, view)) < len(view)
    finally:
        folder.user.summarizer.close()
        folder.user.summarizer = None


def test_one_cursor_searches_one_needle_as_body_then_as_text(folder):
    """
    Two text evaluations on one cursor (L{_FolderCursor.each}) with the same needle, as BODY
    and then as TEXT: the second looks at the headers too (the workers' answers are made for
    the keys at hand, not kept from the first).
    """
    view = folder.uids()
    everyone = list(range(len(view)))
    cursor = S._FolderCursor(folder, view, list(view), S.MAX_TEXT)
    body = [i + 1 for i in cursor.each(q("BODY alice"), everyone)]
    text = [i + 1 for i in cursor.each(q("TEXT alice"), everyone)]
    assert body == oneByOne(q("BODY alice"), folder, view)
    assert text == oneByOne(q("TEXT alice"), folder, view)
    assert set(body) < set(text)  # (a message with "alice" in its headers alone)


def test_flag_size_date_uid_keys_read_no_summary(folder):
    db = folder.user.db
    view = folder.uids()
    for text in ["UNSEEN", "FLAGGED", "LARGER 1000", "SMALLER 300", "BEFORE 15-Jan-2025",
                 "SINCE 1-Mar-2025", "UID 2:9", "1:4", "MODSEQ 3", "KEYWORD $Junk",
                 "OR DELETED (ANSWERED NOT LARGER 900)", "NOT SEEN", "ALL"]:
        assert S.searchFolder(q(text), folder, view) == oneByOne(q(text), folder, view), text
    # oneByOne built contexts, but their summaries are lazy: still nothing was summarised
    assert db.execute("SELECT count(*) FROM summaries").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM fields").fetchone() == (0,)


def test_header_keys_decode_no_summary(folder):
    """
    Once the header fields are in the index, FROM/SUBJECT/... and SENT* read them alone: with
    every cached summary made unreadable they still answer and leave the broken summaries
    alone; TEXT parses the part offsets from the files it decodes, and answers as the
    per-message path, which finds the summaries broken and computes them again.
    """
    view = folder.uids()
    keys = ["FROM alice", 'SUBJECT "grüße"', "TO Éloise", "CC jane", "BCC eve",
            "HEADER Message-ID example", "SENTSINCE 15-Jan-2025", "OR FROM alice NOT SUBJECT lunch"]
    folder.summaries(view)  # (header keys alone would keep the fields and make no summary)
    expected = {k: S.searchFolder(q(k), folder, view) for k in keys}
    assert all(expected.values())
    db = folder.user.db
    assert db.execute("SELECT count(*) FROM fields").fetchone() == (len(view),)
    db.execute("UPDATE summaries SET summary = 'not a summary'")
    assert {k: S.searchFolder(q(k), folder, view) for k in keys} == expected
    broken = "SELECT count(*) FROM summaries WHERE summary = 'not a summary'"
    assert db.execute(broken).fetchone() == (len(view),)
    assert S.searchFolder(q("TEXT lunch"), folder, view) == oneByOne(q("TEXT lunch"), folder, view) != []
    assert db.execute(broken).fetchone() == (0,)


def test_view_with_messages_gone(folder):
    """
    A session's view may still hold UIDs another session expunged: they match nothing, not
    even NOT; sequence numbers and * are the view's.
    """
    view = folder.uids()
    gone = view[1]
    folder.store([gone], ["\\Deleted"], "add")
    folder.expunge([gone])
    assert 2 not in S.searchFolder(q("ALL"), folder, view)
    assert S.searchFolder(q("ALL"), folder, view) == [s for s in range(1, len(view) + 1) if s != 2]
    assert 2 not in S.searchFolder(q("NOT FROM nobody-at-all"), folder, view)
    assert S.searchFolder(q("*"), folder, view) == [len(view)]
    assert S.searchFolder(q("UID *"), folder, view) == [len(view)]
    assert S.searchFolder(q("ALL"), folder, []) == []
