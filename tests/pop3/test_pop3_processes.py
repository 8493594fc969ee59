"""
POP3 sessions served by several processes ([pop3] processes, pymaild.handoff): real servers,
real TLS, sessions landing in the main process and in worker processes, and what must hold
across them: one session per mailbox, the failed-login limit, the connection limits, a worker
killed in the middle of a session, SIGHUP and shutdown.  Which process served a connection is
read from the server's log (a worker's events carry its name, with the client's port).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl

import pytest

from conftest import postmaster_inbox, wait_for
from popwire import Session, plain_session, stuffed, tls_session
from pymaild.store.delivery import deliver

PASSWORD = "Worker-pass-2026"
MESSAGES = [b"From: a@example.com\r\nSubject: m%d\r\n\r\n.line %d\r\nbody\r\n" % (i, i) for i in range(3)]


def start(make_server, processes: int, extra: str = ""):
    server = make_server(f"[pop3]\nprocesses = {processes}\n" + extra).start()
    # the workers start with the first POP3 connection
    s = session(server, tls=False)
    s.ask(b"QUIT")
    s.close()
    wait_for(lambda: len(worker_pids(server)) == processes - 1, timeout=30, what="the workers to be ready")
    return server


def session(server, tls: bool = True) -> Session:
    """A new session, once the connection limits leave room for it (the start-up check's
    connections, or a session just closed, may still count for a moment)."""
    made = []

    def attempt() -> bool:
        try:
            s = tls_session(server) if tls else plain_session(server)
        except OSError:
            return False
        if not s.greeting.startswith(b"+OK"):
            s.close()
            return False
        made.append(s)
        return True

    wait_for(attempt, timeout=10, what="room for a connection")
    return made[0]


def worker_pids(server) -> dict[str, int]:
    """The workers ready now: name -> pid (the latest start of each)."""
    ready = dict(re.findall(r"(pop3-worker-\d+) \(pid (\d+)\) ready", server.log()))
    ended = set(re.findall(r"pop3-worker-\d+ \(pid (\d+)\) ended", server.log()))
    return {name: int(pid) for name, pid in ready.items() if pid not in ended}


def served_by(server, s: Session) -> str:
    """The process that serves session C{s}: "main" or "pop3-worker-N"."""
    port = s.sock.getsockname()[1]
    pattern = re.compile(r"\[([^\]]+)\] pop3s? connect from 127\.0\.0\.1:%d " % port)
    found = []
    wait_for(lambda: found.extend(pattern.findall(server.log())) or found, timeout=10,
             what=f"the connect from port {port} in the log")
    return found[-1] if found[-1].startswith("pop3-worker-") else "main"


def add_user(server, name: str) -> None:
    r = server.ctl("user", "add", name, "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 0, r.stdout + r.stderr


def login(server, user: bytes, password: bytes, tls: bool = True) -> tuple[Session, bytes]:
    s = session(server, tls)
    return s, s.login(user, password)


def test_sessions_in_every_process_read_and_delete(make_server):
    """
    Six sessions at once (six users) are spread over the main process and both workers; each
    reads its mailbox exactly (dot-stuffed), and a DELE'd message is gone from the maildir
    after QUIT, as it would be with one process.
    """
    server = start(make_server, 3)
    users = [f"u{i}@localhost" for i in range(6)]
    homes = []
    for user in users:
        add_user(server, user)
        home = server.data_dir / "mail" / "localhost" / user.split("@")[0]
        for sub in ("cur", "new", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        for message in MESSAGES:
            deliver(home, message)
        homes.append(home)
    sessions = []
    for user in users:
        s, answer = login(server, user.encode(), PASSWORD.encode())
        assert answer.startswith(b"+OK"), answer
        sessions.append(s)
    where = {served_by(server, s) for s in sessions}
    assert where == {"main", "pop3-worker-1", "pop3-worker-2"}, where
    for s in sessions:
        for n, message in enumerate(MESSAGES, 1):
            first, body = s.ask_multi(b"RETR %d" % n)
            assert first.startswith(b"+OK") and body == stuffed(message)
        assert s.ask(b"DELE 2").startswith(b"+OK")
    for s in sessions:
        assert s.ask(b"QUIT") == b"+OK Logging out, 1 messages deleted"
        s.close()
    for home in homes:
        names = os.listdir(home / "cur") + os.listdir(home / "new")
        assert len(names) == 2, names


def test_a_mailbox_is_in_use_across_processes(make_server):
    """
    While one session holds a mailbox, a login to it from any process gets [IN-USE]; after
    its QUIT, a session in another process gets it.
    """
    server = start(make_server, 3)
    password = server.postmaster_password().encode()
    holder, answer = login(server, b"postmaster@localhost", password)
    assert answer.startswith(b"+OK")
    tries = [tls_session(server) for _ in range(4)]
    places = {served_by(server, s) for s in tries}
    assert len(places - {served_by(server, holder)}) >= 1, places  # (another process than the holder's)
    for s in tries:
        assert s.login(b"postmaster@localhost", password).startswith(b"-ERR [IN-USE]")
    assert holder.ask(b"QUIT").startswith(b"+OK")
    holder.close()
    for s in tries:
        s.close()
    wait_for(lambda: login(server, b"postmaster@localhost", password)[1].startswith(b"+OK"), timeout=10,
             what="the mailbox to be free")


def test_failed_logins_count_in_every_process(make_server):
    """
    [limits] max_login_failures wrong passwords on connections served by different processes
    block the next login, with the right password, wherever it lands.
    """
    server = start(make_server, 3, "[limits]\nmax_login_failures = 3\n")
    sessions = [tls_session(server) for _ in range(3)]
    assert len({served_by(server, s) for s in sessions}) == 3
    for s in sessions:
        assert s.login(b"postmaster@localhost", b"wrong").startswith(b"-ERR [AUTH]")
    for _ in range(3):
        s, answer = login(server, b"postmaster@localhost", server.postmaster_password().encode())
        assert answer.startswith(b"-ERR [SYS/TEMP] Too many failed logins"), answer
        s.close()
    for s in sessions:
        s.close()


def test_connection_limits_count_every_process(make_server):
    """
    [limits] max_connections_per_ip counts the connections the workers serve: one more is
    refused with -ERR [SYS/TEMP]; when a worker's session ends, there is room again.
    """
    server = start(make_server, 3, "[limits]\nmax_connections_per_ip = 3\n")
    sessions = [session(server, tls=False) for _ in range(3)]
    assert len({served_by(server, s) for s in sessions}) == 3
    with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10) as extra:
        assert extra.recv(4096).startswith(b"-ERR [SYS/TEMP] Too many connections")
    on_worker = next(s for s in sessions if served_by(server, s) != "main")
    assert on_worker.ask(b"QUIT").startswith(b"+OK")
    on_worker.close()

    def accepted() -> bool:
        s = plain_session(server)
        ok = s.greeting.startswith(b"+OK")
        s.close()
        return ok

    wait_for(accepted, timeout=10, what="room for a new connection")
    assert "pop3 refused connection from 127.0.0.1: max_connections_per_ip reached" in server.log()
    for s in sessions:
        s.close()


def test_a_killed_worker_deletes_nothing_and_is_replaced(make_server):
    """
    kill -9 of the worker serving a session that DELE'd: the client's connection ends,
    nothing is deleted, the mailbox and the connection count are free again, and a new worker
    serves the next sessions.
    """
    server = start(make_server, 2, "[limits]\nmax_connections_per_ip = 2\n")
    home = postmaster_inbox(server)
    for message in MESSAGES:
        deliver(home, message)
    password = server.postmaster_password().encode()
    s, answer = login(server, b"postmaster@localhost", password)  # (a tie: the worker gets it)
    assert answer.startswith(b"+OK") and served_by(server, s) == "pop3-worker-1"
    assert s.ask(b"DELE 1").startswith(b"+OK") and s.ask(b"DELE 2").startswith(b"+OK")
    old = worker_pids(server)["pop3-worker-1"]
    os.kill(old, signal.SIGKILL)
    with pytest.raises((ConnectionError, OSError)):
        s.ask(b"NOOP")
        s.ask(b"NOOP")
    s.close()
    wait_for(lambda: worker_pids(server).get("pop3-worker-1") not in (None, old), timeout=30,
             what="a new worker")
    assert len(os.listdir(home / "cur") + os.listdir(home / "new")) == 3
    two = []
    for _ in range(2):  # both fit: the killed worker's connection no longer counts
        t = session(server)
        assert t.greeting.startswith(b"+OK"), t.greeting
        two.append(t)
    assert two[0].login(b"postmaster@localhost", password).startswith(b"+OK Logged in, 3 messages")
    assert {served_by(server, t) for t in two} == {"main", "pop3-worker-1"}
    for t in two:
        t.close()


def _leaf(port: int) -> tuple[bytes, int]:
    """The certificate a pop3s session gets, and the session's local port."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            Session(tls)  # (the greeting: the session was served)
            return tls.getpeercert(binary_form=True), tls.getsockname()[1]


