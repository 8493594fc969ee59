"""
Open relay attempts on the MX port: a recipient in another domain, the % hack and a source route
through a local domain.  The server takes mail only for its own domains without AUTH, so each gets
554 5.7.1 (or 550 for the % hack, an unknown local user) and the session goes on.  swaks tries a
relay too, in tests/integration/test_smtp_clients.py.
"""

from __future__ import annotations

from smtpwire import smtp


def test_relay_refusal(server):
    """
    Other domains get 554 5.7.1 (also with source routes); the % hack is an unknown local address
    (550); the session goes on.
    """
    with smtp(server) as s:
        s.mail("sender@example.org")
        code, text = s.rcpt("victim@example.net")
        assert code == 554 and text.startswith(b"5.7.1")
        code, _ = s.rcpt("victim%example.net@localhost")
        assert code == 550
        code, text = s.docmd("RCPT TO:<@localhost:victim@example.net>")
        assert code == 554 and text.startswith(b"5.7.1")
