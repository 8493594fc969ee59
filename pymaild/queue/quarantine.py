# -*- test-case-name: tests.test_cli_quarantine -*-
"""
The quarantine: messages a plugin held (C{quarantine} verdict) instead of delivering, in
C{<data_dir>/quarantine/}: C{ID.eml} (the message as it arrived, with pymaild's Return-Path and
Received) and C{ID.json} (who it was for, why it was held), both fsynced before the SMTP
client gets its 250, like a delivery.

C{pymaildctl quarantine list|show|release|delete} manages them; L{release} delivers a message
to the local mailboxes and queues it for the remote recipients it was for.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from pymaild.durable import fsyncDirectory


class Quarantine:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _paths(self, id: str) -> tuple[Path, Path]:
        if not id or not all(c in "0123456789ABCDEF" for c in id):
            raise KeyError(id)
        return self.root / f"{id}.eml", self.root / f"{id}.json"

    def hold(self, source, transaction: dict, users, reason: str, homes: dict | None = None) -> str:
        """
        Keep the message (bytes or a path) and its envelope; returns its id.  Blocking.

        @param homes: C{{user: its mail directory relative to the store's root}}, so that a
            release finds the mailbox without asking the directory (an LDAP user's mailbox
            keeps its first address's name).
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        id = uuid.uuid4().hex[:16].upper()
        message, record = self._paths(id)
        tmpMessage, tmpRecord = message.with_suffix(".eml.tmp"), record.with_suffix(".json.tmp")
        try:
            with open(tmpMessage, "wb") as out:
                if isinstance(source, (bytes, bytearray)):
                    out.write(source)
                else:
                    with open(source, "rb") as f:
                        while chunk := f.read(1 << 20):
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            data = {"id": id, "held": time.time(), "reason": reason, "users": sorted(users), "homes": homes or {},
                    **{k: transaction.get(k) for k in ("sender", "recipients", "ret", "envid", "body", "smtputf8",
                                                          "client", "skip")}}
            with open(tmpRecord, "w") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmpMessage, message)
            os.rename(tmpRecord, record)
            fsyncDirectory(self.root)
        except BaseException:
            for path in (tmpMessage, tmpRecord, message, record):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        return id

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))

    def record(self, id: str) -> dict:
        return json.loads(self._paths(id)[1].read_text())

    def messagePath(self, id: str) -> Path:
        return self._paths(id)[0]

    def delete(self, id: str) -> None:
        message, record = self._paths(id)
        os.unlink(record)
        try:
            os.unlink(message)
        except FileNotFoundError:
            pass
        fsyncDirectory(self.root)
