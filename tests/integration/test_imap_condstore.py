"""
CONDSTORE and QRESYNC (RFC 7162) end to end over TLS: HIGHESTMODSEQ, FETCH MODSEQ and
CHANGEDSINCE, STORE UNCHANGEDSINCE with MODIFIED, unsolicited FETCH with MODSEQ, STATUS
HIGHESTMODSEQ, and the FETCH writer's answers (batches, nesting limit).
"""

from __future__ import annotations

import re

import pytest

from conftest import wait_for
from imapwire import ask, logged_in, read_tagged
from pymaild.store.delivery import deliver


def message(n: int) -> bytes:
    return b"From: a@example.com\r\nSubject: number %d\r\n\r\nbody %d\r\n" % (n, n)


def delivered(server, count: int, first: int = 0):
    """The postmaster's INBOX with C{count} messages delivered (by another process, as it were)."""
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for n in range(first, first + count):
        deliver(home, message(n))
    return home


@pytest.fixture
def inbox(server):
    delivered(server, 5, first=1)
    return server


def modseqs(answer: bytes) -> dict[int, int]:
    return {int(uid): int(m) for uid, m in re.findall(rb"UID (\d+)[^\r\n]*MODSEQ \((\d+)\)", answer)}


def highest(answer: bytes) -> int:
    return int(re.search(rb"\[HIGHESTMODSEQ (\d+)\]", answer).group(1))


def test_condstore_fetch_store_and_status(inbox):
    sock = logged_in(inbox)
    assert b"CONDSTORE" in ask(sock, b"c CAPABILITY", b"c")
    answer = ask(sock, b"s SELECT INBOX (CONDSTORE)", b"s")
    start = highest(answer)
    answer = ask(sock, b"f UID FETCH 1:* (FLAGS) (CHANGEDSINCE 0)", b"f")
    before = modseqs(answer)
    assert sorted(before) == [1, 2, 3, 4, 5] and max(before.values()) <= start, answer
    # a change gives a new MODSEQ above everything before; CHANGEDSINCE then finds just it
    answer = ask(sock, b"t UID STORE 2 +FLAGS (\\Flagged)", b"t")
    after = modseqs(answer)
    assert after[2] > start and b"\\Flagged" in answer, answer
    answer = ask(sock, b"f2 UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % start, b"f2")
    assert sorted(modseqs(answer)) == [2], answer
    # UNCHANGEDSINCE: message 2 changed after "start", so it is refused with MODIFIED
    answer = ask(sock, b"t2 UID STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Seen)" % start, b"t2")
    assert re.search(rb"t2 OK \[MODIFIED 2\]", answer), answer
    assert sorted(modseqs(answer)) == [1, 3], answer  # MODSEQ reported even with .SILENT
    answer = ask(sock, b"f3 FETCH 1:3 (UID FLAGS MODSEQ)", b"f3")
    flags = dict(re.findall(rb"UID (\d+) FLAGS \(([^)]*)\)", answer))
    assert b"\\Seen" in flags[b"1"] and b"\\Seen" in flags[b"3"] and b"\\Seen" not in flags[b"2"], answer
    # sequence-number STORE reports MODIFIED as sequence numbers (every MODSEQ is above 0)
    answer = ask(sock, b"t3 STORE 4 (UNCHANGEDSINCE 0) -FLAGS (\\Seen)", b"t3")
    assert re.search(rb"t3 OK \[MODIFIED 4\]", answer), answer
    answer = ask(sock, b"st STATUS INBOX (MESSAGES HIGHESTMODSEQ)", b"st")
    m = re.search(rb'STATUS "?INBOX"? \(MESSAGES 5 HIGHESTMODSEQ (\d+)\)', answer)
    assert m and int(m.group(1)) >= after[2], answer
    assert b"b BAD" in ask(sock, b"b STATUS INBOX (MESSAGES FROB)", b"b")
    sock.close()


def test_other_sessions_hear_modseq(inbox):
    one = logged_in(inbox)
    two = logged_in(inbox)
    assert b"ENABLED CONDSTORE" in ask(one, b"e ENABLE CONDSTORE", b"e")
    ask(one, b"s SELECT INBOX", b"s")
    ask(two, b"s SELECT INBOX", b"s")
    answer = ask(two, b"t STORE 3 +FLAGS (\\Answered)", b"t")
    stored = int(re.search(rb"MODSEQ \((\d+)\)", answer).group(1)) if b"MODSEQ" in answer else None
    assert stored is None, answer  # session two never used CONDSTORE: no MODSEQ for it
    heard = []  # announcements of a burst are read together, 50 ms later
    wait_for(lambda: heard.append(ask(one, b"n NOOP", b"n")) or b"3 FETCH" in heard[-1], timeout=10)
    seen = b"".join(heard)
    assert re.search(rb"\* 3 FETCH \(FLAGS \([^)]*\\Answered[^)]*\) MODSEQ \(\d+\)\)", seen), seen
    one.close()
    two.close()


def test_fetch_refusals(inbox):
    sock = logged_in(inbox, b"INBOX")
    assert b"v BAD" in ask(sock, b"v UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)", b"v")  # no QRESYNC
    assert b"d BAD" in ask(sock, b"d FETCH 1 " + b"(" * 50 + b"FLAGS" + b")" * 50, b"d")
    assert b"m BAD" in ask(sock, b"m FETCH 1 (FLAGS) (FROB)", b"m")
    assert b"u BAD" in ask(sock, b"u STORE 1 (FROB 1) +FLAGS (\\Seen)", b"u")
    assert b"ok OK" in ask(sock, b"ok FETCH 1 (FLAGS)", b"ok")  # and the session goes on
    sock.close()


def test_fetch_many_messages_in_batches(server):
    """
    More messages than one batch: every one answered once, in order, bodies intact.
    """
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1201):
        deliver(home, message(n))
    sock = logged_in(server, b"INBOX")
    answer = ask(sock, b"f FETCH 1:* (UID BODY.PEEK[TEXT])", b"f")
    found = re.findall(rb"\* (\d+) FETCH \(UID (\d+) BODY\[TEXT\] \{\d+\}\r\nbody (\d+)\r\n\)", answer)
    assert len(found) == 1200
    assert [int(s) for s, _, _ in found] == list(range(1, 1201))
    assert all(s == u == b for s, u, b in found)
    sock.close()


