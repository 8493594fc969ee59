"""
Submission abuse: sending without AUTH, AUTH without TLS, a wrong password and a MAIL FROM that
is someone else's address.  The server wants TLS, then AUTH, then the logged-in user's own
address before it takes a message on the submission port.
"""

from __future__ import annotations

import base64
import json

from smtpwire import Raw, inbox_messages


def test_submission_wants_tls_auth_and_own_sender(server):
    """
    On submission: MAIL before AUTH gets 530 5.7.0, AUTH before TLS 538, a wrong password 535,
    a MAIL FROM of someone else 553 5.7.1; the logged-in user's own address sends.
    """
    r = Raw(server, "submission")
    r.ask(b"EHLO client.example")
    assert r.ask(b"MAIL FROM:<postmaster@localhost>").startswith(b"530 5.7.0")
    assert r.ask(b"AUTH PLAIN " + base64.b64encode(b"\0postmaster@localhost\0x")).startswith(b"538 5.7.11")
    r.starttls()
    assert r.ask(b"EHLO client.example").startswith(b"250-")
    assert r.ask(b"AUTH PLAIN " + base64.b64encode(b"\0postmaster@localhost\0wrong")).startswith(b"535 5.7.8")
    password = server.postmaster_password().encode()
    assert r.ask(b"AUTH PLAIN " + base64.b64encode(b"\0postmaster@localhost\0" + password)).startswith(b"235 2.7.0")
    assert r.ask(b"MAIL FROM:<ceo@example.com>").startswith(b"553 5.7.1")
    assert r.ask(b"MAIL FROM:<postmaster@localhost>").startswith(b"250 2.1.0")
    assert r.ask(b"RCPT TO:<postmaster@localhost>").startswith(b"250 2.1.5")
    assert r.ask(b"RCPT TO:<friend@example.net>").startswith(b"250 2.1.5")  # (into the outbound queue)
    assert r.ask(b"DATA").startswith(b"354")
    assert r.ask(b"Subject: sent\r\n\r\nhi\r\n.").startswith(b"250 2.0.0")
    (stored,) = inbox_messages(server)
    (envelope,) = (server.data_dir / "queue" / "messages").glob("*.json")
    assert [r["address"] for r in json.loads(envelope.read_text())["recipients"]] == ["friend@example.net"]
    assert b"with ESMTPSA" in stored and b"(authenticated user postmaster@localhost)" in stored
    assert b"(using TLSv1.3 with cipher " in stored or b"(using TLSv1.2 with cipher " in stored
