"""
Smoke tests for the throwaway OpenLDAP server of C{tests/ldapserver.py} and its corporate
fixture, checked with ldap3 as pymaild will use it: the service account's searches, user binds,
the ACLs, LDAPS and StartTLS with the self-signed certificate, and a restart that keeps the
ports and the data.  Skipped when Debian's slapd and ldap-utils are not installed.
"""

from __future__ import annotations

import ssl

import pytest

from ldapserver import (
    ACTIVE_USER_FILTER,
    BASE_DN,
    CONTACTS_DN,
    GROUPS_DN,
    PASSWORDS,
    PEOPLE_DN,
    Slapd,
    twoServers,
    groupDn,
    slapd_available,
    userDn,
)

ldap3 = pytest.importorskip("ldap3")
from ldap3 import BASE, NONE, SAFE_SYNC, SUBTREE, Connection, Server, Tls  # noqa: E402
from ldap3.core.exceptions import LDAPCommunicationError, LDAPSocketOpenError  # noqa: E402
from ldap3.utils.conv import escape_filter_chars  # noqa: E402

pytestmark = pytest.mark.skipif(not slapd_available(), reason="slapd and ldap-utils are not installed")


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    yield server
    server.close()


def connect(url: str, user: str | None = None, password: str | None = None, tls: Tls | None = None, **kw):
    server = Server(url, get_info=NONE, connect_timeout=5, tls=tls)
    return Connection(
        server, user=user, password=password, client_strategy=SAFE_SYNC, receive_timeout=5, **kw
    )


def service(slapd: Slapd) -> Connection:
    conn = connect(slapd.url, slapd.serviceDn, slapd.servicePassword)
    status, result, _, _ = conn.bind()
    assert status, result
    return conn


def search(conn: Connection, base: str, filt: str, attrs=("*",), scope=SUBTREE):
    status, result, entries, _ = conn.search(base, filt, search_scope=scope, attributes=list(attrs))
    return [e for e in entries if e["type"] == "searchResEntry"], result


def verifying_tls(slapd: Slapd) -> Tls:
    return Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(slapd.certPath))


def test_service_finds_users_by_mail_and_mailLocalAddress(slapd):
    conn = service(slapd)
    try:
        for address in ("alice@example.com", "a.smith@example.com", "SALES-LEAD@example.com"):
            filt = f"(&(objectClass=inetOrgPerson)(|(mail={escape_filter_chars(address)})(mailLocalAddress={escape_filter_chars(address)})))"
            entries, _ = search(conn, PEOPLE_DN, filt, ("uid", "mail", "mailLocalAddress", "userPassword"))
            assert [e["dn"] for e in entries] == [userDn("alice")], address
            attrs = entries[0]["attributes"]
            assert attrs["uid"] == ["alice"]
            assert attrs["mail"] == ["alice@example.com"]
            assert sorted(attrs["mailLocalAddress"]) == ["a.smith@example.com", "sales-lead@example.com"]
            assert "userPassword" not in attrs or attrs["userPassword"] == []
        entries, _ = search(conn, PEOPLE_DN, "(mailLocalAddress=dave@example.org)", ("uid",))
        assert [e["dn"] for e in entries] == [userDn("dave")]
        # An injection attempt through an escaped login matches nothing.
        entries, _ = search(conn, PEOPLE_DN, f"(uid={escape_filter_chars('*)(uid=*')})", ("uid",))
        assert entries == []
    finally:
        conn.unbind()


def test_users_bind_with_their_passwords(slapd):
    for uid, password in PASSWORDS.items():
        conn = connect(slapd.url, userDn(uid), password)
        status, result, _, _ = conn.bind()
        assert status, (uid, result)
        # A user reads their own entry (a base search on their DN), nobody else's; a subtree
        # search from ou=people finds nothing, not even them (no access to ou=people itself).
        own, _ = search(conn, userDn(uid), "(objectClass=*)", ("mail",), scope=BASE)
        assert len(own) == 1 and own[0]["attributes"]["mail"] == [f"{uid}@example.com"]
        other = "bob" if uid != "bob" else "alice"
        assert search(conn, userDn(other), "(objectClass=*)", ("mail",), scope=BASE)[0] == []
        assert search(conn, PEOPLE_DN, "(uid=*)", ("uid",))[0] == []
        conn.unbind()
    conn = connect(slapd.url, userDn("alice"), "wrong")
    status, result, _, _ = conn.bind()
    assert not status and result["description"] == "invalidCredentials"


def test_carol_is_disabled_by_employeeType(slapd):
    conn = service(slapd)
    try:
        entries, _ = search(conn, PEOPLE_DN, "(uid=carol)", ("employeeType",))
        assert entries[0]["attributes"]["employeeType"] == ["disabled"]
        active, _ = search(conn, PEOPLE_DN, f"(&(objectClass=inetOrgPerson){ACTIVE_USER_FILTER})", ("uid",))
        assert sorted(e["attributes"]["uid"][0] for e in active) == ["alice", "bob", "dave"]
    finally:
        conn.unbind()


