"""
The outbound queue benchmark: how fast pymaild's queue runner empties a full queue into a fast
SMTP sink, side by side with a real Postfix doing the same, and what 100,000 deferred messages
cost pymaild while it waits.

    .venv/bin/python bench/queue_bench.py [--messages 2000] [--repeat 3] [--deferred 100000] [--quick]

Needs root (Postfix's own instance, a DNS server on port 53) and Debian's `postfix` (for
`postfix`, `postsuper`, `postqueue` and `smtp-sink`).  Every server runs on loopback addresses.

  1. Throughput: C{--messages} messages of about 4 KB, one recipient each, spread round-robin
     over 10 and over 100 domains (d0.test ...), are put in the queue while nothing delivers,
     then released; the clock runs from the release to the moment the queue is empty, and the
     sink's message count must have grown by exactly C{--messages}.  Both servers look up each
     domain's MX (mxN.test, address 127.0.0.2) in the same fake DNS server (a twisted.names
     server from tests/queue/fakedns.py on 127.0.5.53:53) and deliver to the same
     C{smtp-sink} on 127.0.0.2, with their default concurrency (20 connections per
     destination, 100 in all).
       - pymaild: stopped, its queue filled with L{pymaild.queue.files.QueueFiles.enqueue};
         started; the clock starts at its log line "queue: N messages queued" (the runner
         has read every envelope and starts sending), so Python's start-up is not counted.
       - Postfix: its own instance; the messages are injected over SMTP with a header that a
         C{header_checks} HOLD rule matches (they wait in hold/, fsynced by cleanup); the clock
         starts at C{postsuper -H ALL} (hold -> deferred) and C{postqueue -f}.
  2. Idle: C{--deferred} small messages queued with their next attempt a day away.  pymaild:
     start-up time (to the SMTP greeting and to "queue: N messages queued") and its CPU time
     then; the same for pymaild with an empty queue.  Then every server idles side by side
     for C{--idle-seconds}: RSS at the end and CPU time (utime+stime) used in that window.
     Postfix: its queue files copied into deferred/ (C{postsuper -s} renames them to match
     their inodes), time stamps a day ahead; qmgr's RSS and CPU, and the whole instance's.
  3. C{--profile DIR}: afterwards one more pymaild run per domain count under py-spy (every
     thread, idle samples included); the reactor thread's and the store threads' top frames.

Details, caveats and figures: bench/README.md, section queue_bench.py.  The servers take turns (A B A B ...), C{--repeat} rounds; medians and min-max.  It asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
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

import imap_bench  # noqa: E402
import pop3_bench  # noqa: E402
import smtp_bench  # noqa: E402
from imap_bench import PYMAILD_ENV, PYSPY, STARTED, freePort, snapshotSources  # noqa: E402
from store_bench import fmtRatio, log, machineLine  # noqa: E402

HOST = "127.0.0.1"
SINK_HOST = "127.0.0.2"
DNS_HOST = "127.0.5.53"
DNS_PORT = 53
POSTFIX = Path("/usr/sbin/postfix")
POSTSUPER = Path("/usr/sbin/postsuper")
POSTQUEUE = Path("/usr/sbin/postqueue")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
SENDER = "bench@bench.localhost"
MAX_DOMAINS = 100
DAY = 86400.0


def address(n: int, domains: int) -> str:
    return f"user{n}@d{n % domains}.test"


def message(n: int, domains: int, size: int) -> bytes:
    """The message, LF line ends (pymaild's queue keeps LF; SMTP injection makes them CRLF)."""
    head = (f"From: Bench <{SENDER}>\nTo: {address(n, domains)}\nSubject: queue benchmark message {n}\n"
            f"Message-ID: <queue.{n}.{time.time_ns()}@bench.localhost>\nDate: Sun, 29 Nov 2026 10:00:00 +0000\n"
            f"X-Bench-Hold: yes\n\n")
    line = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode()


# --- processes ---------------------------------------------------------------------------------


def cpuSeconds(pid) -> float:
    """utime + stime of one process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mainThreadCpu(pid: int) -> float:
    """utime + stime of a process's main thread (pymaild's reactor thread)."""
    return cpuSeconds(f"{pid}/task/{pid}")


def rssKB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def treeCpu(root: int) -> float:
    """
    CPU seconds of a process tree so far: every live process of it, plus what the root's
    children that it has reaped used (Postfix's master reaps every daemon).
    """
    total = 0.0
    for pid, _ in imap_bench.processTree(root):
        try:
            total += cpuSeconds(pid)
        except (OSError, ValueError, IndexError):
            pass
    with open(f"/proc/{root}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return total + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


class FakeDNS:
    """tests/queue/fakedns.py's server on DNS_HOST:DNS_PORT (Postfix's resolver knows no other port)."""

    SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from twisted.internet import reactor
from twisted.names import dns
import fakedns
factory = fakedns.FakeDNSFactory(fakedns.FakeZones(json.load(open({zones!r}))))
factory.noisy = False
queries = [0]
handle = factory.handleQuery
def counting(message, protocol, address):
    queries[0] += 1
    return handle(message, protocol, address)
factory.handleQuery = counting
factory.zones.queries = type("NoList", (), {{"append": lambda self, x: None}})()
reactor.listenUDP({port}, dns.DNSDatagramProtocol(factory), interface={host!r})
reactor.listenTCP({port}, factory, interface={host!r})
import signal
signal.signal(signal.SIGUSR1, lambda *a: (sys.stdout.write("%d\\n" % queries[0]), sys.stdout.flush()))
print("ready", flush=True)
reactor.run()
"""

    def __init__(self, root: Path):
        zones = {}
        for i in range(MAX_DOMAINS):
            zones[f"d{i}.test"] = [["MX", 10, f"mx{i}.test"]]
            zones[f"mx{i}.test"] = [["A", SINK_HOST]]
        path = root / "zones.json"
        path.write_text(json.dumps(zones))
        script = root / "fakedns_run.py"
        script.write_text(self.SCRIPT.format(tests=str(REPO / "tests" / "queue"), zones=str(path), port=DNS_PORT,
                                             host=DNS_HOST))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                     stderr=open(root / "fakedns.log", "ab"), env=PYMAILD_ENV)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"fake DNS server did not start: {(root / 'fakedns.log').read_text()[-1500:]}")

    def queries(self) -> int:
        self.proc.send_signal(signal.SIGUSR1)
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Sink:
    """Postfix's smtp-sink on SINK_HOST: counts messages (its -c counters on stdout)."""

    def __init__(self, root: Path):
        self.port = freePort()
        self.out = root / "smtp-sink.out"
        self._file = open(self.out, "wb")
        argv = [str(SMTP_SINK), "-c", f"{SINK_HOST}:{self.port}", "1000"]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(argv, stdout=self._file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((SINK_HOST, self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def counters(self) -> dict:
        """The last counters it printed: sess, quit, mesg."""
        with open(self.out, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 200))
            tail = f.read().decode(errors="replace")
        found = re.findall(r"sess=(\d+) quit=(\d+) mesg=(\d+)", tail)
        if not found:
            return {"sess": 0, "quit": 0, "mesg": 0}
        sess, quit, mesg = map(int, found[-1])
        return {"sess": sess, "quit": quit, "mesg": mesg}

    def count(self) -> int:
        return self.counters()["mesg"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()


# --- pymaild -----------------------------------------------------------------------------------


@contextlib.contextmanager
def noFsync():
    """The bench fills queues untimed: no fsync per file (one os.sync() after)."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real
        os.sync()


def fillPymaild(queueDir: Path, count: int, domains: int, size: int, due: float = 0.0, workers: int = 1) -> None:
    """C{count} messages into pymaild's queue with C{QueueFiles.enqueue} (in C{workers} processes)."""
    from pymaild.queue.files import QueueFiles

    QueueFiles(queueDir).create()
    if workers <= 1:
        _fillRange(queueDir, range(count), domains, size, due)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fillRange, args=(queueDir, range(i, count, workers), domains, size, due))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a fill process exited with {proc.exitcode}")


def _fillRange(queueDir: Path, numbers, domains: int, size: int, due: float) -> None:
    from pymaild.queue.files import Envelope, QueueFiles, Recipient

    files = QueueFiles(queueDir)
    with noFsync():
        for n in numbers:
            envelope = Envelope(id="", sender=SENDER, recipients=[Recipient(address=address(n, domains), next_attempt=due)])
            files.enqueue(message(n, domains, size), envelope)


def queuedPymaild(queueDir: Path) -> int:
    return sum(1 for name in os.listdir(queueDir / "messages") if name.endswith(".json"))


class Pymaild(pop3_bench.Server):
    GREETING = b"220"

    def __init__(self, root: Path, name: str, sinkPort: int):
        super().__init__(root)
        self.name = name
        self.data = root / "data"
        self.queue = self.data / "queue"
        self.config = root / "pymaild.toml"
        self.logPath = root / "server.log"
        lines = ["[server]", 'hostname = "bench.localhost"', "shutdown_timeout = 5", "", "[listen]"]
        for listener in ("submission", "smtps", "imap", "imaps", "pop3", "pop3s"):
            lines.append(f"{listener} = []")
        lines += [f'smtp = ["{HOST}:{self.port}"]', "", "[domains]", 'local = ["localhost"]', "",
                  "[limits]", "max_connections_per_ip = 1000", "",
                  "[queue]", f'nameservers = ["{DNS_HOST}:{DNS_PORT}"]', f"remote_port = {sinkPort}", ""]
        self.config.write_text("\n".join(lines))

    def launch(self, ready: bool = True) -> dict:
        """
        Start twistd; wait for "queue: N messages queued" (and, with C{ready}, the greeting).
        Times from the launch, seconds: C{loaded}, C{listening}; C{cpuLoaded}: its CPU time then.
        """
        offset = self.logPath.stat().st_size if self.logPath.exists() else 0
        self._log = open(self.logPath, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(pop3_bench.TWISTD), "-n", "--pidfile=", "pymaild", "--config", str(self.config),
                                      "--data-dir", str(self.data)], cwd=self.root, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=PYMAILD_ENV)
        out: dict = {}
        pattern = re.compile(rb"queue: (\d+) messages queued")
        deadline = time.monotonic() + 600
        buf = b""
        with open(self.logPath, "rb") as f:
            f.seek(offset)
            while "loaded" not in out or (ready and "listening" not in out):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start within 600 s:\n{self.logTail()}")
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logTail()}")
                if "loaded" not in out:
                    buf += f.read()
                    m = pattern.search(buf)
                    if m:
                        out["loadedAt"] = time.perf_counter()
                        out["loaded"] = out["loadedAt"] - t0
                        out["queued"] = int(m.group(1))
                        out["cpuLoaded"] = cpuSeconds(self.proc.pid)
                        continue
                if ready and "listening" not in out:
                    try:
                        with socket.create_connection((HOST, self.port), timeout=2) as s:
                            s.settimeout(5)
                            if s.recv(4096).startswith(b"220"):
                                out["listening"] = time.perf_counter() - t0
                                continue
                    except OSError:
                        pass
                time.sleep(0.005)
        return out

    def logTail(self) -> str:
        return pop3_bench._tail(self.logPath)