def test_esearch_literals_and_modseq(inbox):
    sock = logged_in(inbox, b"INBOX")
    assert b"ESEARCH" in ask(sock, b"c CAPABILITY", b"c")
    answer = ask(sock, b"e SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT number", b"e")
    assert b'* ESEARCH (TAG "e") MIN 1 MAX 5 COUNT 5 ALL 1:5\r\n' in answer, answer
    answer = ask(sock, b"u UID SEARCH RETURN () NOT SUBJECT 3", b"u")
    assert b'* ESEARCH (TAG "u") UID ALL 1:2,4:5\r\n' in answer, answer
    answer = ask(sock, b"z SEARCH RETURN (COUNT MIN) SUBJECT nothing-like-this", b"z")
    assert b'* ESEARCH (TAG "z") COUNT 0\r\n' in answer, answer
    assert b"bad BAD" in ask(sock, b"bad SEARCH RETURN (SAVE) ALL", b"bad")  # no SEARCHRES
    # a literal in the keys: synchronising (continuation request) and LITERAL+
    sock.sendall(b"l SEARCH CHARSET UTF-8 SUBJECT {8}\r\n")
    assert sock.recv(4096).startswith(b"+ ")
    answer = ask(sock, b"number 4 UNDELETED", b"l")
    assert b"* SEARCH 4\r\n" in answer, answer
    answer = ask(sock, b"p SEARCH OR SUBJECT {8+}\r\nnumber 2 SUBJECT {1+}\r\n5", b"p")
    assert b"* SEARCH 2 5\r\n" in answer, answer
    # MODSEQ key: the highest MODSEQ of the matches comes with the result
    answer = ask(sock, b"m SEARCH MODSEQ 1", b"m")
    assert re.search(rb"\* SEARCH 1 2 3 4 5 \(MODSEQ \d+\)\r\n", answer), answer
    # too deep is refused, the session goes on
    assert b"d BAD" in ask(sock, b"d SEARCH " + b"(" * 40 + b"ALL" + b")" * 40, b"d")
    assert b"* SEARCH 1 2 3 4 5" in ask(sock, b"ok SEARCH ALL", b"ok")
    sock.close()


