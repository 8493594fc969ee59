"""
STARTTLS command injection: plaintext commands pipelined behind STARTTLS.  The server throws away
whatever arrived before the TLS handshake and resets the session, so nothing injected in the clear
survives into the encrypted session.
"""

from __future__ import annotations

from smtpwire import Raw


def test_starttls_discards_pipelined_plaintext(server):
    r = Raw(server)
    r.ask(b"EHLO client.example")
    r.sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
    assert r.reply().startswith(b"220 ")
    assert r.data == b""
    r.sock = server.tls().wrap_socket(r.sock, server_hostname="localhost")
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"503 5.5.1")  # no MAIL survived
    assert r.ask(b"MAIL FROM:<a@example.org>").startswith(b"503 5.5.1")  # EHLO again first
    assert r.ask(b"EHLO client.example").startswith(b"250-")