# --- Postfix -----------------------------------------------------------------------------------


class Postfix(pop3_bench.Server):
    """Its own instance (as bench/smtp_bench.py builds one) relaying by MX through the fake DNS."""

    GREETING = b"220"

    def __init__(self, root: Path, name: str, sinkPort: int):
        super().__init__(root)
        self.name = name
        os.chmod(root, 0o755)
        conf = root / "conf"
        self.queueDir = root / "queue"
        for sub in ("conf", "queue", "data", "queue/etc"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(root / "data", "postfix", "postfix")
        # smtp(8) runs chrooted in the queue directory (Debian's master.cf) and reads this
        # resolv.conf there: its MX lookups go to the fake DNS server, as pymaild's do
        (self.queueDir / "etc" / "resolv.conf").write_text(f"nameserver {DNS_HOST}\noptions timeout:5 attempts:1\n")
        for name in ("services", "hosts", "nsswitch.conf", "localtime", "host.conf"):
            if Path("/etc", name).exists():
                shutil.copy(Path("/etc", name), self.queueDir / "etc" / name)
        (conf / "header_checks").write_text("/^X-Bench-Hold:/ HOLD\n")
        (conf / "main.cf").write_text(f"""\
# generated by bench/queue_bench.py
compatibility_level = 3.6
queue_directory = {self.queueDir}
data_directory = {root / 'data'}
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localhost
mydomain = localhost
myorigin = bench.localhost
mydestination =
local_transport = error:no local delivery in this benchmark
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
header_checks = regexp:{conf / 'header_checks'}
smtp_tcp_port = {sinkPort}
message_size_limit = 10485760
maillog_file = {root / 'maillog'}
maillog_file_prefixes = /var, /dev/stdout, {root}
alias_maps =
alias_database =
biff = no
""")
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [f"{HOST}:{self.port} inet n - n - - smtpd" if line.startswith("smtp      inet") else line
                  for line in master]
        (conf / "master.cf").write_text("\n".join(master) + "\n")
        self.conf = conf

    def postconf(self, *names: str) -> dict:
        r = subprocess.run(["postconf", "-c", str(self.conf), *names], capture_output=True, text=True, timeout=60)
        return dict(line.split(" = ", 1) for line in r.stdout.splitlines() if " = " in line)

    def start(self) -> None:
        r = subprocess.run([str(POSTFIX), "-c", str(self.conf), "start"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start: {r.stdout}{r.stderr}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(4096).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening:\n{self.logTail()}")

    def stop(self) -> None:
        subprocess.run([str(POSTFIX), "-c", str(self.conf), "stop"], capture_output=True, timeout=120)
        # (postfix stop returns before the master has gone: wait for its pid file's process)
        pid = self.masterPid()
        deadline = time.monotonic() + 30
        while pid and time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)

    def masterPid(self) -> int | None:
        try:
            return int((self.queueDir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def qmgrPid(self) -> int | None:
        pid = self.masterPid()
        if pid is None:
            return None
        for child, name in imap_bench.processTree(pid):
            if name == "qmgr":
                return child
        return None

    def queued(self, queues=("maildrop", "incoming", "active", "deferred", "hold")) -> int:
        total = 0
        for q in queues:
            for _, _, names in os.walk(self.queueDir / q):
                total += len(names)
        return total

    def logTail(self) -> str:
        return pop3_bench._tail(self.root / "maillog")


def fillPostfix(server: Postfix, count: int, domains: int, size: int, timeout: float) -> None:
    """Over SMTP (10 connections) into hold/ (the HOLD rule); waits until all are there."""
    before = server.queued(("hold",))

    async def run():
        jobs: asyncio.Queue = asyncio.Queue()
        for n in range(count):
            jobs.put_nowait((address(n, domains), message(n, domains, size).replace(b"\n", b"\r\n")))
        return sum(await asyncio.gather(*(smtp_bench._client(server.port, jobs, timeout, SENDER) for _ in range(10))))

    sent = asyncio.run(run())
    if sent != count:
        raise RuntimeError(f"injected {sent} of {count}")
    deadline = time.monotonic() + timeout
    while server.queued(("hold",)) - before < count or server.queued(("maildrop", "incoming", "active")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.queued(('hold',))} in hold/ after {timeout} s:\n{server.logTail()}")
        time.sleep(0.05)


def fillPostfixDeferred(server: Postfix, count: int, size: int) -> float:
    """
    C{count} deferred messages, cheaply: one message injected into hold/, its queue file copied
    into deferred/ under made-up names (C{postsuper -s} renames them after their inodes and
    into the hash directories), dated a day ahead (qmgr takes a deferred file's mtime as its
    next attempt).  Postfix must be stopped.  Seconds it took.
    """
    t0 = time.perf_counter()
    server.start()
    fillPostfix(server, 1, 1, size, 60)
    server.stop()
    [template] = [Path(d) / n for d, _, names in os.walk(server.queueDir / "hold") for n in names]
    data = template.read_bytes()
    stat = template.stat()
    template.unlink()
    deferred = server.queueDir / "deferred"
    future = time.time() + DAY
    with noFsync():
        for i in range(count):
            path = deferred / f"B{i:09X}"
            with open(path, "wb") as f:
                f.write(data)
            os.chown(path, stat.st_uid, stat.st_gid)
            os.chmod(path, stat.st_mode & 0o777)
            os.utime(path, (future, future))
    # (postsuper, run by hand, logs to maillog_file as the mail owner)
    maillog = server.root / "maillog"
    maillog.touch()
    shutil.chown(maillog, "postfix", "postfix")
    r = subprocess.run([str(POSTSUPER), "-c", str(server.conf), "-s"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"postsuper -s: {r.stdout}{r.stderr}")
    found = server.queued(("deferred",))
    if found != count:
        raise RuntimeError(f"{found} files in deferred/ after postsuper -s, expected {count}")
    return time.perf_counter() - t0


# --- the measurements ------------------------------------------------------------------------


class Undelivered(RuntimeError):
    """A message was deferred or failed during a throughput run (it would wait min_backoff)."""


def waitDelivered(sink: Sink, target: int, empty, timeout: float, proc=None, logPath: Path | None = None,
                  logOffset: int = 0) -> None:
    deadline = time.monotonic() + timeout
    logFile = open(logPath, "rb") if logPath is not None else None
    if logFile is not None:
        logFile.seek(logOffset)
    text = b""
    bad = re.compile(rb"queue: \S+ to <[^>]*> (?:deferred until|failed|expired)[^\n]*")
    try:
        while sink.count() < target or not empty():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done after {timeout:.0f} s: sink count {sink.count()} of {target}")
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}")
            if logFile is not None:
                text = text[-300:] + logFile.read()
                m = bad.search(text)
                if m:
                    raise Undelivered(m.group(0).decode(errors="replace"))
            time.sleep(0.01)
    finally:
        if logFile is not None:
            logFile.close()


def throughputPymaild(server: Pymaild, sink: Sink, count: int, domains: int, size: int, timeout: float,
                      spy: Path | None = None, rate: int = 200) -> dict:
    server.stop()
    shutil.rmtree(server.queue / "messages", ignore_errors=True)
    fillPymaild(server.queue, count, domains, size)
    before = sink.counters()
    queries, dnsCpu = DNS.queries(), cpuSeconds(DNS.proc.pid)
    offset = server.logPath.stat().st_size if server.logPath.exists() else 0
    start = server.launch(ready=False)
    t0 = start["loadedAt"]
    spyProc = None
    if spy is not None:
        # (attached once the queue is loaded, so that start-up is not in it; every thread,
        # idle samples included: the reactor thread waiting in epoll shows as doPoll)
        spyProc = subprocess.Popen([str(PYSPY), "record", "--pid", str(server.proc.pid), "--format", "raw", "--rate",
                                    str(rate), "--threads", "--idle", "--nonblocking", "--output", str(spy)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0, main0 = cpuSeconds(server.proc.pid), mainThreadCpu(server.proc.pid)
    try:
        waitDelivered(sink, before["mesg"] + count, lambda: queuedPymaild(server.queue) == 0, timeout, server.proc,
                      server.logPath, offset)
        elapsed = time.perf_counter() - t0
        cpu = cpuSeconds(server.proc.pid) - cpu0
        mainCpu = mainThreadCpu(server.proc.pid) - main0
    finally:
        if spyProc is not None:
            spyProc.send_signal(signal.SIGINT)
            try:
                spyProc.wait(30)
            except subprocess.TimeoutExpired:
                spyProc.kill()
                spyProc.wait()
    after = sink.counters()
    out = {"seconds": elapsed, "delivered": after["mesg"] - before["mesg"], "queuedAtStart": start["queued"],
           "startup": start["loaded"], "cpu": cpu, "reactorCpu": mainCpu, "dnsQueries": DNS.queries() - queries,
           "dnsCpu": cpuSeconds(DNS.proc.pid) - dnsCpu, "sessions": after["sess"] - before["sess"]}
    server.stop()
    return out


def throughputPostfix(server: Postfix, sink: Sink, count: int, domains: int, size: int, timeout: float) -> dict:
    if server.queued():  # (what a failed run left)
        subprocess.run([str(POSTSUPER), "-c", str(server.conf), "-d", "ALL"], capture_output=True, timeout=120)
    fillPostfix(server, count, domains, size, timeout)
    before = sink.counters()
    queries, dnsCpu = DNS.queries(), cpuSeconds(DNS.proc.pid)
    cpu0 = treeCpu(server.masterPid())
    t0 = time.perf_counter()
    for argv in ([str(POSTSUPER), "-c", str(server.conf), "-H", "ALL"], [str(POSTQUEUE), "-c", str(server.conf), "-f"]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stdout}{r.stderr}")
    waitDelivered(sink, before["mesg"] + count, lambda: server.queued() == 0, timeout)
    elapsed = time.perf_counter() - t0
    cpu = treeCpu(server.masterPid()) - cpu0
    after = sink.counters()
    return {"seconds": elapsed, "delivered": after["mesg"] - before["mesg"], "cpu": cpu,
            "dnsQueries": DNS.queries() - queries, "dnsCpu": cpuSeconds(DNS.proc.pid) - dnsCpu,
            "sessions": after["sess"] - before["sess"]}


def idle(servers: list, seconds: float) -> dict:
    """CPU used by each (pid list) over C{seconds} side by side, and RSS at the end."""
    before = {}
    for name, pids in servers:
        before[name] = {p: cpuSeconds(p) for p in pids}
    time.sleep(seconds)
    out = {}
    for name, pids in servers:
        out[name] = {"cpu": sum(cpuSeconds(p) - before[name][p] for p in pids), "rss": sum(rssKB(p) for p in pids)}
    return out


# --- output --------------------------------------------------------------------------------------


def threadProfile(path: Path, n: int = 15) -> list[tuple[str, int, list]]:
    """From py-spy's raw --threads output: the reactor (main) thread's leaf frames, and the store threads'."""
    groups = {"reactor thread": collections.Counter(), "store threads (together)": collections.Counter()}
    totals = collections.Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if not frames or not frames[0].startswith("thread "):
            continue
        group = "reactor thread" if "MainThread" in frames[0] else "store threads (together)" if "store" in frames[0] else None
        if group is None or len(frames) < 2:
            continue
        totals[group] += int(count)
        groups[group][imap_bench._short(frames[-1])] += int(count)
    return [(g, totals[g], groups[g].most_common(n)) for g in groups if totals[g]]


def summary(xs: list[float], fmt) -> str:
    if not xs:
        return "-"
    return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def rate(x: float) -> str:
    return f"{x:,.0f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:,.1f} MB"


def measureIdle(a, tmp: Path, sink: Sink, pym: Pymaild, postfix: Postfix | None, notes: list[str]) -> dict:
    """
    Start-up of pymaild with C{--deferred} deferred messages and with none, C{--repeat} times
    each in turn; then all the servers idle side by side for C{--idle-seconds}.
    """
    log(f"idle: filling pymaild's queue with {a.deferred:,} deferred messages")
    big = Pymaild(tmp / "pymaild-deferred", f"pymaild, {a.deferred:,} deferred", sink.port)
    big.launch()  # (untimed: the certificate and the passwd-file)
    big.stop()
    tf = time.perf_counter()
    fillPymaild(big.queue, a.deferred, MAX_DOMAINS, 600, due=time.time() + DAY, workers=os.cpu_count() or 1)
    notes.append(f"filling pymaild's queue with {a.deferred:,} deferred messages (600 bytes each) took "
                 f"{time.perf_counter() - tf:.0f} s (untimed; no fsync per file, one sync after)")
    pfBig = None
    if postfix is not None:
        log(f"idle: filling a second Postfix's deferred/ with {a.deferred:,} messages")
        pfBig = Postfix(tmp / "postfix-deferred", f"Postfix, {a.deferred:,} deferred", sink.port)
        took = fillPostfixDeferred(pfBig, a.deferred, 600)
        notes.append(f"filling Postfix's deferred/ with {a.deferred:,} copies of one queue file took {took:.0f} s (untimed)")
    empty = "pymaild, empty queue"
    rows: dict = {big.name: {}, empty: {}}
    if postfix is not None:
        for pf in (pfBig.name, "Postfix, empty queue"):
            rows[pf + ": qmgr"] = {}
            rows[pf + ": all processes"] = {}
    for _ in range(a.repeat):
        for server, name in ((big, big.name), (pym, empty)):
            s = server.launch()
            row = rows[name]
            for key, value in (("startup", s["listening"]), ("loaded", s["loaded"]), ("cpuLoaded", s["cpuLoaded"])):
                row.setdefault(key, []).append(value)
            if s["queued"] != (a.deferred if server is big else 0):
                notes.append(f"{name}: the log said {s['queued']} messages queued")
            log(f"  {name}: listening after {s['listening']:.2f} s, queue loaded after {s['loaded']:.2f} s, "
                f"{s['cpuLoaded']:.2f} s CPU")
            server.stop()
        if postfix is not None:
            for pf, name in ((pfBig, pfBig.name), (postfix, "Postfix, empty queue")):
                pf.stop()
                t = time.perf_counter()
                pf.start()
                rows[name + ": all processes"].setdefault("startup", []).append(time.perf_counter() - t)
    # the window: every server started, then all of them idle side by side
    watch = []
    for server, name in ((big, big.name), (pym, empty)):
        server.launch()
        watch.append((name, server.proc.pid, False))
    if postfix is not None:
        time.sleep(1)  # (the master starts qmgr shortly after it listens)
        for pf, name in ((pfBig, pfBig.name), (postfix, "Postfix, empty queue")):
            watch.append((name + ": qmgr", pf.qmgrPid(), False))
            watch.append((name + ": all processes", pf.masterPid(), True))
    log(f"idle window: {a.idle_seconds:g} s")
    before = {name: treeCpu(pid) if tree else cpuSeconds(pid) for name, pid, tree in watch}
    time.sleep(a.idle_seconds)
    for name, pid, tree in watch:
        rows[name]["cpu"] = (treeCpu(pid) if tree else cpuSeconds(pid)) - before[name]
        rows[name]["rss"] = sum(rssKB(p) for p, _ in imap_bench.processTree(pid)) if tree else rssKB(pid)
    if pfBig is not None:
        qmgr = cpuSeconds(pfBig.qmgrPid())
        notes.append(f"{pfBig.name}: its qmgr used {qmgr:.2f} s of CPU from its start to the end of the window "
                     "(Postfix keeps no deferred message in memory; qmgr scans deferred/ every queue_run_delay, 300 s)")
        left = pfBig.queued(("deferred",))
        if left != a.deferred:
            notes.append(f"{pfBig.name}: {left} left in deferred/ after the window")
        pfBig.stop()
    if queuedPymaild(big.queue) != a.deferred:
        notes.append(f"{big.name}: {queuedPymaild(big.queue)} left in the queue after the window")
    for server in (big, pym):
        server.stop()
    return rows


DNS: FakeDNS


def main() -> None:
    global DNS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages per throughput run (2000)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (4096)")
    p.add_argument("--domains", default="10,100", help="destination domain counts, comma-separated (10,100)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (3)")
    p.add_argument("--deferred", type=int, default=100_000, help="deferred messages for the idle measurement (100,000; 0: none)")
    p.add_argument("--idle-seconds", type=float, default=60, help="length of the idle window (60)")
    p.add_argument("--quick", action="store_true", help="300 messages, 1 round, 10,000 deferred, 10 s idle")
    p.add_argument("--no-postfix", action="store_true", help="pymaild alone")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take (300)")
    p.add_argument("--profile", type=Path, help="afterwards, one more pymaild run per domain count under py-spy; raw stacks here")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (200)")
    p.add_argument("--pymaild-source", choices=("worktree", "HEAD"), default="worktree")
    p.add_argument("--json", type=Path, help="also write every sample as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (queues, logs) afterwards")
    a = p.parse_args()
    if a.quick:
        a.messages, a.repeat, a.deferred, a.idle_seconds = 300, 1, 10_000, 10
    domainCounts = [int(x) for x in a.domains.split(",") if x.strip() and int(x)]
    if domainCounts and max(domainCounts) > MAX_DOMAINS:
        sys.exit(f"--domains: at most {MAX_DOMAINS}")
    if os.geteuid() != 0:
        sys.exit("needs root: the fake DNS server listens on port 53 (Postfix's resolver has no other) "
                 "and Postfix's instance runs as root")
    if not SMTP_SINK.exists():
        sys.exit("smtp-sink is missing: apt-get install postfix (debconf: No configuration)")
    withPostfix = not a.no_postfix and POSTFIX.exists()
    tmp = Path(tempfile.mkdtemp(prefix="queuebench-"))
    os.chmod(tmp, 0o755)
    snapshot, sourceLine = snapshotSources(tmp, a.pymaild_source)
    sys.path.insert(0, str(snapshot))  # (the fills use the same pymaild.queue.files as the servers)
    t0 = time.perf_counter()
    results: dict = {"throughput": {}, "idle": {}}
    notes: list[str] = []
    others: list = []
    profiles: list = []
    try:
        DNS = FakeDNS(tmp)
        others.append(DNS)
        sink = Sink(tmp)
        others.append(sink)
        pym = Pymaild(tmp / "pymaild", "pymaild", sink.port)
        pym.launch()  # (untimed: makes the TLS certificate and the passwd-file)
        pym.stop()
        servers: list = [pym]
        postfix = None
        if withPostfix:
            postfix = Postfix(tmp / "postfix", "Postfix", sink.port)
            postfix.start()
            servers.append(postfix)
            limits = postfix.postconf("default_destination_concurrency_limit", "default_process_limit",
                                      "initial_destination_concurrency", "mail_version")
            notes.append("Postfix " + ", ".join(f"{k} {v}" for k, v in limits.items()))
        elif not a.no_postfix:
            notes.append("Postfix is not installed (apt-get install postfix): pymaild alone")
        notes.append("pymaild [queue] defaults: connections 100, connections_per_destination 20")

        # 1. throughput
        for domains in domainCounts:
            label = f"{a.messages:,} x {a.size // 1024} KB, {domains} domains"
            log(label)
            for round in range(a.repeat):
                for server in servers:
                    slot = results["throughput"].setdefault(label, {}).setdefault(server.name, {"samples": [], "error": None})
                    if slot["error"]:
                        continue
                    try:
                        if server is pym:
                            sample = throughputPymaild(pym, sink, a.messages, domains, a.size, a.timeout)
                        else:
                            sample = throughputPostfix(server, sink, a.messages, domains, a.size, a.timeout)
                        slot["samples"].append(sample)
                        log(f"  {server.name}: {sample['delivered'] / sample['seconds']:,.0f} msg/s "
                            f"({sample['seconds']:.2f} s, {sample['delivered']} delivered, {sample['dnsQueries']} DNS queries)")
                        if sample["delivered"] != a.messages:
                            notes.append(f"{label}: {server.name}: the sink got {sample['delivered']} of {a.messages}")
                    except (OSError, RuntimeError, ConnectionError, asyncio.TimeoutError, subprocess.SubprocessError) as e:
                        why = (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
                        slot.setdefault("failures", []).append(why)
                        if len(slot["failures"]) >= 2:
                            slot["error"] = why  # (no more runs of it for this workload)
                        notes.append(f"{label}: {server.name}: run {round + 1} not counted: "
                                     f"{'a message was not delivered at once: ' if isinstance(e, Undelivered) else ''}{why}")
                        log(f"{server.name} failed: {why}\n{server.logTail()[-1500:] if not isinstance(e, Undelivered) else ''}")
                        if server is pym:
                            pym.stop()

        # 2. idle with deferred messages
        if a.deferred:
            results["idle"] = measureIdle(a, tmp, sink, pym, postfix, notes)

        # 3. profile
        if a.profile:
            if not PYSPY.exists():
                log(f"--profile: {PYSPY} is missing (.venv/bin/pip install py-spy)")
            else:
                a.profile.mkdir(parents=True, exist_ok=True)
                for domains in domainCounts:
                    path = a.profile / f"pymaild-{domains}-domains.txt"
                    try:
                        sample = throughputPymaild(pym, sink, a.messages, domains, a.size, a.timeout, spy=path,
                                                   rate=a.profile_rate)
                        profiles.append((domains, path, sample))
                    except RuntimeError as e:
                        notes.append(f"profile, {domains} domains: {e}")
                        pym.stop()
    finally:
        for server in STARTED:
            try:
                server.stop()
            except Exception as e:  # (stop everything else even so)
                log(f"stopping {server.name}: {e}")
        for other in others:
            other.stop()

    names = [s.name for s in servers]
    print(f"## Queue benchmark, {time.strftime('%Y-%m-%d %H:%M')} ({time.perf_counter() - t0:.0f} s)")
    print(machineLine(tmp))
    print(sourceLine)
    print(f"repeat {a.repeat}, medians (min-max); throughput = messages delivered to smtp-sink / seconds from "
          "release to an empty queue\n")
    if results["throughput"]:
        print("| workload | " + " | ".join(names) + " | Postfix / pymaild |")
        print("|---|" + "---|" * len(names) + "---|")
    for label, slots in results["throughput"].items():
        row, rates = [], {}
        for name in names:
            slot = slots.get(name)
            if slot is None or not slot["samples"]:
                row.append(f"failed: {slot['error'][:60]}" if slot and slot["error"] else "-")
                continue
            xs = [s["delivered"] / s["seconds"] for s in slot["samples"]]
            rates[name] = statistics.median(xs)
            row.append(f"{summary(xs, rate)} msg/s")
        r = rates["Postfix"] / rates["pymaild"] if "Postfix" in rates and "pymaild" in rates else None
        print(f"| {label} | " + " | ".join(row) + f" | {fmtRatio(r)} |")
    if results["throughput"]:
        print("\nRatio: Postfix's rate / pymaild's (above 1: Postfix faster).")
    secs = lambda x: f"{x:.2f} s"  # noqa: E731
    for label, slots in results["throughput"].items():
        for name in names:
            xs = (slots.get(name) or {}).get("samples") or []
            if not xs:
                continue
            med = lambda key: statistics.median(s[key] for s in xs)  # noqa: E731
            cpu = summary([s["cpu"] for s in xs], secs)
            extra = ""
            if name == "pymaild":
                cpu += f" (reactor thread {summary([s['reactorCpu'] for s in xs], secs)})"
                extra = f"; start-up to \"queue: N messages queued\" {summary([s['startup'] for s in xs], secs)}, not timed"
            print(f"- {label}, {name}: CPU {cpu}, {med('sessions'):,.0f} SMTP sessions, "
                  f"{med('dnsQueries'):,.0f} DNS queries (the DNS server's CPU {med('dnsCpu'):.2f} s){extra}")
    if results["idle"]:
        print(f"\n### Idle with {a.deferred:,} deferred messages ({a.idle_seconds:g} s side by side)\n")
        print("| server | start-up: to the greeting | to the queue loaded | CPU until loaded | RSS after the window "
              "| CPU in the window |")
        print("|---|---|---|---|---|---|")
        secs = lambda x: f"{x:.2f} s"  # noqa: E731
        for name, row in results["idle"].items():
            print(f"| {name} | {summary(row.get('startup', []), secs)} | {summary(row.get('loaded', []), secs)} | "
                  f"{summary(row.get('cpuLoaded', []), secs)} | {mb(row['rss']) if 'rss' in row else '-'} | "
                  f"{secs(row['cpu']) if 'cpu' in row else '-'} |")
    for note in notes:
        print(f"- {note}")
    for domains, path, sample in profiles:
        print(f"\n=== py-spy: pymaild emptying {a.messages:,} messages to {domains} domains "
              f"({sample['delivered'] / sample['seconds']:,.0f} msg/s under py-spy; raw stacks in {path}) ===")
        for title, total, own in threadProfile(path):
            print(f"  {title}: {total:,} samples, own time (leaf frame, idle included):")
            for frame, c in own:
                print(f"  {100 * c / max(1, total):5.1f}%  {frame}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    if a.keep:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