def test_list_extended_and_list_status(inbox):
    sock = logged_in(inbox)
    caps = ask(sock, b"c CAPABILITY", b"c")
    assert b"LIST-EXTENDED" in caps and b"LIST-STATUS" in caps
    for command in (b'a CREATE "Work/Projects"', b'c SUBSCRIBE "Work/Projects"',
                    b'd SUBSCRIBE "Gone"', b'f SUBSCRIBE INBOX'):
        assert b" OK" in ask(sock, command, command[:1]), command
    # the delimiter query of RFC 3501
    assert b'* LIST (\\Noselect) "/" ""\r\n' in ask(sock, b'g LIST "" ""', b"g")
    # SUBSCRIBED selection: a subscribed name that no longer exists is \NonExistent
    answer = ask(sock, b'h LIST (SUBSCRIBED) "" "*"', b"h")
    assert re.search(rb'\* LIST \(\\NonExistent \\HasNoChildren \\Subscribed\) "/" "Gone"', answer), answer
    assert re.search(rb'\* LIST \([^)]*\\Subscribed[^)]*\) "/" "Work/Projects"', answer), answer
    assert b'"Work"\r\n' not in answer and b'"Sent"' not in answer, answer
    # RECURSIVEMATCH: a parent that matches, not subscribed, with subscribed children
    answer = ask(sock, b'i LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"', b"i")
    assert re.search(rb'\* LIST \([^)]*\) "/" "Work" \("CHILDINFO" \("SUBSCRIBED"\)\)', answer), answer
    assert b'"Work/Projects"' not in answer, answer
    assert b"j BAD" in ask(sock, b'j LIST (RECURSIVEMATCH) "" "*"', b"j")
    # several patterns, RETURN (SUBSCRIBED CHILDREN STATUS (...)), SPECIAL-USE selection
    answer = ask(sock, b'k LIST "" ("INBOX" "Work/*") RETURN (SUBSCRIBED CHILDREN STATUS (MESSAGES UNSEEN SIZE))', b"k")
    assert re.search(rb'\* LIST \([^)]*\\Subscribed[^)]*\) "/" "INBOX"\r\n\* STATUS "INBOX" \(MESSAGES 5 UNSEEN 5 SIZE \d+\)',
                     answer), answer
    assert re.search(rb'"Work/Projects"\r\n\* STATUS "Work/Projects" \(MESSAGES 0 UNSEEN 0 SIZE 0\)', answer), answer
    assert b'"Sent"' not in answer
    answer = ask(sock, b'l LIST (SPECIAL-USE) "" "*" RETURN (SPECIAL-USE)', b"l")
    assert b"\\Sent" in answer and b"\\Trash" in answer and b'"INBOX"' not in answer and b"Work" not in answer, answer
    # plain LIST does not show \Subscribed (it was not asked for)
    answer = ask(sock, b'm LIST "" "INBOX"', b"m")
    assert b"\\Subscribed" not in answer and b'"INBOX"' in answer, answer
    assert b"n BAD" in ask(sock, b'n LIST "" "*" RETURN (STATUS (FROB))', b"n")
    sock.close()


