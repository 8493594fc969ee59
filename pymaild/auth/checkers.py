# -*- test-case-name: tests.auth.test_checkers -*-
"""
Password checking for the portal: L{PasswdFileChecker} checks user names and passwords against
the passwd-file.

Interfaces implemented: C{twisted.cred.checkers.ICredentialsChecker} for C{IUsernamePassword}.

Implementation summary: the login is normalised on the reactor thread (lower case; a login
without C{@} gets the default domain); the lookup and the hash check run together in the
thread pool the checker is given (a hash check costs tens of milliseconds of CPU and an
Argon2 check 64 MiB of memory), and the Deferred fires with the canonical user name.

Security: an unknown user costs one check against a fixed Argon2id hash, like a known one, so
the time an answer takes does not tell which users exist.  An empty password is refused at
once: it is never a valid password, and refusing it costs nothing.  Each refused attempt is
logged at debug level with C{user} and C{result} (C{bad-password}, C{unknown-user},
C{empty-password}, C{unknown-scheme}, C{bad-login}, C{temporary-failure}); the protocol layer
logs every attempt, good ones too, with the peer's address.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pymaild.auth import passwords
from pymaild.auth.passwdfile import PasswdFile, canonical_user
from pymaild.errors import TemporaryFailure

log = Logger()

#: What an unknown user's password is checked against: C{hash_password} of a password nobody
#: knows, with the same Argon2id parameters as real hashes (a test checks that they agree).
DUMMY_HASH = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$b4j/wr0MRuOORXQEHZb+vA$"
    "WGhLWCyynCkgpbFzIBSIANJms7VVaxWgMzrsTk1zxb8"
)


def _text(value: str | bytes) -> str:
    """
    @raise UnicodeDecodeError: for bytes that are not UTF-8.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


@implementer(ICredentialsChecker)
class PasswdFileChecker:
    """
    Check C{IUsernamePassword} credentials against a L{PasswdFile}.

    @ivar passwdFile: the accounts.
    @ivar defaultDomain: the domain of a login without C{@}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwdFile: PasswdFile, defaultDomain: str, threadpool, reactor) -> None:
        """
        @param threadpool: a started, bounded C{twisted.python.threadpool.ThreadPool} in which
            the file is read and hashes are checked.
        @param reactor: the reactor the results are delivered in.
        """
        self.passwdFile = passwdFile
        self.defaultDomain = defaultDomain
        self._threadpool = threadpool
        self._reactor = reactor

    def normalizeLogin(self, login: str | bytes) -> str:
        """
        The account name a login names.

        @param login: what the client sent, C{local@domain} or a bare C{local}.
        @return: the canonical user name (lower case; the default domain added when there is
            no C{@}).
        @raise ValueError: if the login cannot be a user name.
        """
        try:
            login = _text(login)
        except UnicodeDecodeError:
            raise ValueError("login is not UTF-8") from None
        login = login.lower()
        if "@" not in login:
            login = f"{login}@{self.defaultDomain}"
        return canonical_user(login)

    def requestAvatarId(self, credentials) -> defer.Deferred:
        """
        @return: a Deferred firing with the canonical user name (C{str}), or failing with
            C{UnauthorizedLogin} (unknown user, wrong or empty password, unsupported scheme) or
            L{TemporaryFailure} (the passwd-file cannot be read).
        """
        try:
            user = self.normalizeLogin(credentials.username)
        except ValueError as e:
            self._logAttempt(repr(credentials.username), "bad-login", reason=str(e))
            return defer.fail(UnauthorizedLogin())
        try:
            password = _text(credentials.password)
        except UnicodeDecodeError:
            # No stored password can match bytes that are not UTF-8; check the user anyway.
            password = None
        if password == "":
            self._logAttempt(user, "empty-password")
            return defer.fail(UnauthorizedLogin())
        d = deferToThreadPool(self._reactor, self._threadpool, self._check, user, password)
        d.addCallbacks(self._checked, self._failed, callbackArgs=(user,), errbackArgs=(user,))
        return d

    def _check(self, user: str, password: str | None) -> str:
        """
        Look the user up and check the password.  Runs in the thread pool.

        @param password: C{None} for a password that cannot match (not UTF-8).
        @return: the result to log: C{ok}, C{bad-password}, C{unknown-user} or C{unknown-scheme}.
        @raise OSError: if the passwd-file cannot be read.
        """
        entry = self.passwdFile.get(user)
        candidate = "\0never matches" if password is None else password
        if entry is None:
            passwords.verify(DUMMY_HASH, candidate)
            return "unknown-user"
        try:
            matches = passwords.verify(entry.password, candidate)
        except passwords.UnknownScheme as e:
            log.warn(
                "cannot check the password of {user}: {problem} in {path}",
                user=user,
                problem=str(e),
                scheme=entry.password.partition("}")[0].lstrip("{") if entry.password.startswith("{") else "CRYPT",
                path=str(self.passwdFile.path),
            )
            passwords.verify(DUMMY_HASH, candidate)
            return "unknown-scheme"
        return "ok" if matches and password is not None else "bad-password"

    def _checked(self, result: str, user: str) -> str:
        self._logAttempt(user, result)
        if result != "ok":
            raise UnauthorizedLogin()
        return user

    def _failed(self, failure, user: str):
        failure.trap(OSError)
        self._logAttempt(user, "temporary-failure", reason=str(failure.value))
        raise TemporaryFailure(cause=failure.value)

    def _logAttempt(self, user: str, result: str, **fields) -> None:
        if result != "ok":  # (a login that succeeds is logged once, by the protocol: "imap login ... ok")
            log.debug("login {user}: {result}", user=user, result=result, **fields)
