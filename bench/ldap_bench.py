"""
The LDAP login benchmark (issue 8): logins per second through pymaild's portal against a real
OpenLDAP slapd, sequential and 50 concurrent, and the reactor's worst latency while they run;
for context the same logins straight with ldap3 and through Dovecot's LDAP passdb; IMAP
LOGIN+LOGOUT end to end; and the reactor while slapd hangs (SIGSTOP).

    .venv/bin/python bench/ldap_bench.py [--repeat 3] [--quick] [--profile DIR] [--json FILE]

slapd (tests/ldapserver.py: the corporate fixture plus --users generated users, SSHA
passwords) runs on 127.0.0.1 with plain LDAP/StartTLS and LDAPS ports.  In rounds (every
measurement once per round, in turn, so that noise hits them all), for each TLS mode (plain
LDAP, StartTLS, LDAPS):
  1. pymaild's portal in a fresh Twisted process: C{Portal([LdapChecker])} with a thread pool
     built as service.py builds it (C{[ldap] pool_size} 4) and twistd's logging (every event to
     a file); logins by uid, after an untimed warm-up that opens every thread's connections:
     sequential (500), 50 concurrent (2,000), 50 concurrent with a wrong password (2,000).  A
     C{LoopingCall} every 10 ms records how late the reactor runs it (p99 and max per phase);
     the CPU time of the reactor thread and of the pool threads is read from /proc per phase
  2. raw ldap3 in a fresh process: the same search (as the service account, pymaild's filter)
     and bind (as the user) on reused connections, from 1 and from 4 threads
  3. Dovecot's LDAP passdb (C{auth_bind = yes}, no auth cache) through its auth-client socket
     (what imap-login speaks): sequential, 50 concurrent, 50 concurrent wrong passwords (held
     0.5 s each by Dovecot: a smaller count)
and, plain LDAP only, IMAP LOGIN+LOGOUT with 10 clients: pymaild (twistd, ldap backend) and
Dovecot (ldap passdb).  Then, for each TLS mode once: slapd SIGSTOPped while 50 logins are
asked at once (C{[ldap] timeout} lowered to --hung-timeout): how long each takes to fail, the
reactor's lateness meanwhile, the time to the first good login after SIGCONT.

pymaild runs from a copy of its sources taken at the start (others edit the tree meanwhile).
Nothing is asserted: figures and ratios are printed.  Every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
DOMAIN = "example.com"
TICK = 0.01  # the reactor probe's interval
MODES = ("plain", "starttls", "ldaps")
MODE_LABELS = {"plain": "plain LDAP", "starttls": "StartTLS", "ldaps": "LDAPS"}
#: pymaild's default user_filter, and the filter its LdapChecker sends (with the fixture's active filter)
USER_FILTER = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"


def benchUsers(n: int) -> list[tuple[str, str, str]]:
    """(login, password, primary address) of the generated users."""
    return [(f"bench{i:05d}", f"Bench-pw-{i:05d}", f"bench{i:05d}@{DOMAIN}") for i in range(n)]


# =================================================================================================
# the worker processes (pymaild's portal; raw ldap3): stdlib, Twisted, ldap3 and the snapshot only
# =================================================================================================


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _latStats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99), "max": max(xs) if xs else None}


class Probe:
    """
    A C{LoopingCall} every L{TICK} seconds; each call records how late it ran: the time it ran
    minus the slot LoopingCall had scheduled it for (the next multiple of the interval after the
    previous call ended, as C{LoopingCall._scheduleFrom} computes it).
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        self.lc = LoopingCall(self._tick)
        self.lc.clock = self.reactor
        self.lc.start(TICK, now=False)
        self.t0 = self.lc.starttime
        self.prevEnd = self.t0

    def _tick(self) -> None:
        now = self.reactor.seconds()
        running = self.prevEnd - self.t0
        until = TICK - (running % TICK)
        if self.prevEnd == self.prevEnd + until:
            until += TICK
        self.samples.append((now, now - (self.prevEnd + until)))
        self.prevEnd = self.reactor.seconds()

    def window(self, t0: float, t1: float) -> dict:
        return _latStats([late for t, late in self.samples if t0 <= t <= t1 + TICK])

    def stop(self) -> None:
        if self.lc.running:
            self.lc.stop()


def threadCpu() -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of this process, by native thread id."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) / tick, int(fields[12]) / tick)
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpuSplit(before: dict, after: dict) -> dict:
    """CPU used between two L{threadCpu} snapshots: the main (reactor) thread, the others, all system time."""
    main = os.getpid()
    used = {tid: (after[tid][0] - before.get(tid, (0, 0))[0], after[tid][1] - before.get(tid, (0, 0))[1])
            for tid in after}
    return {"main": sum(used.get(main, (0.0, 0.0))), "threads": sum(sum(v) for tid, v in used.items() if tid != main),
            "system": sum(v[1] for v in used.values())}


def _connectionArgs(settings: dict):
    """ldap3 Server/Connection arguments as pymaild's LdapClient builds them."""
    import ssl

    from ldap3 import NONE, SYNC, Server, Tls

    tls = None
    if settings["start_tls"] or settings["urls"][0].startswith("ldaps:"):
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings["ca_file"], version=ssl.PROTOCOL_TLS_CLIENT)

    def server():
        return Server(settings["urls"][0], get_info=NONE, connect_timeout=settings["timeout"], tls=tls)

    kw = dict(client_strategy=SYNC, receive_timeout=max(1, int(round(settings["timeout"]))), raise_exceptions=False,
              auto_referrals=False)
    return server, kw


