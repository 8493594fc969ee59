"""
Sequence sets: pymaild's parser against Twisted's on random sets, its cost (one sort, not one
per number), and C{mailbox.inSet} against the plain definition.
"""

from __future__ import annotations

import random
from itertools import islice
from array import array
from types import SimpleNamespace

import pytest
from twisted.mail import imap4

from pymaild.imap.mailbox import StoreMailbox, inSet
from pymaild.imap.server import PymaildIMAP4Server, parseSequenceSet


def randomSet(rng: random.Random, items: int) -> bytes:
    out = []
    for _ in range(items):
        a = rng.choice([b"*", str(rng.randint(1, 60)).encode()])
        if rng.random() < 0.5:
            b = rng.choice([b"*", str(rng.randint(1, 60)).encode()])
            if a == b == b"*":
                b = b"7"
            out.append(a + b":" + b)
        else:
            out.append(a)
    return b",".join(out)


def test_same_sets_as_twisted():
    """
    On 2,000 random sets of 1 to 12 items, pymaild's MessageSet has Twisted's ranges, and both
    hold the same numbers once C{*} is known.
    """
    rng = random.Random(4)
    for _ in range(2000):
        token = randomSet(rng, rng.randint(1, 12))
        ours, theirs = parseSequenceSet(token), imap4.parseIdList(token)
        assert ours.ranges == theirs.ranges, token
        ours.last = theirs.last = 50
        assert list(ours) == list(theirs), token


@pytest.mark.parametrize("token", [b"7", b"4294967295", b"9:3", b"3:9", b"5:5", b"1:4294967295"])
def test_one_number_or_range_is_twisteds_set_without_its_sort(token, monkeypatch):
    """
    One number or one range of numbers (the commonest sets: a client opening or flagging a
    message) is parsed without C{MessageSet.clean}, and is Twisted's set all the same, before
    and after C{last} is set.
    """
    calls = []
    clean = imap4.MessageSet.clean
    monkeypatch.setattr(imap4.MessageSet, "clean", lambda self: calls.append(1) or clean(self))
    ours = parseSequenceSet(token)
    assert calls == [] and isinstance(ours, imap4.MessageSet)
    monkeypatch.setattr(imap4.MessageSet, "clean", clean)
    theirs = imap4.parseIdList(token)
    assert ours.ranges == theirs.ranges
    ours.last = theirs.last = 12
    assert list(islice(ours, 20)) == list(islice(theirs, 20))


@pytest.mark.parametrize("token", [b"0", b"4294967296", b"1:*:*", b"a:b", b"", b"1,", b",1", b"1:0", b"1 2", b"-1"])
def test_refused(token):
    with pytest.raises(ValueError):
        parseSequenceSet(token)


def test_star_star_is_the_last_message():
    """
    RFC 3501's grammar allows C{*:*} (seq-range is seq-number ":" seq-number); Twisted refused it.
    """
    s = parseSequenceSet(b"*:*")
    s.last = 9
    assert list(s) == [9]


def test_a_long_set_is_sorted_once(monkeypatch):
    """
    12,000 numbers (66 KB) through the server's C{arg_seqset}: C{MessageSet.clean} runs once, not
    once a number as in Twisted's C{parseIdList} (quadratic: 20 s of reactor for 10,000).
    """
    calls = []
    clean = imap4.MessageSet.clean
    monkeypatch.setattr(imap4.MessageSet, "clean", lambda self: calls.append(1) or clean(self))
    token = b",".join(b"%d" % n for n in range(1, 24000, 2))
    messages, rest = PymaildIMAP4Server().arg_seqset(token + b" (FLAGS)")
    assert rest == b"(FLAGS)" and len(messages.ranges) == 12000
    assert len(calls) <= 2


def test_in_set_matches_the_definition():
    rng = random.Random(7)
    for _ in range(500):
        token = randomSet(rng, rng.randint(1, 12))
        uids = sorted(rng.sample(range(1, 80), rng.randint(0, 40)))
        messages = parseSequenceSet(token)
        spans = [(min(a or 1 << 32, b or 1 << 32), max(a or 1 << 32, b or 1 << 32)) for a, b in messages.ranges]
        assert inSet(messages, uids) == [u for u in uids if any(a <= u <= b for a, b in spans)], token


def test_resolve_matches_the_definition():
    """
    C{StoreMailbox.resolve} (slices of the session's view, joined without a sort) against the
    definition: for UIDs, the view's UIDs in the set with C{*} the greatest; for sequence
    numbers, the view's n-th UID for each n in the set from 1 to its length, C{*} the length;
    both ascending and without repeats.
    """
    rng = random.Random(11)
    for _ in range(1500):
        token = randomSet(rng, rng.randint(1, 12))
        view = array("I", sorted(rng.sample(range(1, 90), rng.randint(1, 50))))
        box = SimpleNamespace(uids=view)

        def named(last):
            ranges = [(last if a is None else a, last if b is None else b) for a, b in parseSequenceSet(token).ranges]
            return lambda n: any(min(a, b) <= n <= max(a, b) for a, b in ranges)

        inUids, inSeqs = named(view[-1]), named(len(view))
        assert StoreMailbox.resolve(box, parseSequenceSet(token), True) == [u for u in view if inUids(u)], token
        assert StoreMailbox.resolve(box, parseSequenceSet(token), False) == \
            [view[n - 1] for n in range(1, len(view) + 1) if inSeqs(n)], token