def test_stls_and_sighup_in_a_worker(make_server, tmp_path):
    """
    A worker does STLS (plaintext pipelined after it discarded) and implicit TLS with the
    certificate the main process read, and takes the new one on SIGHUP.
    """
    from pymaild.tls import generateSelfSigned

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    generateSelfSigned(cert, key, "localhost")
    server = start(make_server, 2, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
                   '[auth]\nplaintext_networks = []\n')
    s = plain_session(server)
    assert served_by(server, s) == "pop3-worker-1"
    s.sock.sendall(b"STLS\r\nCAPA\r\n")  # the CAPA is injected plaintext: never answered
    assert s.line().startswith(b"+OK")
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    s.sock = ctx.wrap_socket(s.sock, server_hostname="localhost")
    s.data.clear()
    answer = s.login(b"postmaster@localhost", server.postmaster_password().encode())
    assert answer.startswith(b"+OK Logged in"), answer
    s.close()

    generateSelfSigned(cert, key, "localhost")
    new = ssl.PEM_cert_to_DER_cert(cert.read_text())
    server.signal(signal.SIGHUP)

    def renewed() -> bool:
        der, port = _leaf(server.ports["pop3s"])
        return der == new and re.search(r"\[pop3-worker-1\] pop3s connect from 127\.0\.0\.1:%d " % port,
                                        server.log()) is not None

    wait_for(renewed, timeout=15, what="the worker to serve the new certificate")


