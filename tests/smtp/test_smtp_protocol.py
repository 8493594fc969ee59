"""
The SMTP protocol object on a StringTransport: pipelined commands wait while a recipient check
is slow (the directory answers through a Deferred that fires later), and DATA pipelined behind
a slow RCPT is never read as commands.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pymaild.envelope import Resolution
from pymaild.smtp.server import SMTPFactory


class SlowDirectory:
    def __init__(self):
        self.pending: list[tuple[str, Deferred]] = []

    def isLocalDomain(self, domain):
        return domain == "localhost"

    def lookup(self, address):
        d = Deferred()
        self.pending.append((address, d))
        return d

    def addressesOf(self, user):
        return succeed(frozenset([user]))


def session(tmp_path):
    clock = MemoryReactorClock()
    directory = SlowDirectory()
    delivered = []
    factory = SMTPFactory("mx.example", None, directory=directory, clock=clock, spool=tmp_path / "spool",
                          run=lambda f, *a: succeed(f(*a)),
                          deliver=lambda source, users: delivered.append(
                              (source if isinstance(source, bytes) else source.read_bytes(), users)))
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return directory, protocol, transport, delivered


def test_pipelined_commands_wait_for_a_slow_recipient_check(tmp_path):
    directory, protocol, transport, delivered = session(tmp_path)
    protocol.dataReceived(b"EHLO c.example\r\n")
    transport.clear()
    protocol.dataReceived(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@localhost>\r\nRCPT TO:<eve@localhost>\r\n"
                          b"DATA\r\nSubject: x\r\n\r\nMAIL FROM:<not-a-command@example.org>\r\n.\r\nQUIT\r\n")
    assert transport.value() == b"250 2.1.0 Sender OK\r\n"  # RCPT waits: nothing after it ran
    assert [a for a, _ in directory.pending] == ["bob@localhost"]
    transport.clear()
    directory.pending[0][1].callback(Resolution("bob@localhost", "user", frozenset(["bob@localhost"])))
    assert transport.value() == b"250 2.1.5 Recipient OK\r\n"
    transport.clear()
    directory.pending[1][1].callback(Resolution("eve@localhost", "none"))
    out = transport.value()
    assert out.startswith(b"550 5.1.1 No such user here\r\n354 ")
    assert b"250 2.0.0 OK: queued as " in out and out.endswith(b"221 2.0.0 mx.example Bye\r\n")
    assert out.count(b"250 2.1.0") == 0  # the line inside the data never ran as MAIL
    ((stored, users),) = delivered
    assert users == ["bob@localhost"] and stored.endswith(b"Subject: x\n\nMAIL FROM:<not-a-command@example.org>\n")


def test_spools_share_a_memory_budget(tmp_path):
    """
    Messages in memory count against one budget; past it (or past a message's own limit) a
    message goes to a file, and giving the memory back lets the next one stay in memory.
    """
    from pymaild.smtp.server import MemoryBudget, Spool

    budget = MemoryBudget(100)
    first, second = Spool(tmp_path, 80, budget), Spool(tmp_path, 80, budget)
    first.write(b"a" * 60)
    second.write(b"b" * 60)  # 120 > 100: to a file
    assert first.path is None and second.path is not None and budget.used == 60
    assert first.source() == b"a" * 60 and second.source().read_bytes() == b"b" * 60
    first.write(b"a" * 30)  # past its own 80: to a file, its memory given back
    assert first.path is not None and budget.used == 0
    first.discard()
    second.discard()
    assert list(tmp_path.iterdir()) == [] and budget.used == 0
    third = Spool(tmp_path, 80, budget)
    third.write(b"c" * 70)
    assert third.path is None and budget.used == 70
    third.discard()
    assert budget.used == 0
