# -*- test-case-name: tests.test_store -*-
"""
Where each user's Maildir++ lives: C{<data_dir>/mail/<domain>/<localpart>/}, as Dovecot lays it
out with C{mail_location = maildir:~/Maildir} and C{home = /var/mail/%d/%n}.

Status: the foundation only creates the directories; the folders, UIDs and index come with the
store issue.
"""

from __future__ import annotations

import os
from pathlib import Path

from zope.interface import implementer

from pymaild.interfaces import IUserStore


def _safePart(part: str, what: str) -> str:
    if not part or part in (".", "..") or "/" in part or "\0" in part or part.startswith("."):
        raise ValueError(f"unsafe {what} for a mail directory: {part!r}")
    return part


@implementer(IUserStore)
class MaildirStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def userDirectory(self, user: str) -> Path:
        local, _, domain = user.rpartition("@")
        path = self.root / _safePart(domain, "domain") / _safePart(local, "local part")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(path / sub, mode=0o700, exist_ok=True)
        return path
