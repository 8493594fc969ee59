"""
IMAP abuse: huge literals, overlong lines, malformed sequence sets, commands in the wrong
state, password guessing.  Each gets a clear answer and the server keeps serving.
"""

from __future__ import annotations

import re
import time

from conftest import wait_for
from imapwire import ask, logged_in, read_tagged, read_to_close, tls_session
from pymaild.store.delivery import deliver


def test_huge_literal_is_refused_before_any_byte(make_server):
    """
    APPEND with a literal over [imap] append_limit is refused at once (no "+" continuation), the
    limit is advertised as APPENDLIMIT, and the session goes on.
    """
    server = make_server('[imap]\nappend_limit = "1M"\n').start()
    sock = logged_in(server)
    caps = ask(sock, b"c CAPABILITY", b"c")
    assert b"APPENDLIMIT=1048576" in caps
    answer = ask(sock, b"a APPEND INBOX {999999999999}", b"a")
    assert b"+ " not in answer and b"a BAD" in answer and b"TOOBIG" in answer
    answer = ask(sock, b"b APPEND INBOX {1048577}", b"b")
    assert b"b BAD" in answer and b"TOOBIG" in answer
    assert b"n OK" in ask(sock, b"n NOOP", b"n")
    sock.close()


def test_overlong_line_gets_bye_and_others_keep_working(make_server):
    """
    A command line over [imap] max_line: "* BYE Line too long", the connection closes, and a new
    session works.
    """
    server = make_server("[imap]\nmax_line = 2048\n").start()
    sock = tls_session(server)
    sock.sendall(b"x NOOP " + b"A" * 5000 + b"\r\n")
    data = read_to_close(sock)
    assert b"* BYE Line too long" in data
    again = logged_in(server)
    assert b"n OK" in ask(again, b"n NOOP", b"n")


def test_malformed_sequence_sets_and_wrong_state(server):
    """
    Sequence sets 0, 4294967296 and 1:*:* get BAD; FETCH before SELECT and SELECT before LOGIN
    are refused; the session goes on.
    """
    sock = tls_session(server)
    assert b"s BAD" in ask(sock, b"s SELECT INBOX", b"s") or b"s NO" in ask(sock, b"s2 SELECT INBOX", b"s2")
    sock.close()
    sock = logged_in(server)
    assert re.search(rb"f (BAD|NO)", ask(sock, b"f FETCH 1 FLAGS", b"f"))
    ask(sock, b"s SELECT INBOX", b"s")
    for i, bad in enumerate((b"0", b"4294967296", b"1:*:*", b"a:b")):
        tag = b"q%d" % i
        assert re.search(tag + rb" BAD", ask(sock, tag + b" FETCH " + bad + b" FLAGS", tag)), bad
    assert b"n OK" in ask(sock, b"n NOOP", b"n")


def test_a_sequence_set_of_11000_numbers_is_answered(server):
    """
    UID FETCH and UID STORE with 11,000 numbers in one 60 KB line (under [imap] max_line) name
    the right messages, and another session is answered meanwhile.  Twisted's parser took 20 s
    of reactor for 10,000 numbers (one sort per number); ask's 15 s socket timeout would end
    this test long before Twisted's parser did.
    """
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for n in range(4):
        deliver(home, b"Subject: m%d\r\n\r\nbody\r\n" % n)
    sock = logged_in(server, select=b"INBOX")
    other = logged_in(server)
    odd = b",".join(b"%d" % n for n in range(1, 22000, 2))
    answer = ask(sock, b"f UID FETCH " + odd + b" (FLAGS)", b"f")
    assert b"f OK" in answer
    assert sorted(re.findall(rb"UID (\d+)", answer)) == [b"1", b"3"]
    sock.sendall(b"s UID STORE " + odd + b",4 +FLAGS (\\Flagged)\r\n")
    assert b"n OK" in ask(other, b"n NOOP", b"n")
    answer = read_tagged(sock, b"s")
    assert b"s OK" in answer and len(re.findall(rb"\\Flagged", answer)) == 3
    assert b"* SEARCH 1 3 4" in ask(sock, b"q SEARCH FLAGGED", b"q")


def test_thousands_of_keywords_and_a_long_id(server):
    """
    STORE of 3,000 keywords is done (it was an internal error: one SQL term a keyword); ID
    before login with 50 KB of parameters is answered and logged in at most ~1 KB.
    """
    sock = tls_session(server)
    many = b" ".join(b'"k%d" "v"' % i for i in range(4000))
    assert b"i OK" in ask(sock, b"i ID (" + many + b")", b"i")
    line = next(line for line in server.log().splitlines() if "imap client id" in line)
    assert 'k0' in line and len(line) < 1300 and "bytes)" in line
    sock.close()
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    deliver(home, b"Subject: one\r\n\r\nbody\r\n")
    sock = logged_in(server, select=b"INBOX")
    words = b" ".join(b"k%d" % i for i in range(3000))
    assert b"s OK" in ask(sock, b"s STORE 1 +FLAGS.SILENT (" + words + b")", b"s")
    answer = ask(sock, b"f FETCH 1 (FLAGS)", b"f")
    assert b"k2999" in answer and b"f OK" in answer
    assert b"r OK" in ask(sock, b"r STORE 1 -FLAGS.SILENT (" + words + b")", b"r")
    assert b"k0" not in ask(sock, b"g FETCH 1 (FLAGS)", b"g")


