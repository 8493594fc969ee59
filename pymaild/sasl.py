# -*- test-case-name: tests.test_sasl -*-
"""
The SASL mechanisms IMAP AUTHENTICATE and POP3 AUTH offer (PLAIN, RFC 4616; LOGIN), as the
challenge objects of C{twisted.mail} with two corrections:

  - PLAIN: Twisted throws the authorization identity away, so "log in as alice, act as bob"
    would silently become alice.  pymaild has no proxy authorisation: an authorization
    identity other than empty or the login name itself is refused (RFC 4616 2), and so is an
    empty login name.
  - LOGIN: the prompts are the customary C{Username:} and C{Password:} (as Dovecot and
    Postfix send them) instead of Twisted's C{User Name\\0} and C{Password\\0}.

Both provide C{IUsernamePassword}, so the portal needs nothing special.
"""

from __future__ import annotations

from twisted.mail import imap4


class AuthorizationRefused(imap4.IllegalClientResponse):
    """A well-formed PLAIN response asking to act as another user."""


class PLAINCredentials(imap4.PLAINCredentials):
    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise imap4.IllegalClientResponse("Malformed PLAIN response")
        authzid, authcid, password = parts
        if not authcid:
            raise imap4.IllegalClientResponse("Empty user name")
        if authzid and authzid != authcid:
            raise AuthorizationRefused("Acting as another user is not allowed")
        self.username, self.password = authcid, password


class LOGINCredentials(imap4.LOGINCredentials):
    def __init__(self):
        super().__init__()
        self.challenges = [b"Password:", b"Username:"]


#: the mechanisms by name, in the order they are offered
MECHANISMS = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
