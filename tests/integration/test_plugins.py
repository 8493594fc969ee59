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

from conftest import maildir_files, run_twistd, wait_for

PLUGINS = Path(__file__).resolve().parent.parent / "data" / "plugins"
MESSAGE = b"From: someone@example.net\r\nSubject: hello\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"


def probe(make_server, tmp_path, extra: str = "", head: str = "", onError: str = "continue"):
    record = tmp_path / "calls.txt"
    server = make_server(f'{head}[plugins]\nenabled = ["probe"]\npaths = ["{PLUGINS}"]\ntimeout = 1\n'
                         f'[plugins.probe]\nrecord = "{record}"\non_error = "{onError}"\n{extra}').start()
    server.calls = lambda: record.read_text().splitlines() if record.exists() else []
    return server


def rcpt(server, address: str):
    """The answer to RCPT TO:<address> in a new port 25 session (EHLO and MAIL first)."""
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.example.net")
        s.mail("someone@example.net")
        return s.rcpt(address)


def inbox(server, folder: str = "") -> list[Path]:
    home = server.data_dir / "mail" / "localhost" / "postmaster" / (f".{folder}" if folder else "")
    return maildir_files(home)


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
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE.replace(b"hello", b"other"))
    [delivered] = inbox(server)  # (the next message on the connection is not quarantined too)
    assert b"Subject: other" in delivered.read_bytes()
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


def test_imap_and_pop3_logins(make_server, tmp_path):
    """The login stage: a right password refused by a plugin is a failed login; failures are reported."""
    import poplib

    server = probe(make_server, tmp_path, 'refuse_login = ["postmaster@localhost"]\n')
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login("postmaster@localhost", server.postmaster_password())
    imap.shutdown()
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls())
    pop.user("postmaster@localhost")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.pass_(server.postmaster_password())
    pop.close()
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls())
    pop.user("nobody@localhost")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong")
    pop.close()
    logins = [" ".join(c.split()[2:]) for c in server.calls() if c.startswith("login ")]
    assert logins == ["imap postmaster@localhost True", "pop3 postmaster@localhost True", "pop3 nobody@localhost False"]
    assert "imap login postmaster@localhost from 127.0.0.1: refused by plugin probe" in server.log()


def test_queue_events(make_server, tmp_path):
    """A queued message that cannot be delivered (its domain does not exist) is a bounced event."""
    import json
    import subprocess
    import sys

    zones = tmp_path / "zones.json"
    zones.write_text(json.dumps({}))
    dns = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "queue" / "fakedns.py"),
                            str(zones), "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(dns.stdout.readline())
        server = probe(make_server, tmp_path, head=f'[queue]\nnameservers = ["127.0.0.1:{port}"]\n')
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
            s.starttls(context=server.tls())
            s.login("postmaster@localhost", server.postmaster_password())
            s.sendmail("postmaster@localhost", ["someone@nowhere.test"], MESSAGE)
        event = wait_for(lambda: [c for c in server.calls() if c.startswith("queue ")], what="a queue event")
        assert event == ["queue - bounced someone@nowhere.test"], event
    finally:
        dns.kill()
        dns.wait()


def test_pymaildctl_quarantine_release_and_delete(make_server, tmp_path):
    """A quarantined message is listed, shown, and released into the mailbox (or deleted)."""
    server = probe(make_server, tmp_path, 'quarantine_subject = "hello"\n')
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE.replace(b"hello", b"hello again"))
    listing = server.ctl("quarantine", "list")
    assert listing.returncode == 0 and "-- 2 messages held" in listing.stdout, listing
    first, second = [line.split()[0] for line in listing.stdout.splitlines()[:2]]
    assert "someone@example.net> -> postmaster@localhost  (probe: probe: suspicious subject)" in listing.stdout
    shown = server.ctl("quarantine", "show", first)
    assert shown.returncode == 0 and '"reason": "probe: probe: suspicious subject"' in shown.stdout
    assert "Subject: hello" in shown.stdout and "body" not in shown.stdout.split("\n\n", 1)[1]
    released = server.ctl("quarantine", "release", first)
    assert released.returncode == 0 and f"released {first}: 1 local" in released.stdout, released
    [path] = inbox(server)
    assert path.read_bytes().startswith(b"Return-Path: <someone@example.net>\n")
    assert server.ctl("quarantine", "delete", second).returncode == 0
    assert "-- 0 messages held" in server.ctl("quarantine", "list").stdout
    missing = server.ctl("quarantine", "release", first)
    assert missing.returncode != 0 and "no message" in missing.stderr