def test_failed_logins_slow_down_then_block(make_server):
    """
    Each failed LOGIN is answered later than the one before; after [limits] max_login_failures
    the address is refused without a password check, even with the right password.
    """
    server = make_server("[limits]\nmax_login_failures = 3\n").start()
    sock = tls_session(server)
    delays = []
    for i in range(3):
        start = time.monotonic()
        answer = ask(sock, b'x%d LOGIN postmaster@localhost "wrong"' % i, b"x%d" % i)
        delays.append(time.monotonic() - start)
        assert b"AUTHENTICATIONFAILED" in answer
    assert delays[2] > delays[0] and delays[2] >= 1.5
    answer = ask(sock, b'y LOGIN postmaster@localhost "%s"' % server.postmaster_password().encode(), b"y")
    assert b"y NO [UNAVAILABLE]" in answer
    assert "result=blocked" in server.log() or "blocked" in server.log()


def test_many_right_passwords_at_once_all_get_in(make_server):
    """
    More correct logins at once from one address than [limits] max_login_failures (a mail
    client's parallel connections, an office behind one NAT address): each waits its turn for a
    password-check slot and none is refused; then wrong passwords sent at once are still
    checked no more than the limit allows.
    """
    server = make_server("[limits]\nmax_login_failures = 3\nmax_connections_per_user = 50\n").start()
    password = server.postmaster_password().encode()
    sessions = [tls_session(server) for _ in range(12)]
    for i, sock in enumerate(sessions):
        sock.sendall(b'p%d LOGIN postmaster@localhost "%s"\r\n' % (i, password))
    answers = [read_tagged(sock, b"p%d" % i) for i, sock in enumerate(sessions)]
    assert all(b"p%d OK" % i in a for i, a in enumerate(answers)), answers
    for sock in sessions:
        sock.close()
    guesses = [tls_session(server) for _ in range(8)]
    for i, sock in enumerate(guesses):
        sock.sendall(b'g%d LOGIN postmaster@localhost "wrong"\r\n' % i)
    answers = [read_tagged(sock, b"g%d" % i) for i, sock in enumerate(guesses)]
    assert sum(b"AUTHENTICATIONFAILED" in a for a in answers) <= 3, answers
    assert all(b"AUTHENTICATIONFAILED" in a or b"[UNAVAILABLE]" in a for a in answers), answers


def test_sessions_per_user_are_limited(make_server):
    """
    Over [limits] max_connections_per_user logged-in sessions, one more login gets NO [LIMIT];
    when a session ends, a new login works again.
    """
    server = make_server("[limits]\nmax_connections_per_user = 2\n").start()
    first, second = logged_in(server), logged_in(server)
    third = tls_session(server)
    answer = ask(third, b'l LOGIN postmaster@localhost "%s"' % server.postmaster_password().encode(), b"l")
    assert b"l NO [LIMIT]" in answer
    first.sendall(b"o LOGOUT\r\n")
    first.close()

    def can_login():
        sock = tls_session(server)
        reply = ask(sock, b'm LOGIN postmaster@localhost "%s"' % server.postmaster_password().encode(), b"m")
        sock.close()
        return b"m OK" in reply

    wait_for(can_login, timeout=10, what="a login after a session ended")
    second.close()


def test_authenticate_is_throttled_too(make_server):
    """
    AUTHENTICATE PLAIN failures count like LOGIN failures: after the limit even the right
    password is refused.
    """
    import base64

    server = make_server("[limits]\nmax_login_failures = 2\n").start()
    sock = tls_session(server)

    def authenticate(tag: bytes, password: bytes) -> bytes:
        sock.sendall(tag + b" AUTHENTICATE PLAIN\r\n")
        data = b""
        while b"+" not in data:
            data += sock.recv(4096)
        sock.sendall(base64.b64encode(b"\0postmaster@localhost\0" + password) + b"\r\n")
        answer = b""
        while not re.search(re.escape(tag) + rb" (OK|NO|BAD)", answer):
            answer += sock.recv(4096)
        return answer

    assert b"a1 NO" in authenticate(b"a1", b"wrong")
    assert b"a2 NO" in authenticate(b"a2", b"wrong")
    assert b"a3 NO" in authenticate(b"a3", server.postmaster_password().encode())


def test_authenticate_counts_as_a_login(make_server):
    """
    A login by AUTHENTICATE counts towards the per-user session limit like LOGIN; "*" cancels
    (BAD); a response that is not base64 is BAD; before TLS it is PRIVACYREQUIRED.
    """
    import base64

    server = make_server("[limits]\nmax_connections_per_user = 1\n").start()
    plain = base64.b64encode(b"\0postmaster@localhost\0" + server.postmaster_password().encode())
    first = tls_session(server)
    assert b"a OK" in ask(first, b"a AUTHENTICATE PLAIN " + plain, b"a")
    second = tls_session(server)
    assert b"b NO [LIMIT]" in ask(second, b"b AUTHENTICATE PLAIN " + plain, b"b")
    second.sendall(b"c AUTHENTICATE PLAIN\r\n")
    assert second.recv(4096).startswith(b"+ ")
    assert b"c BAD" in ask(second, b"*", b"c")
    second.sendall(b"d AUTHENTICATE PLAIN\r\n")
    assert second.recv(4096).startswith(b"+ ")
    assert b"d BAD" in ask(second, b"not!base64", b"d")
    assert b"e OK" in ask(second, b"e NOOP", b"e")  # the session goes on
    first.close()
    second.close()
    import socket

    plaintext = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=15)
    plaintext.recv(4096)
    assert b"f NO [PRIVACYREQUIRED]" in ask(plaintext, b"f AUTHENTICATE PLAIN " + plain, b"f")
    plaintext.close()
