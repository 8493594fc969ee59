"""
A store user that works until it is killed with SIGKILL (tests/store/test_crash.py).

It appends, delivers, moves, flags, expunges and syncs, at random.  After each message is stored
(append returned, or deliver returned) it appends the message's marker to a log file and fsyncs
the log: those markers must survive any crash exactly once.  Before expunging it logs the
markers it is about to remove as "-marker": those may be there once or not at all.
"""

import os
import random
import sys
from pathlib import Path

from pymaild.store.delivery import deliver
from pymaild.store.maildir import UserStore


def main(root: str, logPath: str, seed: int) -> None:
    rng = random.Random(seed)
    user = UserStore(Path(root))
    folders = [user.folder("INBOX"), user.folder("Other") if user.exists("Other") else user.createFolder("Other")]
    log = os.open(logPath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    n = 0

    def stored(marker: str) -> None:
        os.write(log, (marker + "\n").encode())
        os.fsync(log)

    while True:
        n += 1
        marker = f"{os.getpid()}-{n}"
        body = f"X-Marker: {marker}\n\nbody {marker}\n".encode()
        op = rng.random()
        folder = rng.choice(folders)
        if op < 0.3:
            folder.append(body, rng.choice([[], ["\\Seen"], ["\\Flagged", "Work"]]))
            stored(marker)
        elif op < 0.5:
            deliver(folder.path, body)
            stored(marker)
        elif op < 0.7:
            uids = folder.uids()
            if uids:
                other = folders[1] if folder is folders[0] else folders[0]
                folder.move(rng.sample(uids, min(3, len(uids))), other)
        elif op < 0.78:
            # expunge: say which markers may vanish before trying, so the test allows 0 or 1
            uids = folder.uids()
            if uids:
                victims = rng.sample(uids, min(2, len(uids)))
                doomed = [folder.open(u).read().split(b"\n", 1)[0].split()[-1].decode() for u in victims]
                os.write(log, ("".join(f"-{m}\n" for m in doomed)).encode())
                os.fsync(log)
                folder.store(victims, ["\\Deleted"], "add")
                folder.expunge(victims)
        elif op < 0.9:
            uids = folder.uids()
            if uids:
                # (every message now and then: from 64 on, a bulk STORE, which commits the
                # index before it renames the files)
                victims = uids if rng.random() < 0.3 else rng.sample(uids, min(5, len(uids)))
                folder.store(victims, rng.choice([["\\Seen"], ["\\Answered", "Todo"]]),
                             rng.choice(["add", "remove", "set"]))
        else:
            folder.sync()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
