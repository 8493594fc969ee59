"""
pymaild's SASL PLAIN and LOGIN: no acting as another user, customary LOGIN prompts; and IMAP
AUTHENTICATE end to end with them.
"""

from __future__ import annotations

import base64

import pytest
from twisted.mail import imap4

from imapwire import ask, tls_session
from pymaild.sasl import AuthorizationRefused, LOGINCredentials, PLAINCredentials


def test_plain_takes_an_empty_or_equal_authorization_identity_only():
    c = PLAINCredentials()
    c.setResponse(b"\0alice\0pw")
    assert (c.username, c.password) == (b"alice", b"pw")
    c.setResponse(b"alice\0alice\0pw2")
    assert c.password == b"pw2"
    with pytest.raises(AuthorizationRefused):
        c.setResponse(b"bob\0alice\0pw")
    for bad in (b"alice\0pw", b"\0\0pw", b"a\0b\0c\0d"):
        with pytest.raises(imap4.IllegalClientResponse):
            c.setResponse(bad)


def test_login_prompts():
    c = LOGINCredentials()
    assert c.getChallenge() == b"Username:"
    c.setResponse(b"alice")
    assert c.moreChallenges() and c.getChallenge() == b"Password:"
    c.setResponse(b"pw")
    assert not c.moreChallenges() and (c.username, c.password) == (b"alice", b"pw")


def test_imap_authenticate_refuses_acting_as_another_user(server):
    password = server.postmaster_password().encode()
    sock = tls_session(server)
    other = base64.b64encode(b"someone@localhost\0postmaster@localhost\0" + password)
    answer = ask(sock, b"a AUTHENTICATE PLAIN " + other, b"a")
    assert b"a NO [AUTHORIZATIONFAILED]" in answer
    same = base64.b64encode(b"\0postmaster@localhost\0" + password)
    assert b"b OK" in ask(sock, b"b AUTHENTICATE PLAIN " + same, b"b")
    sock.close()
