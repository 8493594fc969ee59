"""
SMTP in, end to end: a real server subprocess, smtplib and raw sockets (plaintext and TLS),
mail delivered into the store and read back from the maildir and over IMAP.
"""

from __future__ import annotations

import base64
import imaplib
import os
import signal
import smtplib
import subprocess

import pytest

from conftest import wait_for
from smtpwire import Raw, inbox_messages, smtp

MESSAGE = b"From: Alice <alice@example.com>\r\nTo: postmaster@localhost\r\nSubject: Hi\r\n\r\nHello\r\n..dot\r\n"


def test_ehlo_advertises_the_extensions(server):
    with smtp(server) as s:
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8", "starttls"):
            assert s.has_extn(ext), ext
        assert not s.has_extn("auth")  # no password before TLS
        assert s.esmtp_features["size"] == str(50 << 20)
        s.starttls(context=server.tls())
        s.ehlo("client.example")
        assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"] and not s.has_extn("starttls")
        code, text = s.noop()
        assert code == 250 and text.startswith(b"2.0.0")
        assert s.verify("postmaster@localhost")[0] == 252
        assert s.docmd("HELP")[0] == 214


def test_mx_delivers_to_a_local_user(server):
    """
    Mail for a local user arrives in the INBOX exactly as sent, with Return-Path and a Received
    header and LF line ends; IMAP reads it back; the reply says queued as.
    """
    with smtp(server) as s:
        s.mail("sender@example.org")
        assert s.rcpt("postmaster@localhost")[0] == 250
        code, text = s.data(MESSAGE)
        assert code == 250 and text.startswith(b"2.0.0 OK: queued as ")
    (stored,) = inbox_messages(server)
    assert stored.startswith(b"Return-Path: <sender@example.org>\nReceived: from client.example ([127.0.0.1])")
    assert b"by " in stored and b"(pymaild) with ESMTP id " in stored and b"for <postmaster@localhost>" in stored
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))  # (smtplib stuffed the dots, the server unstuffed them)
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30)
    try:
        imap.login("postmaster@localhost", server.postmaster_password())
        imap.select("INBOX")
        _, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert data[0][1] == b"Hello\r\n..dot\r\n"
    finally:
        imap.logout()


def test_recipients_and_plus_addressing(server):
    """
    Unknown local addresses get 550 5.1.1, user+tag reaches user; the session goes on.  (Relay
    refusal: tests/security/test_smtp_open_relay.py.)
    """
    with smtp(server) as s:
        s.mail("sender@example.org")
        code, text = s.rcpt("nobody@localhost")
        assert code == 550 and text.startswith(b"5.1.1")
        assert s.rcpt("postmaster+lists@localhost")[0] == 250
        assert s.docmd("RCPT TO:<Postmaster>")[0] == 250  # RFC 5321 4.5.1, no domain
        assert s.docmd("RCPT TO: postmaster@localhost")[0] == 250  # no brackets: taken, as Postfix does
        assert s.data(MESSAGE)[0] == 250
    assert len(inbox_messages(server)) == 1  # one copy for the one user behind the three addresses


def test_order_of_commands(server):
    r = Raw(server)
    assert r.ask(b"MAIL FROM:<a@example.org>").startswith(b"503 5.5.1")
    assert r.ask(b"EHLO client.example").startswith(b"250-")
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"503 5.5.1")
    assert r.ask(b"DATA").startswith(b"503 5.5.1")
    assert r.ask(b"MAIL FROM:<a@example.org>").startswith(b"250 2.1.0")
    assert r.ask(b"MAIL FROM:<a@example.org>").startswith(b"503 5.5.1")
    assert r.ask(b"DATA").startswith(b"554 5.5.1")
    assert r.ask(b"FOO").startswith(b"500 5.5.2")
    assert r.ask(b"MAIL FROM:<a@example.org> X=Y").startswith(b"503")  # (nested)
    assert r.ask(b"RSET").startswith(b"250 2.0.0")
    assert r.ask(b"MAIL FROM:<a@example.org> X=Y").startswith(b"555 5.5.4")
    assert r.ask(b"MAIL FROM:<a@example.org> SIZE=999999999999").startswith(b"552 5.3.4")
    assert r.ask(b"QUIT").startswith(b"221 2.0.0")


def test_size_limit_while_streaming(make_server):
    server = make_server('[smtp]\nmax_message_size = "64K"\n').start()
    with smtp(server) as s:
        s.mail("a@example.org")
        s.rcpt("postmaster@localhost")
        code, text = s.data(b"Subject: big\r\n\r\n" + b"0123456789\r\n" * 10000)
        assert code == 552 and text.startswith(b"5.3.4")
        assert s.noop()[0] == 250
    assert inbox_messages(server) == []