def test_shutdown_closes_the_workers_sessions_and_stops_them(make_server):
    """
    SIGTERM: an idle session in a worker is told the server is shutting down, and every
    worker process exits with the main one.
    """
    server = start(make_server, 3)
    pids = list(worker_pids(server).values())
    s, answer = login(server, b"postmaster@localhost", server.postmaster_password().encode())
    assert answer.startswith(b"+OK") and served_by(server, s) != "main"
    assert server.stop() == -signal.SIGTERM
    assert s.line() == b"-ERR [SYS/TEMP] Server shutting down"
    s.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_connection_reset_before_it_is_accepted_does_not_stop_the_listener(make_server):
    """
    A client that connects and resets before the server accepts (the server stopped meanwhile):
    the accepted socket has no peer any more; the listener goes on serving the next clients.
    """
    import struct

    server = make_server("[pop3]\nprocesses = 2\n").start()
    server.signal(signal.SIGSTOP)
    try:
        rst = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10)
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rst.close()
    finally:
        server.signal(signal.SIGCONT)
    for _ in range(3):
        s = session(server, tls=False)
        assert s.ask(b"QUIT").startswith(b"+OK")
        s.close()


def test_a_sighup_before_the_workers_start_reaches_them(make_server, tmp_path):
    """
    The certificate a worker serves is the one the main process holds when the worker starts,
    not the one it had at start-up: SIGHUP before the first POP3 connection, then a worker's
    pop3s session gets the new certificate.
    """
    from pymaild.tls import generateSelfSigned

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    generateSelfSigned(cert, key, "localhost")
    server = make_server(f'[pop3]\nprocesses = 2\n[tls]\ncert = "{cert}"\nkey = "{key}"\n').start()
    generateSelfSigned(cert, key, "localhost")
    new = ssl.PEM_cert_to_DER_cert(cert.read_text())
    server.signal(signal.SIGHUP)
    wait_for(lambda: "TLS certificate reloaded" in server.log(), what="the reload")
    s = session(server, tls=False)  # (starts the worker)
    s.ask(b"QUIT")
    s.close()
    wait_for(lambda: len(worker_pids(server)) == 1, timeout=30, what="the worker")
    der, port = _leaf(server.ports["pop3s"])
    assert der == new
    assert re.search(r"\[pop3-worker-1\] pop3s connect from 127\.0\.0\.1:%d " % port, server.log())


def test_a_hung_worker_is_replaced_and_its_connection_served(make_server):
    """
    A worker that stops answering (SIGSTOP) is killed after handoff.ADOPT_TIMEOUT seconds; the
    connection it was given is served by the main process, and a new worker starts.
    """
    from pymaild.handoff import ADOPT_TIMEOUT

    server = start(make_server, 2)
    old = worker_pids(server)["pop3-worker-1"]
    os.kill(old, signal.SIGSTOP)
    s = Session(socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=ADOPT_TIMEOUT + 20))
    assert s.greeting.startswith(b"+OK")
    assert "pop3-worker-1 (pid %d) did not take a connection" % old in server.log()
    assert served_by(server, s) == "main"
    assert s.ask(b"QUIT").startswith(b"+OK")
    s.close()
    wait_for(lambda: worker_pids(server).get("pop3-worker-1") not in (None, old), timeout=30, what="a new worker")
