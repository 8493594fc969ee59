"""
The IMAP benchmark of issue 4: pymaild's IMAP server side by side with a real, listening
Dovecot, in the same run, on the same generated INBOX (hard links to the same files).

    .venv/bin/python bench/imap_bench.py [--messages 10000,100000] [--repeat 3] [--smoke]

Measures (see bench/README.md), for each message count:
  1. LOGIN+SELECT INBOX: connect, greeting, LOGIN, SELECT; time to the tagged OK of SELECT
     (and the SELECT alone)
  2. UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE): first (summaries computed /
     Dovecot's cache filled; each round after the first restarts the servers without their
     indexes, built again by an untimed SELECT; the files read once beforehand, so that
     pymaild, measured first, does not read the disk for both) and warm; then UID FETCH 1:*
     (FLAGS), warm and right after a STORE to one message
  3. FETCH 1:N BODY.PEEK[] as MB/s (N capped at --body-cap)
  4. SEARCH FROM / SUBJECT / TEXT
  5. STORE 1:* +FLAGS.SILENT (\\Seen), then -FLAGS.SILENT (\\Seen) (measured last; the original
     flags are put back, untimed, before each run after the first)
  6. a mixed workload: 10 concurrent sessions doing random SELECT / FETCH FLAGS / FETCH
     BODY.PEEK[] / STORE / NOOP: operations per second and p99 latency
  7. server memory per idle connection: 1,000 and 5,000 logged-in sessions that SELECT INBOX
     and IDLE on the smallest INBOX of the run, 1,000 on the larger ones

It prints pymaild / Dovecot ratios of times (for rates: Dovecot's rate / pymaild's); it asserts
nothing.  Traffic goes to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import collections
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import maildir_gen  # noqa: E402
from dovecot_extra import DOVECOT_BIN, NOBODY, dovecotVersion  # noqa: E402
from store_bench import fmtRatio, fmtTime, log, machineLine, ratio  # noqa: E402

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
PYMAILDCTL = BIN / "pymaildctl"
PYSPY = BIN / "py-spy"
USER = "bench@localhost"
PASSWORD = "Bench-pass-2024"
HOST = "127.0.0.1"

#: how the sessions log in: "LOGIN", or "PLAIN" (AUTHENTICATE PLAIN) when a server advertises
#: LOGINDISABLED on the plaintext connection; chosen once by L{chooseLogin}, the same for both
LOGIN_MODE = {"mode": "LOGIN"}
PLAIN_RESPONSE = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()

#: the searches of row 4: (label, command); the terms occur in the generated mail
SEARCHES = (
    ("SEARCH FROM", 'SEARCH FROM "mallory.robinson"'),
    ("SEARCH SUBJECT", 'SEARCH SUBJECT "budget review"'),
    ("SEARCH TEXT", 'SEARCH TEXT "quarterly"'),
)
ENVELOPE_FETCH = "UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"
FLAGS_FETCH = "UID FETCH 1:* (FLAGS)"
#: the mixed workload: operation -> weight
MIX = (("SELECT", 1), ("FETCH FLAGS", 3), ("FETCH BODY", 3), ("STORE", 2), ("NOOP", 1))


class CommandTimeout(Exception):
    pass


class ServerGone(Exception):
    pass


class Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise Deadline("the benchmark ran over --time-limit")


def _terminated(signum, frame):
    raise Deadline("terminated (SIGTERM)")


def freePort() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def raiseNofile(want: int) -> int:
    """
    Raise this process's RLIMIT_NOFILE (the servers inherit it); root may raise the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- process memory --------------------------------------------------------------------------

def _statusKB(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pssKB(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def processTree(root: int) -> list[tuple[int, str]]:
    """
    C{root} and all its descendants: C{(pid, comm)}.
    """
    children = collections.defaultdict(list)
    comm = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[ppid].append(int(entry))
        comm[int(entry)] = name
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append((pid, comm.get(pid, "?")))
        todo.extend(children.get(pid, ()))
    return out


def memory(root: int) -> dict:
    """
    RSS and PSS (KB) of a process tree, and of its C{imap} processes alone.
    """
    tree = processTree(root)
    imap = [pid for pid, name in tree if name == "imap"]
    return {
        "rss": sum(_statusKB(pid, "VmRSS") for pid, _ in tree),
        "pss": sum(_pssKB(pid) for pid, _ in tree),
        "imapRss": sum(_statusKB(pid, "VmRSS") for pid in imap),
        "imapProcesses": len(imap),
        "processes": len(tree),
    }


# --- the servers -----------------------------------------------------------------------------

#: every server this run made: stopped at the end whatever happens
STARTED: list[Server] = []


class Server:
    name = "?"
    proc: subprocess.Popen | None = None

    def __init__(self, root: Path):
        self.root = root
        self.port = 0
        self._log = None
        STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _waitListening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logTail()}")
            try:
                s = socket.create_connection((HOST, self.port), timeout=2)
                s.settimeout(5)
                greeting = s.recv(4096)
                s.close()
                if greeting.startswith(b"* OK"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening within {timeout} s:\n{self.logTail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def indexFiles(self) -> list[Path]:
        raise NotImplementedError

    def forgetIndex(self) -> None:
        """Restart without the mailbox's index (its caches): the next SELECT builds it again."""
        self.stop()
        for path in self.indexFiles():
            path.unlink(missing_ok=True)
        self.start()

    def logTail(self) -> str:
        return ""

    def setPassword(self, field: str) -> None:
        raise NotImplementedError


#: the environment pymaild runs in: PYTHONPATH points at the snapshot of its sources
PYMAILD_ENV: dict[str, str] = dict(os.environ)


def snapshotSources(work: Path, source: str, name: str = "pymaild-src") -> tuple[Path, str]:
    """
    A copy of pymaild's sources that the servers of this run import (others may edit the
    working tree while it runs), in C{work/name}: C{worktree} copies the files as they are
    now, any other C{source} is a git revision (C{HEAD}: the last commit).  PYMAILD_ENV's
    PYTHONPATH points at it.  Returns the directory and a line for the table's header.
    """
    dest = work / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, timeout=30).stdout.strip() or "?"
    if source != "worktree":
        archive = subprocess.run(["git", "-C", str(REPO), "archive", source, "pymaild", "twisted"],
                                 capture_output=True, timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        line = f"pymaild: commit {rev} (git archive HEAD)" if source == "HEAD" else f"pymaild: git archive {source}"
    else:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        shutil.copytree(REPO / "pymaild", dest / "pymaild", ignore=ignore)
        shutil.copytree(REPO / "twisted", dest / "twisted", ignore=ignore)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "pymaild", "twisted"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
        dirty = [x[3:] for x in dirty if x.strip()]
        line = (f"pymaild: working tree copied at {time.strftime('%H:%M:%S')} (commit {rev}"
                + (f" + uncommitted: {', '.join(dirty)})" if dirty else ", clean)"))
    # compiled as pip compiles an installed package: without it every server start compiled all
    # of pymaild again (about 0.2 s) where PYTHONDONTWRITEBYTECODE is set, as on the
    # development machines, and the first start did everywhere
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    PYMAILD_ENV["PYTHONPATH"] = str(dest)
    check = subprocess.run([sys.executable, "-c", "import pymaild; print(pymaild.__file__)"], env=PYMAILD_ENV, cwd=work,
                           capture_output=True, text=True, timeout=60).stdout.strip()
    if not check.startswith(str(dest)):
        raise RuntimeError(f"the snapshot is not what pymaild imports: {check}")
    return dest, line


class Pymaild(Server):
    name = "pymaild"

    def __init__(self, root: Path, maildir: Path):
        super().__init__(root)
        self.data = root / "data"
        self.config = root / "pymaild.toml"
        self.maildir = self.data / "mail" / "localhost" / "bench"
        self.logPath = root / "pymaild.log"
        self.port = freePort()
        root.mkdir(parents=True)
        lines = ["[server]", 'hostname = "bench.localhost"', "shutdown_timeout = 5", "", "[listen]"]
        for name in ("smtp", "submission", "smtps", "imaps", "pop3", "pop3s"):
            lines.append(f"{name} = []")
        lines += [f'imap = ["{HOST}:{self.port}"]', "",
                  "[domains]", 'local = ["localhost"]', "",
                  "[auth]", 'plaintext_networks = ["127.0.0.0/8"]', "",
                  "[limits]", "max_connections = 20000", "max_connections_per_ip = 20000",
                  "max_connections_per_user = 20000", ""]
        self.config.write_text("\n".join(lines))
        r = self.ctl("user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"pymaildctl user add failed: {r.stdout}{r.stderr}")
        self.maildir.parent.mkdir(parents=True, exist_ok=True)
        maildir_gen.linkCopy(maildir, self.maildir)
        maildir_gen.settle(self.maildir)

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(PYMAILDCTL), "--config", str(self.config), "--data-dir", str(self.data), *args],
                              input=input, capture_output=True, text=True, timeout=120, env=PYMAILD_ENV)

    def passwordField(self) -> str:
        for line in (self.data / "passwd").read_text().splitlines():
            if line.startswith(USER + ":"):
                return line.split(":")[1]
        raise RuntimeError("no bench user in pymaild's passwd-file")

    def setPassword(self, field: str) -> None:
        path = self.data / "passwd"
        out = []
        for line in path.read_text().splitlines():
            if line.startswith(USER + ":"):
                parts = line.split(":")
                parts[1] = field
                line = ":".join(parts)
            out.append(line)
        tmp = path.with_suffix(".bench-tmp")
        tmp.write_text("\n".join(out) + "\n")
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)

    def start(self) -> None:
        self._log = open(self.logPath, "ab")
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "pymaild", "--config", str(self.config), "--data-dir", str(self.data)],
            cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=PYMAILD_ENV)
        self._waitListening()

    def indexFiles(self) -> list[Path]:
        return [self.maildir / ("pymaild.index.sqlite" + suffix) for suffix in ("", "-wal", "-shm")]

    def logTail(self) -> str:
        try:
            return self.logPath.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def memory(self) -> dict:
        return memory(self.pid)


