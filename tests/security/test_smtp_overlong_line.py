"""
An overlong line inside DATA, with commands hidden after it.  The server answers the line with
500 5.5.2 but stays in DATA until the real end of data, so what followed the long line never runs
as commands and the refused message is not delivered.
"""

from __future__ import annotations

from smtpwire import Raw, inbox_messages


def test_overlong_line_in_data_stays_data(server):
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n")
    r.reply(), r.reply(), r.reply()
    r.sock.sendall(b"Subject: x\r\n\r\n" + b"A" * 20000 + b"\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n.\r\nNOOP\r\n")
    assert r.reply().startswith(b"500 5.5.2")
    assert r.reply().startswith(b"250 2.0.0")  # the NOOP after the real end, and nothing else
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"503")  # no MAIL from inside the data
    assert inbox_messages(server) == []
