"""
The LDAP checker and directory against a real OpenLDAP slapd (tests/ldapserver.py) with a
corporate fixture: logins (uid, address, wrong and empty passwords, a disabled account, filter
injection), address and group lookups (aliases, nested groups, an external contact, a loop),
a server stopped and started again (temporary failures, then recovery without a restart),
failover to a second server, LDAPS and StartTLS.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from pymaild.auth.ldap import LdapChecker, LdapClient, LdapDirectory, LdapSettings
from pymaild.errors import TemporaryFailure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ldapserver  # noqa: E402

if not ldapserver.slapd_available():
    raise unittest.SkipTest("slapd is not installed (scripts/test installs it)")


settings = ldapserver.checkerSettings


class _LdapCase(unittest.TestCase):
    servers = 1

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="pymaild-ldap-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        if self.servers == 2:
            self.slapd, self.slapd2 = ldapserver.twoServers(self.tmp)
            self.addCleanup(self.slapd2.close)
        else:
            self.slapd = ldapserver.Slapd(self.tmp / "slapd")
            self.slapd.start()
        self.addCleanup(self.slapd.close)
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="test-ldap")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.use(settings(self.slapd.url))

    def use(self, s: LdapSettings) -> None:
        self.client = LdapClient(s)
        self.checker = LdapChecker(self.client, self.pool, reactor)
        self.directory = LdapDirectory(self.client, self.pool, reactor, ["example.com", "example.org"])

    def login(self, user, password):
        return self.checker.requestAvatarId(UsernamePassword(user, password))


class LoginCase(_LdapCase):
    @defer.inlineCallbacks
    def test_logins_by_uid_and_by_address_give_the_primary_address(self):
        self.assertEqual((yield self.login(b"alice", ldapserver.PASSWORDS["alice"].encode())), "alice@example.com")
        self.assertEqual((yield self.login(b"Alice@Example.com", ldapserver.PASSWORDS["alice"].encode())),
                         "alice@example.com")
        # (the default user_filter matches uid and mail; a site may add any address attribute)
        yield self.assertFailure(self.login(b"a.smith@example.com", ldapserver.PASSWORDS["alice"].encode()),
                                 UnauthorizedLogin)
        self.use(settings(self.slapd.url, user_filter="(&(objectClass=inetOrgPerson)"
                                                      "(|(uid={login})(mail={login})(mailLocalAddress={login})))"))
        self.assertEqual((yield self.login(b"a.smith@example.com", ldapserver.PASSWORDS["alice"].encode())),
                         "alice@example.com")
        self.assertEqual((yield self.login("dave", ldapserver.PASSWORDS["dave"])), "dave@example.com")

    @defer.inlineCallbacks
    def test_refusals(self):
        for user, password in [(b"alice", b"wrong"), (b"alice", b""), (b"nobody", b"x"),
                               (b"carol", ldapserver.PASSWORDS["carol"].encode()),  # disabled
                               (b"*", b"x"), (b"*)(uid=*", b"x"), (b"al*", ldapserver.PASSWORDS["alice"].encode()),
                               (b"alice)(|(uid=*", ldapserver.PASSWORDS["alice"].encode()), (b"alice\\2a", b"x"),
                               (b"\x00alice", ldapserver.PASSWORDS["alice"].encode())]:
            with self.subTest(user=user):
                yield self.assertFailure(self.login(user, password), UnauthorizedLogin)


class LookupCase(_LdapCase):
    @defer.inlineCallbacks
    def test_users_aliases_and_tags(self):
        for address, user in [("alice@example.com", "alice@example.com"), ("A.Smith@Example.COM", "alice@example.com"),
                              ("sales-lead@example.com", "alice@example.com"), ("alice+news@example.com", "alice@example.com"),
                              ("dave@example.org", "dave@example.com")]:
            r = yield self.directory.lookup(address)
            self.assertEqual((r.kind, r.users), ("user", frozenset([user])), address)
        for address in ["carol@example.com", "nobody@example.com", "*@example.com", "alice@elsewhere.example"]:
            r = yield self.directory.lookup(address)
            self.assertEqual(r.kind, "none", address)

    @defer.inlineCallbacks
    def test_nested_groups_external_members_and_loops(self):
        r = yield self.directory.lookup("staff@example.com")
        self.assertEqual(r.kind, "group")
        self.assertEqual(r.users, frozenset({"alice@example.com", "bob@example.com", "dave@example.com"}))
        self.assertEqual(r.remote, frozenset({"partner@partner.example"}))
        r = yield self.directory.lookup("loop@example.com")
        self.assertEqual(r.users, frozenset({"alice@example.com", "bob@example.com"}))

    @defer.inlineCallbacks
    def test_addresses_of_a_user(self):
        addresses = yield self.directory.addressesOf("alice@example.com")
        self.assertEqual(addresses, frozenset({"alice@example.com", "a.smith@example.com", "sales-lead@example.com"}))


class OutageCase(_LdapCase):
    @defer.inlineCallbacks
    def test_a_stopped_directory_is_a_temporary_failure_then_recovers(self):
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")
        self.slapd.stop()
        yield self.assertFailure(self.login(b"bob", ldapserver.PASSWORDS["bob"].encode()), TemporaryFailure)
        yield self.assertFailure(self.directory.lookup("bob@example.com"), TemporaryFailure)
        self.slapd.start()
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")
        r = yield self.directory.lookup("bob@example.com")
        self.assertEqual(r.kind, "user")

    @defer.inlineCallbacks
    def test_a_wrong_service_password_is_temporary_not_unknown_user(self):
        self.use(settings(self.slapd.url, bind_password="wrong"))
        yield self.assertFailure(self.login(b"bob", ldapserver.PASSWORDS["bob"].encode()), TemporaryFailure)
        yield self.assertFailure(self.directory.lookup("bob@example.com"), TemporaryFailure)


class FailoverCase(_LdapCase):
    servers = 2

    @defer.inlineCallbacks
    def test_the_second_server_answers_when_the_first_is_down(self):
        self.use(settings(self.slapd.url, self.slapd2.url))
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")
        self.slapd.stop()
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")
        r = yield self.directory.lookup("eng@example.com")
        self.assertEqual(r.users, frozenset({"dave@example.com"}))


class TLSCase(_LdapCase):
    @defer.inlineCallbacks
    def test_ldaps_and_starttls(self):
        for s in (settings(self.slapd.ldapsUrl, ca_file=str(self.slapd.certPath)),
                  settings(self.slapd.url, start_tls=True, ca_file=str(self.slapd.certPath))):
            self.use(s)
            self.assertEqual((yield self.login(b"alice", ldapserver.PASSWORDS["alice"].encode())), "alice@example.com")

    @defer.inlineCallbacks
    def test_an_untrusted_certificate_is_a_temporary_failure(self):
        self.use(settings(self.slapd.ldapsUrl))  # (the system's CAs do not know the test certificate)
        yield self.assertFailure(self.login(b"alice", ldapserver.PASSWORDS["alice"].encode()), TemporaryFailure)


class TemplateAndBalanceCase(_LdapCase):
    servers = 2

    @defer.inlineCallbacks
    def test_bind_dn_template(self):
        self.use(settings(self.slapd.url, bind_dn_template=f"uid={{login}},{ldapserver.PEOPLE_DN}"))
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")
        for user in (b"carol", b"bob,ou=people", b"*", b"nobody"):
            yield self.assertFailure(self.login(user, ldapserver.PASSWORDS["carol"].encode()), UnauthorizedLogin)

    def test_round_robin_starts_each_connection_at_the_next_server(self):
        client = LdapClient(settings(self.slapd.url, self.slapd2.url, balance="round-robin"))
        firsts = [str(client._servers()[0]) for _ in range(4)]
        self.assertEqual(len(set(firsts)), 2)
        self.assertNotEqual(firsts[0], firsts[1])


class HungDirectoryCase(_LdapCase):
    @defer.inlineCallbacks
    def test_a_hung_directory_does_not_stall_the_reactor(self):
        """
        slapd stopped with SIGSTOP (connections accepted, nothing answered): 20 logins at once
        fail temporarily (the first ones after the timeout, the rest at once: the client stops
        waiting on a directory that just timed out), and meanwhile the reactor keeps turning
        (its worst lateness is measured with a 10 ms LoopingCall).  When slapd answers again,
        logins work after the pause.
        """
        import os
        import signal
        import time

        from twisted.internet import task

        self.use(settings(self.slapd.url, timeout=1.0))
        yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())  # (connections open)
        os.kill(self.slapd.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(self.slapd.process.pid, signal.SIGCONT))
        late = []
        last = [time.monotonic()]

        def tick():
            now = time.monotonic()
            late.append(now - last[0] - 0.01)
            last[0] = now

        loop = task.LoopingCall(tick)
        loop.start(0.01)
        results = yield defer.DeferredList([self.login(b"bob", ldapserver.PASSWORDS["bob"].encode()) for _ in range(20)],
                                           consumeErrors=True)
        loop.stop()
        self.assertTrue(all(not ok and f.check(TemporaryFailure) for ok, f in results))
        self.assertLess(max(late), 0.5, f"the reactor stalled {max(late):.3f} s")
        os.kill(self.slapd.process.pid, signal.SIGCONT)
        self.client._downUntil = 0  # (the pause over)
        self.assertEqual((yield self.login(b"bob", ldapserver.PASSWORDS["bob"].encode())), "bob@example.com")


class QuotaCase(_LdapCase):
    @defer.inlineCallbacks
    def test_quota_attribute_reaches_the_store(self):
        """A user's quota attribute (bytes, or with K/M/G) is handed to the store as entries are read."""
        import ldap3

        admin = ldap3.Connection(self.slapd.url, ldapserver.ROOT_DN, ldapserver.ROOT_PASSWORD, auto_bind=True)
        admin.modify(ldapserver.userDn("bob"), {"roomNumber": [(ldap3.MODIFY_REPLACE, ["2K"])]})
        admin.unbind()
        self.use(settings(self.slapd.url, quota_attribute="roomNumber"))
        seen = []
        self.directory.lookups.quotaSink = self.checker.lookups.quotaSink = lambda user, q: seen.append((user, q))
        yield self.directory.lookup("bob@example.com")
        yield self.login(b"alice", ldapserver.PASSWORDS["alice"].encode())
        yield self.directory.lookup("staff@example.com")
        self.assertIn(("bob@example.com", 2048), seen)
        self.assertIn(("alice@example.com", None), seen)

    def test_the_store_takes_a_per_user_limit(self):
        from pymaild.store.maildir import MaildirStore
        from pymaild.store.quota import QuotaExceeded

        store = MaildirStore(self.tmp / "mail", storageLimit=0)
        user = store.user("bob@example.com")
        user.quota.check(10_000)  # (no limit)
        store.setStorageLimit("bob@example.com", 1000)
        self.assertRaises(QuotaExceeded, user.quota.check, 10_000)
        store.setStorageLimit("bob@example.com", None)
        user.quota.check(10_000)
        store.setStorageLimit("carl@example.com", 500)
        self.assertEqual(store.user("carl@example.com").quota.storageLimit, 500)