def test_qresync(inbox):
    """
    RFC 7162 QRESYNC: a client that was away learns exactly what vanished and what changed at
    SELECT; EXPUNGE becomes VANISHED; UID FETCH ... (CHANGEDSINCE n VANISHED).
    """
    sock = logged_in(inbox)
    assert b"QRESYNC" in ask(sock, b"c CAPABILITY", b"c")
    answer = ask(sock, b"s SELECT INBOX", b"s")
    validity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", answer).group(1))
    since = highest(answer)
    assert b"q BAD" in ask(sock, b"q SELECT INBOX (QRESYNC (%d %d))" % (validity, since), b"q")  # not enabled
    # another session changes things while this client is "away"
    other = logged_in(inbox, b"INBOX")
    ask(other, b"a STORE 2 +FLAGS (\\Deleted)", b"a")
    ask(other, b"b STORE 4 +FLAGS (\\Deleted)", b"b")
    ask(other, b"c EXPUNGE", b"c")
    ask(other, b"d UID STORE 5 +FLAGS (\\Flagged)", b"d")
    other.close()
    assert b"u OK" in ask(sock, b"u UNSELECT", b"u")
    assert b"* ENABLED QRESYNC" in ask(sock, b"e ENABLE QRESYNC", b"e")  # authenticated state only
    answer = ask(sock, b"r SELECT INBOX (QRESYNC (%d %d))" % (validity, since), b"r")
    assert b"[CLOSED]" not in answer, answer  # nothing was selected
    assert b"* VANISHED (EARLIER) 2,4\r\n" in answer, answer
    assert re.search(rb"\* 3 FETCH \(UID 5 FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", answer), answer
    assert not re.search(rb"FETCH \(UID [13] ", answer), answer  # unchanged: not sent
    # known-uids limit the VANISHED answer
    answer = ask(sock, b"k SELECT INBOX (QRESYNC (%d %d 1:3))" % (validity, since), b"k")
    assert b"* VANISHED (EARLIER) 2\r\n" in answer, answer
    assert answer.index(b"* OK [CLOSED]") < answer.index(b"FLAGS"), answer
    # a different UIDVALIDITY: nothing but the normal SELECT answers
    answer = ask(sock, b"w SELECT INBOX (QRESYNC (%d %d))" % (validity + 1, since), b"w")
    assert b"VANISHED" not in answer and b"FETCH" not in answer, answer
    # EXPUNGE is reported as VANISHED once QRESYNC is on
    ask(sock, b"f UID STORE 3 +FLAGS (\\Deleted)", b"f")
    answer = ask(sock, b"g EXPUNGE", b"g")
    assert b"* VANISHED 3\r\n" in answer and b"EXPUNGE\r\n" not in answer, answer
    answer = ask(sock, b"h UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % since, b"h")
    assert b"* VANISHED (EARLIER) 2:4\r\n" in answer, answer
    assert re.search(rb"\* 2 FETCH \(UID 5 FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", answer), answer
    sock.close()


def test_recent(inbox):
    """
    RFC 3501 2.3.2: the first session told of a message has it \\Recent; EXAMINE looks without
    claiming; STATUS counts the unclaimed; new mail goes to the selected session; SEARCH
    RECENT/NEW/OLD.
    """
    from pymaild.store.delivery import deliver as deliverTo

    looker = logged_in(inbox)
    assert b"STATUS \"INBOX\" (RECENT 5)" in ask(looker, b"s STATUS INBOX (RECENT)", b"s")
    answer = ask(looker, b"e EXAMINE INBOX", b"e")
    assert b"* 5 RECENT" in answer, answer
    assert b"\\Recent" in ask(looker, b"f FETCH 1 FLAGS", b"f")
    sock = logged_in(inbox)
    answer = ask(sock, b"s SELECT INBOX", b"s")
    assert b"* 5 RECENT" in answer, answer  # EXAMINE did not claim them
    answer = ask(sock, b"f FETCH 1:2 (FLAGS)", b"f")
    assert answer.count(b"\\Recent") == 2, answer
    assert b"* SEARCH 1 2 3 4 5" in ask(sock, b"r SEARCH RECENT", b"r")
    ask(sock, b"t STORE 2 +FLAGS (\\Seen \\Recent)", b"t")  # \Recent cannot be set or cleared
    assert b"* SEARCH 1 3 4 5" in ask(sock, b"n SEARCH NEW", b"n")
    assert b"* SEARCH\r\n" in ask(sock, b"o SEARCH OLD", b"o")
    # a second read-write session finds nothing recent, and STATUS counts nothing unclaimed
    other = logged_in(inbox)
    assert b"* 0 RECENT" in ask(other, b"s SELECT INBOX", b"s")
    assert b"\\Recent" not in ask(other, b"f FETCH 1:* (FLAGS)", b"f")
    assert b"* SEARCH 1 2 3 4 5" in ask(other, b"o SEARCH OLD", b"o")
    assert b"(RECENT 0)" in ask(looker, b"x STATUS INBOX (RECENT)", b"x")
    other.close()
    # new mail: the selected session hears EXISTS and RECENT and has it \Recent
    home = inbox.data_dir / "mail" / "localhost" / "postmaster"
    deliverTo(home, message(6))
    heard = []  # inotify -> sync -> claim
    wait_for(lambda: heard.append(ask(sock, b"i NOOP", b"i")) or b"RECENT" in heard[-1], timeout=10)
    seen = b"".join(heard)
    assert b"* 6 EXISTS" in seen and b"* 6 RECENT" in seen, seen
    assert b"\\Recent" in ask(sock, b"g FETCH 6 (FLAGS)", b"g")
    sock.close()
    looker.close()


def test_watch_comes_back_after_a_bulk_store(server):
    """
    A STORE on many messages lifts the folder's inotify watch around its renames: an IDLE
    session still hears the flag changes (told in-process) and, afterwards, a delivery by
    another process (the watch is back).
    """
    folder = delivered(server, 100)
    idler = logged_in(server, b"INBOX")
    idler.sendall(b"i IDLE\r\n")
    assert idler.recv(4096).startswith(b"+")
    other = logged_in(server, b"INBOX")
    assert b"t OK" in ask(other, b"t STORE 1:* +FLAGS.SILENT (\\Flagged)", b"t")
    heard = []

    def hear(marker: bytes) -> bool:
        heard.append(idler.recv(65536))
        return marker in b"".join(heard)

    assert wait_for(lambda: hear(b"* 100 FETCH"), timeout=10)
    deliver(folder, message(101))
    assert wait_for(lambda: hear(b"* 101 EXISTS"), timeout=10)
    idler.sendall(b"DONE\r\n")
    other.close()
    idler.close()
    assert b"Traceback" not in server.log_path.read_bytes()


def test_a_bulk_store_answers_from_the_index_and_renames_its_files_after(server):
    """
    A STORE on many messages answers once the index holds the change (MODSEQ and flags as
    every later answer gives them), and renames the files after: a command pipelined right
    behind the STORE waits for the renames and sees the same flags, and once it has answered
    every file's name carries them (what another Maildir reader sees).
    """
    folder = delivered(server, 100)
    s = logged_in(server, b"INBOX (CONDSTORE)")
    s.sendall(b"t STORE 1:* +FLAGS (\\Seen \\Flagged)\r\nf FETCH 1:* (FLAGS MODSEQ)\r\n")
    answer = read_tagged(s, b"f")
    stored, fetched = answer.split(b"t OK", 1)
    flags = re.findall(rb"\* (\d+) FETCH \(FLAGS \(([^)]*)\) MODSEQ \((\d+)\)\)", stored)
    assert len(flags) == 100 and len({m for _, _, m in flags}) == 1
    assert all(set(f.split()) >= {b"\\Seen", b"\\Flagged"} for _, f, _ in flags)
    again = re.findall(rb"\* (\d+) FETCH \(FLAGS \(([^)]*)\) MODSEQ \((\d+)\)\)", fetched)
    assert sorted(again) == sorted(flags) and b"f OK" in fetched
    names = [p.name for p in (folder / "cur").iterdir()]
    assert len(names) == 100 and all("FS" in n.partition(":2,")[2] for n in names)
    other = logged_in(server, b"INBOX")
    seen = ask(other, b"u UID FETCH 1:* (FLAGS)", b"u")
    assert seen.count(b"\\Seen") == 100 and seen.count(b"\\Flagged") == 100
    s.close()
    other.close()
    assert b"Traceback" not in server.log_path.read_bytes()


def test_lsub(server):
    """
    RFC 3501 6.3.9: LSUB lists subscribed names, also those whose folder is gone, and a parent
    that is not subscribed as \\Noselect when "%" stops above a subscribed child.
    """
    sock = logged_in(server)
    for command in (b'a CREATE "Work/Projects"', b'b SUBSCRIBE "Work/Projects"', b'c SUBSCRIBE "Gone"'):
        assert b" OK" in ask(sock, command, command[:1])
    answer = ask(sock, b'l LSUB "" "%"', b"l")
    assert b'* LSUB (\\Noselect) "/" "Work"\r\n' in answer, answer
    assert re.search(rb'\* LSUB \([^)]*\) "/" "Gone"\r\n', answer), answer
    assert b'"Work/Projects"' not in answer, answer
    answer = ask(sock, b'm LSUB "" "*"', b"m")
    assert re.search(rb'\* LSUB \([^)]*\) "/" "Work/Projects"\r\n', answer), answer
    assert b'"Work"\r\n' not in answer, answer
    answer = ask(sock, b'n LSUB "Work/" "%"', b"n")
    assert re.search(rb'\* LSUB \([^)]*\) "/" "Work/Projects"\r\n', answer) and b"Gone" not in answer, answer
    sock.close()
