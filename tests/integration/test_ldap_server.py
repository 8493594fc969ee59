"""
pymaild with [auth] backend = "ldap" end to end (twistd subprocess, real slapd): logins over
SMTP submission, IMAP and POP3; delivery to a user's alias address and to a nested group with
an external member (queued); a disabled user; a stopped directory gives temporary answers and
pymaild recovers when it comes back, without a restart.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import sys
from pathlib import Path

import pytest

from conftest import free_ports, maildir_files, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ldapserver  # noqa: E402

pytestmark = pytest.mark.skipif(not ldapserver.slapd_available(), reason="slapd is not installed")


@pytest.fixture
def slapd(tmp_path):
    server = ldapserver.Slapd(tmp_path / "slapd")
    server.start()
    yield server
    server.close()


def config(slapd) -> str:
    # (the queue asks a name server where nothing answers: a remote recipient stays queued,
    # whatever the machine's own resolver would say about partner.example at once)
    return f"""
[queue]
nameservers = ["127.0.0.1:{free_ports(1)[0]}"]

[auth]
backend = "ldap"
plaintext_networks = ["127.0.0.0/8"]

[domains]
local = ["example.com", "example.org"]

[ldap]
urls = ["{slapd.url}"]
start_tls = true
ca_file = "{slapd.certPath}"
bind_dn = "{ldapserver.SERVICE_DN}"
bind_password = "{ldapserver.SERVICE_PASSWORD}"
base_dn = "{ldapserver.BASE_DN}"
active_filter = "{ldapserver.ACTIVE_USER_FILTER}"
timeout = 2
cache_ttl = 0
negative_cache_ttl = 0
"""


def inbox(server, user: str) -> list[bytes]:
    local, _, domain = user.partition("@")
    home = server.data_dir / "mail" / domain / local
    return [p.read_bytes() for p in maildir_files(home)]


def test_ldap_logins_and_deliveries(make_server, slapd):
    server = make_server(config(slapd)).start()
    assert not (server.data_dir / "passwd").exists()  # (no passwd-file, no first account)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.partner.example")
        s.sendmail("someone@partner.example", ["a.smith@example.com"], b"Subject: to an alias\r\n\r\nhi\r\n")
        s.sendmail("someone@partner.example", ["staff@example.com"], b"Subject: to all staff\r\n\r\nhi\r\n")
        code, _ = s.rcpt("carol@example.com") if s.mail("x@partner.example") else (None, None)
        assert code == 550  # (disabled)
        s.rset()
    assert len(inbox(server, "alice@example.com")) == 2
    assert len(inbox(server, "bob@example.com")) == 1 and len(inbox(server, "dave@example.com")) == 1
    queued = list((server.data_dir / "queue" / "messages").glob("*.json"))
    assert len(queued) == 1 and "partner@partner.example" in queued[0].read_text()

    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("alice", ldapserver.PASSWORDS["alice"])
    assert imap.select("INBOX")[1] == [b"2"]
    imap.logout()
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls())
    pop.user("dave@example.com")
    pop.pass_(ldapserver.PASSWORDS["dave"])
    assert pop.stat()[0] == 1
    pop.quit()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        s.login("bob", ldapserver.PASSWORDS["bob"])
        s.sendmail("bob@example.com", ["alice@example.com"], b"Subject: from bob\r\n\r\nhi\r\n")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("carol", ldapserver.PASSWORDS["carol"])  # (disabled)
        assert e.value.smtp_code == 535
    assert len(inbox(server, "alice@example.com")) == 3


def test_filter_characters_are_only_data(make_server, slapd):
    """
    Logins and recipients with LDAP filter characters (* ( ) \\; NUL: tests/auth/test_ldap.py) match nobody, over IMAP,
    POP3, SMTP AUTH and RCPT, even with a real user's password; the server keeps serving.
    """
    server = make_server(config(slapd)).start()
    password = ldapserver.PASSWORDS["alice"]
    # (each failure from 127.0.0.1 doubles the wait for the next answer: a few cover it)
    for login in ("*)(|(uid=*", "alice\\2a"):
        imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
        with pytest.raises(imaplib.IMAP4.error) as e:
            imap.login(login, password)
        assert "AUTHENTICATIONFAILED" in str(e.value) or "BAD" in str(e.value), (login, e.value)
        imap.shutdown()
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls())
    pop.user("*")
    with pytest.raises(poplib.error_proto) as e:
        pop.pass_(password)
    assert e.value.args[0].startswith(b"-ERR [AUTH]")
    pop.quit()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("al*", password)
        assert e.value.smtp_code == 535
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.partner.example")
        s.mail("someone@partner.example")
        for address in ("*@example.com", "alice*@example.com", "al(ice@example.com", "staff)(mail=*@example.com"):
            code, _ = s.rcpt(address)
            assert code in (550, 553, 501), (address, code)
        s.rset()
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("alice", password)
    imap.logout()


def test_a_stopped_directory_is_temporary_and_pymaild_recovers(make_server, slapd):
    server = make_server(config(slapd)).start()
    slapd.stop()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.partner.example")
        s.mail("someone@partner.example")
        code, text = s.rcpt("bob@example.com")
        assert (code, text[:5]) == (451, b"4.4.3")
        s.rset()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("bob", ldapserver.PASSWORDS["bob"])
        assert e.value.smtp_code == 454
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    with pytest.raises(imaplib.IMAP4.error) as e:
        imap.login("bob", ldapserver.PASSWORDS["bob"])
    assert "UNAVAILABLE" in str(e.value)
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=server.tls())
    pop.user("bob")
    with pytest.raises(poplib.error_proto) as e:
        pop.pass_(ldapserver.PASSWORDS["bob"])
    assert e.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    pop.quit()
    assert not list((server.data_dir / "queue" / "messages").iterdir())  # (nothing bounced)
    slapd.start()
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("bob", ldapserver.PASSWORDS["bob"])
    imap.logout()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.partner.example")
        s.sendmail("someone@partner.example", ["bob@example.com"], b"Subject: back\r\n\r\nhi\r\n")
    wait_for(lambda: inbox(server, "bob@example.com"), what="delivery after recovery")


def test_quota_from_the_directory(make_server, slapd):
    """[ldap] quota_attribute: bob's 2K quota refuses a larger message and shows in IMAP QUOTA."""
    import ldap3

    admin = ldap3.Connection(slapd.url, ldapserver.ROOT_DN, ldapserver.ROOT_PASSWORD, auto_bind=True)
    admin.modify(ldapserver.userDn("bob"), {"roomNumber": [(ldap3.MODIFY_REPLACE, ["2K"])]})
    admin.unbind()
    server = make_server(config(slapd) + 'quota_attribute = "roomNumber"\n').start()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("mx.partner.example")
        s.sendmail("someone@partner.example", ["bob@example.com"], b"Subject: small\r\n\r\nhi\r\n")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("someone@partner.example", ["bob@example.com"], b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 60)
        assert e.value.smtp_code == 452 and b"4.2.2" in e.value.smtp_error
    assert len(inbox(server, "bob@example.com")) == 1
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("bob", ldapserver.PASSWORDS["bob"])
    typ, data = imap.getquotaroot("INBOX")
    assert typ == "OK" and b"STORAGE" in data[1][0] and b" 2)" in data[1][0], data
    imap.logout()


