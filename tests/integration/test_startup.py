"""
End to end: twistd runs pymaild as a subprocess; real clients talk to it over real sockets and
TLS on 127.0.0.1.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys

import pytest

from conftest import LISTENER_NAMES, free_ports, run_twistd, wait_for
from imapwire import read_to_close

TLS_LISTENERS = {"smtps", "imaps", "pop3s"}
GREETINGS = {"smtp": b"220 ", "imap": b"* OK [CAPABILITY ", "pop3": b"+OK"}
PROTOCOL = {
    "smtp": "smtp", "submission": "smtp", "smtps": "smtp",
    "imap": "imap", "imaps": "imap", "pop3": "pop3", "pop3s": "pop3",
}


def greeting(port: int, tls_context: ssl.SSLContext | None) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls_context is not None:
        sock = tls_context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_every_listener_greets(server):
    """
    Each of the seven listeners answers with its protocol's greeting; the implicit-TLS ones
    over TLS with the self-signed certificate, checked against host name "localhost".
    """
    for name in LISTENER_NAMES:
        tls = server.tls() if name in TLS_LISTENERS else None
        line = greeting(server.ports[name], tls)
        assert line.startswith(GREETINGS[PROTOCOL[name]]), (name, line)


def test_first_start_creates_postmaster(server):
    """
    With no account, pymaild creates postmaster@<first local domain>, writes the password to
    a 0600 file and logs it exactly once.
    """
    password_file = server.data_dir / "postmaster.password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = server.postmaster_password()
    assert len(password) >= 16
    assert server.log().count(password) == 1
    passwd = (server.data_dir / "passwd").read_text()
    assert passwd.startswith("postmaster@localhost:{ARGON2ID}$argon2id$")
    assert stat.S_IMODE((server.data_dir / "passwd").stat().st_mode) == 0o600
    assert stat.S_IMODE((server.data_dir / "tls" / "key.pem").stat().st_mode) == 0o600


def test_postmaster_imap_login_over_implicit_tls(server):
    """
    The postmaster password logs in over IMAPS, and a wrong one is refused with
    AUTHENTICATIONFAILED.
    """
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        assert "STARTTLS" not in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login("postmaster@localhost", "wrong password")
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        typ, _ = imap.login("postmaster@localhost", server.postmaster_password())
        assert typ == "OK"
        typ, data = imap.logout()
        assert typ == "BYE"


def test_imap_login_refused_before_starttls_and_works_after(server):
    """
    On port 143 LOGIN is disabled until STARTTLS; after STARTTLS the postmaster logs in, also
    with a login name without domain (the first local domain is added).
    """
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        assert "LOGINDISABLED" in imap.capabilities and "STARTTLS" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            imap.login("postmaster@localhost", server.postmaster_password())
        imap.starttls(ssl_context=server.tls())
        typ, _ = imap.login("postmaster", server.postmaster_password())
        assert typ == "OK"
    finally:
        imap.logout()


def test_postmaster_pop3_login(server):
    """
    The postmaster password logs in over POP3S (an empty mailbox); plaintext USER on port 110
    is refused with [AUTH].
    """
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls(), timeout=30)
    try:
        pop.user("postmaster@localhost")
        assert pop.pass_(server.postmaster_password()).startswith(b"+OK")
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.user("postmaster@localhost")
    finally:
        pop.quit()


def test_pop3_wrong_password(server):
    """
    A wrong password gets -ERR [AUTH] and the session goes on: the right one then works.
    """
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls(), timeout=30)
    try:
        pop.user("postmaster@localhost")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.pass_("nope")
        pop.user("postmaster@localhost")
        assert pop.pass_(server.postmaster_password()).startswith(b"+OK")
    finally:
        pop.quit()


def test_restart_keeps_account_and_certificate(make_server):
    """
    A second start reuses the certificate and the passwd-file; no second postmaster is made.
    """
    server = make_server().start()
    cert = server.cert_path.read_bytes()
    password = server.postmaster_password()
    assert server.stop() == -signal.SIGTERM
    server.start()
    assert server.cert_path.read_bytes() == cert
    assert server.postmaster_password() == password
    assert server.log().count("created the first account") == 1
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        assert imap.login("postmaster@localhost", password)[0] == "OK"


def test_new_user_logs_in_without_restart(server):
    """
    pymaildctl user add on a running server: the new account logs in at once, no signal needed.
    """
    result = server.ctl("user", "add", "alice@localhost", "--password-stdin", input="alice secret\n")
    assert result.returncode == 0, result.stderr
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        assert imap.login("alice@localhost", "alice secret")[0] == "OK"


def test_sighup_rereads_passwd_file(server):
    """
    SIGHUP re-reads the passwd-file even when a change left its size and time stamp as they
    were (the automatic re-read cannot see it; the signal must).
    """
    passwd = server.data_dir / "passwd"
    result = server.ctl("user", "add", "alice@localhost", "--password-stdin", input="same secret\n")
    assert result.returncode == 0, result.stderr

    def imap_login(user):
        with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
            try:
                return imap.login(user, "same secret")[0]
            except imaplib.IMAP4.error:
                return "NO"

    assert imap_login("alice@localhost") == "OK"
    before = passwd.stat()
    text = passwd.read_text()
    renamed = text.replace("alice@localhost:", "bobby@localhost:")
    assert len(renamed) == len(text)
    with open(passwd, "r+") as f:  # in place: same inode, same size
        f.write(renamed)
    os.utime(passwd, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert imap_login("bobby@localhost") == "NO"
    server.signal(signal.SIGHUP)
    wait_for(lambda: imap_login("bobby@localhost") == "OK", what="bobby to log in after SIGHUP")
    assert imap_login("alice@localhost") == "NO"


def _leaf_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_sighup_reloads_certificate(make_server, tmp_path):
    """
    With [tls] cert/key in the configuration, SIGHUP makes new connections get the new
    certificate; a broken replacement is logged and the old one kept.
    """
    from pymaild.tls import generateSelfSigned

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    generateSelfSigned(cert, key, "localhost")
    server = make_server(f'[tls]\ncert = "{cert}"\nkey = "{key}"\n').start()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    first = _leaf_certificate(server.ports["imaps"], ctx)
    assert first == ssl.PEM_cert_to_DER_cert(cert.read_text())

    generateSelfSigned(cert, key, "localhost")
    second_der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert second_der != first
    assert _leaf_certificate(server.ports["imaps"], ctx) == first  # not before the signal
    server.signal(signal.SIGHUP)
    wait_for(lambda: _leaf_certificate(server.ports["imaps"], ctx) == second_der, what="the new certificate")

    key.write_text("garbage\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "TLS reload failed" in server.log(), what="the reload failure in the log")
    assert _leaf_certificate(server.ports["pop3s"], ctx) == second_der


def test_sigterm_exits_cleanly(server):
    """
    SIGTERM: a clean stop (twistd ends by re-raising the signal, which systemd counts as
    success), idle IMAP clients get * BYE, and the ports are closed.
    """
    imap = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
    imap.recv(4096)
    assert server.stop() == -signal.SIGTERM
    rest = read_to_close(imap)
    assert rest.startswith(b"* BYE")
    assert "pymaild stopped" in server.log()
    for port in server.ports.values():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)


def test_sigterm_lets_smtp_transaction_finish(server):
    """
    A transaction in flight when SIGTERM arrives may finish; meanwhile new connections are
    refused; once it ends the client gets 421 and the server exits 0.
    """
    smtp = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
    smtp.ehlo("client.example")
    assert smtp.mail("sender@example.org")[0] == 250
    server.signal(signal.SIGTERM)
    wait_for(lambda: "pymaild stopping" in server.log(), what="shutdown to begin")

    def refused():
        try:
            socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, what="the listener to close")
    assert server.proc.poll() is None  # still waiting for our transaction
    assert smtp.noop()[0] == 250
    code, _ = smtp.rset()
    assert code == 250

    def said_goodbye():
        try:
            return smtp.noop()[0] == 421
        except smtplib.SMTPServerDisconnected:
            return True

    wait_for(said_goodbye, what="421 once the transaction is over")
    assert server.proc.wait(30) == -signal.SIGTERM


def test_shutdown_timeout_bounds_the_wait(make_server):
    """
    A transaction that never ends is cut off after [server] shutdown_timeout seconds.
    """
    server = make_server("[server]\nshutdown_timeout = 1\n").start()
    smtp = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30)
    smtp.ehlo("client.example")
    smtp.mail("sender@example.org")
    server.signal(signal.SIGTERM)
    assert server.proc.wait(20) == -signal.SIGTERM
    assert "aborting smtp connection" in server.log()


def test_connection_limit_per_address(make_server):
    """
    Over [limits] max_connections_per_ip, a new SMTP connection gets 421 4.7.0 and is closed;
    the others keep working.
    """
    server = make_server("[limits]\nmax_connections_per_ip = 2\n").start()

    def connect(port, greeting):
        # The readiness probes' connections may not be counted out yet: retry until served.
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if sock.recv(100).startswith(greeting):
            return sock
        sock.close()
        return None

    first = wait_for(lambda: connect(server.ports["smtp"], b"220"), what="a first connection")
    second = wait_for(lambda: connect(server.ports["pop3"], b"+OK"), what="a second connection")
    third = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10)
    assert third.recv(100).startswith(b"421 4.7.0")
    assert third.recv(100) == b""
    first.sendall(b"NOOP\r\n")
    assert first.recv(100).startswith(b"250")
    first.close()
    second.close()
    third.close()


def test_json_log(make_server):
    """
    twistd --logger=pymaild.log.jsonLogger writes one JSON object per line, with the
    connection and login events carrying their fields.
    """
    server = make_server().start(twistd_args=["--logger=pymaild.log.jsonLogger"])
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        imap.login("postmaster@localhost", server.postmaster_password())

    def login_logged():
        records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return [r for r in records if r.get("event") == "login"]

    records = wait_for(login_logged, what="the login event")
    assert records[0]["user"] == "postmaster@localhost"
    assert records[0]["result"] == "ok"
    assert records[0]["protocol"] == "imap"
    assert records[0]["peer"] == "127.0.0.1"
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines[:3]
    assert "ClassicText" not in server.log()


def test_the_text_log_is_made_faster_and_keeps_twistds_lines(server):
    """
    With twistd's own text log (no --logger), the service gives it pymaild's formatter at its
    start (pymaild.log.quickenTextLog); every line keeps twistd's shape, continuation lines
    indented with a tab.  (With --logger, test_json_log above: nothing of it.)
    """
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        imap.login("postmaster@localhost", server.postmaster_password())
    wait_for(lambda: "login" in server.log().partition("pymaild.log.ClassicText")[2],
             what="a login logged after the formatter came")
    before, _, after = server.log().partition("pymaild.log.ClassicText")
    assert before.splitlines()[-1].endswith("[pymaild.service#debug] log: twistd's text lines made by ")
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] \S")
    lines = [line for line in after.splitlines()[1:] if line]
    assert lines and all(stamp.match(line) or line.startswith("\t") for line in lines), lines[:5]


def test_embedded_default_without_config(tmp_path):
    """
    `twistd -n pymaild` with no argument: ./pymaild-data in the current directory and the seven
    default ports on 127.0.0.1.  (Fails, rather than skips, if something else holds them.)
    """
    defaults = {"smtp": 2525, "submission": 2587, "smtps": 2465, "imap": 2143, "imaps": 2993, "pop3": 2110, "pop3s": 2995}
    for name, port in defaults.items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is already in use on this machine"
    from conftest import TWISTD

    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "pymaild"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            assert proc.poll() is None, (tmp_path / "log").read_text()
            return all(socket.socket().connect_ex(("127.0.0.1", p)) == 0 for p in defaults.values())

        wait_for(up, what="the default ports")
        data = tmp_path / "pymaild-data"
        ctx = ssl.create_default_context(cafile=str(data / "tls" / "cert.pem"))
        for name, port in defaults.items():
            line = greeting(port, ctx if name in TLS_LISTENERS else None)
            assert line.startswith(GREETINGS[PROTOCOL[name]]), (name, line)
        assert (data / "passwd").read_text().startswith("postmaster@localhost:")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
        log.close()


def test_port_in_use_stops_startup(make_server):
    """
    A port in use: one line naming the listener and the address, exit 2, no traceback, and
    none of the other ports left listening.
    """
    server = make_server()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", server.ports["pop3"]))
    blocker.listen()
    try:
        result = run_twistd("--config", str(server.config_path), "--data-dir", str(server.data_dir), cwd=server.workdir)
    finally:
        blocker.close()
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"pymaild: {server.config_path.resolve()}: [listen] pop3: cannot listen on 127.0.0.1:{server.ports['pop3']}: address already in use"]
    for name, port in server.ports.items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, name


def test_first_login_creates_special_use_folders(make_server):
    """
    A user's first IMAP login creates Drafts, Sent, Trash, Junk and Archive (names from
    [store]) as Maildir++ folders in the user's directory.
    """
    server = make_server('[store]\nsent = "Gesendet"\njunk = ""\n').start()
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        assert imap.login("postmaster@localhost", server.postmaster_password())[0] == "OK"
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    folders = sorted(p.name for p in home.iterdir() if p.name.startswith(".") and (p / "cur").is_dir())
    assert folders == [".Archive", ".Drafts", ".Gesendet", ".Trash"]
    assert (home / "pymaild.index.sqlite").exists()


def makeServiceAlone(tmp_path, served: tuple[str, ...], before: str, after: str, toml: str = "") -> str:
    """
    What C{after} prints once C{tap.makeService} has built a service (C{before} runs first) in
    a process of its own, with SMTP and the C{served} protocols listening on ephemeral ports.
    """
    config = tmp_path / "pymaild.toml"
    lines = [toml, "[listen]"]
    for name in ("smtp", "submission", "smtps", "imap", "imaps", "pop3", "pop3s"):
        lines.append(f'{name} = ["127.0.0.1:0"]' if name in ("smtp", *served) else f"{name} = []")
    config.write_text("\n".join(lines) + "\n")
    code = (
        "import gc, sys\n"
        "from pymaild import tap\n"
        f"options = tap.Options(); options.parseOptions(['--config', {str(config)!r}, '--data-dir', {str(tmp_path / 'data')!r}])\n"
        + before + "tap.makeService(options)\n" + after
    )
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_building_the_service_collects_nothing_and_freezes_what_it_made(tmp_path):
    """
    makeService runs with the garbage collector off (start-up allocates and frees almost
    nothing) and freezes what it made, so that no later collection scans it; collection is on
    again afterwards.  Run in a process of its own, which the freeze would otherwise outlive.
    """
    before = ("seen = []\n"
              "gc.callbacks.append(lambda phase, info: seen.append(info['generation']) if phase == 'start' else None)\n"
              "gc.collect(); seen.clear()\n")
    out = makeServiceAlone(tmp_path, (), before, "print(seen, gc.isenabled(), gc.get_freeze_count() > 10000)\n")
    assert out.split("\n")[0] == "[] True True"


_LDAP = '[auth]\nbackend = "ldap"\n[ldap]\nurls = ["ldap://127.0.0.1:1"]\nbase_dn = "dc=example,dc=com"\n'


@pytest.mark.parametrize("served, toml, expected", [
    ((), "", "{'imap': False, 'pop3': False, 'handoff': False, 'summary': False, 'idle': False, 'ldap': False}"),
    (("imap",), "", "{'imap': True, 'pop3': False, 'handoff': False, 'summary': False, 'idle': True, 'ldap': False}"),
    (("pop3",), "", "{'imap': False, 'pop3': True, 'handoff': True, 'summary': False, 'idle': False, 'ldap': False}"),
    ((), _LDAP, "{'imap': False, 'pop3': False, 'handoff': False, 'summary': False, 'idle': False, 'ldap': True}"),
])
def test_a_protocol_without_a_listener_is_not_imported(tmp_path, served, toml, expected):
    """
    service.build imports IMAP's and POP3's modules (and the POP3 worker pool's, and IDLE's
    inotify watcher) only when a listener serves them, LDAP's only for [auth] backend = "ldap",
    and the message parser not at all: an MX alone starts sooner and smaller.  (The suite's
    other tests show each protocol serving when it has a listener, and LDAP logins.)
    """
    after = ("print({k: m in sys.modules for k, m in [('imap', 'pymaild.imap.server'), ('pop3', 'pymaild.pop3.server'),"
             " ('handoff', 'pymaild.handoff'), ('summary', 'pymaild.store.summary'), ('idle', 'pymaild.store.watch'),"
             " ('ldap', 'pymaild.auth.ldap')]})\n")
    assert makeServiceAlone(tmp_path, served, "", after, toml=toml + "[pop3]\nprocesses = 2").strip() == expected


_EARLY_SIGNAL = r"""
import os, signal, sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from pymaild import config, service

