"""
Dovecot and pymaild on the same Maildir++: Dovecot (Debian's, run by tests/dovecot_peer.py)
sees the folders, messages, flags and keywords pymaild wrote, and pymaild sees what Dovecot
changes.  Skipped only where Dovecot is not installed (scripts/test installs it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dovecot_peer import DovecotIMAP, dovecot_imap_path  # noqa: E402

from pymaild.store.maildir import UserStore  # noqa: E402

pytestmark = pytest.mark.skipif(dovecot_imap_path() is None, reason="Debian's dovecot-imapd is not installed")


@pytest.fixture
def tmp_path():
    """
    A temporary directory that Dovecot, running as nobody, can reach (pytest's tmp_path is
    0700 under /tmp/pytest-of-root).
    """
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pymaild-interop-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def message(subject: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def fetch_by_subject(imap: DovecotIMAP, folder: str) -> dict[str, set[str]]:
    """
    {subject: flags} of a folder as Dovecot reports them.
    """
    imap.command(f'SELECT "{folder}"')
    untagged, tagged = imap.command("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"OK" in tagged, tagged
    out = {}
    for line in untagged:
        if b" FETCH " not in line:
            continue
        flags = re.search(rb"FLAGS \(([^)]*)\)", line).group(1).decode().split()
        subject = re.search(rb"Subject: ([^\r\n]*)", line).group(1).decode()
        out[subject] = set(flags) - {"\\Recent"}
    return out


def test_dovecot_reads_what_pymaild_wrote(tmp_path):
    """
    Folders (nested, non-ASCII), messages, system flags and keywords written by pymaild are
    what Dovecot lists and fetches.
    """
    root = tmp_path / "alice"
    user = UserStore(root)
    inbox = user.folder("INBOX")
    inbox.append(message("one"), ["\\Seen", "Work"])
    inbox.append(message("two"), ["\\Flagged", "\\Answered"])
    inbox.append(message("three"))
    user.createFolder("Entwürfe").append(message("draft"), ["\\Draft", "$Pending"])
    user.createFolder("Projects/2026")
    user.close()

    with DovecotIMAP(root) as imap:
        untagged, _ = imap.command('LIST "" "*"')
        listed = {re.search(rb'"/" "?([^"]*)"?$', l).group(1).decode() for l in untagged}
        assert listed == {"INBOX", "Entw&APw-rfe", "Projects", "Projects/2026"}
        assert fetch_by_subject(imap, "INBOX") == {
            "one": {"\\Seen", "Work"},
            "two": {"\\Flagged", "\\Answered"},
            "three": set(),
        }
        assert fetch_by_subject(imap, "Entw&APw-rfe") == {"draft": {"\\Draft", "$Pending"}}


def test_pymaild_sees_what_dovecot_changed(tmp_path):
    """
    Flags, keywords, expunges, appends and folders made through Dovecot appear in pymaild at
    its next sync, the untouched messages keeping their UIDs.
    """
    root = tmp_path / "bob"
    user = UserStore(root)
    inbox = user.folder("INBOX")
    for subject in ("a", "b", "c"):
        inbox.append(message(subject))
    before = {m.uid for m in inbox.messages()}
    user.close()

    with DovecotIMAP(root) as imap:
        imap.command("SELECT INBOX")
        assert b"OK" in imap.command("STORE 1 +FLAGS (\\Seen Later)")[1]
        assert b"OK" in imap.command("STORE 2 +FLAGS (\\Deleted)")[1]
        assert b"OK" in imap.command("EXPUNGE")[1]
        assert b"OK" in imap.command("CREATE Archive/2025")[1]

    user = UserStore(root)
    inbox = user.folder("INBOX")
    changes = inbox.sync()
    assert len(changes.expunged) == 1 and changes.flagsChanged
    subjects = {}
    for m in inbox.messages():
        subject = re.search(rb"Subject: (\S+)", inbox.open(m.uid).read()).group(1).decode()
        subjects[subject] = (m.flags | m.keywords, m.uid)
    assert set(subjects) == {"a", "c"}
    assert subjects["a"][0] == {"\\Seen", "Later"}
    assert subjects["c"][0] == set()
    assert {uid for _, uid in subjects.values()} <= before
    # Dovecot creates only .Archive.2025; the IMAP layer shows "Archive" as a \\NonExistent parent
    assert [f.name for f in user.listFolders()] == ["INBOX", "Archive/2025"]
    user.close()
