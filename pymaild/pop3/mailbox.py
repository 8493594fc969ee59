# -*- test-case-name: tests.integration.test_startup -*-
"""
The POP3 avatar: the user's INBOX (C{cur/} and C{new/} of the Maildir), read-only.

Status: a snapshot taken at login, oldest first; UIDL is the maildir base name (the part before
C{:2,}).  DELE is refused: deletion at QUIT, stable UIDs from the index and locking come with
the POP3 issue, over the store of the store issue.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.mail import pop3
from zope.interface import implementer


@implementer(pop3.IMailbox)
class ReadOnlyInbox:
    def __init__(self, maildir: Path):
        entries = []
        for sub in ("cur", "new"):
            try:
                with os.scandir(maildir / sub) as it:
                    for e in it:
                        if e.is_file() and not e.name.startswith("."):
                            st = e.stat()
                            entries.append((st.st_mtime, e.name, e.path, st.st_size))
            except FileNotFoundError:
                pass
        entries.sort()
        self._paths = [e[2] for e in entries]
        self._names = [e[1].split(":", 1)[0].encode("ascii", "replace") for e in entries]
        self._sizes = [e[3] for e in entries]

    def listMessages(self, i=None):
        if i is None:
            return list(self._sizes)
        return self._sizes[i]

    def getMessage(self, i):
        return open(self._paths[i], "rb")

    def getUidl(self, i):
        return self._names[i]

    def deleteMessage(self, i):
        raise pop3.POP3Error(b"[SYS/PERM] Deleting is not available in this version")

    def undeleteMessages(self):
        pass

    def sync(self):
        pass


def pop3Avatar(store):
    def avatar(user: str, mind):
        return ReadOnlyInbox(store.userDirectory(user)), lambda: None

    return avatar
