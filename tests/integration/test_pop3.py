"""
POP3 over the store, end to end: a real server subprocess, poplib and raw sockets over TLS,
messages delivered into the maildir by another process (as an MDA would), IMAP alongside.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import os
import poplib
import socket

import pytest

from conftest import postmaster_inbox as inbox
from conftest import wait_for
from popwire import logged_in, plain_session, stuffed, tls_session
from pymaild.store.delivery import deliver

PLAIN = (
    b"From: Alice <alice@example.com>\r\nTo: postmaster@localhost\r\nSubject: Hello there\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob,\r\nsee you.\r\n"
)
DOTS = (
    b"From: dots@example.com\r\nSubject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\n"
    b"middle . dot\r\nlast line without a line end"
)
BIG = b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a large message\r\n" % i for i in range(20000))
MESSAGES = (PLAIN, DOTS, BIG)


@pytest.fixture
def mailbox(server):
    """The running server with three messages in postmaster's INBOX."""
    home = inbox(server)
    for message in MESSAGES:
        deliver(home, message)
    return server


def pop(server) -> poplib.POP3_SSL:
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls(), timeout=30)
    p.user("postmaster@localhost")
    p.pass_(server.postmaster_password())
    return p


def imap(server) -> imaplib.IMAP4_SSL:
    i = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30)
    i.login("postmaster@localhost", server.postmaster_password())
    return i


def wire_size(message: bytes) -> int:
    return len(message)  # the test messages have CRLF line ends already


# --- RFC 1939 ------------------------------------------------------------------------------


def test_stat_list_uidl_retr_top(mailbox):
    """
    STAT and LIST count the octets as sent (CRLF); RETR sends each message exactly, dot-stuffed
    on the wire (and a line end added to a last line without one); TOP sends the header, the
    empty line and n body lines; UIDL lists one distinct id per message.
    """
    s = logged_in(mailbox)
    total = sum(map(wire_size, MESSAGES))
    assert s.ask(b"STAT") == b"+OK 3 %d" % total
    first, body = s.ask_multi(b"LIST")
    assert first.startswith(b"+OK 3 messages")
    assert body == b"".join(b"%d %d\r\n" % (i, wire_size(m)) for i, m in enumerate(MESSAGES, 1))
    assert s.ask(b"LIST 2") == b"+OK 2 %d" % wire_size(DOTS)
    first, body = s.ask_multi(b"UIDL")
    ids = [line.split(b" ")[1] for line in body.splitlines()]
    assert len(set(ids)) == 3 and all(0 < len(i) <= 70 for i in ids)
    assert s.ask(b"UIDL 3") == b"+OK 3 " + ids[2]
    for number, message in enumerate(MESSAGES, 1):
        first, body = s.ask_multi(b"RETR %d" % number)
        assert first == b"+OK %d octets" % wire_size(message)
        expected = stuffed(message)
        assert body == expected, number
    first, body = s.ask_multi(b"TOP 1 1")
    assert body == PLAIN.split(b"\r\n\r\n")[0] + b"\r\n\r\nHi Bob,\r\n"
    first, body = s.ask_multi(b"TOP 2 0")
    assert body == b"From: dots@example.com\r\nSubject: dots\r\n\r\n"
    first, body = s.ask_multi(b"TOP 2 3")
    assert body == b"From: dots@example.com\r\nSubject: dots\r\n\r\n..starts with a dot\r\n...two dots\r\n..\r\n"
    assert s.ask(b"NOOP") == b"+OK"
    assert s.ask(b"QUIT").startswith(b"+OK")


def test_poplib_reads_what_was_delivered(mailbox):
    """poplib (which undoes the dot-stuffing) gets back each message's lines."""
    p = pop(mailbox)
    try:
        for number, message in enumerate(MESSAGES, 1):
            _, lines, _ = p.retr(number)
            assert b"\r\n".join(lines) == message.rstrip(b"\r\n")
    finally:
        p.quit()


