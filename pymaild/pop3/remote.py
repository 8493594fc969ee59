# -*- test-case-name: tests.pop3.test_pop3_processes -*-
"""
POP3 logins of sessions served by a worker process (C{[pop3] processes}, L{pymaild.handoff}).

A worker checks no password itself: it asks the main process (L{Login}), whose L{Logins} keep
the failed-login throttle, the plugins' login hooks and the set of mailboxes in use for every
POP3 session of the server, in whichever process it runs.  A granted login names the account,
its mailbox key (the lock), where its directory is and its storage limit (both may come from
LDAP, which only the main process asks); the worker opens the mailbox in its own store.  When
the session ends the worker gives the mailbox back (L{Release}); when a worker process ends,
the main process gives back every mailbox its sessions held (L{LoginDesk.workerLost}).

Security: the password crosses the UNIX socket pair between the two processes of the server
and nothing else; a worker that lost the main process refuses logins as a temporary failure.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

from pymaild.pipeline.stages import Session
from pymaild.pop3.server import Refused

log = Logger()


class Login(amp.Command):
    """worker -> main: check this login for a session of the worker's."""

    arguments = [
        (b"user", amp.Unicode()),
        (b"username", amp.String()),
        (b"password", amp.String()),
        (b"session", amp.Unicode()),
        (b"peer", amp.Unicode()),
        (b"peerPort", amp.Integer()),
        (b"localPort", amp.Integer()),
        (b"tls", amp.Boolean()),
    ]
    response = [
        (b"result", amp.Unicode()),
        (b"delay", amp.Float()),
        (b"account", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"place", amp.Unicode()),
        (b"limit", amp.Integer()),
    ]


class Release(amp.Command):
    """worker -> main: the session holding this mailbox is over."""

    arguments = [(b"key", amp.Unicode())]
    requiresAnswer = False


class LoginDesk(amp.CommandLocator):
    """
    The main process's end, one per worker process: answers its L{Login}s with the server's
    L{pymaild.pop3.server.Logins} and remembers the mailboxes its sessions hold.

    @param store: the main process's C{MaildirStore} (where the account's directory is).
    """

    def __init__(self, logins, store):
        super().__init__()
        self.logins, self.store = logins, store
        self.held: set = set()
        self.lost = False  # the worker ended: what its logins still get is given back at once

    @Login.responder
    def login(self, user, username, password, session, peer, peerPort, localPort, tls):
        view = Session(id=session, protocol="pop3", peer=peer, peerPort=peerPort, localPort=localPort, tls=tls)
        d = self.logins.login(view, user, UsernamePassword(username, password))
        d.addCallback(self._granted)
        d.addErrback(self._refused)  # (a refusal, or what _granted raised)
        return d

    def _granted(self, result):
        mbox, logout, key = result
        logout()  # (the worker opens the mailbox in its own store)
        account = mbox.account
        try:
            if self.lost:  # (its check outlived the worker: nobody will give it back)
                raise Refused("tempfail")
            answer = {"result": "ok", "delay": 0.0, "account": account, "key": key,
                      "place": self.store.placeOf(account), "limit": self.store.storageLimitOf(account)}
        except Exception:
            self.logins.release(key)
            raise
        self.held.add(key)
        return answer

    def _refused(self, failure):
        if not failure.check(Refused):
            log.failure("pop3 login for a worker", failure)
            refusal = Refused("error")
        else:
            refusal = failure.value
        return {"result": refusal.result, "delay": refusal.delay, "account": "", "key": "", "place": "", "limit": 0}

    @Release.responder
    def release(self, key):
        if key in self.held:
            self.held.discard(key)
            self.logins.release(key)
        return {}

    def workerLost(self) -> None:
        """The worker process ended: its sessions hold nothing any more (and logins still
        being checked for it will not hold anything either)."""
        self.lost = True
        held, self.held = self.held, set()
        for key in held:
            self.logins.release(key)


class RemoteLogins:
    """
    A worker process's L{pymaild.pop3.server.Logins}: asks the main process.

    @param channel: the AMP connection to the main process (or None until it is made).
    @param store: this process's C{MaildirStore}.
    @param avatar: makes the mailbox of an account: C{avatar(account, None) -> (mailbox, logout)}
        (L{pymaild.pop3.mailbox.pop3Avatar}).
    """

    def __init__(self, store, avatar, channel=None):
        self.store, self.avatar, self.channel = store, avatar, channel

    def login(self, session: Session, name: str, credentials):
        if self.channel is None or not self.channel.transport or self.channel.transport.disconnecting:
            return defer.fail(Refused("tempfail"))
        d = self.channel.callRemote(
            Login, user=name, username=bytes(credentials.username), password=bytes(credentials.password),
            session=session.id, peer=session.peer, peerPort=session.peerPort, localPort=session.localPort,
            tls=bool(session.tls))
        d.addCallbacks(self._answered, self._lost)
        return d

    def _answered(self, answer):
        if answer["result"] != "ok":
            raise Refused(answer["result"], answer["delay"])
        account = answer["account"]
        try:
            self.store.place(account, answer["place"])
            self.store.setStorageLimit(account, answer["limit"])
            mbox, logout = self.avatar(account, None)
        except Exception:  # (the main process holds the mailbox for this session: give it back)
            log.failure("pop3 login {user}: opening the mailbox", user=account)
            self.release(answer["key"])
            raise Refused("tempfail") from None
        return mbox, logout, answer["key"]

    def _lost(self, failure):
        if failure.check(Refused):
            return failure
        log.failure("pop3 login: asking the main process", failure)
        raise Refused("tempfail")

    def release(self, key) -> None:
        if self.channel is not None and self.channel.transport and not self.channel.transport.disconnecting:
            self.channel.callRemote(Release, key=key)