class Dovecot(Server):
    name = "Dovecot"

    def __init__(self, root: Path, maildir: Path, passwordField: str, processLimit: int):
        super().__init__(root)
        self.home = root / "home"
        self.conf = root / "dovecot.conf"
        self.passwd = root / "passwd"
        self.logPath = root / "dovecot.log"
        self.port = freePort()
        root.mkdir(parents=True)
        os.chmod(root, 0o755)
        # Dovecot's sockets live under base_dir, and a UNIX socket's path has at most 107 bytes
        # (token-login/imap-urlauth is the longest): a deep work directory (bench/run's) gets
        # a short one of its own
        run = root / "run"
        if len(str(run)) > 50:
            run = Path(tempfile.mkdtemp(prefix="pymaild-dv-"))
            atexit.register(shutil.rmtree, run, True)
        else:
            run.mkdir()
        os.chmod(run, 0o755)
        (root / "state").mkdir()
        maildir_gen.linkCopy(maildir, self.home)
        if os.geteuid() == 0:
            for dirpath, dirnames, filenames in os.walk(self.home):
                os.chown(dirpath, NOBODY, NOBODY)
                for name in filenames:
                    os.chown(os.path.join(dirpath, name), NOBODY, NOBODY)
        maildir_gen.settle(self.home)
        self.setPassword(passwordField)
        clients = max(12000, 2 * processLimit)
        self.conf.write_text(f"""\
# generated by bench/imap_bench.py
base_dir = {run}
state_dir = {root / 'state'}
log_path = {self.logPath}
protocols = imap
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = {self.passwd}
}}
userdb {{
  driver = passwd-file
  args = {self.passwd}
}}
mail_location = maildir:~
namespace inbox {{
  inbox = yes
  separator = /
}}
first_valid_uid = 1
first_valid_gid = 1
default_client_limit = {clients}
default_process_limit = {processLimit}
default_vsz_limit = 0
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
service imap {{
  process_limit = {processLimit}
}}
protocol imap {{
  mail_max_userip_connections = {processLimit}
}}
""")

    def setPassword(self, field: str) -> None:
        tmp = self.passwd.with_suffix(".tmp")
        tmp.write_text(f"{USER}:{field}:{NOBODY}:{NOBODY}::{self.home}::\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.passwd)

    def start(self) -> None:
        self._log = open(self.root / "dovecot.stderr", "ab")
        self.proc = subprocess.Popen([str(DOVECOT_BIN), "-F", "-c", str(self.conf)], cwd=self.root,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self._waitListening()

    def indexFiles(self) -> list[Path]:
        # (dovecot-uidlist and dovecot-keywords are the maildir's, not the index's: kept)
        return list(self.home.glob("dovecot.index*"))

    def logTail(self) -> str:
        texts = []
        for p in (self.root / "dovecot.stderr", self.logPath):
            try:
                texts.append(p.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(texts)

    def memory(self) -> dict:
        return memory(self.pid)


# --- a minimal blocking IMAP client ------------------------------------------------------------

_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


class Session:
    """
    One IMAP connection over a blocking socket.  C{command} parses responses (literals inline);
    C{bulk} reads the raw answer in large chunks, so that the client costs little next to the
    server's work.
    """

    _tags = 0

    def __init__(self, port: int, timeout: float = 60):
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.greeting = self._readResponse(time.monotonic() + timeout)

    def _tag(self) -> bytes:
        Session._tags += 1
        return b"Q%05dz" % Session._tags

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandTimeout()
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            raise CommandTimeout() from None
        except OSError as e:
            raise ServerGone(str(e)) from None
        if not data:
            raise ServerGone("connection closed")
        self.buf += data

    def _readLine(self, deadline: float) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            start = max(0, len(self.buf) - 1)
            self._recv(deadline)

    def _readResponse(self, deadline: float) -> bytes:
        out = bytearray()
        while True:
            line = self._readLine(deadline)
            out += line
            m = _LITERAL.search(line)
            if m is None:
                return bytes(out)
            n = int(m.group(1))
            while len(self.buf) < n:
                self._recv(deadline)
            out += b"\r\n" + self.buf[:n]
            del self.buf[:n]

    def command(self, line: str, timeout: float | None = None) -> tuple[list[bytes], bytes]:
        deadline = time.monotonic() + (timeout or self.timeout)
        tag = self._tag()
        self.sock.sendall(tag + b" " + line.encode() + b"\r\n")
        untagged = []
        while True:
            r = self._readResponse(deadline)
            if r.startswith(tag + b" "):
                return untagged, r[len(tag) + 1 :]
            untagged.append(r)

    def check(self, line: str, timeout: float | None = None) -> list[bytes]:
        untagged, tagged = self.command(line, timeout)
        if not tagged.startswith(b"OK"):
            raise RuntimeError(f"{line!r}: {tagged[:300]!r}")
        return untagged

    def bulk(self, line: str, timeout: float | None = None) -> tuple[float, bytes, bytes]:
        """
        Send C{line}, read everything up to the tagged completion as raw bytes.

        @return: C{(seconds from sending to the last byte, the raw answer, the tagged status line)}.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        tag = self._tag()
        marker = b"\r\n" + tag + b" "
        self.buf.clear()
        t0 = time.perf_counter()
        self.sock.sendall(tag + b" " + line.encode() + b"\r\n")
        start = -1
        scan = 0
        while True:
            self._recv(deadline)
            if start < 0:
                if self.buf.startswith(tag + b" "):
                    start = 0
                else:
                    found = self.buf.find(marker, scan)
                    if found >= 0:
                        start = found + 2
                    else:
                        scan = max(0, len(self.buf) - len(marker))
            if start >= 0:
                end = self.buf.find(b"\r\n", start)
                if end >= 0:
                    elapsed = time.perf_counter() - t0
                    raw = bytes(self.buf[:start])
                    tagged = bytes(self.buf[start + len(tag) + 1 : end])
                    del self.buf[: end + 2]
                    return elapsed, raw, tagged

    def login(self) -> None:
        if LOGIN_MODE["mode"] == "LOGIN":
            self.check(f'LOGIN {USER} "{PASSWORD}"')
            return
        deadline = time.monotonic() + self.timeout
        tag = self._tag()
        self.sock.sendall(tag + b" AUTHENTICATE PLAIN\r\n")
        r = self._readResponse(deadline)
        if not r.startswith(b"+"):
            raise RuntimeError(f"AUTHENTICATE PLAIN: {r[:200]!r}")
        self.sock.sendall(PLAIN_RESPONSE.encode() + b"\r\n")
        while True:
            r = self._readResponse(deadline)
            if r.startswith(tag + b" "):
                if not r[len(tag) + 1 :].startswith(b"OK"):
                    raise RuntimeError(f"AUTHENTICATE PLAIN: {r[:200]!r}")
                return

    def select(self) -> int:
        for r in self.check("SELECT INBOX"):
            parts = r.split()
            if len(parts) == 3 and parts[2] == b"EXISTS":
                return int(parts[1])
        raise RuntimeError("SELECT INBOX gave no EXISTS")

    def close(self) -> None:
        try:
            self.sock.settimeout(5)
            self.sock.sendall(b"Z LOGOUT\r\n")
        except OSError:
            pass
        self.sock.close()


def chooseLogin(servers: list[Server], notes: list[str]) -> None:
    """
    LOGIN, unless a server advertises LOGINDISABLED on this plaintext connection: then
    AUTHENTICATE PLAIN (one more round trip) for both servers alike.
    """
    refusing = []
    for server in servers:
        s = Session(server.port, 30)
        try:
            caps = b" ".join(s.check("CAPABILITY")).upper().split()
        finally:
            s.close()
        if b"LOGINDISABLED" in caps:
            if b"AUTH=PLAIN" not in caps:
                raise RuntimeError(f"{server.name} advertises LOGINDISABLED and no AUTH=PLAIN on {HOST}")
            refusing.append(server.name)
    if refusing:
        LOGIN_MODE["mode"] = "PLAIN"
        notes.append(f"{' and '.join(refusing)} advertised LOGINDISABLED on the plaintext connection from {HOST} "
                     "despite [auth] plaintext_networks: both servers log in with AUTHENTICATE PLAIN instead of LOGIN")
    else:
        LOGIN_MODE["mode"] = "LOGIN"


def openSession(server: Server, timeout: float) -> Session:
    s = Session(server.port, timeout)
    s.login()
    s.select()
    return s


def compressUids(uids: list[int]) -> list[str]:
    """
    Sorted UIDs as IMAP set ranges (C{"1:5"}, C{"7"}).
    """
    out = []
    uids = sorted(uids)
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(f"{uids[i]}" if i == j else f"{uids[i]}:{uids[j]}")
        i = j + 1
    return out


def chunkedSets(ranges: list[str], limit: int = 8000) -> list[str]:
    out, cur = [], []
    size = 0
    for r in ranges:
        if cur and size + len(r) + 1 > limit:
            out.append(",".join(cur))
            cur, size = [], 0
        cur.append(r)
        size += len(r) + 1
    if cur:
        out.append(",".join(cur))
    return out


# --- the measurements (one server, one sample each) ------------------------------------------

def measureLoginSelect(server: Server, timeout: float) -> dict:
    t0 = time.perf_counter()
    s = Session(server.port, timeout)
    s.login()
    t1 = time.perf_counter()
    n = s.select()
    t2 = time.perf_counter()
    s.close()
    return {"loginSelect": t2 - t0, "select": t2 - t1, "messages": n}


def measureBulk(server: Server, line: str, timeout: float) -> dict:
    s = openSession(server, timeout)
    try:
        elapsed, raw, tagged = s.bulk(line, timeout)
    finally:
        s.close()
    return {"time": elapsed, "bytes": len(raw), "raw": raw, "tagged": tagged}


def measureCounted(server: Server, line: str, expected: int, timeout: float, seen: dict | None = None) -> dict:
    """
    L{measureBulk}, checked: C{expected} FETCH responses or a RuntimeError; with C{seen}, the
    number of \\Seen in the answer goes there under the server's name.
    """
    m = measureBulk(server, line, timeout)
    got = countFetches(m["raw"])
    if seen is not None:
        seen[server.name] = m["raw"].count(b"\\Seen")
    m.pop("raw")
    if got != expected:
        raise RuntimeError(f"{line}: {got} FETCH responses, {expected} expected ({m['tagged'][:60]!r})")
    return m


def measureFlagsAfterStore(server: Server, size: int, timeout: float) -> dict:
    """
    UID FETCH 1:* (FLAGS) right after a STORE to one message (pymaild then reads its flag
    index again); the flag is taken back afterwards.
    """
    session = openSession(server, timeout)
    try:
        session.check("UID STORE 1 +FLAGS.SILENT (\\Flagged)")
        elapsed, raw, tagged = session.bulk(FLAGS_FETCH, timeout)
        session.check("UID STORE 1 -FLAGS.SILENT (\\Flagged)")
    finally:
        session.close()
    if countFetches(raw) != size or b"\\Flagged" not in raw:
        raise RuntimeError(f"{FLAGS_FETCH} after STORE: {countFetches(raw)} FETCH responses ({tagged[:60]!r})")
    return {"time": elapsed}


def seenUids(server: Server, timeout: float) -> set[int]:
    s = openSession(server, timeout)
    try:
        _, raw, tagged = s.bulk("UID FETCH 1:* (FLAGS)", timeout)
    finally:
        s.close()
    out = set()
    for m in re.finditer(rb"\* \d+ FETCH \(([^\r\n]*)\)", raw):
        items = m.group(1)
        u = re.search(rb"UID (\d+)", items)
        if u and b"\\Seen" in items:
            out.add(int(u.group(1)))
    return out


def measureStore(server: Server, seen: set[int], timeout: float, state: dict) -> dict:
    """
    Time C{STORE 1:* +FLAGS.SILENT (\\Seen)} then C{-FLAGS.SILENT}.  A run after the first puts
    the original \\Seen flags back first (untimed), so that every run starts from the same flags;
    the last run leaves every message unseen.
    """
    s = openSession(server, timeout)
    try:
        if state.get("dirty"):
            t0 = time.perf_counter()
            sets = chunkedSets(compressUids(list(seen)))
            for uidSet in sets:
                s.check(f"UID STORE {uidSet} +FLAGS.SILENT (\\Seen)", timeout)
            log(f"  {server.name}: original \\Seen flags restored in {len(sets)} commands, "
                f"{fmtTime(time.perf_counter() - t0)}")
            state["dirty"] = False
            now = seenUids(server, timeout)
            if now != seen:
                state["restoreMismatch"] = f"{len(now):,} seen after restoring {len(seen):,}"
        state["dirty"] = True
        plus, _, t1 = s.bulk("STORE 1:* +FLAGS.SILENT (\\Seen)", timeout)
        minus, _, t2 = s.bulk("STORE 1:* -FLAGS.SILENT (\\Seen)", timeout)
        for tagged in (t1, t2):
            if not tagged.startswith(b"OK"):
                raise RuntimeError(f"STORE: {tagged[:200]!r}")
    finally:
        s.close()
    return {"plus": plus, "minus": minus}


def countFetches(raw: bytes) -> int:
    return len(re.findall(rb"(?:^|\n)\* \d+ FETCH \(", raw))


def searchCount(raw: bytes) -> int:
    n = 0
    for line in raw.split(b"\r\n"):
        if line.startswith(b"* SEARCH"):
            n += len(line.split()) - 2
    return n


# --- the mixed workload (asyncio) ------------------------------------------------------------

class AsyncSession:
    def __init__(self, reader, writer):
        self.r, self.w = reader, writer
        self.n = 0

    @classmethod
    async def open(cls, port: int) -> AsyncSession:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 22)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = cls(reader, writer)
        s.greeting = await s.response()
        return s

    async def response(self) -> bytes:
        out = b""
        while True:
            line = await self.r.readuntil(b"\r\n")
            out += line
            m = _LITERAL.search(line[:-2])
            if m is None:
                return out
            out += await self.r.readexactly(int(m.group(1)))

    async def command(self, line: str) -> tuple[bytes, list[bytes]]:
        self.n += 1
        tag = b"a%d" % self.n
        self.w.write(tag + b" " + line.encode() + b"\r\n")
        untagged = []
        while True:
            r = await self.response()
            if r.startswith(tag + b" "):
                return r[len(tag) + 1 :], untagged
            untagged.append(r)

    async def check(self, line: str) -> list[bytes]:
        tagged, untagged = await self.command(line)
        if not tagged.startswith(b"OK"):
            raise RuntimeError(f"{line!r}: {tagged[:200]!r}")
        return untagged

    async def login(self) -> None:
        if LOGIN_MODE["mode"] == "LOGIN":
            await self.check(f'LOGIN {USER} "{PASSWORD}"')
            return
        self.n += 1
        tag = b"a%d" % self.n
        self.w.write(tag + b" AUTHENTICATE PLAIN\r\n")
        r = await self.response()
        if not r.startswith(b"+"):
            raise RuntimeError(f"AUTHENTICATE PLAIN: {r[:200]!r}")
        self.w.write(PLAIN_RESPONSE.encode() + b"\r\n")
        while True:
            r = await self.response()
            if r.startswith(tag + b" "):
                if not r[len(tag) + 1 :].startswith(b"OK"):
                    raise RuntimeError(f"AUTHENTICATE PLAIN: {r[:200]!r}")
                return

    def close(self) -> None:
        try:
            self.w.close()
        except Exception:
            pass


async def _mixedSession(port: int, index: int, seed: int, seconds: float, start: asyncio.Event, ready: list,
                        lat: dict, errors: collections.Counter, rate: float | None = None) -> None:
    s = await AsyncSession.open(port)
    try:
        await s.login()
        exists = 0
        for r in await s.check("SELECT INBOX"):
            p = r.split()
            if len(p) == 3 and p[2] == b"EXISTS":
                exists = int(p[1])
        rng = random.Random(seed * 1000 + index)
        pacing = random.Random(seed * 1000 + index + 500)  # (the same operations paced or not)
        ops = [name for name, w in MIX for _ in range(w)]
        ready.append(index)
        await start.wait()
        deadline = time.monotonic() + seconds
        due = time.perf_counter()
        while time.monotonic() < deadline:
            if rate is not None:
                # paced: this session's commands fall due at Poisson times (rate / sessions each);
                # a command that fell due while its session still waited for the one before is
                # charged that wait (its latency counts from when it fell due); one sent on time
                # counts from its sending (the client's timer wakes up to a millisecond late:
                # that is not the server's)
                due += pacing.expovariate(rate)
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                if time.monotonic() >= deadline:
                    break
            op = rng.choice(ops)
            n = rng.randint(1, max(1, exists))
            if op == "SELECT":
                line = "SELECT INBOX"
            elif op == "FETCH FLAGS":
                line = f"FETCH {n} (FLAGS)"
            elif op == "FETCH BODY":
                line = f"FETCH {n} (BODY.PEEK[])"
            elif op == "STORE":
                line = f"STORE {n} {rng.choice('+-')}FLAGS (\\Flagged)"
            else:
                line = "NOOP"
            t0 = time.perf_counter() if rate is None or wait > 0 else due
            tagged, untagged = await s.command(line)
            lat[op].append(time.perf_counter() - t0)
            if not tagged.startswith(b"OK"):
                errors[op] += 1
            if op == "SELECT":
                for r in untagged:
                    p = r.split()
                    if len(p) == 3 and p[2] == b"EXISTS":
                        exists = int(p[1])
        try:
            await asyncio.wait_for(s.command("LOGOUT"), 10)
        except Exception:
            pass
    finally:
        s.close()


async def _mixed(port: int, sessions: int, seconds: float, seed: int, rate: float | None = None) -> dict:
    start = asyncio.Event()
    ready: list = []
    lat = collections.defaultdict(list)
    errors = collections.Counter()
    tasks = [asyncio.create_task(_mixedSession(port, i, seed, seconds, start, ready, lat, errors,
                                               None if rate is None else rate / sessions))
             for i in range(sessions)]
    t_end = time.monotonic() + 120
    while len(ready) < sessions and time.monotonic() < t_end:
        done = [t for t in tasks if t.done() and t.exception()]
        if done:
            raise done[0].exception()
        await asyncio.sleep(0.02)
    t0 = time.perf_counter()
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 120)
    wall = time.perf_counter() - t0
    every = sorted(x for xs in lat.values() for x in xs)
    return {
        "ops": len(every), "wall": wall, "opsPerSec": len(every) / wall,
        "p50": every[len(every) // 2] if every else None,
        "p99": every[min(len(every) - 1, int(len(every) * 0.99))] if every else None,
        "perOp": {k: {"n": len(v), "p50": sorted(v)[len(v) // 2], "p99": sorted(v)[min(len(v) - 1, int(len(v) * 0.99))]}
                  for k, v in lat.items() if v},
        "errors": dict(errors),
    }


def measureMixed(server: Server, sessions: int, seconds: float, seed: int = 0, rate: float | None = None) -> dict:
    """
    The mixed workload; runs with the same C{seed} do the same operations on the same messages
    (both servers get seed 1 in their first run, 2 in their second...).  Without C{rate} a
    closed loop (each session sends its next command as soon as the last is answered: the
    servers at saturation); with it, C{rate} commands a second in all, at Poisson times.
    """
    cpu0 = time.process_time()
    m = asyncio.run(_mixed(server.port, sessions, seconds, seed, rate))
    m["clientCpu"] = (time.process_time() - cpu0) / m["wall"]  # includes the logins: an upper bound
    return m


# --- idle connections (asyncio) --------------------------------------------------------------

async def _openIdle(port: int, sem: asyncio.Semaphore, conns: list, stats: collections.Counter) -> None:
    async with sem:
        s = await asyncio.wait_for(AsyncSession.open(port), 60)
        try:
            await asyncio.wait_for(s.login(), 60)
            await asyncio.wait_for(s.check("SELECT INBOX"), 120)
            s.n += 1
            tag = b"a%d" % s.n
            s.w.write(tag + b" IDLE\r\n")
            r = await asyncio.wait_for(s.response(), 60)
            while r.startswith(b"* "):
                r = await asyncio.wait_for(s.response(), 60)
            if r.startswith(b"+"):
                stats["idle"] += 1
            else:
                stats["noIdle"] += 1
                stats["idleAnswer:" + r.decode(errors="replace").strip()[:60]] += 1
        except BaseException:
            s.close()
            raise
        conns.append(s)


async def _idleSteps(server: Server, counts: list[int], settle: float, parallel: int) -> list[dict]:
    conns: list[AsyncSession] = []
    stats = collections.Counter()
    sem = asyncio.Semaphore(parallel)
    out = []
    before = server.memory()
    try:
        for target in counts:
            t0 = time.perf_counter()
            need = target - len(conns)
            results = await asyncio.gather(*[_openIdle(server.port, sem, conns, stats) for _ in range(need)],
                                           return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            opened = time.perf_counter() - t0
            await asyncio.sleep(settle)
            after = server.memory()
            n = len(conns)
            step = {"target": target, "open": n, "failures": len(failures), "seconds": opened,
                    "before": before, "after": after,
                    "rssPerConn": (after["rss"] - before["rss"]) / n if n else None,
                    "pssPerConn": (after["pss"] - before["pss"]) / n if n else None,
                    "idle": stats["idle"], "noIdle": stats["noIdle"],
                    "idleAnswers": [k.split(":", 1)[1] for k in stats if k.startswith("idleAnswer:")]}
            if failures:
                step["firstFailure"] = repr(failures[0])[:200]
            out.append(step)
            log(f"  {server.name}: {n:,} idle connections open ({len(failures)} failed) in {opened:.1f} s, "
                f"RSS {before['rss'] / 1024:.0f} -> {after['rss'] / 1024:.0f} MB "
                f"({step['rssPerConn'] or 0:.0f} KB/conn), PSS {step['pssPerConn'] or 0:.0f} KB/conn")
            if failures and n < target * 0.9:
                break
    finally:
        for s in conns:
            s.close()
        await asyncio.sleep(0.5)
    return out


def measureIdle(server: Server, counts: list[int], settle: float, parallel: int) -> list[dict]:
    return asyncio.run(_idleSteps(server, counts, settle, parallel))


# --- py-spy ------------------------------------------------------------------------------------

class Spy:
    """
    py-spy recording pymaild while one measurement runs; top frames by own time.
    """

    def __init__(self, pid: int, out: Path, rate: int = 200):
        self.out = out
        self.proc = subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                                      "--output", str(out), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)

    def stop(self) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return topFrames(self.out)


def topFrames(path: Path, n: int = 12) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """
    (samples, top frames by own samples, top pymaild frames by inclusive samples).
    """
    own, incl = collections.Counter(), collections.Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0, [], []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [f for f in stack.split(";") if "(" in f]
        if frames:
            own[_short(frames[-1])] += c
        for f in set(_short(f) for f in frames if "pymaild/" in f):
            incl[f] += c
    return total, own.most_common(n), incl.most_common(n)


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for cut in ("/site-packages/", str(REPO) + "/"):
        if cut in where:
            where = where.split(cut, 1)[1]
    return f"{name} ({where})"


# --- statistics and output -------------------------------------------------------------------

def stats(xs: list[float], higher: bool = False) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return (max(xs) if higher else min(xs)), statistics.median(xs)


def fmtRate(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f} {unit}" if x < 100 else f"{x:,.0f} {unit}"


def printTable(r: dict, a: argparse.Namespace) -> None:
    out = []
    w = out.append
    w("")
    w(f"pymaild IMAP benchmark: INBOX of {', '.join(f'{n:,}' for n in r['sizes'])} messages "
      f"(average {r['avgSize']:,} bytes), repeat {a.repeat}, warm page cache, plaintext IMAP on {HOST}")
    w(f"machine: {r['machine']}; load average {r['loadStart']:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    w(f"{r['source']}; Dovecot {r['dovecotVersion']}; RLIMIT_NOFILE {r['nofile']:,}")
    w(f"login ({'LOGIN' if LOGIN_MODE['mode'] == 'LOGIN' else 'AUTHENTICATE PLAIN'}): the argon2id hash pymaildctl "
      f"wrote ({r['scheme']}), the same hash in Dovecot's passwd-file (rows 1, 6); {{PLAIN}} for the idle "
      "connections (row 7)")
    w("")
    L, C = 46, 11
    w(f"{'':{L}}{'pymaild':>{2 * C}}{'Dovecot':>{2 * C}}{'pymaild / Dovecot':>{2 * C}}")
    w(f"{'':{L}}" + "".join(f"{h:>{C}}" for h in ("best", "median") * 3))
    for size in r["sizes"]:
        res = r["bySize"][str(size)]
        w(f"-- INBOX of {size:,} messages " + "-" * 60)
        for row in res["rows"]:
            label, kind = row["label"], row["kind"]
            p, d = row["pymaild"], row["dovecot"]
            if row.get("pymaildNote"):
                pb = pm = row["pymaildNote"]
                rb = rm = "-"
                db, dm = stats(d, higher=kind in ("rate", "mbps"))
                db, dm = _fmt(db, kind), _fmt(dm, kind)
            else:
                higher = kind in ("rate", "mbps")
                pbv, pmv = stats(p, higher)
                dbv, dmv = stats(d, higher)
                if higher:  # time ratio = Dovecot's rate / pymaild's
                    rbv, rmv = ratio(dbv, pbv), ratio(dmv, pmv)
                else:
                    rbv, rmv = ratio(pbv, dbv), ratio(pmv, dmv)
                pb, pm, db, dm = _fmt(pbv, kind), _fmt(pmv, kind), _fmt(dbv, kind), _fmt(dmv, kind)
                rb, rm = fmtRatio(rbv), fmtRatio(rmv)
                if row.get("dovecotNote"):
                    db = dm = row["dovecotNote"]
                    rb = rm = "-"
            w(f"{label:{L}}" + "".join(f"{x:>{C}}" for x in (pb, pm, db, dm, rb, rm)))
        for note in res.get("notes", []):
            w(f"   {note}")
    for idle in r.get("idle", []):
        w("")
        w(f"server memory per idle connection (INBOX of {idle['size']:,} messages; each connection: LOGIN, "
          f"SELECT INBOX, IDLE; measured {a.idle_settle:.0f} s after the last one opened)")
        w(f"{'':{L}}{'pymaild':>{2 * C}}{'Dovecot':>{2 * C}}{'pymaild / Dovecot':>{2 * C}}")
        w(f"{'':{L}}" + "".join(f"{h:>{C}}" for h in ("RSS", "PSS") * 3))
        for i, target in enumerate(idle["counts"]):
            ps = idle["pymaild"][i] if i < len(idle["pymaild"]) else None
            ds = idle["dovecot"][i] if i < len(idle["dovecot"]) else None

            def kb(step, key):
                return "-" if step is None or step.get(key) is None else f"{step[key]:,.0f} KB"

            rr = ratio(ps and ps["rssPerConn"], ds and ds["rssPerConn"])
            rp = ratio(ps and ps["pssPerConn"], ds and ds["pssPerConn"])
            opened = []
            for name, st in (("pymaild", ps), ("Dovecot", ds)):
                if st is not None and (st["open"] != target or st["failures"]):
                    opened.append(f"{name} {st['open']:,} open, {st['failures']} failed")
            label = f"per connection at {target:,} connections"
            w(f"{label:{L}}" + "".join(f"{x:>{C}}" for x in (kb(ps, "rssPerConn"), kb(ps, "pssPerConn"),
                                                              kb(ds, "rssPerConn"), kb(ds, "pssPerConn"),
                                                              fmtRatio(rr), fmtRatio(rp)))
              + (f"   ({'; '.join(opened)})" if opened else ""))
        for note in idle.get("notes", []):
            w(f"   {note}")
    w("")
    w("ratios: pymaild / Dovecot of times (lower is better, 1.00 = as fast as Dovecot); for MB/s and ops/s the "
      "ratio is Dovecot's rate / pymaild's\n(the time ratio again), for memory pymaild's KB / Dovecot's KB. "
      "best = fastest run, median = middle run; the ratio columns are best/best and median/median.")
    w("Issue 4's target: every ratio within 2x of Dovecot, memory per idle connection below Dovecot's. "
      "Nothing here is a test.")
    print("\n".join(out), flush=True)


def _fmt(x, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "time":
        return fmtTime(x)
    if kind == "mbps":
        return fmtRate(x, "MB/s")
    if kind == "rate":
        return fmtRate(x, "op/s")
    return str(x)


# --- the run -----------------------------------------------------------------------------------

def prepareMaildir(work: Path, messages: int) -> tuple[Path, int]:
    """
    The generated maildir for C{messages} (reused from an earlier run in C{work}).
    """
    gen = work / f"gen-{messages}"
    marker = gen / "generated.json"
    maildir = gen / "maildir"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("messages") == messages and info.get("seed") == maildir_gen.SEED \
                and info.get("mix", "plain") == maildir_gen.DEFAULT_MIX \
                and len(os.listdir(maildir / "cur")) == messages:
            log(f"reusing the generated maildir in {maildir}")
            return maildir, info["bytes"]
    if gen.exists():
        shutil.rmtree(gen)
    gen.mkdir(parents=True)
    log(f"generating {messages:,} messages in {maildir}")
    info = maildir_gen.generate(maildir, messages, progress=lambda n: log(f"  {n:,}"))
    info["seed"] = maildir_gen.SEED
    marker.write_text(json.dumps(info))
    return maildir, info["bytes"]


def warmPageCache(maildir: Path) -> int:
    """Read every message file of C{maildir} once (into the page cache); the bytes read."""
    total = 0
    for sub in ("cur", "new"):
        directory = maildir / sub
        for name in os.listdir(directory):
            with open(directory / name, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


def alternate(a: argparse.Namespace, servers: list[Server], fn, label: str, results: dict,
              notes: list[str], restartOnTimeout: bool = True, budget: float | None = None,
              nextCost: float = 1.0) -> None:
    """
    Run C{fn(server)} C{--repeat} times per server, pymaild and Dovecot taking turns; record
    the samples (or the error) in C{results[server.name]}.  No further round starts when it
    would likely end past C{budget} seconds (C{--row-budget}) from the first: the next round is
    expected to cost C{nextCost} times the average round so far.
    """
    budget = a.row_budget if budget is None else budget
    t0 = time.perf_counter()
    for i in range(a.repeat):
        elapsed = time.perf_counter() - t0
        if i > 0 and elapsed + nextCost * elapsed / i > budget:
            notes.append(f"{label}: {i} run{'s' if i > 1 else ''} instead of {a.repeat} (--row-budget "
                         f"{a.row_budget:g} s)")
            break
        for server in servers:
            slot = results.setdefault(server.name, {"samples": [], "error": None})
            if slot["error"] is not None:
                continue
            os.sync()  # (the last run's writeback, the other server's too, lands in no measurement)
            try:
                slot["samples"].append(fn(server))
            except CommandTimeout:
                slot["error"] = f"timeout (>{a.command_timeout:.0f} s)"
                log(f"{label}: {server.name} timed out; restarting it")
                notes.append(f"{label}: {server.name} did not answer within {a.command_timeout:.0f} s "
                             "(the server was restarted)")
                if restartOnTimeout:
                    server.restart()
            except (RuntimeError, ServerGone, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                slot["error"] = "error"
                text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                if isinstance(e, asyncio.IncompleteReadError):
                    text = "the server closed the connection"
                log(f"{label}: {server.name} failed: {text}; the end of its log:\n"
                    + "\n".join(server.logTail().splitlines()[-12:]))
                notes.append(f"{label}: {server.name} answered {text}")
                if server.proc is None or server.proc.poll() is not None:
                    server.restart()


def runSize(a: argparse.Namespace, work: Path, size: int, avg: dict, profileOnly: bool = False) -> dict:
    maildir, totalBytes = prepareMaildir(work, size)
    avg[size] = totalBytes // size
    root = work / f"run-{size}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    os.chmod(root, 0o755)
    log(f"{size:,} messages: linking the files for both servers")
    pym = Pymaild(root / "pymaild", maildir)
    dov = Dovecot(root / "dovecot", maildir, pym.passwordField(), a.process_limit)
    os.sync()
    servers: list[Server] = [pym, dov]
    rows: list[dict] = []
    notes: list[str] = []
    res = {"rows": rows, "notes": notes}
    T = a.command_timeout
    try:
        for s in servers:
            s.start()
        chooseLogin(servers, notes)
        # untimed: the first SELECT builds each server's index (bench/store_bench.py measures that)
        counts = {}
        for s in servers:
            t0 = time.perf_counter()
            m = measureLoginSelect(s, T)
            counts[s.name] = m["messages"]
            log(f"{s.name}: first LOGIN+SELECT (index build) {fmtTime(time.perf_counter() - t0)}, "
                f"{m['messages']:,} messages")
        if counts["pymaild"] != counts["Dovecot"] or counts["pymaild"] != size:
            notes.append(f"MISMATCH: SELECT INBOX shows pymaild {counts['pymaild']:,}, Dovecot {counts['Dovecot']:,} "
                         f"messages (generated {size:,})")

        def add(label, kind, samples: dict, key=None, transform=None, order=None):
            row = {"label": label, "kind": kind, "pymaild": [], "dovecot": [],
                   "order": order if order is not None else int(label.strip()[0]) if label.strip()[0].isdigit()
                   else rows[-1]["order"]}
            for name, slot in (("pymaild", samples.get("pymaild")), ("dovecot", samples.get("Dovecot"))):
                if slot is None:
                    continue
                vals = [x[key] if key else x for x in slot["samples"]]
                if transform:
                    vals = [transform(x) for x in vals]
                row[name] = vals
                if slot["error"] is not None and not vals:
                    row[name + "Note"] = slot["error"]
            rows.append(row)

        if profileOnly:
            return res

        if 1 in a.rows:
            # 1. LOGIN+SELECT
            r1: dict = {}
            alternate(a, servers, lambda s: measureLoginSelect(s, T), "LOGIN+SELECT", r1, notes)
            add("1. LOGIN+SELECT INBOX (connect to tagged OK)", "time", r1, "loginSelect")
            add("   of which SELECT INBOX", "time", r1, "select")
            log(f"LOGIN+SELECT: pymaild {fmtTime(stats([x['loginSelect'] for x in r1['pymaild']['samples']])[1])}, "
                f"Dovecot {fmtTime(stats([x['loginSelect'] for x in r1['Dovecot']['samples']])[1])}")

        if 2 in a.rows:
            # 2. UID FETCH ENVELOPE: first, then warm
            first: dict = {}
            # The servers' files are hard links of the same generated ones, so whichever reads
            # first fills the page cache for the other: read them all beforehand, untimed, and
            # neither first FETCH pays for the disk.
            t0 = time.perf_counter()
            warmed = warmPageCache(maildir)
            log(f"page cache: read {warmed / 1e6:,.0f} MB of message files in {time.perf_counter() - t0:.1f} s")
            notes.append("first UID FETCH ENVELOPE: the message files were read once beforehand (untimed), so that "
                         "neither server's first FETCH reads the disk (the two share the files as hard links)")
            rounds: collections.Counter = collections.Counter()

            def firstEnvelope(s):
                if rounds[s.name]:
                    # another cold sample: the server restarted without its index (its cache of
                    # ENVELOPEs gone), the index built again by an untimed LOGIN+SELECT
                    s.forgetIndex()
                    if measureLoginSelect(s, T)["messages"] != size:
                        notes.append(f"first UID FETCH ENVELOPE: {s.name}'s rebuilt index has not {size:,} messages")
                rounds[s.name] += 1
                m = measureBulk(s, ENVELOPE_FETCH, T)
                got = countFetches(m["raw"])
                if got != size:
                    notes.append(f"UID FETCH ENVELOPE: {s.name} returned {got:,} FETCH responses ({m['tagged'][:60]!r})")
                m.pop("raw")
                log(f"first UID FETCH ENVELOPE: {s.name} {fmtTime(m['time'])} ({m['bytes'] / 1e6:.1f} MB)")
                return m

            # a round after the first also restarts the servers and builds their indexes again
            alternate(a, servers, firstEnvelope, "first UID FETCH ENVELOPE", first, notes, nextCost=1.5)
            add("2. UID FETCH 1:* (... ENVELOPE), first", "time", first, "time")

            def envelope(s):
                m = measureBulk(s, ENVELOPE_FETCH, T)
                m.pop("raw")
                return m

            r2: dict = {}
            alternate(a, servers, envelope, "UID FETCH ENVELOPE", r2, notes)
            add("   UID FETCH 1:* (... ENVELOPE), warm", "time", r2, "time")

            # what a client syncing a folder's flags sends on every open
            seenCounts: dict = {}

            r2f: dict = {}
            alternate(a, servers, lambda s: measureCounted(s, FLAGS_FETCH, size, T, seenCounts), "UID FETCH FLAGS",
                      r2f, notes)
            add("   UID FETCH 1:* (FLAGS), warm", "time", r2f, "time")

            r2s: dict = {}
            alternate(a, servers, lambda s: measureFlagsAfterStore(s, size, T), "UID FETCH FLAGS", r2s, notes)
            add("   UID FETCH 1:* (FLAGS), after a STORE to one message", "time", r2s, "time")
            if len(set(seenCounts.values())) > 1:
                notes.append(f"UID FETCH FLAGS: the servers disagree on \\Seen: {seenCounts}")

        if 3 in a.rows:
            # 3. bodies
            cap = min(size, a.body_cap)
            bodyLine = f"FETCH 1:{cap} BODY.PEEK[]" if cap < size else "FETCH 1:* BODY.PEEK[]"

            r3: dict = {}
            alternate(a, servers, lambda s: measureCounted(s, bodyLine, cap, T), "BODY.PEEK[]", r3, notes)
            label = "3. FETCH 1:* BODY.PEEK[] (MB/s)" if cap == size else f"3. FETCH 1:{cap:,} BODY.PEEK[] (MB/s)"
            add(label, "mbps", r3, transform=lambda m: m["bytes"] / 1e6 / m["time"])
            if cap < size:
                notes.append(f"row 3: capped to the first {cap:,} of {size:,} messages (--body-cap)")
            log(f"bodies: {label}")

        if 4 in a.rows:
            # 4. SEARCH
            for label, line in SEARCHES:
                found: dict = {}

                def search(s, line=line, found=found):
                    m = measureBulk(s, line, T)
                    if not m["tagged"].startswith(b"OK"):
                        raise RuntimeError(m["tagged"][:120].decode(errors="replace"))
                    found[s.name] = searchCount(m["raw"])
                    m.pop("raw")
                    return m

                r4: dict = {}
                alternate(a, servers, search, label, r4, notes)
                add(f"4. {line}", "time", r4, "time")
                if "pymaild" in found and "Dovecot" in found and found["pymaild"] != found["Dovecot"]:
                    notes.append(f"{line}: pymaild found {found['pymaild']:,} messages, Dovecot {found['Dovecot']:,}")
                elif "Dovecot" in found:
                    rows[-1]["label"] += f" [{found['Dovecot']:,} hits]"
                log(f"{line}: found {found}")

        if 6 in a.rows:
            # 6. mixed workload
            def mixedAlternation(label: str, runsBy: dict, rate: float | None) -> dict:
                results: dict = {}

                def one(s):
                    m = measureMixed(s, a.sessions, a.mixed_seconds, len(runsBy[s.name]) + 1, rate)
                    runsBy[s.name].append(m)
                    log(f"{label}: {s.name} {m['ops']:,} ops in {m['wall']:.1f} s = {m['opsPerSec']:,.1f} op/s, "
                        f"p50 {fmtTime(m['p50'])}, p99 {fmtTime(m['p99'])}, errors {m['errors']}, "
                        f"client CPU {100 * m['clientCpu']:.0f}% of one core")
                    return m

                saved = a.repeat
                a.repeat = a.mixed_repeat
                try:
                    alternate(a, servers, one, label, results, notes, budget=float("inf"))
                finally:
                    a.repeat = saved
                return results

            mixedRuns: dict = collections.defaultdict(list)
            r6 = mixedAlternation("mixed workload", mixedRuns, None)
            add(f"6. mixed, {a.sessions} sessions x {a.mixed_seconds:g} s: ops/s", "rate", r6, "opsPerSec")
            add("   p99 latency", "time", r6, "p99")
            add("   p50 latency", "time", r6, "p50")
            # The same sessions and commands paced to half the slower server's rate (Poisson
            # arrivals, latency from when each command fell due): latency at a load both serve,
            # which the closed loop above cannot show (there every server is saturated and the
            # mean latency is sessions / ops per second)
            rates = [statistics.median(m["opsPerSec"] for m in runs) for runs in mixedRuns.values() if runs]
            if len(rates) == len(servers) and a.mixed_paced:
                rate = min(rates) / 2
                pacedRuns: dict = collections.defaultdict(list)
                r6p = mixedAlternation(f"mixed workload, paced to {rate:,.1f} op/s", pacedRuns, rate)
                add("   p50 latency paced to half the slower server's ops/s", "time", r6p, "p50")
                add("   p99 latency paced to half the slower server's ops/s", "time", r6p, "p99")
                notes.append(f"mixed workload, paced: {rate:,.1f} op/s in all ({rate / a.sessions:,.2f} per session), "
                             "half the slower server's median ops/s above; done: "
                             + ", ".join(f"{name} {statistics.median(m['opsPerSec'] for m in runs):,.1f}"
                                         for name, runs in pacedRuns.items()))
                res["mixedPacedRuns"] = dict(pacedRuns)
            res["mixedRuns"] = dict(mixedRuns)
            for kind, name, runs in [("", n, r) for n, r in mixedRuns.items()] + [
                    (", paced", n, r) for n, r in res.get("mixedPacedRuns", {}).items()]:
                errs = collections.Counter()
                for m in runs:
                    errs.update(m["errors"])
                if errs:
                    notes.append(f"mixed workload{kind}: {name} answered NO/BAD to {dict(errs)}")
                slow = []
                for op in dict(MIX):
                    xs = [m["perOp"][op]["p99"] for m in runs if op in m["perOp"]]
                    ys = [m["perOp"][op].get("p50") for m in runs if m["perOp"].get(op, {}).get("p50") is not None]
                    if xs:
                        slow.append(f"{op} {fmtTime(statistics.median(ys)) + ' / ' if ys else ''}"
                                    f"{fmtTime(statistics.median(xs))}")
                cpu = statistics.median(m["clientCpu"] for m in runs)
                notes.append(f"mixed workload{kind}, {name} p50 / p99 by operation: {', '.join(slow)}; "
                             f"the client used {100 * cpu:.0f}% of a core")
        if 5 in a.rows:
            # 5. STORE, run last: it changes every message's flags
            seen = {s.name: seenUids(s, T) for s in servers}
            storeState = {s.name: {} for s in servers}
            r5: dict = {}
            # a run after the first also puts the original flags back: about one more run's work
            alternate(a, servers, lambda s: measureStore(s, seen[s.name], T, storeState[s.name]), "STORE", r5, notes,
                      nextCost=2.0)
            add("5. STORE 1:* +FLAGS.SILENT (\\Seen)", "time", r5, "plus", order=5)
            add("   STORE 1:* -FLAGS.SILENT (\\Seen)", "time", r5, "minus", order=5)
            for s in servers:
                if storeState[s.name].get("restoreMismatch"):
                    notes.append(f"STORE: {s.name}'s \\Seen flags were not restored between runs: "
                                 f"{storeState[s.name]['restoreMismatch']}")
        rows.sort(key=lambda row: row["order"])
        return res
    finally:
        res["servers"] = servers


def runIdle(a: argparse.Namespace, servers: list[Server], size: int, counts: list[int]) -> dict:
    """
    Row 7, on the servers of C{size}: both restarted (fresh memory), logins switched to
    {PLAIN} on both, one warm-up session, then the idle connections.
    """
    notes = []
    out = {"size": size, "counts": counts, "notes": notes}
    original = next(s for s in servers if isinstance(s, Pymaild)).passwordField()
    for s in servers:
        s.setPassword("{PLAIN}" + PASSWORD)
        s.restart()
        measureLoginSelect(s, a.command_timeout)  # loads the user's store: not a per-connection cost
        time.sleep(1)
        log(f"idle connections on {s.name}: {', '.join(f'{n:,}' for n in counts)}")
        steps = measureIdle(s, counts, a.idle_settle, a.idle_parallel)
        out[s.name.lower()] = steps
        if steps and steps[-1]["idle"]:
            notes.append(f"{s.name}: {steps[-1]['idle']:,} of {steps[-1]['open']:,} connections IDLE-ing "
                         "(continuation request received)")
        if steps and steps[-1]["noIdle"]:
            answers = "; ".join(steps[-1]["idleAnswers"][:2])
            notes.append(f"{s.name}: IDLE refused ({answers}): those connections stay logged in with INBOX "
                         "selected, not IDLE-ing")
        for st in steps:
            if st["failures"]:
                notes.append(f"{s.name}: {st['failures']} of the connections up to {st['target']:,} failed: "
                             f"{st.get('firstFailure', '?')}")
    d = out.get("dovecot") or []
    if d:
        last = d[-1]["after"]
        notes.append(f"Dovecot: sum over its whole process tree ({last['processes']:,} processes, of them "
                     f"{last['imapProcesses']:,} imap: {last['imapRss'] / 1024:,.0f} MB RSS); one imap process "
                     "per connection; RSS counts shared pages in every process, PSS divides them")
    notes.append("pymaild: one process (twistd); per connection = (memory after - before) / connections")
    for s in servers:
        s.setPassword(original)
    return out


def profile(a: argparse.Namespace, work: Path, size: int, servers: list[Server]) -> None:
    """
    py-spy on pymaild while each pymaild measurement runs once more.
    """
    if not PYSPY.exists():
        log(f"--profile: {PYSPY} is missing (.venv/bin/pip install py-spy)")
        return
    pym = next(s for s in servers if isinstance(s, Pymaild))
    pym.setPassword("{PLAIN}" + PASSWORD)  # so that SELECT, not argon2, is what the profile shows
    if pym.proc is None or pym.proc.poll() is not None:
        pym.start()
    outDir = Path(a.profile)
    outDir.mkdir(parents=True, exist_ok=True)
    T = a.command_timeout
    cap = min(size, a.body_cap)
    jobs = [
        ("select", "SELECT INBOX", lambda: [measureLoginSelect(pym, T) for _ in range(5)]),
        ("envelope-1", ENVELOPE_FETCH + " (1st run of this profile)", lambda: measureBulk(pym, ENVELOPE_FETCH, T)),
        ("envelope-2", ENVELOPE_FETCH + " (2nd run)", lambda: measureBulk(pym, ENVELOPE_FETCH, T)),
        ("flags", FLAGS_FETCH + " (5 runs)", lambda: [measureBulk(pym, FLAGS_FETCH, T) for _ in range(5)]),
        ("flags-store", FLAGS_FETCH + " after a STORE (5 runs)",
         lambda: [measureFlagsAfterStore(pym, size, T) for _ in range(5)]),
        ("bodies", f"FETCH 1:{cap} BODY.PEEK[]", lambda: measureBulk(pym, f"FETCH 1:{cap} BODY.PEEK[]", T)),
        *[(f"search-{i}", line, (lambda line=line: measureBulk(pym, line, T))) for i, (_, line) in enumerate(SEARCHES)],
        ("store", "STORE 1:* +FLAGS.SILENT (\\Seen) / -FLAGS.SILENT", lambda: measureStore(pym, seenUids(pym, T), T, {})),
        ("mixed", f"mixed workload {a.mixed_seconds:g} s", lambda: measureMixed(pym, a.sessions, a.mixed_seconds)),
    ]
    wanted = set(a.profile_only.split(",")) if a.profile_only else None
    for key, what, fn in jobs:
        if wanted and key not in wanted:
            continue
        spy = Spy(pym.pid, outDir / f"{key}.txt", a.profile_rate)
        t0 = time.perf_counter()
        try:
            fn()
            status = "ok"
        except (CommandTimeout, RuntimeError, ServerGone) as e:
            status = f"{type(e).__name__}: {str(e)[:100]}"
        elapsed = time.perf_counter() - t0
        total, own, incl = spy.stop()
        print(f"\n=== py-spy: pymaild during {what} on {size:,} messages ({fmtTime(elapsed)}, {status}; "
              f"{total:,} samples; {outDir / key}.txt) ===")
        print("  own time (leaf frame):")
        for frame, c in own:
            print(f"  {100 * c / max(1, total):5.1f}%  {frame}")
        print("  inclusive, pymaild frames:")
        for frame, c in incl[:8]:
            print(f"  {100 * c / max(1, total):5.1f}%  {frame}")
        sys.stdout.flush()
        if status.startswith("CommandTimeout"):
            pym.restart()


def run(a: argparse.Namespace) -> None:
    if not DOVECOT_BIN.exists():
        sys.exit("Dovecot is not installed (apt-get install dovecot-imapd): nothing to compare with")
    most = max(a.idle_counts + a.idle_large_counts, default=0)
    nofile = raiseNofile(max(65536, 4 * most + 1024))
    if nofile < most + 512:
        a.idle_counts = [n for n in a.idle_counts if n + 512 <= nofile]
        a.idle_large_counts = [n for n in a.idle_large_counts if n + 512 <= nofile]
        log(f"RLIMIT_NOFILE is {nofile}: idle connections limited to {a.idle_counts} / {a.idle_large_counts}")
    keep = a.workdir is not None
    if keep:
        work = Path(a.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="pymaild-imap-bench-", dir=a.tmpdir))
    os.chmod(work, 0o755)  # Dovecot's mail processes run as nobody and must reach the maildir
    result = {"sizes": a.messages, "bySize": {}, "dovecotVersion": dovecotVersion(), "machine": machineLine(work),
              "nofile": nofile}
    result["loadStart"] = os.getloadavg()[0]
    _, result["source"] = snapshotSources(work, a.pymaild_source)
    log(result["source"])
    avg: dict = {}
    pending = None
    try:
        for size in a.messages:
            res = runSize(a, work, size, avg, profileOnly=a.profile_only_run)
            servers = res.pop("servers")
            result["bySize"][str(size)] = res
            counts = a.idle_counts if size == a.messages[0] else a.idle_large_counts
            if counts and 7 in a.rows and not a.profile_only_run:
                result.setdefault("idle", []).append(runIdle(a, servers, size, counts))
            if a.profile and size == max(a.messages):
                pending = (size, servers)  # pymaild stays up for the profile after the table
                for s in servers:
                    if not isinstance(s, Pymaild):
                        s.stop()
            else:
                for s in servers:
                    s.stop()
        result["avgSize"] = sum(avg.values()) // max(1, len(avg))
        result["scheme"] = "argon2id m=64 MiB, t=3"
        if not a.profile_only_run:
            printTable(result, a)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2, default=str))
        if pending:
            profile(a, work, *pending)
    finally:
        for s in STARTED:
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {s.name}: {e}")
        if not keep:
            log(f"removing {work}")
            shutil.rmtree(work, ignore_errors=True)
        else:
            for size in a.messages:
                shutil.rmtree(work / f"run-{size}", ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", default="10000,100000", help="INBOX sizes, comma-separated (10000,100000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (3)")
    p.add_argument("--smoke", action="store_true",
                   help="2,000 messages, 100 idle connections, 3 s mixed workload, repeat 2: well under a minute")
    p.add_argument("--rows", default="1,2,3,4,5,6,7",
                   help="the rows to measure (1,2,3,4,5,6,7; rows 3-6 expect row 2 to have made the summaries)")
    p.add_argument("--row-budget", type=float, default=40.0,
                   help="no further run of a measurement that would likely end past this many seconds (40)")
    p.add_argument("--body-cap", type=int, default=10_000, help="row 3 fetches at most this many bodies (10000)")
    p.add_argument("--sessions", type=int, default=10, help="concurrent sessions of the mixed workload (10)")
    p.add_argument("--mixed-seconds", type=float, default=10.0, help="length of one mixed-workload run (10)")
    p.add_argument("--no-mixed-paced", dest="mixed_paced", action="store_false",
                   help="skip the mixed workload paced to half the slower server's rate")
    p.add_argument("--mixed-repeat", type=int, default=None,
                   help="mixed-workload runs per server (default: --repeat, at most 2)")
    p.add_argument("--idle", default="1000,5000",
                   help="idle connection counts on the smallest INBOX, comma-separated (1000,5000; '' skips)")
    p.add_argument("--idle-large", default="1000",
                   help="idle connection counts on the larger INBOXes (1000; '' skips)")
    p.add_argument("--idle-settle", type=float, default=3.0, help="seconds between opening and measuring (3)")
    p.add_argument("--idle-parallel", type=int, default=32, help="connections being set up at once (32)")
    p.add_argument("--process-limit", type=int, default=6000, help="Dovecot's imap process_limit (6000)")
    p.add_argument("--command-timeout", type=float, default=300.0,
                   help="seconds one command may take before the server is declared stuck and restarted (300)")
    p.add_argument("--pymaild-source", choices=("worktree", "HEAD"), default="worktree",
                   help="run pymaild from a copy of the working tree taken at the start (default) or from HEAD")
    p.add_argument("--workdir", help="keep the generated maildirs here and reuse them next time")
    p.add_argument("--tmpdir", help="where the temporary work directory goes")
    p.add_argument("--profile", metavar="DIR",
                   help="afterwards, py-spy pymaild during each measurement on the largest INBOX (top frames)")
    p.add_argument("--profile-only", metavar="KEYS", default="",
                   help="with --profile: only these (select,envelope-1,envelope-2,flags,flags-store,bodies,search-0,search-1,search-2,store,mixed)")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (200)")
    p.add_argument("--no-table", dest="profile_only_run", action="store_true",
                   help="with --profile: skip the measurements, only set up and profile")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    p.add_argument("--time-limit", type=int, default=1500, help="abort after this many seconds (1500)")
    a = p.parse_args()
    if a.smoke:
        a.messages, a.idle, a.idle_large, a.mixed_seconds = "2000", "100", "", 3.0
        a.repeat = min(a.repeat, 2)
        a.idle_settle = min(a.idle_settle, 1.0)
    a.messages = sorted({int(x) for x in a.messages.split(",") if x.strip()})
    a.rows = {int(x) for x in a.rows.split(",") if x.strip()}
    a.idle_counts = sorted({int(x) for x in a.idle.split(",") if x.strip()})
    a.idle_large_counts = sorted({int(x) for x in a.idle_large.split(",") if x.strip()})
    if not a.messages or min(a.messages) < 1 or a.repeat < 1:
        p.error("--messages and --repeat must be positive")
    if a.mixed_repeat is None:
        a.mixed_repeat = min(a.repeat, 2)
    if a.profile_only_run and not a.profile:
        p.error("--no-table needs --profile")
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminated)  # stop the servers on the way out
    signal.alarm(a.time_limit)
    t0 = time.perf_counter()
    try:
        run(a)
    except Deadline as e:
        sys.exit(str(e))
    finally:
        signal.alarm(0)
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
