"""
The POP3 protocol object on a StringTransport with a clock: the idle timeout, and the mailbox
lock held while QUIT commits even if the client goes away meanwhile.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail import pop3
from twisted.python.failure import Failure

from pymaild.pop3.mailbox import Entry
from pymaild.pop3.server import POP3Factory
from pymaild.throttle import LoginThrottle


class Mailbox:
    key = "box"

    def __init__(self):
        self.entries = [Entry(1, 10, b"u1", "/nonexistent")]
        self.commits = []

    def load(self):
        return succeed(len(self.entries))

    def commit(self):
        d = Deferred()
        self.commits.append(d)
        return d

    def undeleteMessages(self):
        pass


class Portal:
    def __init__(self, mailbox):
        self.mailbox = mailbox

    def login(self, credentials, mind, *interfaces):
        return succeed((pop3.IMailbox, self.mailbox, lambda: None))


def session(idle=600.0):
    clock = MemoryReactorClock()
    mailbox = Mailbox()
    factory = POP3Factory(Portal(mailbox), implicitTLS=True, throttle=LoginThrottle(), clock=clock,
                          idleTimeout=idle)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return clock, factory, protocol, transport, mailbox


def test_idle_session_is_closed_after_the_timeout():
    clock, factory, protocol, transport, _ = session()
    transport.clear()
    clock.advance(599)
    assert transport.value() == b"" and not transport.disconnecting
    protocol.dataReceived(b"NOOP\r\n")  # any line restarts the timer (here: -ERR, not logged in)
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value().endswith(b"-ERR Disconnected for inactivity\r\n") and transport.disconnecting


def test_the_lock_is_held_until_quit_has_committed():
    clock, factory, protocol, transport, mailbox = session()
    protocol.dataReceived(b"USER u\r\nPASS p\r\n")
    assert b"+OK Logged in, 1 messages" in transport.value()
    assert factory.logins.inUse == {"box"}
    protocol.dataReceived(b"DELE 1\r\nQUIT\r\n")
    assert len(mailbox.commits) == 1 and protocol.isBusy()
    protocol.connectionLost(Failure(ConnectionDone()))  # the client went away during the commit
    assert factory.logins.inUse == {"box"}  # a new session must not see the messages being removed
    mailbox.commits[0].callback(1)
    assert factory.logins.inUse == set() and not protocol.isBusy()


def test_a_dropped_session_commits_nothing_and_unlocks():
    clock, factory, protocol, transport, mailbox = session()
    protocol.dataReceived(b"USER u\r\nPASS p\r\nDELE 1\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert mailbox.commits == [] and factory.logins.inUse == set()


def test_an_unreachable_directory_is_a_temporary_failure():
    """
    When the accounts cannot be checked (the directory is down), USER/PASS and AUTH get
    -ERR [SYS/TEMP], never [AUTH]: a client must not conclude the password is wrong.
    """
    import base64

    from twisted.internet.defer import fail

    from pymaild.errors import TemporaryFailure

    clock, factory, protocol, transport, _ = session()

    class Down:
        def login(self, credentials, mind, *interfaces):
            return fail(TemporaryFailure("directory unreachable"))

    factory.logins.portal = Down()
    transport.clear()
    protocol.dataReceived(b"USER u\r\nPASS p\r\n")
    clock.advance(0)
    assert transport.value().endswith(b"-ERR [SYS/TEMP] Temporary authentication failure, try again later\r\n")
    transport.clear()
    protocol.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n")
    clock.advance(0)
    assert transport.value().startswith(b"-ERR [SYS/TEMP]")
    assert factory.logins.throttle._failures == {}  # not counted as a wrong password
