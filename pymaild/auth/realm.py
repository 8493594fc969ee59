# -*- test-case-name: tests.auth.test_realm -*-
"""
The one C{twisted.cred} realm: it turns an authenticated account name into the avatar the
protocol asked for (IMAP C{IAccount}, POP3 C{IMailbox}, SMTP C{IMessageDelivery}).

The realm knows no protocol: L{pymaild.service} hands it one avatar factory per interface, so
that the protocol packages and the auth package never import each other.
"""

from __future__ import annotations

from typing import Callable

from twisted.cred.portal import IRealm
from twisted.internet.defer import maybeDeferred
from zope.interface import implementer


@implementer(IRealm)
class MailRealm:
    """
    @ivar avatarFactories: C{{interface: factory(user, mind) -> (avatar, logout)}}; a factory
        may return a Deferred of that pair (for work such as creating the user's folders).
    """

    def __init__(self, avatarFactories: dict[object, Callable]):
        self.avatarFactories = dict(avatarFactories)

    def requestAvatar(self, avatarId, mind, *interfaces):
        user = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        for interface in interfaces:
            factory = self.avatarFactories.get(interface)
            if factory is not None:
                d = maybeDeferred(factory, user, mind)
                return d.addCallback(lambda pair, i=interface: (i, pair[0], pair[1]))
        raise NotImplementedError(f"no avatar for {interfaces!r}")
