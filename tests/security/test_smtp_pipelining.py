"""
PIPELINING (RFC 2920) with a refused recipient in a transaction sent in one write: the server
holds the commands behind each RCPT until its check is done and answers them all in order, so
the DATA behind them is never read as commands.  The same with a slow directory (a Deferred that
fires later) is tested on a StringTransport in tests/smtp/test_smtp_protocol.py, which stays there.
"""

from __future__ import annotations

from smtpwire import Raw, inbox_messages


def test_pipelining_holds_commands_while_recipients_are_checked(server):
    """
    A whole transaction in one write (RFC 2920): every reply in order, the bad recipient
    refused, the message delivered to the good one, the next transaction after it too.
    """
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@localhost>\r\nRCPT TO:<postmaster@localhost>\r\n"
                   b"DATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@example.org>\r\n"
                   b"RCPT TO:<postmaster@localhost>\r\nDATA\r\nSubject: second\r\n\r\nx\r\n.\r\nQUIT\r\n")
    answers = [r.reply() for _ in range(9)]
    assert [a[:3] for a in answers] == [b"250", b"550", b"250", b"354", b"250", b"250", b"250", b"354", b"250"], answers
    assert r.reply().startswith(b"221")
    assert len(inbox_messages(server)) == 2
