"""
The POP3 benchmark of issue 5: pymaild's POP3 server side by side with a real, listening
Dovecot (dovecot-pop3d) and Twisted's own `twistd mail` (the Python baseline), in the same
run, on the same generated mailbox (hard links to the same files).

    .venv/bin/python bench/pop3_bench.py [--messages 2000] [--repeat 3] [--smoke]

Measures, with the servers taking turns (A B C A B C ...):
  1. RETR of every message, one session: connect, USER/PASS, STAT, RETR 1..N one at a time
     (each answer read whole before the next command, as fetchmail does), QUIT: messages/s and
     MB/s (octets received, dot-stuffed, as on the wire)
  2. the same for 4 concurrent sessions, one per user (each user has their own copy of the
     mailbox: POP3 allows one session per mailbox), each in its own client process
  3. login (USER/PASS to +OK: includes opening the mailbox), STAT, LIST and UIDL of the whole
     mailbox: median time of each

Before the rounds every server gets one untimed session per user (and pymaild's POP3 worker
processes, which the first connection starts, are waited for), so that no round pays for a
first login.

Every server logs in with the same password hash scheme where it can (pymaild's ARGON2ID field
is copied into Dovecot's passwd-file; twistd mail keeps cleartext passwords in its dirdbm),
runs without TLS on 127.0.0.1 and keeps the mail (no DELE).  The received message and octet
counts are compared: a server that sends less is reported, not ranked.  It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import maildir_gen  # noqa: E402
from dovecot_extra import DOVECOT_BIN, NOBODY, dovecotVersion  # noqa: E402
import imap_bench  # noqa: E402
from imap_bench import PYMAILD_ENV, STARTED, freePort, prepareMaildir, snapshotSources  # noqa: E402
from store_bench import fmtRatio, fmtTime, log, machineLine  # noqa: E402

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
PYMAILDCTL = BIN / "pymaildctl"
HOST = "127.0.0.1"
PASSWORD = "Bench-pass-2024"
USERS = 4


def userName(i: int) -> str:
    return f"bench{i}@localhost"


class Server(imap_bench.Server):
    """A server of this run (stop, restart, pid from the IMAP benchmark's), greeting with GREETING."""

    GREETING = b"+OK"

    def __init__(self, root: Path):
        super().__init__(root)
        self.port = freePort()
        root.mkdir(parents=True)

    def _launch(self, argv: list[str], env=None) -> None:
        self._log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logTail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(4096).startswith(self.GREETING):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening:\n{self.logTail()}")

    def logTail(self) -> str:
        return _tail(self.root / "server.log")

    def login(self, i: int) -> tuple[str, str]:
        return userName(i), PASSWORD


class Pymaild(Server):
    name = "pymaild"

    def __init__(self, root: Path, maildir: Path, processes: int | None = None):
        super().__init__(root)
        self.processes = processes
        self.data = root / "data"
        self.config = root / "pymaild.toml"
        lines = ["[server]", 'hostname = "bench.localhost"', "shutdown_timeout = 5", ""]
        if processes is not None:
            lines += ["[pop3]", f"processes = {processes}", ""]
        lines += ["[listen]"]
        for name in ("smtp", "submission", "smtps", "imap", "imaps", "pop3s"):
            lines.append(f"{name} = []")
        lines += [f'pop3 = ["{HOST}:{self.port}"]', "", "[domains]", 'local = ["localhost"]', "",
                  "[auth]", 'plaintext_networks = ["127.0.0.0/8"]', "",
                  "[limits]", "max_connections_per_ip = 1000", ""]
        self.config.write_text("\n".join(lines))
        for i in range(USERS):
            r = self.ctl("user", "add", userName(i), "--password-stdin", input=PASSWORD + "\n")
            if r.returncode != 0:
                raise RuntimeError(f"pymaildctl user add failed: {r.stdout}{r.stderr}")
            home = self.data / "mail" / "localhost" / f"bench{i}"
            home.parent.mkdir(parents=True, exist_ok=True)
            maildir_gen.linkCopy(maildir, home)
            maildir_gen.settle(home)

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(PYMAILDCTL), "--config", str(self.config), "--data-dir", str(self.data), *args],
                              input=input, capture_output=True, text=True, timeout=120, env=PYMAILD_ENV)

    def workersReady(self) -> bool:
        """Whether the POP3 worker processes said they are ready (or there are none)."""
        wanted = (self.processes or len(os.sched_getaffinity(0))) - 1
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return False
        return text.count(") ready") >= wanted

    def passwordField(self) -> str:
        for line in (self.data / "passwd").read_text().splitlines():
            if line.startswith(userName(0) + ":"):
                return line.split(":")[1]
        raise RuntimeError("no bench user in pymaild's passwd-file")

    def start(self) -> None:
        self._launch([str(TWISTD), "-n", "--pidfile=", "pymaild", "--config", str(self.config),
                      "--data-dir", str(self.data)], env=PYMAILD_ENV)


