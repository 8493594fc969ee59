"""
SORT and THREAD (RFC 5256) and SORT=DISPLAY (RFC 5957) end to end: capabilities, the answers
for a small threaded folder, UID forms, search keys with them, refusals.
"""

from __future__ import annotations

import pytest

from imapwire import ask, logged_in
from pymaild.store.delivery import deliver

MESSAGES = [
    # (from, subject, date, message-id, references)
    ("Zed <zed@example.com>", "Budget", "Mon, 02 Nov 2026 10:00:00 +0000", "<a@x>", ""),
    ("amy@example.com", "Re: Budget", "Mon, 02 Nov 2026 11:00:00 +0000", "<b@x>", "<a@x>"),
    ("Bob <bob@example.com>", "Lunch", "Sun, 01 Nov 2026 09:00:00 +0000", "<c@x>", ""),
    ("carol@example.com", "Re: Re: Budget", "Mon, 02 Nov 2026 12:00:00 +0000", "<d@x>", "<a@x> <b@x>"),
    ("Al <zz@example.com>", "Fwd: Lunch", "Tue, 03 Nov 2026 08:00:00 +0000", "<e@x>", ""),
]


@pytest.fixture
def threads(server):
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for sender, subject, date, mid, refs in MESSAGES:
        header = f"From: {sender}\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: {mid}\r\n"
        if refs:
            header += f"References: {refs}\r\n"
        deliver(home, (header + "\r\nbody\r\n").encode())
    return server


def untagged(answer: bytes, name: bytes) -> bytes:
    for line in answer.split(b"\r\n"):
        if line.startswith(b"* " + name):
            return line
    raise AssertionError(answer)


def test_sort_and_thread(threads):
    sock = logged_in(threads, b"INBOX")
    caps = ask(sock, b"c CAPABILITY", b"c")
    for cap in (b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"):
        assert cap in caps
    assert untagged(ask(sock, b"a SORT (DATE) UTF-8 ALL", b"a"), b"SORT") == b"* SORT 3 1 2 4 5"
    assert untagged(ask(sock, b"b SORT (REVERSE DATE) UTF-8 ALL", b"b"), b"SORT") == b"* SORT 5 4 2 1 3"
    # base subjects: Budget x3 (then by sequence), Lunch x2
    assert untagged(ask(sock, b"s SORT (SUBJECT) US-ASCII ALL", b"s"), b"SORT") == b"* SORT 1 2 4 3 5"
    # FROM sorts by mailbox, DISPLAYFROM by the display name (or the address when there is none)
    assert untagged(ask(sock, b"f SORT (FROM) UTF-8 ALL", b"f"), b"SORT") == b"* SORT 2 3 4 1 5"
    assert untagged(ask(sock, b"d SORT (DISPLAYFROM) UTF-8 ALL", b"d"), b"SORT") == b"* SORT 5 2 3 4 1"
    # UID SORT with search keys
    answer = ask(sock, b"u UID SORT (REVERSE DATE) UTF-8 SUBJECT budget", b"u")
    assert untagged(answer, b"SORT") == b"* SORT 4 2 1"
    assert untagged(ask(sock, b"e SORT (SIZE) UTF-8 SUBJECT nothing", b"e"), b"SORT") == b"* SORT"
    # THREAD: the budget thread by References; the forward joins its subject
    answer = ask(sock, b"t THREAD REFERENCES UTF-8 ALL", b"t")
    assert untagged(answer, b"THREAD") == b"* THREAD (3 5)(1 2 4)"  # Fwd: Lunch joins Lunch (step 5)
    answer = ask(sock, b"o THREAD ORDEREDSUBJECT UTF-8 ALL", b"o")
    assert untagged(answer, b"THREAD") == b"* THREAD (3 5)(1 (2)(4))"  # RFC 5256: the rest are siblings
    answer = ask(sock, b"v UID THREAD REFERENCES UTF-8 NOT FROM bob", b"v")
    assert untagged(answer, b"THREAD") == b"* THREAD (1 2 4)(5)"
    # refusals, and the session goes on
    assert b"x1 BAD" in ask(sock, b"x1 SORT (SHOESIZE) UTF-8 ALL", b"x1")
    assert b"x2 BAD" in ask(sock, b"x2 SORT DATE UTF-8 ALL", b"x2")
    assert b"x3 BAD" in ask(sock, b"x3 THREAD WHATEVER UTF-8 ALL", b"x3")
    assert b"x4 NO [BADCHARSET" in ask(sock, b"x4 SORT (DATE) KOI8-R ALL", b"x4")
    assert b"ok OK" in ask(sock, b"ok SORT (ARRIVAL) UTF-8 ALL", b"ok")
    sock.close()
