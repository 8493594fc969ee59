"""
Real mail clients from Debian against a real server: mbsync (isync) two-way sync and mutt in
batch mode.  scripts/test installs them.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pymaild.store.delivery import deliver

MBSYNC = shutil.which("mbsync")
MUTT = shutil.which("mutt")


def message(subject: str) -> bytes:
    return (f"From: alice@example.com\r\nTo: postmaster@localhost\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\nbody of {subject}\r\n").encode()


@pytest.fixture
def filled(server):
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for subject in ("one", "two", "three"):
        deliver(home, message(subject))
    return server


def imap_subjects(server, folder: str) -> dict[str, set[str]]:
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        imap.login("postmaster@localhost", server.postmaster_password())
        typ, _ = imap.select(folder)
        assert typ == "OK", folder
        typ, data = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                subject = item[1].decode().split(":", 1)[1].strip()
                flags = item[0].decode().split("FLAGS (", 1)[1].split(")", 1)[0].split()
                out[subject] = set(flags)
        return out


def local_files(folder: Path) -> list[Path]:
    return [p for sub in ("cur", "new") for p in (folder / sub).iterdir()]


@pytest.mark.skipif(MBSYNC is None, reason="Debian's isync (mbsync) is not installed")
def test_mbsync_two_way_sync(filled, tmp_path):
    """
    mbsync pulls INBOX and the special folders; a flag set, a message deleted and a folder with
    a message created locally reach the server on the next sync, and a server-side change comes
    back.
    """
    server = filled
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount pm
Host 127.0.0.1
Port {server.ports['imaps']}
User postmaster@localhost
Pass "{server.postmaster_password()}"
SSLType IMAPS
CertificateFile {server.cert_path}

IMAPStore remote
Account pm

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel everything
Far :remote:
Near :local:
Patterns *
Create Both
Remove None
Expunge Both
SyncState *
""")

    def sync():
        result = subprocess.run([MBSYNC, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    sync()
    inbox = local / "INBOX"
    assert len(local_files(inbox)) == 3
    assert (local / "Sent").is_dir() and (local / "Trash").is_dir()

    # local changes: flag "one" seen, delete "two", new folder with a message
    for path in local_files(inbox):
        text = path.read_bytes()
        if b"Subject: one" in text:
            base = path.name.split(":2,")[0]
            path.rename(inbox / "cur" / f"{base}:2,FS")
        elif b"Subject: two" in text:
            path.rename(inbox / "cur" / (path.name.split(":2,")[0] + ":2,T"))
    projects = local / "Projects"
    for sub in ("cur", "new", "tmp"):
        (projects / sub).mkdir(parents=True)
    deliver(projects, message("plan"))
    sync()

    remote = imap_subjects(server, "INBOX")
    assert set(remote) == {"one", "three"}
    assert {"\\Seen", "\\Flagged"} <= remote["one"]
    assert set(imap_subjects(server, "Projects")) == {"plan"}

    # a server-side change comes back
    with imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30) as imap:
        imap.login("postmaster@localhost", server.postmaster_password())
        imap.append("INBOX", None, None, message("four"))
    sync()
    subjects = {p.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0].strip() for p in local_files(inbox)}
    assert subjects == {b"one", b"three", b"four"}


@pytest.mark.skipif(MUTT is None, reason="Debian's mutt is not installed")
def test_mutt_batch_move_and_delete(filled, tmp_path):
    """
    mutt, driven in batch mode over IMAPS, opens INBOX, saves (moves) one message to Archive
    and deletes another with an expunge on exit.
    """
    server = filled
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(f"""
set folder="imaps://postmaster@localhost@127.0.0.1:{server.ports['imaps']}/"
set imap_user="postmaster@localhost"
set imap_pass="{server.postmaster_password()}"
set spoolfile="+INBOX"
set certificate_file="{tmp_path / 'certs'}"
set ssl_ca_certificates_file="{server.cert_path}"
set ssl_verify_host=no
set delete=yes
set move=no
set confirmappend=no
set confirmcreate=no
set mail_check=0
set timeout=5
set imap_check_subscribed=no
set sort=mailbox-order
""")
    # mutt needs a terminal: script(1) gives it a pseudo-terminal; the keys are pushed.
    keys = "<save-message>=Archive<enter><delete-message><sync-mailbox><quit>"
    env = {**os.environ, "TERM": "xterm", "HOME": str(tmp_path), "COLUMNS": "80", "LINES": "24"}
    command = f"{MUTT} -n -F {muttrc} -f =INBOX -e \"push '{keys}'\""
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )
    remote = imap_subjects(server, "INBOX")
    archive = imap_subjects(server, "Archive")
    assert "one" in archive, (result.stdout[-2000:], result.stderr[-2000:])
    assert "one" not in remote and len(remote) == 1, remote
