"""
SMTP smuggling: a fake end of data (a bare LF or CR around the dot) followed by a second
transaction inside one DATA.  The server only ends data at CRLF.CRLF and refuses bare line ends
(or, when configured, normalises them into the body), so the smuggled commands never run and no
second message is ever delivered.
"""

from __future__ import annotations

import pytest

from smtpwire import Raw, inbox_messages

FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\n.\r", b"\r.\n", b"\r.\r\n"]


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=repr)
def test_smuggling_never_makes_a_second_message(server, fake):
    """
    A fake end of data followed by a second transaction (SMTP smuggling): one reply for the
    whole DATA (the message is refused for its bare line ends), no message delivered at all,
    and the session goes on.
    """
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n")
    assert r.reply().startswith(b"250") and r.reply().startswith(b"250") and r.reply().startswith(b"354")
    r.sock.sendall(b"Subject: one\r\n\r\nfirst" + fake + b"MAIL FROM:<ceo@localhost>\r\nRCPT TO:<postmaster@localhost>\r\n"
                   b"DATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n")
    answer = r.reply()
    assert answer.startswith(b"550 5.6.0"), answer
    assert r.ask(b"NOOP").startswith(b"250 2.0.0")
    assert r.data == b""  # nothing more was answered: no smuggled command ran
    assert inbox_messages(server) == []


def test_bare_line_ends_normalised_when_configured(make_server):
    server = make_server('[smtp]\nbare_line_ends = "normalize"\n').start()
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n")
    r.reply(), r.reply(), r.reply()
    r.sock.sendall(b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<ceo@localhost>\r\n.\r\n")
    assert r.reply().startswith(b"250 2.0.0")
    (stored,) = inbox_messages(server)
    assert stored.endswith(b"Subject: one\n\nfirst\n\nMAIL FROM:<ceo@localhost>\n")