signum = getattr(signal, sys.argv[3])
svc = service.build(config.load(sys.argv[1], sys.argv[2]), reactor)  # (as makeService: logging not begun)
os.kill(os.getpid(), signum)  # (the ports answer now; the service has not started)
print("alive after", sys.argv[3], flush=True)
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])  # (as twistd, after makeService)
svc.privilegedStartService()
svc.startService()
reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
reactor.callLater(2, reactor.stop)  # (the end after a SIGHUP; a stop signal ends it at once)
reactor.run()
print("exit signal", reactor._exitSignal, flush=True)
os._exit(0)  # (the test reads the log; threads the service left are not its subject)
"""


def signalledEarly(server, tmp_path, name: str) -> str:
    """
    A fresh Python process builds the service as twistd does, sends itself the signal C{name}
    once the ports answer and before the service starts, then starts and runs; its output.
    """
    script = tmp_path / "early_signal.py"
    script.write_text(_EARLY_SIGNAL)
    run = subprocess.run([sys.executable, str(script), str(server.config_path), str(server.data_dir), name],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    assert f"alive after {name}" in run.stdout
    return run.stdout


def test_a_sighup_between_binding_and_start_is_a_reload_not_the_end(make_server, tmp_path):
    """
    The listening sockets are bound while the service is built, before twistd starts it, and a
    SIGHUP can come as soon as they answer: it must not meet the signal's default action (the
    process ends; CI saw that as a reload that never came); the reload runs once the reactor
    does.
    """
    out = signalledEarly(make_server(listeners=("smtp",)), tmp_path, "SIGHUP").split("alive after SIGHUP", 1)[1]
    assert "SIGHUP: re-reading the certificate" in out and "TLS certificate reloaded" in out, out[-3000:]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_between_binding_and_start_stops_gracefully(make_server, tmp_path, name):
    """
    A SIGTERM or SIGINT that comes once the ports answer but before the reactor runs (and
    installs its handlers) stops pymaild as one that comes later does: the service starts and
    stops, the log lines made before twistd's log began are written (the first account's
    password), and the exit is by the signal.  Without the early handlers the signal's default
    action ended the process there: CI saw a log without "created the first account".
    """
    out = signalledEarly(make_server(listeners=("smtp",)), tmp_path, name)
    for line in ("created the first account", f"Received {name}, shutting down", "pymaild stopped",
                 f"exit signal {getattr(signal, name).value}"):
        assert line in out, (line, out[-3000:])
