"""
The FETCH request parser: attributes, RFC 7162 modifiers, nesting limits.
"""

from __future__ import annotations

import pytest

from pymaild.imap import fetch
from pymaild.imap.fetch import MAX_NESTING, FetchError, internalDate, parseFetch, parseFetchCached


def types(request):
    return [item.type for item in request.items]


def test_attributes_and_macros():
    assert types(parseFetch(b"(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")) == [
        "uid", "flags", "rfc822size", "internaldate", "envelope"]
    assert types(parseFetch(b"FLAGS")) == ["flags"]
    assert set(types(parseFetch(b"FAST"))) == {"flags", "internaldate", "rfc822size"}
    request = parseFetch(b"BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]<0.100>")
    assert types(request) == ["body"] and request.items[0].peek and request.items[0].partialLength == 100


def test_what_the_loader_must_provide():
    assert not parseFetch(b"(UID FLAGS RFC822.SIZE)").needsSummaries
    assert not parseFetch(b"BODY.PEEK[]").needsSummaries  # the whole message: the file alone
    assert not parseFetch(b"RFC822").needsSummaries
    assert parseFetch(b"BODY.PEEK[1]").needsSummaries
    assert parseFetch(b"BODY").needsSummaries
    assert parseFetch(b"ENVELOPE").needsSummaries
    assert parseFetch(b"BODY[]").marksSeen and not parseFetch(b"BODY.PEEK[]").marksSeen
    assert parseFetch(b"RFC822.TEXT").marksSeen and not parseFetch(b"RFC822.HEADER").marksSeen


def test_modseq_and_changedsince():
    request = parseFetch(b"(FLAGS MODSEQ)")
    assert request.modseq and types(request) == ["flags"]
    assert parseFetch(b"MODSEQ").modseq and parseFetch(b"MODSEQ").items == []
    request = parseFetch(b"(FLAGS) (CHANGEDSINCE 12345)")
    assert request.changedSince == 12345 and request.modseq and not request.vanished
    request = parseFetch(b"(FLAGS) (CHANGEDSINCE 7 VANISHED)")
    assert request.vanished
    # a header field named MODSEQ is a header field, not the attribute
    request = parseFetch(b"BODY.PEEK[HEADER.FIELDS (MODSEQ)]")
    assert not request.modseq and request.items[0].header.fields == [b"MODSEQ"]


@pytest.mark.parametrize("line", [
    b"", b"()", b"(FLAGS", b"FLAGS)", b"(FLAGS) (VANISHED)", b"(FLAGS) (CHANGEDSINCE x)",
    b"(FLAGS) (CHANGEDSINCE 99999999999999999999)", b"(FLAGS) (FROB 1)", b"(FLAGS) junk",
    b"(FLAGS) (CHANGEDSINCE 1 CHANGEDSINCE 2)", b"(NOSUCHTHING)", b'(FLAGS "x)',
])
def test_malformed_requests_are_refused(line):
    with pytest.raises(FetchError):
        parseFetch(line)


def test_nesting_is_limited():
    parseFetch(b"(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")  # depth 3: what clients send
    with pytest.raises(FetchError, match="nested"):
        parseFetch(b"(" * (MAX_NESTING + 1) + b"FLAGS" + b")" * (MAX_NESTING + 1))
    with pytest.raises(FetchError, match="nested"):
        parseFetch(b"(" * 100000)


