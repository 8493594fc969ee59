"""
MailRealm: each protocol gets the avatar it asks for through the portal, from the factories
service.py injects; an interface nobody provides is refused.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.cred.portal import IRealm
from twisted.mail import imap4, pop3
from twisted.mail.interfaces import IMessageDelivery
from zope.interface.verify import verifyObject

from pymaild.auth.realm import MailRealm
from pymaild.imap.mailbox import StoreAccount
from pymaild.pop3.mailbox import StoreInbox, pop3Avatar
from pymaild.smtp.server import SubmissionLogin
from pymaild.store.maildir import MaildirStore


@pytest.fixture
def realm(tmp_path):
    store = MaildirStore(tmp_path / "mail")
    return MailRealm(
        {
            imap4.IAccount: lambda user, mind: (StoreAccount(store.user(user), defer.maybeDeferred), lambda: None),
            pop3.IMailbox: pop3Avatar(store, defer.maybeDeferred),
            IMessageDelivery: lambda user, mind: (SubmissionLogin(), lambda: None),
        }
    )


def test_realm_provides_irealm(realm):
    """
    MailRealm is a twisted.cred realm.
    """
    assert verifyObject(IRealm, realm)


@pytest.mark.parametrize(
    "interface, cls",
    [(imap4.IAccount, StoreAccount), (pop3.IMailbox, StoreInbox), (IMessageDelivery, SubmissionLogin)],
)
def test_each_protocol_gets_its_avatar(realm, tmp_path, interface, cls):
    """
    IMAP asks for IAccount, POP3 for IMailbox, SMTP submission for IMessageDelivery; each gets
    an object providing that interface and a logout callable.  A bytes avatarId is decoded.
    """
    iface, avatar, logout = realm.requestAvatar(b"alice@example.com", None, interface).result
    assert iface is interface
    assert isinstance(avatar, cls)
    assert verifyObject(interface, avatar)
    logout()
    if interface is pop3.IMailbox:
        assert (tmp_path / "mail" / "example.com" / "alice" / "new").is_dir()


def test_first_known_interface_wins(realm):
    """
    With several interfaces asked for, the realm answers the first one it knows.
    """
    iface, _, _ = realm.requestAvatar("bob@example.com", None, object(), pop3.IMailbox, imap4.IAccount).result
    assert iface is pop3.IMailbox


def test_unknown_interface_is_refused(realm):
    """
    An interface no factory serves raises NotImplementedError (cred's convention).
    """
    with pytest.raises(NotImplementedError):
        realm.requestAvatar("bob@example.com", None, object())


@pytest.mark.parametrize("user", ["../x@example.com", "a@..", "a/b@example.com", ".hidden@example.com"])
def test_store_refuses_path_traversal(tmp_path, user):
    """
    A user name that would leave <data>/mail (or hide as a dot-folder) is refused.
    """
    with pytest.raises(ValueError):
        MaildirStore(tmp_path / "mail").userDirectory(user)
    assert not (tmp_path / "x").exists()