def test_anonymous_search_finds_nothing(slapd):
    conn = connect(slapd.url)
    status, _, _, _ = conn.bind()
    assert status
    entries, _ = search(conn, BASE_DN, "(objectClass=*)")
    assert entries == []
    entries, _ = search(conn, PEOPLE_DN, "(uid=alice)", ("userPassword",))
    assert entries == []
    conn.unbind()


def test_service_cannot_read_passwords(slapd):
    conn = service(slapd)
    try:
        entries, _ = search(conn, PEOPLE_DN, "(uid=alice)", ("userPassword",))
        assert entries and entries[0]["attributes"].get("userPassword", []) == []
        entries, _ = search(conn, PEOPLE_DN, "(userPassword=*)", ("uid",))
        assert entries == []
    finally:
        conn.unbind()


def test_ldaps_with_the_certificate_as_ca(slapd):
    conn = connect(slapd.ldapsUrl, userDn("bob"), PASSWORDS["bob"], tls=verifying_tls(slapd))
    status, result, _, _ = conn.bind()
    assert status, result
    assert conn.server.ssl
    conn.unbind()


def test_ldaps_refuses_an_untrusted_certificate(slapd):
    conn = connect(slapd.ldapsUrl, tls=Tls(validate=ssl.CERT_REQUIRED))  # system CAs only
    with pytest.raises(LDAPSocketOpenError):
        conn.bind()


def test_starttls(slapd):
    conn = connect(slapd.url, userDn("dave"), PASSWORDS["dave"], tls=verifying_tls(slapd))
    conn.open()
    assert conn.start_tls()
    status, result, _, _ = conn.bind()
    assert status, result
    assert conn.tls_started
    conn.unbind()


def test_groups_resolve(slapd):
    conn = service(slapd)
    try:
        groups, _ = search(conn, GROUPS_DN, "(objectClass=groupOfNames)", ("cn", "mail", "member"))
        byCn = {g["attributes"]["cn"][0]: g["attributes"] for g in groups}
        assert {cn: a["mail"] for cn, a in byCn.items()} == {
            "all-staff": ["staff@example.com"],
            "engineering": ["eng@example.com"],
            "loop-a": ["loop@example.com"],
            "loop-b": ["loop-b@example.com"],
        }
        assert sorted(byCn["all-staff"]["member"]) == sorted(
            [userDn("alice"), userDn("bob"), groupDn("engineering")]
        )
        assert groupDn("loop-a") in byCn["loop-b"]["member"]
        assert groupDn("loop-b") in byCn["loop-a"]["member"]
        partner = f"cn=Partner Contact,{CONTACTS_DN}"
        assert partner in byCn["engineering"]["member"]
        # Every member DN is an entry the service account can read.
        for attrs in byCn.values():
            for member in attrs["member"]:
                found, _ = search(conn, member, "(objectClass=*)", ("mail",), scope=BASE)
                assert len(found) == 1 and found[0]["attributes"]["mail"], member
        # Which groups is dave in (the reverse lookup a membership check does)?
        found, _ = search(conn, GROUPS_DN, f"(member={escape_filter_chars(userDn('dave'))})", ("cn",))
        assert [e["attributes"]["cn"][0] for e in found] == ["engineering"]
    finally:
        conn.unbind()


def test_restart_keeps_ports_and_data(slapd):
    url, ldapsUrl = slapd.url, slapd.ldapsUrl
    conn = service(slapd)
    slapd.stop()
    assert not slapd.running
    with pytest.raises(LDAPCommunicationError):  # the old connection is dead for good
        conn.search(PEOPLE_DN, "(uid=alice)", attributes=["mail"])
    slapd.start()
    assert (slapd.url, slapd.ldapsUrl) == (url, ldapsUrl)
    conn = service(slapd)
    entries, _ = search(conn, PEOPLE_DN, "(uid=alice)", ("mail",))
    assert entries[0]["attributes"]["mail"] == ["alice@example.com"]
    conn.unbind()
    # An abrupt outage: SIGKILL, then the same again.
    slapd.kill()
    with pytest.raises(LDAPSocketOpenError):
        connect(slapd.url).open()
    slapd.start()
    conn = connect(slapd.url, userDn("alice"), PASSWORDS["alice"])
    assert conn.bind()[0]
    conn.unbind()
    assert not connect(slapd.url, userDn("alice"), "wrong").bind()[0]



def test_two_servers_for_failover(tmp_path):
    primary, secondary = twoServers(tmp_path)
    try:
        assert primary.url != secondary.url
        assert primary.certPath == secondary.certPath
        primary.kill()
        conn = connect(secondary.ldapsUrl, userDn("alice"), PASSWORDS["alice"], tls=verifying_tls(primary))
        assert conn.bind()[0]
        conn.unbind()
    finally:
        primary.close()
        secondary.close()
