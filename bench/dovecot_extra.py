"""
What the benchmark needs from Dovecot beyond C{tests/dovecot_peer.py}'s L{DovecotIMAP}:

- L{timedBulkCommand}: send one command on a L{DovecotIMAP} session and read its answer as raw
  bytes, in large chunks, until the tagged completion.  C{DovecotIMAP.command} parses every
  response line in Python (a regular expression per line), which for 100,000 FETCH lines
  costs more than Dovecot's own work; timing it would measure the client.
- L{DovecotLDA}: Debian's C{dovecot-lda}, one process per message, as an MTA runs it, on a
  maildir of its own.

Both run Dovecot as nobody (65534) when we are root, as L{DovecotIMAP} does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dovecot_peer import NOBODY, DovecotError, DovecotIMAP, dovecot_imap_path  # noqa: E402,F401

DOVECOT_LDA = Path("/usr/lib/dovecot/dovecot-lda")
DOVECOT_BIN = Path("/usr/sbin/dovecot")

#: files Dovecot keeps in a maildir root (its index, uid list and list index)
INDEX_PREFIXES = ("dovecot.index", "dovecot-uidlist", "dovecot.list.index", "dovecot-uidvalidity", "dovecot-keywords")


def dovecotVersion() -> str:
    try:
        return subprocess.run([str(DOVECOT_BIN), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def removeIndex(root: Path) -> None:
    """
    Delete Dovecot's index files from a maildir root: its next SELECT builds them anew.
    """
    for entry in os.scandir(root):
        if entry.is_file() and entry.name.startswith(INDEX_PREFIXES):
            os.unlink(entry.path)


def timedBulkCommand(imap: DovecotIMAP, line: str) -> tuple[float, bytes]:
    """
    Send C{line} and read everything up to and including the tagged completion.

    @return: C{(seconds from sending to the completion's last byte, the raw answer)}.
    """
    imap._tag += 1
    tag = b"d%d" % imap._tag
    marker = b"\r\n" + tag + b" "
    out = bytearray()
    stdout = imap._proc.stdout
    t0 = time.perf_counter()
    imap._proc.stdin.write(tag + b" " + line.encode() + b"\r\n")
    imap._proc.stdin.flush()
    start = -1
    while True:
        chunk = stdout.read1(1 << 20)
        if not chunk:
            raise DovecotError(f"Dovecot closed the connection during {line!r}{imap._log()}")
        scanFrom = max(0, len(out) - len(marker))
        out += chunk
        if start < 0:
            if out.startswith(tag + b" "):
                start = 0
            else:
                found = out.find(marker, scanFrom)
                if found >= 0:
                    start = found + 2
        if start >= 0 and out.endswith(b"\r\n") and out.find(b"\r\n", start) == len(out) - 2:
            elapsed = time.perf_counter() - t0
            return elapsed, bytes(out)


class DovecotLDA:
    """
    C{dovecot-lda} delivering into one maildir, one process per message.
    """

    def __init__(self, workdir: Path):
        if not (DOVECOT_LDA.is_file() and os.access(DOVECOT_LDA, os.X_OK)):
            raise DovecotError(f"{DOVECOT_LDA} is not installed (apt-get install dovecot-core)")
        self.asRoot = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="dovecot-lda-", dir=workdir))
        os.chmod(self.dir, 0o755)
        (self.dir / "run").mkdir()
        self.config = self.dir / "dovecot.conf"
        self.config.write_text("\n".join([
            "mail_location = maildir:~",
            "namespace inbox {", "  inbox = yes", "  separator = /", "}",
            f"log_path = {self.dir / 'dovecot.log'}",
            f"base_dir = {self.dir / 'run'}",
            "ssl = no", "listen =", "protocols = imap",
            "first_valid_uid = 1", "first_valid_gid = 1",
        ]) + "\n")
        if self.asRoot:
            for p in (self.dir, self.dir / "run", self.config):
                os.chown(p, NOBODY, NOBODY)

    def deliverMany(self, maildir: Path, message: Path, count: int) -> float:
        """
        Deliver C{message} C{count} times into C{maildir} (created, owned by nobody).

        @return: seconds for all deliveries (each a fresh C{dovecot-lda} process).
        """
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if self.asRoot:
            for p in (maildir, maildir / "cur", maildir / "new", maildir / "tmp", message):
                os.chown(p, NOBODY, NOBODY)
            kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        env = {"USER": "nobody" if self.asRoot else os.environ.get("USER", "user"), "HOME": str(maildir),
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        argv = [str(DOVECOT_LDA), "-c", str(self.config), "-p", str(message)]
        t0 = time.perf_counter()
        for _ in range(count):
            r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=60, **kwargs)
            if r.returncode != 0:
                raise DovecotError(f"dovecot-lda exited {r.returncode}: {r.stderr.decode(errors='replace')}"
                                   f"{self.log()}")
        return time.perf_counter() - t0

    def log(self) -> str:
        try:
            return "\n" + (self.dir / "dovecot.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
