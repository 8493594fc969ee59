# -*- test-case-name: tests.store.test_mailbox_keys -*-
"""
Stable mailbox keys: which directory under C{<data_dir>/mail} belongs to which directory entry,
so that a user whose primary address (or login name) changes keeps their mail.

With C{[auth] backend = "ldap"}, an account's name is its primary address, which an
administrator may change (a marriage, a department's new domain).  The entry's stable key
(C{[ldap] mailbox_attribute}: OpenLDAP's C{entryUUID}, Active Directory's C{objectGUID}) is
recorded here, in C{<data_dir>/mail/.mailbox-keys.sqlite}, beside the directory it was first
given (C{<domain>/<local>} of the primary address it had then).  From then on the entry's mail
lives there whatever its addresses become.

Implementation summary: L{MailboxKeys.place} answers from memory for a key already known;
a new key claims its natural directory (the primary address's), adopting a directory already
on disk that no key holds (mail from before the key was configured, or from a passwd-file
installation); a natural directory that another key holds (an address given to a new
person after its owner left) gives the newcomer a fresh directory C{<local>~<8 hex digits>}
instead of the old owner's mail.  A new key is committed (sqlite, synchronous) before it is
used, so a crash never leaves mail in a directory the map does not name.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

from twisted.logger import Logger

log = Logger()

FILENAME = ".mailbox-keys.sqlite"


class MailboxKeys:
    """
    The key → directory map of one mail root.  Thread-safe (one lock, one connection).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / FILENAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS mailbox (key TEXT PRIMARY KEY, directory TEXT NOT NULL UNIQUE)")
        self._byKey = dict(self._db.execute("SELECT key, directory FROM mailbox"))
        self._taken = set(self._byKey.values())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def place(self, key: str, natural: str) -> str:
        """
        The directory (relative to the root, C{"<domain>/<local>"}) of the entry whose stable key
        is C{key}; C{natural} is where its primary address would put it.
        """
        with self._lock:
            known = self._byKey.get(key)
            if known is not None:
                return known
            directory = natural
            if directory in self._taken:
                digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
                candidates = [f"{natural}~{digest[:8]}", f"{natural}~{digest[:16]}", f"{natural}~{digest}"]
                directory = next(c for c in candidates if c not in self._taken)
                log.warn("mailbox {natural} belongs to another directory entry; {key} gets {directory}",
                         natural=natural, key=key, directory=directory)
            self._db.execute("INSERT INTO mailbox (key, directory) VALUES (?, ?)", (key, directory))
            self._byKey[key] = directory
            self._taken.add(directory)
            return directory

    def directories(self) -> dict[str, str]:
        """Every key's directory (for pymaildctl and tests)."""
        with self._lock:
            return dict(self._byKey)