class Dovecot(Server):
    name = "Dovecot"

    def __init__(self, root: Path, maildir: Path, passwordField: str):
        super().__init__(root)
        os.chmod(root, 0o755)
        (root / "run").mkdir()
        (root / "state").mkdir()
        passwd = root / "passwd"
        entries = []
        for i in range(USERS):
            home = root / f"home{i}"
            maildir_gen.linkCopy(maildir, home)
            if os.geteuid() == 0:
                for dirpath, _, filenames in os.walk(home):
                    os.chown(dirpath, NOBODY, NOBODY)
                    for name in filenames:
                        os.chown(os.path.join(dirpath, name), NOBODY, NOBODY)
            maildir_gen.settle(home)
            entries.append(f"{userName(i)}:{passwordField}:{NOBODY}:{NOBODY}::{home}::\n")
        passwd.write_text("".join(entries))
        os.chmod(passwd, 0o644)
        self.conf = root / "dovecot.conf"
        self.conf.write_text(f"""\
# generated by bench/pop3_bench.py
base_dir = {root / 'run'}
state_dir = {root / 'state'}
log_path = {root / 'dovecot.log'}
protocols = pop3
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
mail_location = maildir:~
first_valid_uid = 1
first_valid_gid = 1
default_vsz_limit = 0
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = 0
  process_min_avail = 2
}}
""")

    def start(self) -> None:
        self._launch([str(DOVECOT_BIN), "-F", "-c", str(self.conf)])

    def logTail(self) -> str:
        return super().logTail() + "\n" + _tail(self.root / "dovecot.log")


class TwistdMail(Server):
    name = "twistd mail"

    def __init__(self, root: Path, maildir: Path):
        super().__init__(root)
        self.domain = root / "localhost"
        self.domain.mkdir()
        from twisted.persisted import dirdbm

        # `twistd mail --user=NAME=PASSWORD` fails on Python 3 (TypeError: DirDBM key must be
        # bytes): the users go straight into the domain's dirdbm, as addUser would put them
        users = dirdbm.open(str(self.domain / "passwd"))
        for i in range(USERS):
            users[b"bench%d" % i] = PASSWORD.encode()
            maildir_gen.linkCopy(maildir, self.domain / f"bench{i}")
            maildir_gen.settle(self.domain / f"bench{i}")

        # `twistd mail --maildirdbmdomain=localhost=...` registers the domain under the str
        # "localhost", and its POP3 looks domains up by bytes, so every login is denied on
        # Python 3: the same classes (MailService, MaildirDirdbmDomain, POP3Factory), wired as
        # twisted/mail/tap.py wires them but with a bytes domain name
        self.tac = root / "twisted-pop3.tac"
        self.tac.write_text(f"""\
from twisted.application import service, strports
from twisted.mail import mail, maildir, protocols
svc = mail.MailService()
svc.addDomain(b"localhost", maildir.MaildirDirdbmDomain(svc, {str(self.domain)!r}))
application = service.Application("twistd mail POP3")
svc.setServiceParent(application)
strports.service("tcp:{self.port}:interface={HOST}", protocols.POP3Factory(svc)).setServiceParent(svc)
""")

    def start(self) -> None:
        self._launch([str(TWISTD), "-n", "--pidfile=", "-y", str(self.tac)])


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


# --- a small POP3 client -----------------------------------------------------------------------