def test_mailboxes_follow_the_entry_not_the_address(make_server, slapd):
    """
    [ldap] mailbox_attribute (entryUUID by default): alice's uid renamed and her primary address
    changed, she logs in under the new name and finds her mail, and mail to the new address
    joins it; bob leaves and a new person gets bob@, who starts with an empty mailbox.
    """
    import ldap3

    server = make_server(config(slapd)).start()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@partner.example", ["alice@example.com", "bob@example.com"], b"Subject: before\r\n\r\nhi\r\n")
    admin = ldap3.Connection(slapd.url, ldapserver.ROOT_DN, ldapserver.ROOT_PASSWORD, auto_bind=True)
    assert admin.modify_dn(ldapserver.userDn("alice"), "uid=alison")
    assert admin.modify(ldapserver.userDn("alison"), {"mail": [(ldap3.MODIFY_REPLACE, ["alison.smith@example.com"])]})
    assert admin.delete(ldapserver.userDn("bob"))
    assert admin.add(ldapserver.userDn("robert"), ["inetOrgPerson"], {
        "cn": "Robert New", "sn": "New", "uid": "robert", "mail": "bob@example.com", "userPassword": "robert-password"})
    admin.unbind()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.sendmail("someone@partner.example", ["alison.smith@example.com", "bob@example.com"], b"Subject: after\r\n\r\nhi\r\n")

    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("alison", ldapserver.PASSWORDS["alice"])
    assert imap.select("INBOX")[1] == [b"2"]
    imap.logout()
    assert len(inbox(server, "alice@example.com")) == 2
    assert not (server.data_dir / "mail" / "example.com" / "alison.smith").exists()

    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls())
    imap.login("robert", "robert-password")
    assert imap.select("INBOX")[1] == [b"1"]
    typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"after" in data[0][1]
    imap.logout()
    assert len(inbox(server, "bob@example.com")) == 1  # (the old bob's mail, untouched and not handed over)
    fresh = [p.name for p in (server.data_dir / "mail" / "example.com").iterdir() if p.name.startswith("bob~")]
    assert len(fresh) == 1
