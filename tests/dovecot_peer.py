"""
Debian's Dovecot as a reference peer for tests and benchmarks.

Dovecot's C{imap} binary can run without its master process: started directly with a
configuration file and the environment variables C{USER} and C{HOME}, it greets with
C{* PREAUTH} and speaks IMAP on its standard input and output.  L{DovecotIMAP} runs it that
way on a maildir, so a test can ask Dovecot the same questions it asks pymaild (ENVELOPE,
BODYSTRUCTURE, folder listings, UIDs) and compare the answers byte for byte.

The API::

    dovecot_imap_path() -> Path | None      # the binary, or None when Dovecot is not installed

    with DovecotIMAP(maildir_root) as imap: # a session already authenticated (PREAUTH)
        untagged, tagged = imap.command("SELECT INBOX")
        untagged, tagged = imap.command("FETCH 1:* (ENVELOPE)")
        for response in untagged:
            number, items = parse_fetch(response)   # {"ENVELOPE": b"(...)"}

    make_maildir(root) / maildir_filename(n, data)  # lay out a maildir Dovecot accepts
    scratch_maildir(prefix) -> Path                 # a new one in a temporary directory

C{command} returns every untagged response (C{b"* ..."}, literals inlined exactly as sent, the
final CRLF removed) and the tagged completion line; a NO/BAD completion is returned, while a
Dovecot that dies or does not answer within C{timeout} seconds raises L{DovecotError} (with its
log).  Dovecot refuses to run a mail process as root: when the tests run as root the maildir is
chowned to nobody (65534), Dovecot is told to switch to that user, and every directory above
the maildir must be searchable by others (use C{tempfile.mkdtemp()} chmod 0755, not pytest's
C{tmp_path}).  Dovecot writes its index files into the maildir root, as it does in production.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

DOVECOT_IMAP = Path("/usr/lib/dovecot/imap")
NOBODY = 65534

__all__ = [
    "DovecotError",
    "DovecotIMAP",
    "dovecot_imap_path",
    "make_maildir",
    "maildir_filename",
    "scratch_maildir",
    "parse_fetch",
]


class DovecotError(Exception):
    """Dovecot died, or answered something this module cannot read."""


def dovecot_imap_path() -> Path | None:
    """The Dovecot C{imap} binary, or None when C{dovecot-imapd} is not installed."""
    if DOVECOT_IMAP.is_file() and os.access(DOVECOT_IMAP, os.X_OK):
        return DOVECOT_IMAP
    return None


def make_maildir(root: Path) -> Path:
    """Create C{root} with C{cur/ new/ tmp/} and return it."""
    root = Path(root)
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def scratch_maildir(prefix: str) -> Path:
    """
    A new maildir, C{Maildir/} in a new temporary directory that Dovecot can reach when it
    runs as nobody (chmod 0755).  The caller removes it: C{shutil.rmtree(path.parent)}.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(workdir, 0o755)
    return make_maildir(workdir / "Maildir")


def maildir_filename(number: int, data: bytes, flags: str = "") -> str:
    """
    A C{cur/} file name Dovecot accepts for message bytes C{data}: C{<n>.M<n>P1.peer,S=<size>:2,}.
    Dovecot checks C{S=} against the file, so it must be the physical size.  Numbering the names
    keeps Dovecot's UIDs (assigned in name order) in the order of C{number} when the numbers have
    the same width.
    """
    return f"{number}.M{number}P1.peer,S={len(data)}:2,{flags}"


_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


