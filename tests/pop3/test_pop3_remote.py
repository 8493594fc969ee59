"""
The two ends of a worker's POP3 logins (pymaild.pop3.remote), without processes: the main
process's LoginDesk over a real Logins (throttle, IN-USE) with a portal whose answer the test
holds back, and the worker's RemoteLogins over a channel that answers as the main process would.
What happens to a mailbox's lock when a worker ends, or fails to open it, in the middle of a
login.
"""

from __future__ import annotations

from twisted.internet import defer

from pymaild.pipeline.stages import Session
from pymaild.pop3.remote import LoginDesk, Login, Release, RemoteLogins
from pymaild.pop3.server import Logins, Refused
from pymaild.throttle import LoginThrottle


class Box:
    account = "alice@example.com"
    key = "/mail/example.com/alice"


class HeldPortal:
    """A portal whose logins succeed when the test says so."""

    def __init__(self):
        self.pending: list[defer.Deferred] = []

    def login(self, credentials, mind, *interfaces):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def grant(self):
        self.pending.pop(0).callback((None, Box(), lambda: None))


class Store:
    def placeOf(self, user):
        return "example.com/alice"

    def storageLimitOf(self, user):
        return 0


def ask(desk: LoginDesk):
    return desk.login("alice@example.com", b"alice@example.com", b"pw", "s1", "192.0.2.1", 5000, 110, True)


def answer(d):
    results = []
    d.addBoth(results.append)
    assert results, "no answer yet"
    return results[0]


def test_a_login_granted_after_its_worker_ended_does_not_keep_the_mailbox():
    portal = HeldPortal()
    logins = Logins(portal, LoginThrottle())
    desk = LoginDesk(logins, Store())
    d = ask(desk)
    desk.workerLost()  # (the worker died while the password was being checked)
    portal.grant()
    assert answer(d)["result"] == "tempfail"
    assert logins.inUse == set()


def test_a_granted_login_is_held_until_released_or_the_worker_ends():
    portal = HeldPortal()
    logins = Logins(portal, LoginThrottle())
    desk = LoginDesk(logins, Store())
    d = ask(desk)
    portal.grant()
    got = answer(d)
    assert got["result"] == "ok" and got["key"] == Box.key and got["place"] == "example.com/alice"
    assert logins.inUse == {Box.key}
    second = ask(desk)
    portal.grant()
    assert answer(second)["result"] == "in-use"
    desk.workerLost()
    assert logins.inUse == set()
    desk.release(Box.key)  # (a late Release of a dead worker's session: nothing to do)
    assert logins.inUse == set()


class Channel:
    """The worker's channel to a main process that grants every login."""

    transport = type("T", (), {"disconnecting": False})()

    def __init__(self):
        self.sent = []

    def callRemote(self, command, **kw):
        self.sent.append((command, kw))
        if command is Login:
            return defer.succeed({"result": "ok", "delay": 0.0, "account": Box.account, "key": Box.key,
                                  "place": "example.com/alice", "limit": 0})
        return None


class WorkerStore:
    def place(self, user, relative):
        pass

    def setStorageLimit(self, user, limit):
        pass


def test_a_worker_that_cannot_open_the_mailbox_gives_it_back():
    channel = Channel()

    def avatar(account, mind):
        raise OSError(24, "Too many open files")

    remote = RemoteLogins(WorkerStore(), avatar, channel)
    creds = type("C", (), {"username": b"alice@example.com", "password": b"pw"})()
    failure = answer(remote.login(Session(id="s1", protocol="pop3", peer="192.0.2.1"), "alice@example.com", creds))
    assert failure.check(Refused) and failure.value.result == "tempfail"
    assert [c for c, _ in channel.sent] == [Login, Release]
    assert channel.sent[1][1] == {"key": Box.key}