def test_sighup_reloads_the_plugins_settings(make_server, tmp_path):
    import signal

    server = probe(make_server, tmp_path)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    text = server.config_path.read_text()
    server.config_path.write_text(text + 'reject_rcpt = ["postmaster@localhost"]\n')
    server.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: plugins probe" in server.log(), what="the plugins to be made again")
    assert rcpt(server, "postmaster@localhost") == (553, b"5.7.1 probe says no")
    server.config_path.write_text(text + 'reject_rcpt = "not a list"\n')  # (a mistake: the old settings stay)
    server.signal(signal.SIGHUP)
    wait_for(lambda: "the plugins keep their settings" in server.log(), what="the refused reload")
    assert "[plugins.probe] reject_rcpt: expected a list" in server.log()
    assert rcpt(server, "postmaster@localhost")[0] == 553


def test_the_four_built_ins_in_a_running_server(make_server, tmp_path):
    """
    dnsbl (its own DNS server), greylist, ratelimit and headers together, as an administrator
    would enable them: a listed sender domain is refused, a new triplet waits, then passes with
    its header fields; logged-in users skip the blocklists and greylisting but are rate limited.
    """
    import json
    import subprocess
    import sys

    zones = tmp_path / "zones.json"
    zones.write_text(json.dumps({"spammer.test.dbl.test": [["A", "127.0.1.2"]]}))
    dns = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "queue" / "fakedns.py"),
                            str(zones), "127.0.0.1"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(dns.stdout.readline())
        server = make_server(f"""
[queue]
nameservers = ["127.0.0.1:{port}"]
[plugins]
enabled = ["dnsbl", "greylist", "ratelimit", "headers"]
[plugins.dnsbl]
zones = [{{zone = "zen.test"}}]
domain_zones = [{{zone = "dbl.test"}}]
[plugins.greylist]
delay = 1
whitelist_recipients = []  # (postmaster@ is exempt by default; it is the only user here)
[plugins.ratelimit]
messages_per_user = 2
[plugins.headers]
add = [{{name = "X-External", value = "yes", when = "external"}}]
rewrite = [{{name = "Subject", match = "^", replace = "[EXT] ", when = "external"}}]
""").start()
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
            s.ehlo("mx.spammer.test")
            s.mail("offers@spammer.test")
            code, text = s.rcpt("postmaster@localhost")
            assert code == 554 and b"blocked using dbl.test" in text
            s.rset()
            s.mail("friend@example.net")
            code, text = s.rcpt("postmaster@localhost")
            assert (code, text[:5]) == (451, b"4.7.1") and b"Greylisted" in text
            s.rset()

        def retried():
            with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
                try:
                    s.sendmail("friend@example.net", ["postmaster@localhost"], MESSAGE)
                    return True
                except smtplib.SMTPRecipientsRefused:
                    return False

        wait_for(retried, timeout=20, interval=0.5, what="the greylisted triplet to pass")
        [path] = inbox(server)
        head = path.read_bytes().split(b"\n\n", 1)[0]
        assert b"\nX-Greylist: delayed " in head and b"\nX-External: yes" in head
        assert b"\nSubject: [EXT] hello" in head and head.count(b"Subject:") == 1
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
            s.starttls(context=server.tls())
            s.login("postmaster@localhost", server.postmaster_password())
            for _ in range(2):
                s.sendmail("postmaster@localhost", ["postmaster@localhost"], MESSAGE)
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("postmaster@localhost", ["postmaster@localhost"], MESSAGE)
            assert e.value.smtp_code == 451 and b"Rate limit" in e.value.smtp_error
        internal = [p for p in inbox(server) if p != path]
        assert len(internal) == 2 and all(b"X-External" not in p.read_bytes() for p in internal)
    finally:
        dns.kill()
        dns.wait()


