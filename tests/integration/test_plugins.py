"""
Plugins end to end: a twistd pymaild with the probe plugin (tests/data/plugins/probe.py) loaded
through [plugins] paths, driven by real SMTP, IMAP and POP3 sessions: the order of the stages,
each verdict, a plugin that raises, one that hangs past its timeout, one that answers later,
and a broken plugin configuration at start-up.
"""

from __future__ import annotations

import imaplib
import os
import smtplib
from pathlib import Path

import pytest

from conftest import run_twistd, wait_for

PLUGINS = Path(__file__).resolve().parent.parent / "data" / "plugins"
MESSAGE = b"From: someone@example.net\r\nSubject: hello\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"


def probe(make_server, tmp_path, extra: str = "", head: str = "", onError: str = "continue"):
    record = tmp_path / "calls.txt"
    server = make_server(f'{head}[plugins]\nenabled = ["probe"]\npaths = ["{PLUGINS}"]\ntimeout = 1\n'
                         f'[plugins.probe]\nrecord = "{record}"\non_error = "{onError}"\n{extra}').start()
    server.calls = lambda: record.read_text().splitlines() if record.exists() else []
    return server


def inbox(server, folder: str = "") -> list[Path]:
    home = server.data_dir / "mail" / "localhost" / "postmaster" / (f".{folder}" if folder else "")
    return sorted(p for sub in ("new", "cur") if (home / sub).is_dir() for p in (home / sub).iterdir())


def session(calls, helo):
    """The calls of the session that said EHLO C{helo}, without the session id."""
    id = next(c.split()[1] for c in calls if c.startswith("helo ") and c.split()[2] == helo)
    return [" ".join([c.split()[0], *c.split()[2:]]) for c in calls if c.split()[1] == id]


def test_every_stage_in_order_over_smtp(make_server, tmp_path):
    """The calls of one session over port 25, then of a login on 587, follow pymaild.pipeline.stages."""
    from pymaild.pipeline.stages import STAGE_NAMES

    server = probe(make_server, tmp_path)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.example.net")
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    calls = session(server.calls(), "client.example.net")
    assert [c.split()[0] for c in calls] == ["connect", "helo", "mail", "rcpt", "data", "delivery"], calls
    assert calls[0] == "connect smtp 127.0.0.1" and calls[3] == "rcpt postmaster@localhost user postmaster@localhost"
    assert calls[4] == "data %d hello" % (len(MESSAGE.replace(b"\r\n", b"\n")) + len(
        inbox(server)[0].read_bytes()) - len(MESSAGE.replace(b"\r\n", b"\n")))
    assert calls[5] == "delivery postmaster@localhost postmaster@localhost"
    order = [c.split()[0] for c in calls]
    assert order == sorted(order, key=STAGE_NAMES.index)
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        s.ehlo("me.example.net")
        s.login("postmaster@localhost", server.postmaster_password())
        s.sendmail("postmaster@localhost", ["someone@example.net"], MESSAGE)
    later = session(server.calls(), "me.example.net")
    assert [c.split()[0] for c in later] == ["connect", "helo", "helo", "auth", "mail", "rcpt", "data"], later
    assert later[0] == "connect submission 127.0.0.1" and later[3] == "auth postmaster@localhost True"
    assert later[4] == "mail postmaster@localhost postmaster@localhost"
    assert len(list((server.data_dir / "queue" / "messages").glob("*.json"))) == 1  # (remote: no delivery stage)


def test_refusals_carry_the_plugins_codes(make_server, tmp_path):
    server = probe(make_server, tmp_path, 'reject_rcpt = ["postmaster@localhost"]\ntempfail_helo = ["bad.example"]\n')
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        code, text = s.ehlo("bad.example")
        assert (code, text) == (450, b"4.7.1 probe: come back later")
        s.ehlo("good.example")
        s.mail("someone@example.net")
        assert s.rcpt("postmaster@localhost") == (553, b"5.7.1 probe says no")
        assert s.rcpt("abuse@localhost")[0] == 550  # (pymaild's own answer comes first: no such user)
        assert s.rcpt("someone@elsewhere.example")[0] == 554  # (no relaying: the plugin is not asked)
    assert not inbox(server)
    assert not any("someone@elsewhere" in c for c in server.calls())