def rawWorker(spec: dict) -> dict:
    """
    The logins straight with ldap3, from T threads, each with its own two connections (the
    service account's for the search, one for binding as the user), opened and used for 20
    untimed logins first.  Timed from a barrier to the last thread's end.
    """
    from ldap3 import SUBTREE, Connection
    from ldap3.utils.conv import escape_filter_chars

    settings = spec["settings"]
    server, kw = _connectionArgs(settings)
    attributes = ["mail", "mailLocalAddress"]
    active = settings.get("active_filter") or ""

    def connect(user=None, password=None):
        c = Connection(server(), user=user, password=password, **kw)
        c.open()
        if settings["start_tls"] and not c.server.ssl:
            if not c.start_tls():
                raise RuntimeError("StartTLS refused")
        if user is not None and not c.bind():
            raise RuntimeError(f"service bind refused: {c.result}")
        return c

    def one(svc, auth, login, password, expected) -> str:
        f = USER_FILTER.replace("{login}", escape_filter_chars(login))
        if active:
            f = f"(&{f}{active})"
        svc.search(settings["base_dn"], f, search_scope=SUBTREE, attributes=attributes, size_limit=100,
                   time_limit=max(1, int(settings["timeout"])))
        entries = [e for e in svc.response or () if e.get("type") == "searchResEntry"]
        if len(entries) != 1:
            return "no-entry"
        mail = entries[0]["attributes"].get("mail") or []
        if auth.rebind(user=entries[0]["dn"], password=password):
            return "ok" if mail and mail[0].lower() == expected else "wrong-avatar"
        return "refused" if auth.result.get("result") == 49 else "error"

    users = spec["users"]
    out = {"phases": {}}
    for phase in spec["phases"]:
        threads, n = phase["threads"], phase["n"]
        barrier = threading.Barrier(threads + 1)
        results: list = [None] * threads

        def run(k: int) -> None:
            try:
                svc = connect(settings["bind_dn"], settings["bind_password"])
                auth = connect()
                for i in range(20):
                    one(svc, auth, *users[(k * 20 + i) % len(users)])
                barrier.wait()
                counts, lat = collections.Counter(), []
                for i in range(k, n, threads):
                    s = time.perf_counter()
                    counts[one(svc, auth, *users[i % len(users)])] += 1
                    lat.append(time.perf_counter() - s)
                results[k] = (time.perf_counter(), counts, lat)
                svc.unbind()
                auth.unbind()
            except Exception as e:  # (reported, and the barrier let go)
                results[k] = e
                barrier.abort()

        pool = [threading.Thread(target=run, args=(k,), name=f"raw-{k}") for k in range(threads)]
        for t in pool:
            t.start()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        t0, cpu0 = time.perf_counter(), os.times()
        for t in pool:
            t.join()
        cpu1 = os.times()
        system = cpu1.system - cpu0.system
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            out["phases"][phase["name"]] = {"error": f"{type(errors[0]).__name__}: {errors[0]}"}
            continue
        counts, lat = collections.Counter(), []
        for _, c, l in results:
            counts.update(c)
            lat += l
        seconds = max(r[0] for r in results) - t0
        out["phases"][phase["name"]] = {"n": n, "seconds": seconds, "rate": n / seconds, "outcomes": dict(counts),
                                        "latency": _latStats(lat),
                                        "cpu": {"main": 0.0, "threads": (cpu1.user - cpu0.user) + system,
                                                "system": system}}
    return out


