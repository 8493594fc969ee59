"""
Crash safety: a process using the store is killed with SIGKILL at random moments (during
appends, deliveries, moves, flag changes, expunges and syncs); after each kill the store must open, and
every message that was stored is there exactly once, no UID is reused, and the index agrees
with the file names.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
from pathlib import Path

from pymaild.store.delivery import LETTER_FLAGS, FileName
from pymaild.store.maildir import UserStore

WORKER = Path(__file__).with_name("crash_worker.py")
MARKER = re.compile(rb"^X-Marker: (\S+)$", re.M)


def survey(root: Path):
    """
    Open the store as a fresh process would, sync both folders, and return
    {(folder, uidvalidity, uid): marker}, a list of index/file disagreements and
    {(folder, uidvalidity): UIDs recorded as vanished}.
    """
    user = UserStore(root)
    seen = {}
    problems = []
    vanished = {}
    try:
        for name in ("INBOX", "Other"):
            if not user.exists(name):
                continue
            folder = user.folder(name)
            folder.sync()
            status = folder.status()
            validity = status["uidvalidity"]
            messages = folder.messages()
            gone = vanished[(name, validity)] = set(folder.vanished(0))
            if gone & {m.uid for m in messages}:
                problems.append((name, "vanished and present", sorted(gone & {m.uid for m in messages})))
            if folder.vanished(status["highestmodseq"]) or folder.changedSince(status["highestmodseq"]):
                problems.append((name, "MODSEQ above HIGHESTMODSEQ", status["highestmodseq"]))
            counted = (len(messages), sum("\\Seen" not in m.flags for m in messages), sum(m.vsize for m in messages))
            if counted != (status["messages"], status["unseen"], status["size"]):
                problems.append((name, "counters", counted, status))
            for m in messages:
                path = folder.filePath(m.uid)
                marker = MARKER.search(path.read_bytes()).group(1).decode()
                seen[(name, validity, m.uid)] = marker
                letters = FileName.parse(path.name).systemLetters
                fromName = {LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS}
                if fromName != set(m.flags):
                    problems.append((name, m.uid, sorted(m.flags), path.name))
    finally:
        user.close()
    return seen, problems, vanished


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    """
    Twelve rounds of work-then-SIGKILL on one store.  After every round: each logged marker is
    present exactly once, no (uidvalidity, uid) ever names two different messages, and the
    index's flags match the file names; every UID that went away is recorded as vanished
    (QRESYNC), none that is there, and no MODSEQ is above the folder's HIGHESTMODSEQ.
    """
    root = tmp_path / "alice"
    log = tmp_path / "stored.log"
    rng = random.Random(20261128)
    history: dict[tuple, str] = {}
    for round_ in range(12):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(root), str(log), str(round_)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.2))
            raise AssertionError(f"the worker stopped by itself: {proc.stderr.read().decode()[-2000:]}")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen, problems, vanished = survey(root)
        assert problems == [], problems
        markers = list(seen.values())
        lines = log.read_text().split() if log.exists() else []
        doomed = {line[1:] for line in lines if line.startswith("-")}
        stored = [line for line in lines if not line.startswith("-")]
        assert stored, "the worker stored nothing before it was killed"
        for marker in stored:
            expected = (0, 1) if marker in doomed else (1,)
            assert markers.count(marker) in expected, (round_, marker, markers.count(marker))
        assert len(markers) == len(set(markers)), "a message appears twice"
        for key, marker in seen.items():
            assert history.setdefault(key, marker) == marker, f"UID {key} reused"
        for name, validity, uid in history:
            if (name, validity, uid) not in seen and (name, validity) in vanished:
                assert uid in vanished[(name, validity)], (round_, name, uid, "gone but not vanished")