def test_bad_arguments_get_err_and_the_session_goes_on(mailbox):
    s = logged_in(mailbox)
    for command in (b"RETR", b"RETR 0", b"RETR 4", b"RETR abc", b"RETR -1", b"TOP 1", b"TOP 1 -1",
                    b"TOP 1 x", b"DELE 99", b"LIST 99999999999", b"FOO", b"", b"USER x", b"STLS",
                    b"RETR 1 2 3", b"\xff\xfe"):
        answer = s.ask(command)
        assert answer.startswith(b"-ERR "), (command, answer)
        assert b"Error" not in answer and b"POP3Error" not in answer  # no exception names
    assert s.ask(b"STAT").startswith(b"+OK 3 ")
    s.close()


def test_commands_before_login_are_refused(server):
    s = tls_session(server)
    for command in (b"STAT", b"LIST", b"RETR 1", b"UIDL", b"NOOP", b"PASS x", b"APOP a b"):
        assert s.ask(command).startswith(b"-ERR"), command
    assert s.ask(b"QUIT").startswith(b"+OK")
    s.close()


def test_pipelined_commands_answer_in_order(mailbox):
    """PIPELINING: a client's whole batch, login included, in one write; answers in order."""
    s = tls_session(mailbox)
    password = mailbox.postmaster_password().encode()
    s.sock.sendall(b"CAPA\r\nUSER postmaster@localhost\r\nPASS " + password + b"\r\nSTAT\r\nLIST\r\nUIDL\r\n"
                   b"RETR 1\r\nTOP 2 0\r\nDELE 3\r\nSTAT\r\nRSET\r\nSTAT\r\nQUIT\r\n")
    assert s.line().startswith(b"+OK") and b"PIPELINING" in s.multi()
    assert s.line().startswith(b"+OK")  # USER
    assert s.line().startswith(b"+OK Logged in")
    assert s.line() == b"+OK 3 %d" % sum(map(wire_size, MESSAGES))
    assert s.line().startswith(b"+OK") and len(s.multi().splitlines()) == 3
    assert s.line().startswith(b"+OK") and len(s.multi().splitlines()) == 3
    assert s.line().startswith(b"+OK") and s.multi() == stuffed(PLAIN)
    assert s.line().startswith(b"+OK") and s.multi().endswith(b"\r\n\r\n")
    assert s.line().startswith(b"+OK")  # DELE
    assert s.line() == b"+OK 2 %d" % (wire_size(PLAIN) + wire_size(DOTS))
    assert s.line().startswith(b"+OK")  # RSET
    assert s.line().startswith(b"+OK 3 ")
    assert s.line() == b"+OK Logging out, 0 messages deleted"
    s.close()


# --- deletion, UIDL, locking ----------------------------------------------------------------


def test_dele_removes_only_at_quit(mailbox):
    """
    DELE'd messages disappear from STAT/LIST at once, but from the store only at QUIT: a
    dropped connection deletes nothing; after QUIT, IMAP no longer sees them.
    """
    s = logged_in(mailbox)
    assert s.ask(b"DELE 1").startswith(b"+OK")
    assert s.ask(b"DELE 1").startswith(b"-ERR")
    assert s.ask(b"RETR 1").startswith(b"-ERR")
    assert s.ask(b"STAT").startswith(b"+OK 2 ")
    first, body = s.ask_multi(b"LIST")
    assert not body.startswith(b"1 ")
    s.sock.close()  # dropped: no QUIT

    def count():
        try:
            s2 = logged_in(mailbox)
        except AssertionError:
            return False  # still IN-USE while the server notices the drop
        answer = s2.ask(b"STAT")
        return s2, answer

    s2, answer = wait_for(count, timeout=10, what="the mailbox to be free again")
    assert answer.startswith(b"+OK 3 ")
    assert s2.ask(b"DELE 1").startswith(b"+OK") and s2.ask(b"DELE 3").startswith(b"+OK")
    assert s2.ask(b"QUIT") == b"+OK Logging out, 2 messages deleted"
    s2.close()
    i = imap(mailbox)
    try:
        typ, data = i.select("INBOX")
        assert data == [b"1"]
        _, data = i.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == DOTS
    finally:
        i.logout()
    s3 = logged_in(mailbox)
    assert s3.ask(b"STAT") == b"+OK 1 %d" % wire_size(DOTS)
    s3.close()


