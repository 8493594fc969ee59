"""
The outbound queue end to end: a real pymaild (twistd subprocess) takes mail on submission,
resolves MX through a twisted.names server (tests/queue/fakedns.py, its own process) and sends
to SMTP sinks (tests/queue/sinks.py, their own process) on 127.0.0.2-4; the sender's DSN
arrives in the sender's INBOX; pymaildctl changes reach the running server; kill -9 in the
middle of deliveries loses nothing.
"""

from __future__ import annotations

import email
import email.policy
import json
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import maildir_files, postmaster_inbox, wait_for

HERE = Path(__file__).resolve().parent.parent / "queue"
sys.path.insert(0, str(HERE))
from test_queue_runner import commonPort  # noqa: E402

ZONES = {
    "accept.test": [["MX", 10, "mx-a.test"]],
    "defer.test": [["MX", 10, "mx-b.test"]],
    "reject.test": [["MX", 10, "mx-c.test"]],
    "mx-a.test": [["A", "127.0.0.2"]],
    "mx-b.test": [["A", "127.0.0.3"]],
    "mx-c.test": [["A", "127.0.0.4"]],
}


class World:
    """The fake internet: a DNS server and three SMTP sinks, each in its own process."""

    def __init__(self, tmp: Path, behaviours: dict):
        self.tmp = tmp
        self.out = tmp / "received"
        self.out.mkdir()
        self.procs = []
        zones = tmp / "zones.json"
        zones.write_text(json.dumps(ZONES))
        dns = self._start([sys.executable, str(HERE / "fakedns.py"), str(zones)])
        self.dnsPort = int(dns.stdout.readline())
        hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        self.port = commonPort(hosts)
        spec = tmp / "sinks.json"
        spec.write_text(json.dumps([dict(behaviours.get(h, {}), host=h, port=self.port) for h in hosts]))
        sinks = self._start([sys.executable, str(HERE / "sinks.py"), str(spec), str(self.out)])
        sinks.stdout.readline()

    def _start(self, argv):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.tmp / "world.log", "ab"),
                                stdin=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def received(self, host: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob(f"{host}-*.json"))]

    def config(self, extra: str = "", backoff: int = 1) -> str:
        return (f'[queue]\nnameservers = ["127.0.0.1:{self.dnsPort}"]\nremote_port = {self.port}\n'
                f'min_backoff = {backoff}\nmax_backoff = {backoff}\nconnect_timeout = 5\ncommand_timeout = 10\n{extra}')

    def stop(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def world(tmp_path):
    worlds = []

    def make(behaviours=None):
        w = World(tmp_path, behaviours or {})
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.stop()


def submit(server, recipients, body=b"Subject: hello\r\n\r\nHello world.\r\n", sender="postmaster@localhost"):
    s = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    try:
        s.starttls(context=server.tls())
        s.login("postmaster@localhost", server.postmaster_password())
        s.sendmail(sender, recipients, body)
    finally:
        s.quit()


def queued(server) -> list[str]:
    return sorted(p.stem for p in (server.data_dir / "queue" / "messages").glob("*.json"))


def inbox(server) -> list[bytes]:
    home = postmaster_inbox(server)
    return [p.read_bytes() for p in maildir_files(home)]


def test_three_domains_one_accepts_one_defers_one_rejects(make_server, world):
    """
    One message to three domains: the first takes it at once, the second after one retry,
    the third refuses it; the sender finds exactly one DSN, naming the third, in the INBOX.
    """
    w = world({"127.0.0.3": {"defer_first": 1}, "127.0.0.4": {"rcpt_default": "550 5.1.1 no such user"}})
    server = make_server(w.config()).start()
    submit(server, ["bob@accept.test", "carol@defer.test", "dave@reject.test"])
    wait_for(lambda: w.received("127.0.0.3") and not queued(server), what="the deferred recipient's retry")
    [a] = w.received("127.0.0.2")
    [b] = w.received("127.0.0.3")
    assert w.received("127.0.0.4") == []
    assert [r[0] for r in a["rcpts"]] == ["bob@accept.test"] and [r[0] for r in b["rcpts"]] == ["carol@defer.test"]
    assert a["mail_from"] == "postmaster@localhost"
    assert "Subject: hello" in a["message"] and "Received: from" in a["message"]
    assert "Return-Path" not in a["message"]  # (added at final delivery only)
    wait_for(lambda: inbox(server), what="the DSN")
    [dsn] = inbox(server)
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert dsn.startswith(b"Return-Path: <>\n")
    report = message.get_payload()[1]
    recipients = [str(block["Final-Recipient"]) for block in report.get_payload()[1:]]
    assert recipients == ["rfc822; dave@reject.test"]
    assert b"550 5.1.1 no such user" in dsn
    log = server.log()
    assert "deferred until" in log and "delivered via mx-b.test" in log


def test_pymaildctl_on_a_running_server(make_server, world):
    """
    A deferred message waits an hour; pymaildctl holds it (retry refused while held), releases
    it and the running server sends it at once; another, always deferred, is bounced by the
    admin: its sender gets the DSN and the queue is empty.
    """
    w = world({"127.0.0.3": {"defer_first": 1}, "127.0.0.4": {"rcpt_default": "451 4.2.1 try later"}})
    server = make_server(w.config(backoff=3600)).start()
    submit(server, ["carol@defer.test"])
    wait_for(lambda: "deferred until" in server.log(), what="the first attempt")
    [id] = queued(server)
    assert server.ctl("queue", "hold", id).returncode == 0
    listing = server.ctl("queue", "list").stdout
    assert f"{id}!" in listing and "carol@defer.test" in listing and "451" in listing
    retry = server.ctl("queue", "retry", id)
    assert retry.returncode != 0 and "release" in retry.stderr
    assert server.ctl("queue", "release", id).returncode == 0
    wait_for(lambda: w.received("127.0.0.3") and not queued(server), what="delivery after release")

    submit(server, ["dave@reject.test"])
    wait_for(lambda: server.log().count("deferred until") >= 2, what="the second message's first attempt")
    [id] = queued(server)
    assert server.ctl("queue", "bounce", id).returncode == 0
    wait_for(lambda: inbox(server) and not queued(server), what="the DSN after the admin's bounce")
    [dsn] = inbox(server)
    assert b"dave@reject.test" in dsn and b"bounced by the administrator" in dsn


def test_kill_9_during_deliveries_loses_nothing(make_server, world):
    """
    20 messages on their way to a slow server; pymaild is killed with SIGKILL in the middle; after
    a restart every message arrives, and a message arrives twice only if the server had said 250
    for it just before the kill (at most one per open connection).
    """
    w = world({"127.0.0.2": {"data_end_delay": 0.2}})
    server = make_server(w.config("connections_per_destination = 2\n")).start()
    for i in range(20):
        submit(server, [f"user{i}@accept.test"], body=b"Subject: n%d\r\nMessage-ID: <m%d@test>\r\n\r\nx\r\n" % (i, i))
    wait_for(lambda: len(w.received("127.0.0.2")) >= 4, what="some deliveries")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.start()
    wait_for(lambda: not queued(server), timeout=60, what="the queue to empty after the restart")
    got = [r["rcpts"][0][0] for r in w.received("127.0.0.2")]
    assert sorted(set(got)) == sorted(f"user{i}@accept.test" for i in range(20))
    assert len(got) - len(set(got)) <= 2


def test_dsn_parameters_are_kept_with_the_message(make_server, world):
    """
    RET and ENVID (MAIL), NOTIFY and ORCPT (RCPT) given at submission land in the envelope and
    are passed on to a server that offers DSN; bad values are refused.
    """
    w = world({"127.0.0.2": {"dsn": True}})
    server = make_server(w.config()).start()
    s = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    try:
        s.starttls(context=server.tls())
        s.login("postmaster@localhost", server.postmaster_password())
        assert "dsn" in s.esmtp_features
        assert s.mail("postmaster@localhost", ["RET=ALL"])[0] == 501
        assert s.mail("postmaster@localhost", ["ENVID=a=b"])[0] == 501
        s.mail("postmaster@localhost")
        assert s.rcpt("x@accept.test", ["NOTIFY=SOMETIMES"])[0] == 501
        assert s.rcpt("x@accept.test", ["ORCPT=rfc822"])[0] == 501
        assert s.rcpt("x@accept.test", ["NOTIFY=NEVER,FAILURE"])[0] == 501
        assert s.rcpt("x@accept.test", ["FOO=BAR"])[0] == 555
        s.rset()
        s.sendmail("postmaster@localhost", ["bob@accept.test"], b"Subject: dsn\r\n\r\nx\r\n",
                   mail_options=["RET=HDRS", "ENVID=abc+2Bdef"],
                   rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b+2Bo@accept.test"])
    finally:
        s.quit()
    wait_for(lambda: w.received("127.0.0.2"), what="delivery")
    [got] = w.received("127.0.0.2")
    assert "RET=HDRS" in got["mail_params"] and "ENVID=abc+2Bdef" in got["mail_params"]
    [(address, params)] = got["rcpts"]
    assert address == "bob@accept.test"
    assert "NOTIFY=SUCCESS,FAILURE" in params and "ORCPT=rfc822;b+2Bo@accept.test" in params
    assert inbox(server) == []  # (the server offered DSN: it reports success itself)


def test_notify_success_for_a_local_recipient(make_server, world):
    """RFC 3461 6.2: a local delivery with NOTIFY=SUCCESS sends the sender a "delivered" report."""
    w = world()
    server = make_server(w.config()).start()
    s = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30)
    try:
        s.starttls(context=server.tls())
        s.login("postmaster@localhost", server.postmaster_password())
        s.sendmail("postmaster@localhost", ["postmaster@localhost"], b"Subject: note\r\n\r\nx\r\n",
                   mail_options=["ENVID=track1"], rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;postmaster@localhost"])
    finally:
        s.quit()
    wait_for(lambda: len(inbox(server)) == 2, what="the message and its delivery report")
    report = [m for m in inbox(server) if b"multipart/report" in m]
    [dsn] = report
    assert b"Action: delivered" in dsn and b"Status: 2.0.0" in dsn and b"Original-Envelope-Id: track1" in dsn
    assert b"Subject: note" in dsn and b"Return-Path: <>" in dsn


def test_smarthost_password_is_reread_on_sighup(make_server, world, tmp_path):
    """[queue] relay_host with AUTH over STARTTLS; SIGHUP picks up a new relay password."""
    import base64

    from pymaild import tls

    cert, key = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    tls.generateSelfSigned(cert, key, "127.0.0.2")
    w = world({"127.0.0.2": {"starttls": True, "auth": True, "tls_cert": str(cert), "tls_key": str(key)}})
    password = tmp_path / "relay.password"
    password.write_text("first\n")
    server = make_server(w.config(
        f'relay_host = "127.0.0.2:{w.port}"\nrelay_user = "me@provider.test"\nrelay_password_file = "{password}"\n'
        f'tls = "verify"\nca_file = "{cert}"\n')).start()
    submit(server, ["someone@anywhere.example"])
    wait_for(lambda: len(w.received("127.0.0.2")) == 1, what="delivery through the relay")
    password.write_text("second\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP" in server.log(), what="the reload")
    submit(server, ["other@anywhere.example"])
    wait_for(lambda: len(w.received("127.0.0.2")) == 2, what="the second delivery")
    [first, second] = w.received("127.0.0.2")
    assert first["tls"] and second["tls"]
    assert [base64.b64decode(r["auth"].split()[1]) for r in (first, second)] == [
        b"\0me@provider.test\0first", b"\0me@provider.test\0second"]
    assert queued(server) == []


def test_kill_9_while_messages_are_being_accepted(make_server, world):
    """
    Remote mail submitted while pymaild is killed with SIGKILL: every message that got its 250
    arrives after a restart; nothing half-written is ever sent (tmp/ is emptied at start).
    """
    import threading

    w = world()
    server = make_server(w.config()).start()
    accepted, stop = [], threading.Event()

    def client():
        for i in range(200):
            if stop.is_set():
                return
            try:
                submit(server, [f"k{i}@accept.test"], body=b"Subject: k%d\r\n\r\n" % i + (b"x" * 70 + b"\r\n") * 300)
            except (OSError, smtplib.SMTPException):
                return
            accepted.append(f"k{i}@accept.test")

    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: len(accepted) >= 5, what="some accepted messages")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    stop.set()
    thread.join(60)
    server.start()
    wait_for(lambda: not queued(server) and set(accepted) <= {r["rcpts"][0][0] for r in w.received("127.0.0.2")},
             timeout=60, what="every accepted message delivered after the restart")
    assert not list((server.data_dir / "queue" / "tmp").iterdir())
    assert not list((server.data_dir / "queue" / "corrupt").iterdir())