def test_recipient_limit(make_server):
    server = make_server("[smtp]\nmax_recipients = 2\n").start()
    with smtp(server) as s:
        s.mail("a@example.org")
        assert s.rcpt("postmaster@localhost")[0] == 250
        assert s.rcpt("postmaster+a@localhost")[0] == 250
        code, text = s.rcpt("postmaster+b@localhost")
        assert code == 452 and text.startswith(b"4.5.3")


def test_smtps_is_tls_from_the_first_byte(server):
    s = smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=server.tls(), timeout=30)
    try:
        s.ehlo("client.example")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login("postmaster@localhost", server.postmaster_password())
        s.sendmail("postmaster@localhost", ["postmaster@localhost"], b"Subject: via 465\r\n\r\nok\r\n")
    finally:
        s.quit()
    assert len(inbox_messages(server)) == 1


def test_a_50_mb_message(server):
    body = (b"0123456789" * 7 + b"\r\n") * (50_000_000 // 72)
    message = b"Subject: huge\r\n\r\n" + body
    with smtp(server) as s:
        s.mail("a@example.org", ["SIZE=%d" % len(message)])
        s.rcpt("postmaster@localhost")
        assert s.data(message)[0] == 250
    (stored,) = inbox_messages(server)
    assert stored.endswith(message.replace(b"\r\n", b"\n"))


def test_kill_right_after_250_delivers_exactly_once(server):
    """
    The 250 after DATA means the message is on disk: the server killed (-9) right after it
    still has it, once, when it comes back.
    """
    with smtp(server) as s:
        s.mail("a@example.org")
        s.rcpt("postmaster@localhost")
        assert s.data(b"Subject: durable\r\n\r\nkeep me\r\n")[0] == 250
        server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    server._log.close()
    server.start()
    stored = inbox_messages(server)
    assert len(stored) == 1 and stored[0].endswith(b"Subject: durable\n\nkeep me\n")
    spool = server.data_dir / "spool"
    assert not spool.exists() or os.listdir(spool) == []


def test_closed_tls_sessions_free_their_descriptors(server):
    """After QUIT over TLS (465, and 25 after STARTTLS) the server's descriptors are freed."""
    def fds() -> int:
        return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

    with smtp(server) as s:
        s.noop()
    before = fds()
    for _ in range(4):
        s = smtplib.SMTP_SSL("127.0.0.1", server.ports["smtps"], context=server.tls(), timeout=30)
        s.ehlo("client.example")
        s.quit()
        s = smtp(server)
        s.starttls(context=server.tls())
        s.ehlo("client.example")
        s.quit()
    wait_for(lambda: fds() <= before, timeout=15, what=f"descriptors back to {before} (now {fds()})")


def test_a_full_disk_while_a_message_arrives(server, tmp_path):
    """
    The spool fills up in the middle of DATA: the message is read to its end and refused with
    a temporary 452 4.3.1 (the sender keeps it), nothing is left in the spool, and the session
    and the server go on (a message that fits then arrives).
    """
    spool = server.data_dir / "spool"
    spool.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(spool)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        with smtp(server) as s:
            s.mail("a@example.org")
            s.rcpt("postmaster@localhost")
            code, text = s.data(b"Subject: too big for the disk\r\n\r\n" + b"0123456789\r\n" * 200_000)
            assert code == 452 and text.startswith(b"4.3.1"), (code, text)
            assert os.listdir(spool) == []
            assert s.noop()[0] == 250
            s.mail("a@example.org")
            s.rcpt("postmaster@localhost")
            assert s.data(b"Subject: small\r\n\r\nfits\r\n")[0] == 250
        assert len(inbox_messages(server)) == 1
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_spool_left_by_a_crash_is_cleared_at_start(server):
    """
    A large message still arriving when the server was killed (never acknowledged; beyond 1 MB
    it is in a spool file) leaves nothing behind.
    """
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n")
    r.reply(), r.reply(), r.reply()
    r.sock.sendall(b"Subject: half\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100)  # past the 1 MB kept in memory
    spool = server.data_dir / "spool"
    wait_for(lambda: spool.exists() and os.listdir(spool), what="the spool file")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    server._log.close()
    server.start()
    assert os.listdir(spool) == [] and inbox_messages(server) == []


def test_review_fixes_parameters_addresses_and_errors(make_server):
    """
    MAIL's AUTH= parameter is taken (RFC 4954 5); control characters and spaces in addresses
    get 501; STARTTLS with a parameter 501; past [smtp] max_errors refused commands the
    session ends with 421 4.7.0 (no harvesting the directory at leisure).
    """
    server = make_server("[smtp]\nmax_errors = 5\n").start()
    r = Raw(server)
    r.ask(b"EHLO client.example")
    assert r.ask(b"STARTTLS now").startswith(b"501 5.5.4")
    assert r.ask(b"MAIL FROM:<a@example.org> AUTH=<>").startswith(b"250 2.1.0")
    assert r.ask(b"RCPT TO:<x\x0bX-Evil: 1@localhost>").startswith(b"501 5.1.3")
    for name in (b"a", b"b", b"c"):
        assert r.ask(b"RCPT TO:<%s@localhost>" % name).startswith(b"550 5.1.1")
    assert r.ask(b"RCPT TO:<d@localhost>").startswith(b"550 5.1.1")
    assert r.reply().startswith(b"421 4.7.0")
    assert r.sock.recv(10) == b""


def test_submission_null_sender_and_canonical_login(server):
    """<> is anybody's sender (read receipts, vacation replies); Received names the account."""
    r = Raw(server, "submission")
    r.ask(b"EHLO client.example")
    r.starttls()
    r.ask(b"EHLO client.example")
    password = server.postmaster_password().encode()
    assert r.ask(b"AUTH PLAIN " + base64.b64encode(b"\0POSTMASTER@localhost\0" + password)).startswith(b"235")
    assert r.ask(b"MAIL FROM:<>").startswith(b"250 2.1.0")
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"250")
    assert r.ask(b"DATA").startswith(b"354")
    assert r.ask(b"Subject: receipt\r\n\r\nread\r\n.").startswith(b"250")
    (stored,) = inbox_messages(server)
    assert b"(authenticated user postmaster@localhost)" in stored and stored.startswith(b"Return-Path: <>")


def test_quota_is_counted_and_enforced_at_rcpt(make_server):
    """
    SMTP deliveries count in the user's quota (IMAP's GETQUOTAROOT sees them); once full, RCPT
    gets 552 5.2.2 for that mailbox.
    """
    server = make_server("[store]\nquota_messages = 2\n").start()
    for i in range(2):
        with smtp(server) as s:
            s.mail("a@example.org")
            assert s.rcpt("postmaster@localhost")[0] == 250
            assert s.data(b"Subject: %d\r\n\r\nx\r\n" % i)[0] == 250
    with smtp(server) as s:
        s.mail("a@example.org")
        code, text = s.rcpt("postmaster@localhost")
        assert code == 552 and text.startswith(b"5.2.2")
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30)
    try:
        imap.login("postmaster@localhost", server.postmaster_password())
        typ, data = imap.getquotaroot("INBOX")
        assert b"MESSAGE 2 2" in b" ".join(x if isinstance(x, bytes) else b" ".join(x) for x in data[1]), data
    finally:
        imap.logout()
    assert len(inbox_messages(server)) == 2