def test_second_session_is_refused_in_use(mailbox):
    first = logged_in(mailbox)
    second = tls_session(mailbox)
    assert second.ask(b"USER postmaster@localhost").startswith(b"+OK")
    answer = second.ask(b"PASS " + mailbox.postmaster_password().encode())
    assert answer.startswith(b"-ERR [IN-USE]")
    assert first.ask(b"QUIT").startswith(b"+OK")
    first.close()
    assert second.login(b"postmaster@localhost", mailbox.postmaster_password().encode()).startswith(b"+OK")
    assert second.ask(b"STAT").startswith(b"+OK 3 ")
    second.close()


def test_uidl_is_stable_across_sessions_flag_changes_and_renames(mailbox):
    """
    UIDLs stay the same across sessions, after IMAP changes flags (the file is renamed), after
    another tool renames a file, and when new mail arrives; a new message gets a new one.
    """
    p = pop(mailbox)
    before = p.uidl()[1]
    p.quit()
    i = imap(mailbox)
    try:
        i.select("INBOX")
        i.store("1:3", "+FLAGS", "(\\Flagged \\Answered)")
    finally:
        i.logout()
    cur = inbox(mailbox) / "cur"
    name = sorted(os.listdir(cur))[0]
    base = name.partition(":")[0]
    os.rename(cur / name, cur / (base + ":2,FRS"))  # another Maildir tool
    deliver(inbox(mailbox), b"Subject: new\r\n\r\nnew\r\n")
    p = pop(mailbox)
    after = p.uidl()[1]
    p.quit()
    assert after[:3] == before
    assert after[3].split()[1] not in [line.split()[1] for line in before]


def test_uidl_format_uid_and_validity(make_server):
    """[pop3] uidl_format = "%08Xu%08Xv" gives Dovecot's default UIDLs (the IMAP UID and UIDVALIDITY)."""
    server = make_server('[pop3]\nuidl_format = "%08Xu%08Xv"\n').start()
    deliver(inbox(server), PLAIN)
    i = imap(server)
    try:
        i.select("INBOX")
        validity = int(i.untagged_responses["UIDVALIDITY"][0])
    finally:
        i.logout()
    p = pop(server)
    try:
        assert p.uidl(1).split()[-1] == b"%08X%08X" % (1, validity)
    finally:
        p.quit()


def test_new_mail_shows_in_the_next_session(mailbox):
    s = logged_in(mailbox)
    assert s.ask(b"STAT").startswith(b"+OK 3 ")
    deliver(inbox(mailbox), b"Subject: during\r\n\r\nduring\r\n")
    assert s.ask(b"STAT").startswith(b"+OK 3 ")
    assert s.ask(b"QUIT").startswith(b"+OK")
    s = logged_in(mailbox)
    assert s.ask(b"STAT").startswith(b"+OK 4 ")
    s.close()


def test_retr_while_imap_changes_flags_and_expunges(mailbox):
    """
    A message whose file IMAP renamed (a flag change) after the POP3 snapshot is still
    retrieved whole; one IMAP expunged gets -ERR and the session goes on.
    """
    s = logged_in(mailbox)
    i = imap(mailbox)
    try:
        i.select("INBOX")
        i.store("1", "+FLAGS", "(\\Flagged)")
        i.store("2", "+FLAGS", "(\\Deleted)")
        i.expunge()
    finally:
        i.logout()
    first, body = s.ask_multi(b"RETR 1")
    assert body == stuffed(PLAIN)
    answer = s.ask(b"RETR 2")
    assert answer.startswith(b"-ERR")
    first, body = s.ask_multi(b"RETR 3")
    assert body == stuffed(BIG)
    assert s.ask(b"DELE 2").startswith(b"+OK")  # gone already: deleting it again is harmless
    assert s.ask(b"QUIT").startswith(b"+OK")


def test_retrieved_messages_are_seen_after_quit(mailbox):
    """
    RETR'd messages get \\Seen at QUIT (TOP does not count); a dropped session marks nothing.
    """
    s = logged_in(mailbox)
    s.ask_multi(b"RETR 1")
    s.close()
    s = logged_in_eventually(mailbox)
    s.ask_multi(b"RETR 2")
    s.ask_multi(b"TOP 3 1")
    assert s.ask(b"QUIT").startswith(b"+OK")
    i = imap(mailbox)
    try:
        i.select("INBOX")
        _, data = i.fetch("1:3", "(FLAGS)")
        flags = [d.decode() for d in data]
        assert "\\Seen" not in flags[0] and "\\Seen" in flags[1] and "\\Seen" not in flags[2]
    finally:
        i.logout()