def test_active_directory_proxy_addresses_and_filters():
    """AD's proxyAddresses: SMTP: is the primary address, smtp: the others, X500: etc. ignored."""
    from pymaild.auth.ldap import _Lookups

    lookups = _Lookups(LdapClient(settings("ldap://127.0.0.1:1", address_attributes=("proxyAddresses", "mail"))))
    entry = {"proxyAddresses": ["smtp:old@corp.example.com", "X500:/o=Corp/cn=alice", "SMTP:Alice@Corp.example.com"],
             "mail": ["alice@corp.example.com"]}
    assert lookups.addressesOf(entry) == ["alice@corp.example.com", "old@corp.example.com"]
    assert lookups.addressFilter("a*b@corp.example.com") == (
        "(|(proxyAddresses=smtp:a\\2ab@corp.example.com)(mail=a\\2ab@corp.example.com))")


def test_binary_mailbox_keys_are_hex_and_text_keys_are_kept():
    """objectGUID (16 raw bytes) is keyed by its hex form, entryUUID by its text."""
    from pymaild.auth.ldap import _keyText

    guid = bytes.fromhex("4f2e9a1c00ff7b44a1d3e5f600112233")
    assert _keyText(guid) == "x4f2e9a1c00ff7b44a1d3e5f600112233"
    assert _keyText(b"6b1d2a3e-1c2f-103f-8d4e-0b1c2d3e4f50") == "6b1d2a3e-1c2f-103f-8d4e-0b1c2d3e4f50"
    assert _keyText(b"ABCDEFGHIJKLMNOP") != _keyText(b"\x00BCDEFGHIJKLMNOP")


class RefusalCase(unittest.TestCase):
    """
    A server that answers a search with an error (here slapd's adminLimitExceeded for an
    unindexed search of more candidates than the service account's limit) is a temporary
    failure, and the connection is kept: it was not broken, and asking again elsewhere would
    not help.
    """

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="pymaild-ldap-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.slapd = ldapserver.Slapd(self.tmp / "slapd", databaseConfig=(
            f'limits dn.exact="{ldapserver.SERVICE_DN}" size.unchecked=2'))
        self.slapd.start()
        self.addCleanup(self.slapd.close)

    def test_an_admin_limit_is_temporary_and_the_connection_stays(self):
        client = LdapClient(settings(self.slapd.url))
        self.assertEqual(len(client.search("(uid=bob)", ["mail"])), 1)
        connection = client._local.service
        with self.assertRaises(TemporaryFailure) as e:
            client.search("(description=*)", ["mail"])  # (unindexed: every entry a candidate)
        self.assertIn("11", str(e.exception))
        self.assertIs(client._local.service, connection)
        self.assertEqual(len(client.search("(uid=alice)", ["mail"])), 1)
        self.assertIs(client._local.service, connection)