# --- CHUNKING (RFC 3030) ---------------------------------------------------------------------


def test_bdat_chunks_make_one_message(server):
    """
    BDAT chunks (a CRLF cut between two of them, a dot line that means nothing here) make one
    message; LAST delivers it; pipelined with the transaction and QUIT in one write.
    """
    r = Raw(server)
    assert b"CHUNKING" in r.ask(b"EHLO client.example")
    first = b"Subject: chunks\r\n\r\nline one\r"
    second = b"\n.\r\nMAIL FROM:<not-a-command@example.org>\r\n"
    r.sock.sendall(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<postmaster@localhost>\r\n"
                   b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second + b"QUIT\r\n")
    answers = [r.reply() for _ in range(5)]
    assert [a[:3] for a in answers] == [b"250", b"250", b"250", b"250", b"221"], answers
    assert b"queued as" in answers[3]
    (stored,) = inbox_messages(server)
    assert stored.endswith(b"Subject: chunks\n\nline one\n.\nMAIL FROM:<not-a-command@example.org>\n")


def test_bdat_refused_chunks_are_still_read(server):
    """A refused BDAT (no MAIL) still swallows its octets: what is in them never runs as commands."""
    r = Raw(server)
    r.ask(b"EHLO client.example")
    payload = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n"
    r.sock.sendall(b"BDAT %d LAST\r\n" % len(payload) + payload + b"NOOP\r\n")
    assert r.reply().startswith(b"503 5.5.1")
    assert r.reply().startswith(b"250 2.0.0")  # the NOOP, and nothing from inside the chunk
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"503")
    assert r.ask(b"BDAT x").startswith(b"501")  # a chunk of unknown size: the connection ends
    assert r.sock.recv(10) == b""
    assert inbox_messages(server) == []


def test_bdat_size_limit(make_server):
    server = make_server('[smtp]\nmax_message_size = "1K"\n').start()
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.ask(b"MAIL FROM:<a@example.org>")
    r.ask(b"RCPT TO:<postmaster@localhost>")
    big = b"x" * 2000
    r.sock.sendall(b"BDAT %d LAST\r\n" % len(big) + big)
    assert r.reply().startswith(b"552 5.3.4")
    assert r.ask(b"NOOP").startswith(b"250")
    assert inbox_messages(server) == []