def test_plugin_order_accept_and_an_auth_refusal(make_server, tmp_path):
    """
    Plugins are asked in [plugins] enabled order: the probe's accept at end of data means the
    headers plugin after it is not asked; the same plugins the other way round both are.  A
    right SMTP AUTH password refused by a plugin gets 535.
    """
    record = tmp_path / "calls.txt"
    tables = (f'[plugins.probe]\nrecord = "{record}"\naccept_data = true\nrefuse_login = ["postmaster@localhost"]\n'
              '[plugins.headers]\nadd = [{name = "X-Headers", value = "asked"}]\n')
    first = make_server(f'[plugins]\nenabled = ["probe", "headers"]\npaths = ["{PLUGINS}"]\n' + tables).start()
    second = make_server(f'[plugins]\nenabled = ["headers", "probe"]\npaths = ["{PLUGINS}"]\n' + tables).start()
    for server in (first, second):
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
            s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    assert b"X-Headers" not in inbox(first)[0].read_bytes()
    assert b"X-Headers: asked" in inbox(second)[0].read_bytes()
    with smtplib.SMTP("127.0.0.1", first.ports["submission"], timeout=30) as s:
        s.starttls(context=first.tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("postmaster@localhost", first.postmaster_password())
        assert e.value.smtp_code == 535
    assert "smtp login postmaster@localhost from 127.0.0.1: refused by plugin probe" in first.log()


def test_a_plugin_from_an_installed_distribution(tmp_path):
    """
    A distribution that installs pymaild/plugins/NAME.py (no __init__.py) on sys.path joins the
    namespace: pymaildctl check-config finds it without [plugins] paths.
    """
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site" / "pymaild" / "plugins"
    site.mkdir(parents=True)
    shutil.copy(PLUGINS / "probe.py", site / "installed_probe.py")
    config = tmp_path / "pymaild.toml"
    config.write_text(f'[plugins]\nenabled = ["probe"]\n[plugins.probe]\nrecord = "{tmp_path / "calls.txt"}"\n')
    ctl = Path(sys.executable).parent / "pymaildctl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    found = subprocess.run([str(ctl), "--config", str(config), "--data-dir", str(tmp_path / "data"), "check-config"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert found.returncode == 0, found.stderr
    assert "[plugins.probe]" in found.stdout
    env.pop("PYTHONPATH")
    missing = subprocess.run([str(ctl), "--config", str(config), "--data-dir", str(tmp_path / "data"), "check-config"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode != 0 and "no plugin named 'probe'" in missing.stderr


def test_sighup_enables_the_first_plugins(make_server, tmp_path):
    """A server started without plugins asks the ones a SIGHUP enables, from the next connection on."""
    import signal

    record = tmp_path / "calls.txt"
    server = make_server(f'[plugins]\npaths = ["{PLUGINS}"]\n').start()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@example.net", ["postmaster@localhost"], MESSAGE)
    server.config_path.write_text(server.config_text + f'enabled = ["probe"]\n[plugins.probe]\nrecord = "{record}"\n'
                                  'reject_rcpt = ["postmaster@localhost"]\n')
    server.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: plugins probe" in server.log(), what="the plugins to be made")
    assert rcpt(server, "postmaster@localhost") == (553, b"5.7.1 probe says no")
    assert len(inbox(server)) == 1