def test_internaldate_format(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        assert internalDate(837596665) == b'"17-Jul-1996 02:44:25 -0700"'
        assert internalDate(0) == b'"31-Dec-1969 16:00:00 -0800"'
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_list_patterns():
    from pymaild.imap.mailbox import listPattern

    assert listPattern("*")("Work/Projects") and listPattern("%")("Work")
    assert not listPattern("%")("Work/Projects")  # anchored: % stops at the delimiter
    assert listPattern("Work/%")("Work/Projects") and not listPattern("Work/%")("Work/A/B")
    assert not listPattern("a.c")("abc")  # the rest is literal, not a regular expression
    assert listPattern("inbox")("INBOX") and listPattern("Inbox/*")("INBOX/x")
    assert not listPattern("work")("Work")  # only INBOX ignores case


def test_read_section_equals_the_streaming_reader(tmp_path):
    """
    The whole-read fast path and the streaming CRLFSection give the same bytes for every range
    and partial, for LF files, CRLF files and stray CRs; to the end of the file, whatever size
    the index gives (right, too small, too large, or none).
    """
    import random

    from pymaild.imap.fetch import readSection
    from pymaild.imap.mailbox import CRLFSection

    rng = random.Random(7)
    for n, content in enumerate([
        b"Subject: x\n\nline\n" * 50,
        b"Subject: y\r\n\r\nwindows\r\nlines\r\n" * 40,
        b"odd\rcarriage\n\rreturns\r\n\n" * 30,
    ]):
        path = tmp_path / f"m{n}"
        path.write_bytes(content)
        for _ in range(200):
            start = rng.randrange(0, len(content))
            end = rng.choice([rng.randrange(start, len(content) + 1), 1 << 62])
            whole = content[start:end].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            skip = rng.choice([0, rng.randrange(0, len(whole) + 3)])
            limit = rng.choice([None, rng.randrange(0, len(whole) + 3)])
            section = CRLFSection(path, start, end, len(whole), skip, limit)
            try:
                expected = section.read()
            finally:
                section.close()
            size = rng.choice([len(content), None, rng.randrange(0, 2 * len(content) + 1)])
            assert readSection(path, start, end, skip, limit, size) == expected


def test_sections_read_whole_stay_within_the_budget(tmp_path):
    """
    One message's sections read into memory add up to at most STREAM_ABOVE: a FETCH naming
    BODY.PEEK[] of a large message three times (or a thousand) streams all but the first,
    and the bytes are the same either way.
    """
    from types import SimpleNamespace

    from pymaild.imap.fetch import STREAM_ABOVE, Stream, renderMessage
    from pymaild.imap.mailbox import CRLFSection
    from pymaild.store.maildir import Message

    body = b"".join(b"line %06d of a message of some size\n" % i for i in range(STREAM_ABOVE // 50))
    path = tmp_path / "m"
    path.write_bytes(b"Subject: big\n\n" + body)
    wire = path.read_bytes().replace(b"\n", b"\r\n")
    assert STREAM_ABOVE // 2 < len(wire) <= STREAM_ABOVE
    meta = Message(1, frozenset(), frozenset(), 1, len(wire), len(wire), 0)
    msg = SimpleNamespace(meta=meta, path=str(path), summary=None)
    pieces = renderMessage(1, msg, parseFetch(b"(BODY.PEEK[] BODY.PEEK[] BODY.PEEK[])"), False, False, CRLFSection)
    held = sum(len(p) for p in pieces if isinstance(p, bytes))
    assert len(wire) < held < len(wire) + 200
    kinds = [type(p) for p in pieces]
    assert [k for i, k in enumerate(kinds) if not i or k is not bytes or kinds[i - 1] is not bytes] == \
        [bytes, Stream, bytes, Stream, bytes]  # (bytes pieces in a row: the read section apart)
    out = b""
    for p in pieces:
        if isinstance(p, Stream):
            out += b"{%d}\r\n" % len(wire) + p.section.read()  # (the prefix ends the bytes before)
            p.section.close()
        else:
            out += p
    one = b"BODY[] {%d}\r\n" % len(wire) + wire
    assert out == b"* 1 FETCH (" + b" ".join([one] * 3) + b")\r\n"


def test_parsed_texts_are_kept_and_each_request_is_its_own(monkeypatch):
    """
    A FETCH text parsed before is not parsed again; each request from it is a copy the server
    may add to (a FETCH that sets \\Seen adds FLAGS) without the next one seeing it; a
    malformed text raises every time; a long one is not kept; the store is bounded.
    """
    monkeypatch.setattr(fetch, "_parsed", {})
    calls = []
    real = fetch.parseFetch
    monkeypatch.setattr(fetch, "parseFetch", lambda line: calls.append(line) or real(line))
    first = parseFetchCached(b"(BODY[] MODSEQ) (CHANGEDSINCE 7)")
    first.items.append("added")
    first.types.add("added")
    second = parseFetchCached(b"(BODY[] MODSEQ) (CHANGEDSINCE 7)")
    assert len(calls) == 1
    again = real(b"(BODY[] MODSEQ) (CHANGEDSINCE 7)")
    assert [bytes(i) for i in second.items] == [bytes(i) for i in again.items] == [b"BODY[]"]
    assert second.items is not first.items and second.types is not first.types
    assert (second.modseq, second.changedSince, second.types) == (True, 7, {"body"})
    for _ in range(2):
        with pytest.raises(FetchError):
            parseFetchCached(b"(BODY[)")
    assert b"(BODY[)" not in fetch._parsed
    long = b"(BODY.PEEK[HEADER.FIELDS (" + b" ".join(b"X-%d" % i for i in range(100)) + b")])"
    parseFetchCached(long)
    parseFetchCached(long)
    assert calls.count(long) == 2
    monkeypatch.setattr(fetch, "PARSED_MAX", 3)
    for n in range(5):
        parseFetchCached(b"(UID RFC822.SIZE FLAGS BODY.PEEK[%d])" % (n + 1))
    assert len(fetch._parsed) <= 3