class DovecotIMAP:
    """
    One Dovecot IMAP session (PREAUTH) on the maildir at C{maildir_root}.

    @param extra_config: lines appended to the generated C{dovecot.conf}.
    @param timeout: seconds to wait for Dovecot's answer to one command.
    """

    def __init__(self, maildir_root: Path, *, extra_config: str = "", timeout: float = 60.0):
        binary = dovecot_imap_path()
        if binary is None:
            raise DovecotError(f"{DOVECOT_IMAP} is not installed (apt-get install dovecot-imapd)")
        self.root = Path(maildir_root).resolve()
        self.timeout = timeout
        self._tag = 0
        self._proc = None
        self._stderr = None
        self._workdir = Path(tempfile.mkdtemp(prefix="dovecot-peer-"))
        try:
            self._start(binary, extra_config)
        except BaseException:
            self.close()
            raise

    def _start(self, binary: Path, extra_config: str) -> None:
        asRoot = os.geteuid() == 0
        log = self._workdir / "dovecot.log"
        lines = [
            f"mail_location = maildir:{self.root}",
            "namespace inbox {",
            "  inbox = yes",
            "  separator = /",
            "}",
            f"log_path = {log}",
            f"base_dir = {self._workdir / 'run'}",
            "ssl = no",
            "listen =",
            "protocols = imap",
            "first_valid_uid = 1",
            "first_valid_gid = 1",
        ]
        (self._workdir / "run").mkdir()
        log.touch()
        if asRoot:
            # Dovecot will not run a mail process as root: it switches to nobody, who must own
            # the maildir (and may write the log).
            lines += [f"mail_uid = {NOBODY}", f"mail_gid = {NOBODY}"]
            _checkReachable(self.root)
            _chownTree(self.root, NOBODY, NOBODY)
            os.chown(log, NOBODY, NOBODY)
            os.chmod(self._workdir, 0o755)
        config = self._workdir / "dovecot.conf"
        config.write_text("\n".join(lines) + "\n" + extra_config + "\n")
        env = {"USER": "nobody" if asRoot else _userName(), "HOME": str(self.root),
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self._stderr = open(self._workdir / "stderr.log", "wb")
        self._proc = subprocess.Popen(
            [str(binary), "-c", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, cwd=str(self._workdir),
        )
        self.greeting = self._withTimeout(self._readResponse)
        if not self.greeting.startswith(b"* PREAUTH"):
            raise DovecotError(f"unexpected greeting {self.greeting!r}{self._log()}")

    def command(self, line: str | bytes) -> tuple[list[bytes], bytes]:
        """
        Send one command (without tag and CRLF; the tag is added) and read until its tagged
        completion.  Returns C{(untagged, tagged)}: every response before the completion (each
        with its literals inline, final CRLF removed) and the completion line itself.  Literals
        in the command are not supported; a NO or BAD completion is returned, not raised.
        Raises L{DovecotError} when Dovecot dies or takes longer than C{timeout} (it is then
        killed).
        """
        if isinstance(line, str):
            line = line.encode("utf-8")
        self._tag += 1
        tag = b"d%d" % self._tag
        try:
            self._proc.stdin.write(tag + b" " + line + b"\r\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise DovecotError(f"Dovecot is gone: {e}{self._log()}") from None

        def read():
            untagged = []
            while True:
                response = self._readResponse()
                if response.startswith(tag + b" "):
                    return untagged, response
                untagged.append(response)

        return self._withTimeout(read)

    def _withTimeout(self, function):
        timer = threading.Timer(self.timeout, self._proc.kill)
        timer.start()
        try:
            return function()
        except DovecotError:
            if not timer.is_alive():
                raise DovecotError(f"Dovecot did not answer within {self.timeout} s"
                                   f"{self._log()}") from None
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        """Log out (politely, then by force) and remove the temporary configuration."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b"z LOGOUT\r\n")
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            proc.stdout.close()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> DovecotIMAP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _readResponse(self) -> bytes:
        out = bytearray()
        stdout = self._proc.stdout
        while True:
            chunk = stdout.readline()
            if not chunk.endswith(b"\n"):
                raise DovecotError(f"Dovecot closed the connection after {bytes(out[-200:])!r}"
                                   f"{self._log()}")
            out += chunk
            m = _LITERAL.search(chunk)
            if m is None:
                return bytes(out[:-2] if out.endswith(b"\r\n") else out[:-1])
            n = int(m.group(1))
            data = stdout.read(n)
            if len(data) != n:
                raise DovecotError(f"Dovecot closed the connection inside a literal{self._log()}")
            out += data

    def _log(self) -> str:
        texts = []
        for path in (self._workdir / "stderr.log", self._workdir / "dovecot.log"):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        text = "".join(texts).strip()
        return f"\nDovecot's log:\n{text}" if text else ""


def parse_fetch(response: bytes) -> tuple[int, dict[str, bytes]]:
    """
    Split an untagged C{* <n> FETCH (...)} response into its message number and its items:
    C{{"ENVELOPE": b"(...)", "RFC822.SIZE": b"123", ...}}, item names upper-cased, values exactly
    as sent (parenthesized lists, strings and literals untouched).
    """
    m = re.match(rb"\* (\d+) FETCH \(", response)
    if m is None or not response.endswith(b")"):
        raise DovecotError(f"not a FETCH response: {response[:200]!r}")
    number = int(m.group(1))
    data = response[m.end():-1]
    items: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        end = pos
        while data[end] != 0x20:  # BODY[HEADER.FIELDS (FROM)]<0> holds spaces in brackets
            end = data.index(b"]", end) + 1 if data[end] == 0x5B else end + 1
        name = data[pos:end].decode("ascii").upper()
        pos = end + 1
        end = _valueEnd(data, pos)
        items[name] = data[pos:end]
        pos = end + 1
    return number, items


def _valueEnd(data: bytes, pos: int) -> int:
    """The end of the IMAP value (atom, string, literal or list) starting at C{pos}."""
    depth = 0
    n = len(data)
    while pos < n:
        c = data[pos]
        if c == 0x28:  # (
            depth += 1
            pos += 1
        elif c == 0x29:  # )
            depth -= 1
            pos += 1
            if depth == 0:
                return pos
        elif c == 0x22:  # "
            pos += 1
            while data[pos] != 0x22:
                pos += 2 if data[pos] == 0x5C else 1
            pos += 1
            if depth == 0:
                return pos
        elif c == 0x7B:  # {
            close = data.index(b"}\r\n", pos)
            pos = close + 3 + int(data[pos + 1:close])
            if depth == 0:
                return pos
        elif c == 0x20:
            if depth == 0:
                return pos
            pos += 1
        else:
            pos += 1
    return pos


def _userName() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"


def _checkReachable(root: Path) -> None:
    for parent in root.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise DovecotError(
                f"Dovecot runs as nobody and cannot reach {root}: {parent} is not searchable "
                "by others (use a directory from tempfile.mkdtemp() chmod 0755, not tmp_path)")


def _chownTree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