def logged_in_eventually(server):
    def attempt():
        try:
            return logged_in(server)
        except AssertionError:
            return None

    return wait_for(attempt, timeout=10, what="a POP3 login")


# --- TLS and logins --------------------------------------------------------------------------


def test_capa_lists_exactly_what_works(server):
    """
    Before TLS on 110: no USER and no SASL (they are refused), STLS offered; after STLS: USER
    and SASL PLAIN LOGIN, no STLS; after login: no login capabilities.  No joke tokens.
    """
    s = plain_session(server)
    assert s.greeting.startswith(b"+OK")
    first, body = s.ask_multi(b"CAPA")
    caps = body.split(b"\r\n")[:-1]
    assert caps == [b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", b"STLS",
                    b"IMPLEMENTATION pymaild"]
    assert s.ask(b"USER postmaster@localhost").startswith(b"-ERR [AUTH]")
    assert s.ask(b"AUTH PLAIN AHBvc3RtYXN0ZXIAeA==").startswith(b"-ERR [AUTH]")
    assert s.ask(b"STLS").startswith(b"+OK")
    s.sock = server.tls().wrap_socket(s.sock, server_hostname="localhost")
    first, body = s.ask_multi(b"CAPA")
    caps = body.split(b"\r\n")[:-1]
    assert b"USER" in caps and b"SASL PLAIN LOGIN" in caps and b"STLS" not in caps
    assert s.ask(b"STLS").startswith(b"-ERR")
    assert s.login(b"postmaster@localhost", server.postmaster_password().encode()).startswith(b"+OK")
    first, body = s.ask_multi(b"CAPA")
    caps = body.split(b"\r\n")[:-1]
    assert b"USER" not in caps and not any(c.startswith(b"SASL") for c in caps) and b"TOP" in caps
    for joke in (b"PIPELINE", b"CELERITY", b"AUSPEX", b"POTENCE"):
        assert joke not in caps
    s.close()


def test_stls_discards_pipelined_plaintext(server):
    """
    A USER pipelined in plaintext after STLS (a man in the middle's injection) is not
    carried into the TLS session: PASS then finds no USER.
    """
    s = plain_session(server)
    s.sock.sendall(b"STLS\r\nUSER postmaster@localhost\r\n")
    assert s.line().startswith(b"+OK")
    assert not s.data  # nothing answered in plaintext after the +OK
    s.sock = server.tls().wrap_socket(s.sock, server_hostname="localhost")
    answer = s.ask(b"PASS " + server.postmaster_password().encode())
    assert answer.startswith(b"-ERR") and b"USER" in answer
    assert s.login(b"postmaster@localhost", server.postmaster_password().encode()).startswith(b"+OK")
    s.close()


def test_plaintext_login_from_a_configured_network(make_server):
    server = make_server('[auth]\nplaintext_networks = ["127.0.0.0/8"]\n').start()
    s = plain_session(server)
    assert s.login(b"postmaster@localhost", server.postmaster_password().encode()).startswith(b"+OK")
    s.close()


def test_auth_plain_and_login(server):
    """
    AUTH PLAIN with an initial response and with a continuation, AUTH LOGIN step by step and
    with the user name on the command line; "*" cancels; a wrong password gets -ERR [AUTH].
    """
    user, password = b"postmaster@localhost", server.postmaster_password().encode()
    b64 = base64.b64encode

    s = tls_session(server)
    first, body = s.ask_multi(b"AUTH")
    assert body == b"PLAIN\r\nLOGIN\r\n"
    assert s.ask(b"AUTH PLAIN " + b64(b"\0" + user + b"\0wrong")).startswith(b"-ERR [AUTH]")
    assert s.ask(b"AUTH PLAIN").startswith(b"+ ")
    assert s.ask(b"*").startswith(b"-ERR")
    assert s.ask(b"AUTH CRAM-MD5").startswith(b"-ERR")
    assert s.ask(b"AUTH PLAIN").startswith(b"+ ")
    assert s.ask(b"not base64!").startswith(b"-ERR")
    assert s.ask(b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)).startswith(b"+OK")
    assert s.ask(b"QUIT").startswith(b"+OK")

    s = tls_session(server)
    assert base64.b64decode(s.ask(b"AUTH LOGIN")[2:]).lower().startswith(b"user")
    assert base64.b64decode(s.ask(b64(user))[2:]).lower().startswith(b"password")
    assert s.ask(b64(password)).startswith(b"+OK")
    assert s.ask(b"QUIT").startswith(b"+OK")

    s = tls_session(server)
    assert base64.b64decode(s.ask(b"AUTH LOGIN " + b64(user))[2:]).lower().startswith(b"password")
    assert s.ask(b64(password)).startswith(b"+OK")
    assert s.ask(b"QUIT").startswith(b"+OK")