def portalWorker(spec: dict) -> dict:
    """
    pymaild's LdapChecker behind a twisted.cred Portal, in this process's reactor, with a thread
    pool built as service.py builds it and twistd's logging (every event, to a file).
    """
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin
    from twisted.cred.portal import IRealm, Portal
    from twisted.internet import defer, reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.threadpool import ThreadPool
    from zope.interface import Interface, implementer

    from pymaild.auth.ldap import LdapChecker, LdapClient, LdapSettings
    from pymaild.errors import TemporaryFailure

    logFile = open(spec["log"], "a")
    observer = textFileLogObserver(logFile)
    if spec.get("logLevel", "debug") != "debug":
        from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate

        observer = FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.levelWithName(spec["logLevel"]))])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    class IBench(Interface):
        pass

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatarId, mind, *interfaces):
            return interfaces[0], avatarId, lambda: None

    s = dict(spec["settings"])
    s["urls"] = tuple(s["urls"])
    settings = LdapSettings(**s)
    pool = ThreadPool(minthreads=0, maxthreads=settings.pool_size, name="pymaild-ldap")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    client = LdapClient(settings)
    portal = Portal(Realm(), [LdapChecker(client, pool, reactor)])
    probe = Probe(reactor)
    users = spec["users"]
    out: dict = {"phases": {}}

    def login(u: str, p: str):
        return portal.login(UsernamePassword(u.encode(), p.encode()), None, IBench)

    @defer.inlineCallbacks
    def phase(name: str, pairs: list, concurrency: int):
        counts, lat = collections.Counter(), []
        it = iter(range(len(pairs)))

        @defer.inlineCallbacks
        def lane():
            for i in it:
                u, p, expected = pairs[i]
                t = time.perf_counter()
                try:
                    _, avatar, _ = yield login(u, p)
                    counts["ok" if avatar == expected else "wrong-avatar"] += 1
                except UnauthorizedLogin:
                    counts["refused"] += 1
                except TemporaryFailure:
                    counts["temporary"] += 1
                except Exception as e:  # (counted: a bench reports, it does not stop)
                    counts[type(e).__name__] += 1
                lat.append(time.perf_counter() - t)

        r0, t0, cpu0 = reactor.seconds(), time.perf_counter(), threadCpu()
        yield defer.gatherResults([lane() for _ in range(concurrency)], consumeErrors=True)
        seconds, r1, cpu1 = time.perf_counter() - t0, reactor.seconds(), threadCpu()
        out["phases"][name] = {"n": len(pairs), "concurrency": concurrency, "seconds": seconds,
                               "rate": len(pairs) / seconds, "outcomes": dict(counts), "latency": _latStats(lat),
                               "late": probe.window(r0, r1), "window": [r0, r1], "cpu": cpuSplit(cpu0, cpu1)}
        return counts

    def pairs(n: int, offset: int, wrong: bool = False) -> list:
        return [(u, ("x" + p if wrong else p), a) for u, p, a in (users[(offset + i) % len(users)] for i in range(n))]

    def sleep(seconds: float):
        return task.deferLater(reactor, seconds, lambda: None)

    def spy(name: str):
        if not spec.get("spy"):
            return None
        path = Path(spec["spy"]) / f"{spec['mode']}-{name}.txt"
        proc = subprocess.Popen([spec["pyspy"], "record", "--pid", str(os.getpid()), "--format", "raw", "--rate",
                                 "500", "--threads", "--gil", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc

    @defer.inlineCallbacks
    def main():
        try:
            probe.start()
            r0 = reactor.seconds()
            yield sleep(1.0)
            out["baseline"] = probe.window(r0, reactor.seconds())
            t = time.perf_counter()
            # (pymaild imports ldap3 at its first LDAP call, on a pool thread: timed apart here)
            __import__("ldap3")
            __import__("ldap3.core.exceptions")
            __import__("ldap3.utils.conv")
            out["ldap3Import"] = time.perf_counter() - t
            yield sleep(0.1)  # (the probe's late tick from that import falls before the next window)
            t = time.perf_counter()
            yield phase("first", pairs(1, 0), 1)  # (opens this thread's two connections: TLS handshakes)
            out["first"] = time.perf_counter() - t
            yield phase("warm-up", pairs(200, 1), spec["concurrency"])  # (every pool thread connects)
            offset = 201
            for ph in spec["phases"]:
                if ph["kind"] == "hung":
                    yield hung(ph, offset)
                    continue
                proc = spy(ph["name"])
                if proc is not None:
                    yield sleep(0.5)
                yield phase(ph["name"], pairs(ph["n"], offset, ph.get("wrong", False)), ph["concurrency"])
                offset += ph["n"]
                if proc is not None:
                    proc.send_signal(signal.SIGINT)
                    yield task.deferLater(reactor, 0, proc.wait)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            probe.stop()
            reactor.stop()

    @defer.inlineCallbacks
    def hung(ph: dict, offset: int):
        pid = spec["slapdPid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            yield phase("hung", pairs(ph["n"], offset), ph["n"])
        finally:
            os.kill(pid, signal.SIGCONT)
        # after SIGCONT: one login every 50 ms until one succeeds
        r0, t0, tries, outcome = reactor.seconds(), time.perf_counter(), 0, None
        while time.perf_counter() - t0 < 60:
            tries += 1
            try:
                yield login(*users[0][:2])
                outcome = "ok"
                break
            except Exception as e:
                outcome = type(e).__name__
            yield sleep(0.05)
        out["recovery"] = {"seconds": time.perf_counter() - t0, "tries": tries, "outcome": outcome,
                           "late": probe.window(r0, reactor.seconds())}
        yield phase("after", pairs(200, offset + ph["n"]), spec["concurrency"])

    reactor.callWhenRunning(main)
    reactor.run()
    logFile.close()
    out["logLines"] = sum(1 for _ in open(spec["log"], errors="replace"))
    return out


def workerMain(specPath: str) -> None:
    spec = json.loads(Path(specPath).read_text())
    sys.path.insert(0, spec["source"])
    import pymaild

    if spec["kind"] == "raw":
        out = rawWorker(spec)
    else:
        out = portalWorker(spec)
    out["pymaild"] = pymaild.__file__
    Path(spec["out"]).write_text(json.dumps(out))


# =================================================================================================
# the benchmark (parent process)
# =================================================================================================


def setupPaths() -> None:
    for p in (str(REPO / "tests"), str(HERE), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)


def benchLdif(users: list[tuple[str, str, str]]) -> str:
    """The corporate fixture plus the generated users under ou=people (SSHA passwords, as the fixture's)."""
    import ldapserver

    entries = [ldapserver.CORPORATE_LDIF.rstrip("\n")]
    for i, (uid, password, mail) in enumerate(users):
        salt = hashlib.sha256(b"ldap-bench-" + uid.encode()).digest()[:8]
        entries.append("\n".join([
            f"dn: uid={uid},{ldapserver.PEOPLE_DN}",
            "objectClass: top", "objectClass: person", "objectClass: organizationalPerson",
            "objectClass: inetOrgPerson", "objectClass: inetLocalMailRecipient",
            f"uid: {uid}", f"cn: Bench User {i}", "sn: User", "givenName: Bench", f"mail: {mail}",
            f"mailLocalAddress: {uid}.alias@{DOMAIN}", "employeeType: staff", f"employeeNumber: {20000 + i}",
            f"userPassword: {ldapserver.sshaHash(password, salt)}",
        ]))
    return "\n\n".join(entries) + "\n"


def ldapSettings(slapd, mode: str, timeout: float, poolSize: int) -> dict:
    import ldapserver

    return {"urls": [slapd.ldapsUrl if mode == "ldaps" else slapd.url], "base_dn": ldapserver.BASE_DN,
            "bind_dn": ldapserver.SERVICE_DN, "bind_password": ldapserver.SERVICE_PASSWORD,
            "start_tls": mode == "starttls", "ca_file": str(slapd.certPath) if mode != "plain" else None,
            "active_filter": ldapserver.ACTIVE_USER_FILTER, "timeout": timeout, "pool_size": poolSize}


def runWorker(work: Path, spec: dict, env: dict, timeout: float) -> dict:
    """Run a worker process (this script, --worker SPEC) and return its JSON."""
    from store_bench import log

    n = len(list(work.glob("spec-*.json")))
    spec["out"] = str(work / f"out-{n}.json")
    path = work / f"spec-{n}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], env=env,
                            cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return {"error": f"worker timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not Path(spec["out"]).exists():
        text = output.decode(errors="replace").strip().splitlines()
        log("worker failed:\n" + "\n".join(text[-15:]))
        return {"error": (text[-1] if text else f"exit {proc.returncode}")[:160]}
    return json.loads(Path(spec["out"]).read_text())


# --- Dovecot --------------------------------------------------------------------------------


def dovecotServer():
    import imap_bench

    class Dovecot(imap_bench.Server):
        """
        A Dovecot instance (own base_dir) with an ldap passdb (auth_bind: search as the service
        account, bind as the user), no auth cache, no failure delay; a static userdb, an imap-login
        listener for the end-to-end row; its auth-client socket for the direct rows.
        """

        name = "Dovecot"

        def __init__(self, root: Path, slapd, mode: str, conc: int):
            import ldapserver
            from dovecot_extra import NOBODY

            super().__init__(root)
            self.port = imap_bench.freePort()
            root.mkdir(parents=True)
            os.chmod(root, 0o755)
            for d in ("run", "state"):
                (root / d).mkdir()
            for d in ("home", "mail"):
                (root / d).mkdir()
                os.chmod(root / d, 0o1777)
            ldapConf = root / "dovecot-ldap.conf.ext"
            uri = slapd.ldapsUrl if mode == "ldaps" else slapd.url
            tls = ""
            if mode != "plain":
                tls = f"tls_ca_cert_file = {slapd.certPath}\ntls_require_cert = demand\n"
                if mode == "starttls":
                    tls += "tls = yes\n"
            ldapConf.write_text(f"""\
uris = {uri}
dn = {ldapserver.SERVICE_DN}
dnpass = {ldapserver.SERVICE_PASSWORD}
{tls}ldap_version = 3
base = {ldapserver.BASE_DN}
scope = subtree
deref = never
auth_bind = yes
pass_filter = (&(&(objectClass=inetOrgPerson)(|(uid=%u)(mail=%u))){ldapserver.ACTIVE_USER_FILTER})
pass_attrs = mail=user
""")
            os.chmod(ldapConf, 0o644)
            self.conf = root / "dovecot.conf"
            self.conf.write_text(f"""\
# generated by bench/ldap_bench.py
base_dir = {root / 'run'}
state_dir = {root / 'state'}
log_path = {root / 'dovecot.log'}
protocols = imap
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 0
auth_failure_delay = 0
passdb {{
  driver = ldap
  args = {ldapConf}
}}
userdb {{
  driver = static
  args = uid={NOBODY} gid={NOBODY} home={root / 'home'}/%u
}}
mail_location = maildir:{root / 'mail'}/%u
first_valid_uid = 1
first_valid_gid = 1
default_vsz_limit = 0
mail_max_userip_connections = 1000
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
""")

        def start(self) -> None:
            from dovecot_extra import DOVECOT_BIN

            self._log = open(self.root / "server.log", "ab")
            self.proc = subprocess.Popen([str(DOVECOT_BIN), "-F", "-c", str(self.conf)], cwd=self.root,
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
            self._waitListening()

        def logTail(self) -> str:
            try:
                return (self.root / "dovecot.log").read_text(errors="replace")[-3000:]
            except OSError:
                return ""

    return Dovecot


class AuthClient:
    """Dovecot's auth-client protocol (what imap-login speaks to the auth process), AUTH PLAIN."""

    def __init__(self, path: Path, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
        self.buf = b""
        while self.line() != b"DONE":
            pass
        self.nextId = 1

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Dovecot's auth process closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def send(self, login: str, password: str) -> int:
        i = self.nextId
        self.nextId += 1
        resp = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
        self.sock.sendall(f"AUTH\t{i}\tPLAIN\tservice=imap\tsecured\tno-penalty\tresp={resp}\n".encode())
        return i

    def run(self, pairs: list, concurrency: int) -> dict:
        counts, lat = collections.Counter(), []
        pending: dict[int, tuple[float, str]] = {}
        it = iter(pairs)
        t0 = time.perf_counter()
        for u, p, a in it:
            pending[self.send(u, p)] = (time.perf_counter(), a)
            if len(pending) >= concurrency:
                break
        while pending:
            parts = self.line().split(b"\t")
            if parts[0] not in (b"OK", b"FAIL") or int(parts[1]) not in pending:
                continue
            started, expected = pending.pop(int(parts[1]))
            lat.append(time.perf_counter() - started)
            fields = dict(p.split(b"=", 1) for p in parts[2:] if b"=" in p)
            if parts[0] == b"OK":
                counts["ok" if fields.get(b"user", b"").decode() == expected else "wrong-avatar"] += 1
            elif b"temp" in parts[2:]:
                counts["temporary"] += 1
            else:
                counts["refused"] += 1
            nxt = next(it, None)
            if nxt is not None:
                pending[self.send(nxt[0], nxt[1])] = (time.perf_counter(), nxt[2])
        seconds = time.perf_counter() - t0
        return {"n": len(pairs), "seconds": seconds, "rate": len(pairs) / seconds, "outcomes": dict(counts),
                "latency": _latStats(lat)}

    def close(self) -> None:
        self.sock.close()


def dovecotAuth(server, users, phases: list[dict], offset: int, timeout: float) -> dict:
    out = {"phases": {}}
    c = AuthClient(server.root / "run" / "auth-client", timeout)
    try:
        c.run([users[i % len(users)] for i in range(200)], 50)  # warm-up: LDAP connections open
        for ph in phases:
            pairs = [users[(offset + i) % len(users)] for i in range(ph["n"])]
            if ph.get("wrong"):
                pairs = [(u, "x" + p, a) for u, p, a in pairs]
            out["phases"][ph["name"]] = c.run(pairs, ph["concurrency"])
            offset += ph["n"]
    finally:
        c.close()
    return out


# --- pymaild over IMAP ------------------------------------------------------------------------


def pymaildServer():
    import imap_bench

    class Pymaild(imap_bench.Server):
        """twistd -n pymaild with only an IMAP listener and [auth] backend = "ldap" (plain LDAP)."""

        name = "pymaild"

        def __init__(self, root: Path, slapd, limits: int):
            import ldapserver

            super().__init__(root)
            self.port = imap_bench.freePort()
            self.data = root / "data"
            root.mkdir(parents=True)
            self.config = root / "pymaild.toml"
            lines = ["[server]", 'hostname = "bench.example.com"', "shutdown_timeout = 5", "", "[listen]"]
            for name in ("smtp", "submission", "smtps", "imaps", "pop3", "pop3s"):
                lines.append(f"{name} = []")
            lines += [f'imap = ["{HOST}:{self.port}"]', "", "[domains]", f'local = ["{DOMAIN}"]', "",
                      "[auth]", 'backend = "ldap"', 'plaintext_networks = ["127.0.0.0/8"]', "",
                      "[ldap]", f'urls = ["{slapd.url}"]', f'bind_dn = "{ldapserver.SERVICE_DN}"',
                      f'bind_password = "{ldapserver.SERVICE_PASSWORD}"', f'base_dn = "{ldapserver.BASE_DN}"',
                      f'active_filter = "{ldapserver.ACTIVE_USER_FILTER}"', "",
                      "[limits]", f"max_connections = {limits}", f"max_connections_per_ip = {limits}",
                      f"max_connections_per_user = {limits}", ""]
            self.config.write_text("\n".join(lines))

        def start(self) -> None:
            import imap_bench

            self._log = open(self.root / "pymaild.log", "ab")
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "pymaild", "--config",
                 str(self.config), "--data-dir", str(self.data)],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=imap_bench.PYMAILD_ENV)
            self._waitListening()

        def logTail(self) -> str:
            try:
                return (self.root / "pymaild.log").read_text(errors="replace")[-3000:]
            except OSError:
                return ""

    return Pymaild


async def _imapLogins(port: int, pairs: list, clients: int, timeout: float) -> dict:
    counts, lat = collections.Counter(), []
    it = iter(pairs)

    async def tagged(reader, tag: bytes) -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line.startswith(tag):
                return line

    async def one(u: str, p: str) -> str:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            if not (await reader.readline()).startswith(b"* OK"):
                return "no-greeting"
            writer.write(f'a LOGIN {u} "{p}"\r\n'.encode())
            answer = await tagged(reader, b"a ")
            writer.write(b"b LOGOUT\r\n")
            await tagged(reader, b"b ")
            if answer.startswith(b"a OK"):
                return "ok"
            return "temporary" if b"UNAVAILABLE" in answer else "refused"
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def lane():
        for u, p, _ in it:
            t = time.perf_counter()
            try:
                counts[await asyncio.wait_for(one(u, p), timeout)] += 1
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                counts[type(e).__name__] += 1
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[lane() for _ in range(clients)])
    seconds = time.perf_counter() - t0
    return {"n": len(pairs), "seconds": seconds, "rate": len(pairs) / seconds, "outcomes": dict(counts),
            "latency": _latStats(lat)}


def imapLogins(port: int, pairs: list, clients: int, timeout: float) -> dict:
    return asyncio.run(_imapLogins(port, pairs, clients, timeout))


def cpuSeconds(pid: int) -> float:
    """utime + stime of a process and its reaped children (/proc/PID/stat), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def treeCpu(root: int) -> float:
    """CPU seconds of a process tree: every live process, and the children they reaped."""
    import imap_bench

    return sum(cpuSeconds(pid) for pid, _ in imap_bench.processTree(root))


# --- py-spy -----------------------------------------------------------------------------------


def spySummary(path: Path, n: int = 10) -> list[str]:
    """
    py-spy --gil samples (only the thread holding the GIL is sampled): per thread group
    (reactor, pool threads), its share of the GIL, its top leaf frames and inclusive frames.
    """
    import imap_bench

    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [f"  (no profile: {path} missing)"]
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[1] if frames[0].startswith("thread (") and ": " in frames[0] else "?"
        group = "reactor thread" if thread == "MainThread" else "pool threads"
        calls = [imap_bench._short(f) for f in frames[1:] if "(" in f]
        totals[group] += c
        own[group][calls[-1] if calls else "?"] += c
        for f in set(calls):
            incl[group][f] += c
    grand = sum(totals.values())
    lines = []
    for group in sorted(own, key=lambda g: -totals[g]):
        total = totals[group]
        lines.append(f"  {group}: {100 * total / max(1, grand):.0f}% of the GIL samples ({total:,}); own time:")
        for frame, c in own[group].most_common(n):
            lines.append(f"    {100 * c / max(1, total):5.1f}%  {frame}")
        lines.append("   inclusive (selected):")
        keep = [(f, c) for f, c in incl[group].most_common(80)
                if any(k in f for k in ("pymaild/", "ldap3/strategy", "ldap3/core/connection", "ldap3/operation",
                                        "twisted/logger", "twisted/python/threadpool", "twisted/_threads",
                                        "twisted/internet/base", "twisted/internet/defer", "twisted/cred",
                                        "pyasn1/"))]
        for frame, c in keep[:n]:
            lines.append(f"    {100 * c / max(1, total):5.1f}%  {frame}")
    return lines


# --- output ---------------------------------------------------------------------------------


def fmtRate(xs: list[float]) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    if len(xs) == 1:
        return f"{med:,.0f}/s"
    return f"{med:,.0f}/s ({min(xs):,.0f}-{max(xs):,.0f})"


def fmtMs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 10 else f"{x:.1f} s"


def collect(results: list[dict], phase: str, key: str = "rate") -> list[float]:
    return [r["phases"][phase][key] for r in results if phase in r.get("phases", {}) and key in r["phases"][phase]]


def badOutcomes(results: list[dict], phase: str, expect: str) -> str:
    bad = collections.Counter()
    for r in results:
        for k, v in r.get("phases", {}).get(phase, {}).get("outcomes", {}).items():
            if k != expect:
                bad[k] += v
    return ", ".join(f"{v} {k}" for k, v in bad.items())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        workerMain(sys.argv[2])
        return
    setupPaths()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="rounds (3)")
    p.add_argument("--quick", action="store_true", help="fewer logins, 1 round, plain LDAP only: under a minute")
    p.add_argument("--modes", default=",".join(MODES), help="plain,starttls,ldaps")
    p.add_argument("--users", type=int, default=1000, help="generated users in the directory (1,000)")
    p.add_argument("--sequential", type=int, default=500, help="logins one after another (500)")
    p.add_argument("--concurrent", type=int, default=2000, help="logins of the concurrent rows (2,000)")
    p.add_argument("--concurrency", type=int, default=50, help="logins at once (50)")
    p.add_argument("--pool-size", type=int, default=4, help="[ldap] pool_size (4, the default)")
    p.add_argument("--timeout", type=float, default=5.0, help="[ldap] timeout of the normal rows (5, the default)")
    p.add_argument("--hung-timeout", type=float, default=1.0, help="[ldap] timeout while slapd is stopped (1)")
    p.add_argument("--hung-logins", type=int, default=50, help="logins asked at once while slapd is stopped (50)")
    p.add_argument("--no-hung", action="store_true", help="leave out the SIGSTOP measurement")
    p.add_argument("--no-dovecot", action="store_true", help="leave out Dovecot (needs dovecot-ldap)")
    p.add_argument("--no-e2e", action="store_true", help="leave out IMAP LOGIN+LOGOUT")
    p.add_argument("--e2e-logins", type=int, default=1000, help="IMAP LOGIN+LOGOUT per round and server (1,000)")
    p.add_argument("--e2e-clients", type=int, default=10, help="concurrent IMAP clients (10)")
    p.add_argument("--e2e-users", type=int, default=50, help="users the IMAP logins cycle over (50)")
    p.add_argument("--portal-log", choices=("debug", "info"), default="debug",
                   help="the portal processes' log level: debug writes every event, as twistd does (debug)")
    p.add_argument("--profile", type=Path, help="afterwards, py-spy of one more portal run (plain) into DIR")
    p.add_argument("--profile-mode", choices=MODES, default="plain", help="the TLS mode of the --profile run (plain)")
    p.add_argument("--pymaild-source", choices=("worktree", "HEAD"), default="worktree")
    p.add_argument("--worker-timeout", type=float, default=600, help="seconds a worker process may take (600)")
    p.add_argument("--json", type=Path, help="also write every sample as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = p.parse_args()
    if a.quick:  # (options given on the command line win)
        given = {arg.split("=")[0] for arg in sys.argv[1:]}
        for name, value in (("repeat", 1), ("sequential", 100), ("concurrent", 400), ("e2e_logins", 200),
                            ("hung_logins", 12), ("modes", "plain")):
            if "--" + name.replace("_", "-") not in given:
                setattr(a, name, value)
    modes = [m for m in a.modes.split(",") if m]

    import imap_bench
    import ldapserver
    from dovecot_extra import dovecotVersion
    from store_bench import log, machineLine

    if not ldapserver.slapd_available():
        sys.exit("slapd is not installed (apt-get install slapd ldap-utils)")
    dovecotNote = None
    if not a.no_dovecot and not Path("/usr/lib/dovecot/modules/auth/libauthdb_ldap.so").exists():
        dovecotNote = "Dovecot not measured: its LDAP passdb is not installed (apt-get install dovecot-ldap)"
        a.no_dovecot = True
    if not a.no_dovecot and os.geteuid() != 0:
        dovecotNote = "Dovecot not measured: its master runs as root here (run the bench as root)"
        a.no_dovecot = True

    tmp = Path(tempfile.mkdtemp(prefix="ldapbench-"))
    os.chmod(tmp, 0o755)  # (Dovecot's auth process reads its files as the dovecot user)
    _, sourceLine = imap_bench.snapshotSources(tmp, a.pymaild_source)
    env = imap_bench.PYMAILD_ENV
    users = benchUsers(a.users)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    slapd = ldapserver.Slapd(tmp / "slapd", ldif=benchLdif(users))
    portal: dict[str, list] = {m: [] for m in modes}
    raw: dict[str, list] = {m: [] for m in modes}
    dove: dict[str, list] = {m: [] for m in modes}
    e2e: dict[str, list] = {"pymaild": [], "Dovecot": []}
    hungResult: dict = {}
    notes: list[str] = []
    if dovecotNote:
        notes.append(dovecotNote)
    slapdStopped = False
    portalPhases = [
        {"name": "sequential", "kind": "login", "n": a.sequential, "concurrency": 1},
        {"name": "concurrent", "kind": "login", "n": a.concurrent, "concurrency": a.concurrency},
        {"name": "wrong", "kind": "login", "n": a.concurrent, "concurrency": a.concurrency, "wrong": True},
    ]
    # Dovecot 2.3.19 holds every failure until its next 500 ms timer, auth_failure_delay = 0 or not
    # (and nodelay is not applied to a failed auth_bind): its wrong-password rate is concurrency / 0.5 s
    dovecotPhases = portalPhases[:2] + [dict(portalPhases[2], n=min(a.concurrent, 4 * a.concurrency))]
    try:
        log(f"slapd: loading {a.users:,} users")
        slapd.start()
        slapdCpu0 = cpuSeconds(slapd.process.pid)
        dovecots = {}
        pym = None
        if not a.no_dovecot:
            Dovecot = dovecotServer()
            for m in modes:
                dovecots[m] = Dovecot(tmp / f"dovecot-{m}", slapd, m, a.concurrency)
                dovecots[m].start()
        if not a.no_e2e:
            pym = pymaildServer()(tmp / "pymaild", slapd, 20000)
            pym.start()
            e2eUsers = users[:a.e2e_users]
            log(f"IMAP: first login of {len(e2eUsers)} users on each server (creates their mailboxes), untimed")
            servers = [pym] + ([dovecots["plain"]] if "plain" in dovecots else [])
            for s in servers:
                r = imapLogins(s.port, e2eUsers, a.e2e_clients, 60)
                if r["outcomes"].get("ok") != len(e2eUsers):
                    notes.append(f"IMAP warm-up on {s.name}: {r['outcomes']}")
        for rnd in range(a.repeat):
            for m in modes:
                settings = ldapSettings(slapd, m, a.timeout, a.pool_size)
                log(f"round {rnd + 1}/{a.repeat}, {MODE_LABELS[m]}: pymaild's portal")
                portal[m].append(runWorker(tmp, {"kind": "portal", "mode": m, "source": str(tmp / "pymaild-src"),
                                                 "settings": settings, "users": users, "phases": portalPhases,
                                                 "concurrency": a.concurrency, "logLevel": a.portal_log,
                                                 "log": str(tmp / f"portal-{m}-{rnd + 1}.log")},
                                           env, a.worker_timeout))
                log(f"round {rnd + 1}/{a.repeat}, {MODE_LABELS[m]}: raw ldap3")
                raw[m].append(runWorker(tmp, {"kind": "raw", "mode": m, "source": str(tmp / "pymaild-src"),
                                              "settings": settings, "users": users,
                                              "phases": [{"name": "1 thread", "threads": 1, "n": a.sequential},
                                                         {"name": f"{a.pool_size} threads", "threads": a.pool_size,
                                                          "n": a.concurrent}]},
                                        env, a.worker_timeout))
                if m in dovecots:
                    log(f"round {rnd + 1}/{a.repeat}, {MODE_LABELS[m]}: Dovecot's auth")
                    try:
                        dove[m].append(dovecotAuth(dovecots[m], users, dovecotPhases, 201, 60))
                    except (OSError, ConnectionError) as e:
                        dove[m].append({"error": f"{type(e).__name__}: {e}"})
                        notes.append(f"Dovecot auth, {MODE_LABELS[m]}: {type(e).__name__}: {e}")
            if pym is not None:
                for s in [pym] + ([dovecots["plain"]] if "plain" in dovecots else []):
                    log(f"round {rnd + 1}/{a.repeat}: IMAP LOGIN+LOGOUT on {s.name}, {a.e2e_clients} clients")
                    pairs = [e2eUsers[i % len(e2eUsers)] for i in range(a.e2e_logins)]
                    cpu0, slapd0 = treeCpu(s.pid), cpuSeconds(slapd.process.pid)
                    r = imapLogins(s.port, pairs, a.e2e_clients, 60)
                    r["cpu"] = treeCpu(s.pid) - cpu0
                    r["slapdCpu"] = cpuSeconds(slapd.process.pid) - slapd0
                    e2e[s.name].append(r)
        if not a.no_hung:
            hungResult = {}
            for m in modes:
                log(f"{MODE_LABELS[m]}: slapd SIGSTOPped, {a.hung_logins} logins at once, "
                    f"[ldap] timeout = {a.hung_timeout:g}")
                slapdStopped = True
                hungResult[m] = runWorker(tmp, {"kind": "portal", "mode": m, "source": str(tmp / "pymaild-src"),
                                                "settings": ldapSettings(slapd, m, a.hung_timeout, a.pool_size),
                                                "users": users, "concurrency": a.concurrency,
                                                "slapdPid": slapd.process.pid,
                                                "phases": [{"name": "hung", "kind": "hung", "n": a.hung_logins}],
                                                "log": str(tmp / f"portal-hung-{m}.log")}, env, a.worker_timeout)
                os.kill(slapd.process.pid, signal.SIGCONT)
                slapdStopped = False
        slapdCpu = cpuSeconds(slapd.process.pid) - slapdCpu0
        profileLines: list[str] = []
        if a.profile:
            pyspy = Path(sys.executable).parent / "py-spy"
            if not pyspy.exists():
                profileLines.append(f"--profile: {pyspy} is missing (.venv/bin/pip install py-spy)")
            else:
                a.profile.mkdir(parents=True, exist_ok=True)
                mode = a.profile_mode
                log(f"py-spy: one more portal run ({MODE_LABELS[mode]})")
                spyPhases = [dict(portalPhases[0], n=max(2000, a.sequential)),
                             dict(portalPhases[1], n=max(4000, a.concurrent))]
                r = runWorker(tmp, {"kind": "portal", "mode": mode, "source": str(tmp / "pymaild-src"),
                                    "settings": ldapSettings(slapd, mode, a.timeout, a.pool_size), "users": users,
                                    "phases": spyPhases, "concurrency": a.concurrency,
                                    "log": str(tmp / "portal-profile.log"), "spy": str(a.profile),
                                    "pyspy": str(pyspy)}, env, a.worker_timeout)
                for ph in spyPhases:
                    rate = r.get("phases", {}).get(ph["name"], {}).get("rate")
                    profileLines.append(f"\npy-spy --gil, pymaild's portal, {ph['name']} ({ph['n']:,} logins, "
                                        f"{rate or 0:,.0f}/s under py-spy at 500 Hz), "
                                        f"{a.profile}/{mode}-{ph['name']}.txt:")
                    profileLines += spySummary(a.profile / f"{mode}-{ph['name']}.txt")
    finally:
        if slapdStopped and slapd.process is not None:
            try:
                os.kill(slapd.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for server in list(imap_bench.STARTED):
            server.stop()
        slapd.close()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"work directory kept: {tmp}")

    # --- the table ---
    elapsed = time.perf_counter() - t0
    load1 = os.getloadavg()
    print(f"## LDAP benchmark, {time.strftime('%Y-%m-%d %H:%M')} ({elapsed:.0f} s)")
    print(machineLine(REPO))
    print(sourceLine)
    slapdVersion = subprocess.run(["/usr/sbin/slapd", "-VV"], capture_output=True, text=True).stderr.split("\n")[0]
    import ldap3
    print(f"{slapdVersion.split('$')[1].strip() if '$' in slapdVersion else 'slapd ?'} (mdb, {a.users:,} generated "
          f"users + the test fixture), ldap3 {ldap3.__version__}"
          + ("" if a.no_dovecot else f", Dovecot {dovecotVersion()} (ldap passdb, auth_bind)"))
    print(f"{a.repeat} round(s); medians (min-max) of the rounds; load average {load0[0]:.2f} at the start, "
          f"{load1[0]:.2f} at the end; slapd used {slapdCpu:.1f} s of CPU")
    print()
    cols = " | ".join(MODE_LABELS[m] for m in modes)
    print(f"| logins | {cols} |")
    print("|---|" + "---|" * len(modes))

    def row(label: str, cells: list[str]) -> None:
        print(f"| {label} | " + " | ".join(cells) + " |")

    P = a.pool_size
    C = a.concurrency
    row("pymaild portal: first login (opens 2 connections; ldap3 imported before)",
        [fmtMs(statistics.median(firsts)) if (firsts := [r["first"] for r in portal[m] if "first" in r]) else "-"
         for m in modes])
    labels = {"sequential": f"pymaild portal: sequential ({a.sequential:,})",
              "concurrent": f"pymaild portal: {C} concurrent ({a.concurrent:,})",
              "wrong": f"pymaild portal: {C} concurrent, wrong password ({a.concurrent:,})"}
    for ph in ("sequential", "concurrent", "wrong"):
        row(labels[ph], [fmtRate(collect(portal[m], ph)) for m in modes])
    row(f"pymaild portal: latency p50 / p99 at {C} concurrent",
        [" / ".join(fmtMs(statistics.median(x)) if (x := [r["phases"]["concurrent"]["latency"][q] for r in portal[m]
                                                         if "concurrent" in r.get("phases", {})]) else "-"
                    for q in ("p50", "p99")) for m in modes])
    def cpuCell(results: list[dict], phase: str, split: bool) -> str:
        rows = [r["phases"][phase] for r in results if "cpu" in r.get("phases", {}).get(phase, {})]
        if not rows:
            return "-"
        main = statistics.median([x["cpu"]["main"] / x["n"] for x in rows])
        threads = statistics.median([x["cpu"]["threads"] / x["n"] for x in rows])
        system = statistics.median([x["cpu"].get("system", 0.0) / x["n"] for x in rows])
        if not split:
            return f"{(main + threads) * 1e6:,.0f} us (sys {system * 1e6:,.0f})"
        return f"{main * 1e6:,.0f} + {threads * 1e6:,.0f} us (sys {system * 1e6:,.0f})"

    row("pymaild CPU per login, reactor + pool threads: sequential",
        [cpuCell(portal[m], "sequential", True) for m in modes])
    row(f"pymaild CPU per login, reactor + pool threads: {C} concurrent",
        [cpuCell(portal[m], "concurrent", True) for m in modes])
    row("raw ldap3: 1 thread", [fmtRate(collect(raw[m], "1 thread")) for m in modes])
    row(f"raw ldap3: {P} threads", [fmtRate(collect(raw[m], f"{P} threads")) for m in modes])
    row(f"raw ldap3 CPU per login: 1 thread / {P} threads",
        [f"{cpuCell(raw[m], '1 thread', False)} / {cpuCell(raw[m], f'{P} threads', False)}" for m in modes])

    def ratioCell(num: list[float], den: list[float]) -> str:
        if not num or not den:
            return "-"
        return f"{statistics.median(num) / statistics.median(den):.2f}"

    row("raw ldap3 / pymaild: sequential vs 1 thread",
        [ratioCell(collect(raw[m], "1 thread"), collect(portal[m], "sequential")) for m in modes])
    row(f"raw ldap3 / pymaild: {C} concurrent vs {P} threads",
        [ratioCell(collect(raw[m], f"{P} threads"), collect(portal[m], "concurrent")) for m in modes])
    if not a.no_dovecot:
        row("Dovecot auth: sequential", [fmtRate(collect(dove[m], "sequential")) for m in modes])
        row(f"Dovecot auth: {C} concurrent", [fmtRate(collect(dove[m], "concurrent")) for m in modes])
        row(f"Dovecot auth: {C} concurrent, wrong password ({dovecotPhases[2]['n']:,}; each held 0.5 s)",
            [fmtRate(collect(dove[m], "wrong")) for m in modes])
        for ph in ("sequential", "concurrent"):
            row(f"Dovecot / pymaild: {ph}", [ratioCell(collect(dove[m], ph), collect(portal[m], ph)) for m in modes])

    def lateCell(m: str, key: str) -> str:
        rows = [r["baseline"] if key == "baseline" else r["phases"][key]["late"] for r in portal[m]
                if (key == "baseline" and "baseline" in r) or key in r.get("phases", {})]
        rows = [x for x in rows if x["n"]]
        if not rows:
            return "-"
        return (f"{fmtMs(statistics.median([x['p99'] for x in rows]))} / "
                f"{fmtMs(max(x['max'] for x in rows))}")

    for key, label in (("baseline", "idle (1 s)"), ("sequential", "sequential"), ("concurrent", f"{C} concurrent"),
                       ("wrong", "wrong passwords")):
        row(f"reactor lateness p99 / max, {label}", [lateCell(m, key) for m in modes])
    print()
    print("Rates are logins/s. Ratios are times (a rate over pymaild's rate): above 1 means pymaild is slower. "
          "Lateness: how late a 10 ms LoopingCall ran (median of the rounds' p99 / worst of all rounds).")
    for m in modes:
        for what, results in (("pymaild", portal[m]), ("raw ldap3", raw[m]), ("Dovecot", dove[m])):
            for r in results:
                if "error" in r:
                    notes.append(f"{MODE_LABELS[m]}, {what}: {r['error']}")
            for ph, expect in (("sequential", "ok"), ("concurrent", "ok"), ("wrong", "refused"), ("1 thread", "ok"),
                               (f"{P} threads", "ok")):
                bad = badOutcomes(results, ph, expect)
                if bad:
                    notes.append(f"{MODE_LABELS[m]}, {what}, {ph}: not all '{expect}': {bad}")
        srcs = {r.get("pymaild") for r in portal[m] if r.get("pymaild")}
        for src in srcs:
            if not src.startswith(str(tmp)):
                notes.append(f"pymaild was imported from {src}, not from the snapshot")
    imports = [r["ldap3Import"] for r in portal.get("plain", []) if "ldap3Import" in r]  # (TLS: at construction)
    if imports:
        notes.append(f"importing ldap3 took {fmtMs(statistics.median(imports))}: pymaild imports it at its first "
                     "LDAP call, so the first login after a start pays that too")
    if any(r.get("logLines") for m in modes for r in portal[m]):
        lines = statistics.median([r["logLines"] for m in modes for r in portal[m] if r.get("logLines")])
        notes.append(f"the portal processes log as twistd does (every event, debug included, to a file): "
                     f"about {lines:,.0f} lines a run" if a.portal_log == "debug" else
                     f"the portal processes log events of level {a.portal_log} and above only (--portal-log): "
                     f"about {lines:,.0f} lines a run")

    if pym is not None:
        print()
        names = ["pymaild"] + (["Dovecot"] if e2e["Dovecot"] else [])
        print(f"| IMAP LOGIN+LOGOUT, {a.e2e_clients} clients, plain LDAP ({a.e2e_logins:,} a round, "
              f"{a.e2e_users} users) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        row("logins/s", [fmtRate([r["rate"] for r in e2e[n]]) for n in names])
        row("latency p50 / p99", [" / ".join(fmtMs(statistics.median([r["latency"][q] for r in e2e[n]]))
                                             for q in ("p50", "p99")) for n in names])
        row("CPU per login: the server's processes / slapd",
            [f"{fmtMs(statistics.median([r['cpu'] / r['n'] for r in e2e[n]]))} / "
             f"{fmtMs(statistics.median([r['slapdCpu'] / r['n'] for r in e2e[n]]))}" for n in names])
        if e2e["Dovecot"]:
            row("pymaild / Dovecot (time)", [ratioCell([r["rate"] for r in e2e["Dovecot"]],
                                                        [r["rate"] for r in e2e["pymaild"]]), ""])
        for n in names:
            bad = collections.Counter()
            for r in e2e[n]:
                bad.update({k: v for k, v in r["outcomes"].items() if k != "ok"})
            if bad:
                notes.append(f"IMAP on {n}: not all logins succeeded: {dict(bad)}")

    if hungResult:
        print()
        print(f"| slapd SIGSTOPped, {a.hung_logins} logins asked at once, [ldap] timeout = {a.hung_timeout:g} s, "
              f"pool of {P} | " + " | ".join(MODE_LABELS[m] for m in hungResult) + " |")
        print("|---|" + "---|" * len(hungResult))
        H = {m: (r if "error" not in r else {"phases": {}, "error": r["error"]}) for m, r in hungResult.items()}

        def hcell(fn) -> list[str]:
            out = []
            for m, r in H.items():
                try:
                    out.append(fn(r) if "error" not in r else f"failed: {r['error'][:60]}")
                except (KeyError, TypeError):
                    out.append("-")
            return out

        def outcomes(d: dict) -> str:
            return ", ".join(f"{v} {k}" for k, v in d.get("outcomes", {}).items()) or "-"

        row("answers", hcell(lambda r: outcomes(r["phases"]["hung"])))
        row("time to the answer: p50 / p99 / max", hcell(lambda r: " / ".join(
            fmtMs(r["phases"]["hung"]["latency"][q]) for q in ("p50", "p99", "max"))))
        row("reactor lateness p99 / max meanwhile", hcell(lambda r: f"{fmtMs(r['phases']['hung']['late']['p99'])} / "
                                                          f"{fmtMs(r['phases']['hung']['late']['max'])} "
                                                          f"({r['phases']['hung']['late']['n']} ticks)"))
        row("after SIGCONT: first good login (a try every 50 ms)", hcell(
            lambda r: f"{fmtMs(r['recovery']['seconds'])} ({r['recovery']['tries']} tries, "
                      f"last {r['recovery']['outcome']})"))
        row(f"then 200 logins, {C} concurrent", hcell(lambda r: outcomes(r["phases"]["after"])))
        row("reactor lateness p99 / max, SIGCONT to the first good login", hcell(
            lambda r: f"{fmtMs(r['recovery']['late']['p99'])} / {fmtMs(r['recovery']['late']['max'])}"))
    for line in profileLines:
        print(line)
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    if a.json:
        a.json.write_text(json.dumps({"portal": portal, "raw": raw, "dovecot": dove, "imap": e2e, "hung": hungResult},
                                     indent=1))


if __name__ == "__main__":
    main()