def test_header_changes_and_their_place(make_server, tmp_path):
    server = probe(make_server, tmp_path, "header = true\n")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    [path] = inbox(server)
    lines = path.read_bytes().split(b"\n")
    assert lines[0].startswith(b"Return-Path: <someone@example.net>") and lines[1].startswith(b"Received: ")
    added = [i for i, line in enumerate(lines) if line.startswith(b"X-Probe")]
    received_end = next(i for i in range(2, len(lines)) if not lines[i].startswith((b" ", b"\t")))
    assert added == [received_end, received_end + 1] and lines[added[1]] == b"X-Probe-Sender: someone@example.net"
    assert b"From: someone@example.net" in lines


def test_remove_headers_and_a_large_message(make_server, tmp_path):
    """removeHeaders takes a field out (also from a message big enough to be spooled to a file)."""
    server = probe(make_server, tmp_path, 'remove = ["x-spam-flag"]\n')
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 2000
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
        s.sendmail("someone@example.net", ["postmaster@localhost"], big)
    small, large = sorted(inbox(server), key=lambda p: p.stat().st_size)
    for path in (small, large):
        data = path.read_bytes()
        assert b"X-Spam-Flag" not in data and b"Subject: hello\n\nbody\n" in data
    assert large.stat().st_size > 1_990_000 and large.read_bytes().endswith(b"x" * 998 + b"\n")


def test_quarantine_holds_the_message(make_server, tmp_path):
    server = probe(make_server, tmp_path, 'quarantine_subject = "hello"\n')
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)  # (250)
    assert not inbox(server)
    held = list((server.data_dir / "quarantine").glob("*.eml"))
    assert len(held) == 1 and b"Subject: hello" in held[0].read_bytes()
    assert "quarantined" in server.log() and "probe: suspicious subject" in server.log()


def test_file_into_a_folder_with_flags(make_server, tmp_path):
    server = probe(make_server, tmp_path, 'folders = ["postmaster@localhost:Lists:\\\\Seen"]\n')
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("postmaster@localhost", server.postmaster_password())
    assert imap.create("Lists")[0] == "OK"
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    assert imap.select("INBOX")[1] == [b"0"]
    assert imap.select("Lists")[1] == [b"1"]
    typ, data = imap.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (X-FILED)])")
    assert b"\\Seen" in data[0][0] and b"X-Filed: Lists" in data[0][1]
    imap.logout()


def test_a_plugin_that_raises_fails_open_or_closed(make_server, tmp_path):
    server = probe(make_server, tmp_path, 'fail = "rcpt"\n')
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    assert len(inbox(server)) == 1
    assert "plugin probe: rcpt hook failed; continue" in server.log() and "probe fails at rcpt" in server.log()
    closed = probe(make_server, tmp_path, 'fail = "rcpt"\n', onError="tempfail")
    with smtplib.SMTP("127.0.0.1", closed.ports["smtp"], timeout=30) as s:
        s.ehlo("client.example.net")
        s.mail("someone@example.net")
        assert s.rcpt("postmaster@localhost") == (451, b"4.3.0 Temporary local problem, try again later")
        assert s.noop()[0] == 250  # (the session goes on)


def test_a_hung_plugin_times_out_and_a_late_one_is_waited_for(make_server, tmp_path):
    server = probe(make_server, tmp_path, 'hang = "mail"\nlater = "data"\n')
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    [path] = inbox(server)
    assert b"X-Later: data" in path.read_bytes()
    assert "plugin probe: mail hook did not answer within 1.0s; continue" in server.log()


def test_a_broken_plugin_configuration_stops_start_up(tmp_path):
    config = tmp_path / "pymaild.toml"
    for table, message in [
        ('[plugins]\nenabled = ["probe", "nonesuch"]\npaths = ["%s"]\n' % PLUGINS, "no plugin named 'nonesuch'"),
        ('[plugins]\nenabled = ["probe"]\npaths = ["%s"]\n[plugins.probe]\nfail = "lunch"\n' % PLUGINS,
         "[plugins.probe] fail: 'lunch' is not a stage"),
    ]:
        config.write_text('[listen]\nsmtp = ["127.0.0.1:0"]\nsubmission = []\nsmtps = []\nimap = []\nimaps = []\n'
                          'pop3 = []\npop3s = []\n' + table)
        result = run_twistd("--config", str(config), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
        assert result.returncode != 0
        assert message in result.stdout + result.stderr, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