def test_failed_logins_slow_down_then_are_limited(make_server):
    """
    Each failed PASS is answered later than the one before; after [limits] max_login_failures
    even the right password is refused with [SYS/TEMP] (AUTH counts the same).
    """
    import time

    server = make_server("[limits]\nmax_login_failures = 3\n").start()
    s = tls_session(server)
    delays = []
    for _ in range(2):
        start = time.monotonic()
        assert s.login(b"postmaster@localhost", b"wrong").startswith(b"-ERR [AUTH]")
        delays.append(time.monotonic() - start)
    start = time.monotonic()
    wrong = base64.b64encode(b"\0postmaster@localhost\0wrong")
    assert s.ask(b"AUTH PLAIN " + wrong).startswith(b"-ERR [AUTH]")
    delays.append(time.monotonic() - start)
    assert delays[0] < delays[1] < delays[2] and delays[2] >= 1.5, delays
    answer = s.login(b"postmaster@localhost", server.postmaster_password().encode())
    assert answer.startswith(b"-ERR [SYS/TEMP]")
    s.close()


def test_overlong_line_and_the_server_keeps_serving(mailbox):
    s = tls_session(mailbox)
    s.sock.sendall(b"USER " + b"a" * 20000 + b"\r\n")
    assert s.line() == b"-ERR Line too long"
    assert s.sock.recv(100) == b""
    s = logged_in(mailbox)
    assert s.ask(b"STAT").startswith(b"+OK 3")
    s.close()