class Session:
    def __init__(self, port: int, timeout: float):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.line()

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk

    def ok(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        answer = self.line()
        if not answer.startswith(b"+OK"):
            raise RuntimeError(f"{command.split()[0].decode()} answered {answer[:100]!r}")
        return answer

    def multi(self, command: bytes) -> int:
        """Send a command with a multi-line answer; the octets of its body (as sent)."""
        self.ok(command)
        start = 0
        while True:
            if self.buf[:3] == b".\r\n":
                del self.buf[:3]
                return 0
            end = self.buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                del self.buf[: end + 5]
                return end + 2
            start = max(0, len(self.buf) - 4)
            chunk = self.sock.recv(1 << 18)
            if not chunk:
                raise ConnectionError("the server closed the connection in a multi-line answer")
            self.buf += chunk

    def login(self, user: str, password: str) -> None:
        self.ok(b"USER " + user.encode())
        self.ok(b"PASS " + password.encode())

    def close(self) -> None:
        try:
            self.ok(b"QUIT")
        finally:
            self.sock.close()


def retrieveAll(port: int, user: str, password: str, timeout: float) -> tuple[int, int]:
    s = Session(port, timeout)
    s.login(user, password)
    count = int(s.ok(b"STAT").split()[1])
    octets = 0
    for n in range(1, count + 1):
        octets += s.multi(b"RETR %d" % n)
    s.close()
    return count, octets


def _worker(args):
    port, user, password, timeout, barrier = args
    barrier.wait()
    t = time.perf_counter()
    count, octets = retrieveAll(port, user, password, timeout)
    return count, octets, time.perf_counter() - t


def measureRetr(server: Server, sessions: int, timeout: float) -> dict:
    if sessions == 1:
        user, password = server.login(0)
        t = time.perf_counter()
        count, octets = retrieveAll(server.port, user, password, timeout)
        elapsed = time.perf_counter() - t
    else:
        with multiprocessing.Manager() as manager:
            barrier = manager.Barrier(sessions + 1)
            with multiprocessing.Pool(sessions) as pool:
                jobs = [(server.port, *server.login(i), timeout, barrier) for i in range(sessions)]
                result = pool.map_async(_worker, jobs)
                barrier.wait()
                t = time.perf_counter()
                parts = result.get(timeout * 4)
                elapsed = time.perf_counter() - t
        count = sum(p[0] for p in parts)
        octets = sum(p[1] for p in parts)
    return {"seconds": elapsed, "messages": count, "octets": octets}


def warmUp(server: Server, timeout: float) -> None:
    """
    One untimed session per user (login, STAT, QUIT), so that no round pays for a first
    login: Dovecot's per-user index and cache files, pymaild's per-user index and its POP3
    worker processes (started by the first POP3 connection; waited for until they are ready).
    """
    try:
        for i in range(USERS):
            s = Session(server.port, timeout)
            s.login(*server.login(i))
            s.ok(b"STAT")
            s.close()
    except (OSError, RuntimeError, ConnectionError) as e:
        log(f"warm-up of {server.name}: {e}")  # (the rounds will say what fails)
    ready = getattr(server, "workersReady", None)
    if ready is not None:
        deadline = time.monotonic() + 30
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)


def measureListing(server: Server, timeout: float, repeat: int = 5) -> dict:
    out = {"login": [], "STAT": [], "LIST": [], "UIDL": []}
    for _ in range(repeat):
        user, password = server.login(0)
        s = Session(server.port, timeout)
        t = time.perf_counter()
        s.login(user, password)
        out["login"].append(time.perf_counter() - t)
        t = time.perf_counter()
        s.ok(b"STAT")
        out["STAT"].append(time.perf_counter() - t)
        for command in ("LIST", "UIDL"):
            t = time.perf_counter()
            s.multi(command.encode())
            out[command].append(time.perf_counter() - t)
        s.close()
    return {k: statistics.median(v) for k, v in out.items()}


# --- the run ---------------------------------------------------------------------------------


def alternate(servers, fn, repeat: int, results: dict, label: str, notes: list[str]) -> None:
    for _ in range(repeat):
        for server in servers:
            slot = results.setdefault(label, {}).setdefault(server.name, {"samples": [], "error": None})
            if slot["error"] is not None:
                continue
            try:
                slot["samples"].append(fn(server))
            except (OSError, RuntimeError, ConnectionError, multiprocessing.TimeoutError) as e:
                text = (str(e).splitlines() or [type(e).__name__])[0][:160] or type(e).__name__
                slot["error"] = text
                notes.append(f"{label}: {server.name}: {text}")
                log(f"{label}: {server.name} failed: {text}\n" + "\n".join(server.logTail().splitlines()[-8:]))
                try:
                    server.restart()
                except RuntimeError as again:
                    log(f"{server.name} did not restart: {again}")