def test_mail_loops_are_refused(make_server):
    """A message that already carries [smtp] max_hops Received headers is refused (554 5.4.6)."""
    server = make_server("[smtp]\nmax_hops = 5\n").start()
    hops = b"".join(b"Received: from hop%d.example by hop%d.example;\r\n Sun, 29 Nov 2026 10:00:00 +0000\r\n" % (i, i)
                    for i in range(5))
    with smtp(server) as s:
        s.mail("a@example.org")
        s.rcpt("postmaster@localhost")
        code, text = s.data(hops + b"Subject: looping\r\n\r\nround and round\r\n")
        assert code == 554 and text.startswith(b"5.4.6")
        s.mail("a@example.org")
        s.rcpt("postmaster@localhost")
        assert s.data(hops[: len(hops) * 3 // 5] + b"Subject: fine\r\n\r\nx\r\n")[0] == 250
        # "Received:" in the body is not a hop
        s.mail("a@example.org")
        s.rcpt("postmaster@localhost")
        assert s.data(b"Subject: quoting\r\n\r\n" + hops * 3)[0] == 250
    assert len(inbox_messages(server)) == 2


def test_catch_all_from_the_aliases_file(server):
    """An '@domain' alias takes whatever else is sent to that domain."""
    (server.data_dir / "aliases").write_text("@localhost: postmaster@localhost\n")
    wait_for(lambda: smtp_rcpt_code(server, "anything@localhost") == 250, what="the catch-all to be read")
    with smtp(server) as s:
        s.mail("a@example.org")
        assert s.rcpt("whoever@localhost")[0] == 250
        assert s.data(b"Subject: to anyone\r\n\r\nx\r\n")[0] == 250
    assert len(inbox_messages(server)) == 1


def smtp_rcpt_code(server, address: str) -> int:
    with smtp(server) as s:
        s.mail("a@example.org")
        return s.rcpt(address)[0]


def test_non_ascii_addresses_need_smtputf8(server):
    r = Raw(server)
    r.ask(b"EHLO client.example")
    assert r.ask("MAIL FROM:<jörg@example.org>".encode()).startswith(b"553 5.6.7")
    assert r.ask(b"MAIL FROM:<a@example.org>").startswith(b"250")
    assert r.ask("RCPT TO:<jörg@localhost>".encode()).startswith(b"553 5.6.7")
    r.ask(b"RSET")
    assert r.ask("MAIL FROM:<jörg@example.org> SMTPUTF8".encode()).startswith(b"250")
    assert r.ask("RCPT TO:<jörg@localhost>".encode()).startswith(b"550 5.1.1")  # taken, then unknown
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"250")


def test_vrfy_off_trusted_and_on(make_server):
    """[smtp] vrfy: 252 by default; real answers for trusted clients or everyone when set."""
    off = make_server().start()
    r = Raw(off, "smtp")
    r.ask(b"EHLO client.example")
    assert r.ask(b"VRFY <postmaster@localhost>").startswith(b"252 2.5.0")
    assert r.ask(b"VRFY <nobody@localhost>").startswith(b"252 2.5.0")
    trusted = make_server('[smtp]\nvrfy = "trusted"\ntrusted_networks = ["127.0.0.1/32"]\n').start()
    r = Raw(trusted, "smtp")
    r.ask(b"EHLO client.example")
    assert r.ask(b"VRFY <postmaster@localhost>").startswith(b"250 2.1.5 <postmaster@localhost>")
    assert r.ask(b"VRFY nobody@localhost").startswith(b"550 5.1.1")
    assert r.ask(b"VRFY <someone@example.net>").startswith(b"252 2.5.0")
    assert r.ask(b"VRFY").startswith(b"501 5.5.4")
    untrusted = make_server('[smtp]\nvrfy = "trusted"\n').start()
    r = Raw(untrusted, "smtp")
    r.ask(b"EHLO client.example")
    assert r.ask(b"VRFY <postmaster@localhost>").startswith(b"252 2.5.0")
    anyone = make_server('[smtp]\nvrfy = "on"\n').start()
    r = Raw(anyone, "smtp")
    r.ask(b"EHLO client.example")
    assert r.ask(b"VRFY <postmaster+tag@localhost>").startswith(b"250 2.1.5")


def test_data_timeout_closes_a_silent_client_mid_data(make_server):
    server = make_server('[smtp]\ndata_timeout = 1\n').start()
    r = Raw(server, "smtp")
    r.ask(b"EHLO client.example")
    r.ask(b"MAIL FROM:<a@example.org>")
    r.ask(b"RCPT TO:<postmaster@localhost>")
    assert r.ask(b"DATA").startswith(b"354")
    r.sock.sendall(b"Subject: slow\r\n")
    assert r.reply().startswith(b"421 4.4.2")  # (after a second of silence; commands get 300 s)
