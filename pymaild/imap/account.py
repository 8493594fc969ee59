# -*- test-case-name: tests.integration.test_startup -*-
"""
The IMAP avatar.

Status: the foundation logs users in, but folders come with the store issue (Maildir++ with
its index) and the IMAP issue: until then the account lists no folder and SELECT answers
C{NO}; nothing is pretended.
"""

from __future__ import annotations

from twisted.mail import imap4
from zope.interface import implementer


@implementer(imap4.IAccount)
class StorelessAccount:
    def __init__(self, user: str):
        self.user = user

    def addMailbox(self, name, mbox=None):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def create(self, pathspec):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def select(self, name, rw=True):
        return None

    def delete(self, name):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def rename(self, oldname, newname):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def isSubscribed(self, name):
        return False

    def subscribe(self, name):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def unsubscribe(self, name):
        raise imap4.MailboxException("[UNAVAILABLE] Folders are not available in this version")

    def listMailboxes(self, ref, wildcard):
        return []


def imapAvatar(user: str, mind):
    return StorelessAccount(user), lambda: None