def printTable(results: dict, servers: list[str], header: list[str], notes: list[str]) -> None:
    print("\n".join(header))
    print()
    cols = " | ".join(f"{name}" for name in servers)
    print(f"| workload | {cols} | pymaild / Dovecot |")
    print("|---|" + "---|" * len(servers) + "---|")

    def cell(slot, kind):
        if slot is None:
            return "-", None
        if slot["error"]:
            return f"failed: {slot['error'][:60]}", None
        xs = slot["samples"]
        if not xs:
            return "-", None
        if kind == "rate":
            rates = [x["messages"] / x["seconds"] for x in xs]
            mbs = [x["octets"] / x["seconds"] / 1e6 for x in xs]
            med = statistics.median(rates)
            text = (f"{med:,.0f} msg/s ({min(rates):,.0f}-{max(rates):,.0f}), "
                    f"{statistics.median(mbs):.1f} MB/s")
            return text, med
        med = statistics.median(xs)
        return f"{fmtTime(med)} ({fmtTime(min(xs))}-{fmtTime(max(xs))})", med

    for label, kind in results["order"]:
        row, values = [], {}
        for name in servers:
            text, value = cell(results.get(label, {}).get(name), kind)
            row.append(text)
            values[name] = value
        p, d = values.get("pymaild"), values.get("Dovecot")
        if p is None or d is None:
            r = None
        else:
            r = d / p if kind == "rate" else p / d  # below 1: pymaild faster
        print(f"| {label} | " + " | ".join(row) + f" | {fmtRatio(r)} |")
    print()
    print("Ratios are times (for rates: Dovecot's rate / pymaild's): below 1 means pymaild is faster.")
    for note in notes:
        print(f"- {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages in each mailbox (2000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (3)")
    p.add_argument("--sessions", default="1,4", help="concurrent sessions of the RETR rows (1,4)")
    p.add_argument("--smoke", action="store_true", help="300 messages, repeat 1: a few seconds")
    p.add_argument("--no-twisted", action="store_true", help="leave twistd mail out")
    p.add_argument("--timeout", type=float, default=120, help="seconds a socket read may wait (120)")
    p.add_argument("--workdir", type=Path, help="keep the generated maildir here and reuse it")
    p.add_argument("--pymaild-source", choices=("worktree", "HEAD"), default="worktree")
    p.add_argument("--json", type=Path, help="also write every sample as JSON")
    p.add_argument("--pymaild-processes", type=int, help="[pop3] processes of pymaild (default: pymaild's own, one per core)")
    a = p.parse_args()
    if a.smoke:
        a.messages, a.repeat = 300, 1
    sessions = [int(x) for x in a.sessions.split(",") if x]
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="pop3bench-"))
    os.chmod(tmp, 0o755)  # Dovecot reads its passwd-file as its own user
    work = a.workdir or tmp
    work.mkdir(parents=True, exist_ok=True)
    maildir, _ = prepareMaildir(work, a.messages)
    _, sourceLine = snapshotSources(tmp, a.pymaild_source)
    notes: list[str] = []
    results: dict = {"order": []}
    t0 = time.perf_counter()
    try:
        pym = Pymaild(tmp / "pymaild", maildir, a.pymaild_processes)
        servers: list[Server] = [pym, Dovecot(tmp / "dovecot", maildir, pym.passwordField())]
        if not a.no_twisted:
            servers.append(TwistdMail(tmp / "twistd", maildir))
        for server in servers:
            server.start()
        log("warm-up: one untimed session per user on every server")
        for server in servers:
            warmUp(server, a.timeout)
        for n in sessions:
            label = f"RETR all, {n} session{'s' if n > 1 else ''}"
            results["order"].append((label, "rate"))
            log(label)
            alternate(servers, lambda s, n=n: measureRetr(s, n, a.timeout), a.repeat, results, label, notes)
        listing: dict = {}
        log("login, STAT, LIST, UIDL")
        alternate(servers, lambda s: measureListing(s, a.timeout), a.repeat, listing, "listing", notes)
        for what in ("login", "STAT", "LIST", "UIDL"):
            label = f"{what} ({a.messages:,} messages)" if what != "login" else "USER/PASS (opens the mailbox)"
            results["order"].append((label, "time"))
            for name, slot in listing.get("listing", {}).items():
                results.setdefault(label, {})[name] = {
                    "samples": [x[what] for x in slot["samples"]], "error": slot["error"]}
        # results checked: every server must have sent the same messages and octets
        for label, kind in results["order"]:
            if kind != "rate":
                continue
            seen = {(x["messages"], x["octets"]) for slot in results[label].values() for x in slot["samples"]}
            if len(seen) > 1:
                notes.append(f"{label}: the servers sent different counts (messages, octets): {sorted(seen)}")
    finally:
        for server in STARTED:
            server.stop()
    names = [s.name for s in servers]
    header = [f"## POP3 benchmark, {time.strftime('%Y-%m-%d %H:%M')} ({time.perf_counter() - t0:.0f} s)",
              machineLine(tmp), sourceLine, f"Dovecot {dovecotVersion()}",
              f"pymaild [pop3] processes = {a.pymaild_processes or f'default ({len(os.sched_getaffinity(0))}: one per core)'}",
              f"{a.messages:,} messages per mailbox ({sum(1 for _ in (maildir / 'cur').iterdir()):,} files), "
              f"repeat {a.repeat}, medians (min-max)"]
    printTable(results, names, header, notes)
    if a.json:
        a.json.write_text(json.dumps({k: v for k, v in results.items() if k != "order"}, indent=1))


if __name__ == "__main__":
    main()
