"""
Tests for L{pymaild.auth.checkers.PasswdFileChecker}, with a real thread pool and the real
reactor (trial runs it).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.logger import Logger, formatEvent
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pymaild.auth import checkers, passwords
from pymaild.auth.checkers import DUMMY_HASH, PasswdFileChecker
from pymaild.auth.passwdfile import PasswdFile
from pymaild.errors import TemporaryFailure


_carolHash: list[str] = []


def carolHash() -> str:
    """
    An Argon2id hash of carol's password, made once (each costs about 0.1 s).
    """
    if not _carolHash:
        _carolHash.append(passwords.hash_password("pässwörd"))
    return _carolHash[0]


class PasswdFileCheckerTests(unittest.TestCase):
    """
    Logins against a passwd-file with C{{PLAIN}} entries (fast), one Argon2id entry, and one
    with a scheme nobody supports.
    """

    def setUp(self):
        # Not self.mktemp(): under pytest that would write below the current directory.
        directory = tempfile.mkdtemp(prefix="pymaild-test-checkers-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = Path(directory) / "passwd"
        self.path.write_text(
            "bob@example.com:{PLAIN}secret\n"
            "carol@example.org:" + carolHash() + "\n"
            "odd@example.com:{NOPE}abc\n"
        )
        self.threadpool = ThreadPool(1, 2, name="test-checkers")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)
        self.checker = PasswdFileChecker(PasswdFile(self.path), "example.com", self.threadpool, reactor)
        self.events: list[dict] = []
        self.patch(checkers, "log", Logger(observer=self.events.append))
        self.verified: list[tuple[str, str, threading.Thread]] = []
        realVerify = passwords.verify

        def recordingVerify(stored, password):
            self.verified.append((stored, password, threading.current_thread()))
            return realVerify(stored, password)

        self.patch(passwords, "verify", recordingVerify)

    def login(self, username, password) -> defer.Deferred:
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def results(self) -> list[tuple[str, str]]:
        return [(e["user"], e["result"]) for e in self.events if "result" in e]

    @defer.inlineCallbacks
    def test_good_password(self):
        """
        The right password gives the canonical user name as str, for str or bytes
        credentials and any case of the login; the check runs in the thread pool.  The checker
        logs nothing for it (the protocol logs the login once: "imap login ... ok").
        """
        for username, password in [
            ("bob@example.com", "secret"),
            (b"BOB@Example.COM", b"secret"),
            ("carol@example.org", "pässwörd"),
            (b"carol@example.org", "pässwörd".encode()),
        ]:
            user = yield self.login(username, password)
            self.assertEqual(user, username.lower() if isinstance(username, str) else username.decode().lower())
            self.assertIsInstance(user, str)
        self.assertEqual(self.results(), [])
        self.assertTrue(all(thread is not threading.main_thread() for _, _, thread in self.verified))

    @defer.inlineCallbacks
    def test_login_without_domain(self):
        """
        A login without '@' is a user of the default domain.
        """
        user = yield self.login(b"Bob", b"secret")
        self.assertEqual(user, "bob@example.com")
        yield self.assertFailure(self.login(b"carol", "pässwörd".encode()), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """
        A wrong password fails with UnauthorizedLogin and is logged as bad-password.
        """
        yield self.assertFailure(self.login(b"bob@example.com", b"Secret"), UnauthorizedLogin)
        yield self.assertFailure(self.login(b"carol@example.org", b"passwoerd"), UnauthorizedLogin)
        self.assertEqual(
            self.results(), [("bob@example.com", "bad-password"), ("carol@example.org", "bad-password")]
        )

    @defer.inlineCallbacks
    def test_unknown_user_costs_a_hash(self):
        """
        An unknown user fails like a wrong password, after one check against the fixed Argon2id
        hash, so the time taken does not tell that the user does not exist.
        """
        yield self.assertFailure(self.login(b"nobody@example.com", b"secret"), UnauthorizedLogin)
        self.assertEqual([stored for stored, _, _ in self.verified], [DUMMY_HASH])
        self.assertEqual(self.results(), [("nobody@example.com", "unknown-user")])

    def test_empty_password(self):
        """
        An empty password is refused at once, without a thread or any hash work.
        """
        for username in (b"bob@example.com", b"nobody@example.com"):
            self.failureResultOf(self.login(username, b""), UnauthorizedLogin)
        self.assertEqual(self.verified, [])
        self.assertEqual(
            self.results(), [("bob@example.com", "empty-password"), ("nobody@example.com", "empty-password")]
        )

    def test_bad_login(self):
        """
        A login that cannot be a user name (not UTF-8, ':' or white space, two '@') is refused
        at once.
        """
        for username in (b"\xff@example.com", b"bob:x@example.com", b"bob smith", b"a@b@example.com"):
            self.failureResultOf(self.login(username, b"secret"), UnauthorizedLogin)
        self.assertEqual(self.verified, [])
        self.assertEqual([result for _, result in self.results()], ["bad-login"] * 4)

    @defer.inlineCallbacks
    def test_password_not_utf8(self):
        """
        A password that is not UTF-8 cannot match, and is no error.
        """
        yield self.assertFailure(self.login(b"bob@example.com", b"secret\xff"), UnauthorizedLogin)
        self.assertEqual(self.results(), [("bob@example.com", "bad-password")])

    @defer.inlineCallbacks
    def test_unknown_scheme(self):
        """
        A stored password in an unsupported scheme is a failed login, and a warning naming the
        user and the scheme.
        """
        yield self.assertFailure(self.login(b"odd@example.com", b"abc"), UnauthorizedLogin)
        warnings = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["user"], warnings[0]["scheme"]), ("odd@example.com", "NOPE"))
        self.assertIn("NOPE", formatEvent(warnings[0]))
        self.assertEqual(self.results(), [("odd@example.com", "unknown-scheme")])

    @defer.inlineCallbacks
    def test_unreadable_file_is_temporary(self):
        """
        A passwd-file that cannot be read fails the login with TemporaryFailure, not as a
        wrong password.
        """
        self.path.unlink()
        self.path.mkdir()
        checker = PasswdFileChecker(PasswdFile(self.path), "example.com", self.threadpool, reactor)
        failure = yield self.assertFailure(
            checker.requestAvatarId(UsernamePassword(b"bob@example.com", b"secret")), TemporaryFailure
        )
        self.assertIsInstance(failure.cause, OSError)
        self.assertEqual(failure.code, 451)

    @defer.inlineCallbacks
    def test_sees_new_users(self):
        """
        A user added to the file after the checker was made can log in (no restart).
        """
        yield self.assertFailure(self.login(b"dave@example.com", b"d"), UnauthorizedLogin)
        PasswdFile(self.path).add("dave@example.com", "{PLAIN}d")
        user = yield self.login(b"dave@example.com", b"d")
        self.assertEqual(user, "dave@example.com")

    def test_events_are_debug(self):
        """
        The per-attempt event is at debug level (the protocol layer logs it with the peer).
        """
        self.failureResultOf(self.login(b"bob@example.com", b""), UnauthorizedLogin)
        self.assertEqual([e["log_level"].name for e in self.events], ["debug"])

    def test_interface(self):
        """
        The checker provides ICredentialsChecker for IUsernamePassword.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        from twisted.cred.credentials import IUsernamePassword

        self.assertEqual(tuple(self.checker.credentialInterfaces), (IUsernamePassword,))


class DummyHashTests(unittest.SynchronousTestCase):
    """
    The hash an unknown user is checked against.
    """

    def test_same_parameters_as_real_hashes(self):
        """
        The dummy hash is an Argon2id hash with the parameters hash_password uses now, so that
        checking it takes as long as checking a real one.
        """
        parameters = re.compile(r"^\{ARGON2ID\}\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$")
        self.assertEqual(
            parameters.match(DUMMY_HASH).group(), parameters.match(passwords.hash_password("x")).group()
        )
        self.assertFalse(passwords.needs_rehash(DUMMY_HASH))
        self.assertFalse(passwords.verify(DUMMY_HASH, "x"))