def test_a_50_mb_message_is_streamed(server):
    """
    A 50 MB message is sent whole and exactly, and the server's memory does not grow by
    anything near its size.
    """
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (50_000_000 // len(line))
    message = b"Subject: huge\r\n\r\n" + body
    deliver(inbox(server), message)
    expected = hashlib.sha256(stuffed(message)).hexdigest()

    def hwm() -> int:
        status = open(f"/proc/{server.proc.pid}/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024

    s = logged_in(server)
    before = hwm()
    s.sock.sendall(b"RETR 1\r\n")
    assert s.line() == b"+OK %d octets" % len(message)
    digest, tail, got = hashlib.sha256(), b"", 0
    data = bytes(s.data)
    while True:
        if data:
            digest.update(data)
            got += len(data)
            tail = (tail + data)[-5:]
            if tail == b"\r\n.\r\n":
                break
        data = s.sock.recv(1 << 20)
        assert data, "closed during RETR"
    # the digest covered the terminating ".\r\n"; compare without it
    assert got - 3 == len(stuffed(message))
    assert hashlib.sha256(stuffed(message) + b".\r\n").hexdigest() == digest.hexdigest()
    assert expected  # (kept for the message in a failure)
    assert hwm() - before < 20_000_000
    s.data.clear()
    assert s.ask(b"NOOP") == b"+OK"
    s.close()


# --- found in review: closing over TLS, floods, parallel guessing, proxy logins -------------


def test_quit_closes_the_tls_connection(mailbox):
    """After QUIT (logged in or not) the server closes the TLS connection itself."""
    from imapwire import read_to_close

    s = logged_in(mailbox)
    assert s.ask(b"QUIT").startswith(b"+OK")
    assert read_to_close(s.sock) == b""
    s = tls_session(mailbox)
    assert s.ask(b"QUIT").startswith(b"+OK")
    assert read_to_close(s.sock) == b""
    s = logged_in(mailbox)  # the lock went with the session
    s.sock.sendall(b"NOOP " + b"x" * 10000 + b"\r\n")
    assert s.line() == b"-ERR Line too long"
    assert read_to_close(s.sock) == b""


def test_a_client_that_does_not_read_is_not_read_either(server):
    """
    Commands pipelined by a client that never reads the answers stop being read once the
    answers back up: the server does not buffer without bound (CAPA is 17 times its command).
    """
    def rss() -> int:
        status = open(f"/proc/{server.proc.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    before = rss()
    s = plain_session(server)
    s.sock.settimeout(3)
    chunk = b"CAPA\r\n" * 10000
    sent = 0
    try:
        while sent < 40_000_000:
            s.sock.sendall(chunk)
            sent += len(chunk)
    except socket.timeout:
        pass
    assert sent < 20_000_000, sent  # the server stopped reading (kernel buffers hold the rest)
    assert rss() - before < 100_000_000
    s.close()
    t = logged_in(server)  # and it serves others meanwhile
    assert t.ask(b"NOOP") == b"+OK"
    t.close()


def test_parallel_password_guesses_are_limited_too(make_server):
    """
    Wrong passwords sent at once on many connections: no more of them are checked than
    [limits] max_login_failures; the others get [SYS/TEMP] without a check.
    """
    server = make_server("[limits]\nmax_login_failures = 3\nmax_connections_per_ip = 50\n").start()
    sessions = [tls_session(server) for _ in range(12)]
    for s in sessions:
        assert s.ask(b"USER postmaster@localhost").startswith(b"+OK")
    for s in sessions:
        s.sock.sendall(b"PASS wrong\r\n")
    answers = [s.line() for s in sessions]
    checked = [a for a in answers if a.startswith(b"-ERR [AUTH]")]
    assert len(checked) <= 3, answers
    assert all(a.startswith((b"-ERR [AUTH]", b"-ERR [SYS/TEMP]")) for a in answers), answers
    for s in sessions:
        s.close()


def test_plain_refuses_acting_as_another_user(server):
    """AUTH PLAIN with an authorization identity other than the login is refused (RFC 4616)."""
    password = server.postmaster_password().encode()
    s = tls_session(server)
    response = base64.b64encode(b"someone@localhost\0postmaster@localhost\0" + password)
    answer = s.ask(b"AUTH PLAIN " + response)
    assert answer.startswith(b"-ERR [AUTH]") and b"another user" in answer
    same = base64.b64encode(b"postmaster@localhost\0postmaster@localhost\0" + password)
    assert s.ask(b"AUTH PLAIN " + same).startswith(b"+OK")
    s.close()


def test_closed_tls_sessions_free_their_descriptors(mailbox):
    """
    After QUIT over TLS (995, and 110 after STLS) the server's side of the connection really
    goes, in whichever process served it: its descriptors are back to where they were (a session that stopped reading after
    QUIT never saw the client's TLS close and stayed open for ever).
    """
    def fds() -> int:  # (of the main process and of the worker processes serving POP3)
        pids = [mailbox.proc.pid]
        for task in os.listdir(f"/proc/{mailbox.proc.pid}/task"):
            with open(f"/proc/{mailbox.proc.pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)

    s = logged_in(mailbox)  # warm up (the store's files are open from here on)
    s.ask(b"QUIT")
    s.close()
    if len(os.sched_getaffinity(0)) > 1:  # ([pop3] processes: one per core by default)
        wait_for(lambda: "pop3-worker-1 (pid" in mailbox.log() and ") ready" in mailbox.log(), what="the worker")
        s = logged_in(mailbox)  # (and in the worker process: it serves the next session)
        s.ask(b"QUIT")
        s.close()
    wait_for(lambda: fds() == fds(), timeout=5)
    before = fds()
    for _ in range(4):
        s = logged_in(mailbox)
        assert s.ask(b"QUIT").startswith(b"+OK")
        s.close()
        s = plain_session(mailbox)
        assert s.ask(b"STLS").startswith(b"+OK")
        s.sock = mailbox.tls().wrap_socket(s.sock, server_hostname="localhost")
        assert s.ask(b"QUIT").startswith(b"+OK")
        s.close()
    wait_for(lambda: fds() <= before, timeout=15, what=f"descriptors back to {before} (now {fds()})")
