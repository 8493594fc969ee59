"""
Shared fixtures: a real pymaild server process on 127.0.0.1 with ephemeral ports.

L{PymaildProcess} writes a configuration file, runs C{twistd -n pymaild --config ...} as a
subprocess of the test and waits until every listener accepts connections (a condition, not a
fixed sleep).  Tests talk to it with the standard library's clients over real sockets and TLS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
PYMAILDCTL = BIN / "pymaildctl"
LISTENER_NAMES = ("smtp", "submission", "smtps", "imap", "imaps", "pop3", "pop3s")

#: Set by scripts/test (and so in CI) when it has installed every Debian package the tests use
#: (it runs as root): there a skipped test is a failure, since a skip would hide a feature
#: nobody checked; elsewhere (a developer's machine without Dovecot, slapd, a tmpfs ...) the
#: skips stay skips and say what is missing.
REQUIRE_ALL = os.environ.get("PYMAILD_TESTS_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where scripts/test installed everything the tests use: {report.longrepr}"


def free_ports(count: int) -> list[int]:
    """
    Ask the kernel for C{count} distinct free ports on 127.0.0.1 (all held open at once, so they
    differ), then release them for the server to bind.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def held_by_another_thread(lock):
    """
    C{lock} held by another thread for the duration (as a store thread holds a user's lock),
    released at the end even if the body fails.
    """
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def client_tls_context(cafile: Path) -> ssl.SSLContext:
    """
    A client context that trusts exactly the server's certificate (the self-signed one from
    the data directory) and checks the host name, as a careful client would.
    """
    return ssl.create_default_context(cafile=str(cafile))


def maildir_files(home: Path) -> list[Path]:
    """
    The message files of a Maildir's new/ and cur/ together, in delivery order (the store's own
    key: sorted as text they are not, the microseconds are not padded, so within one second
    M92234 sorts after M100929; a CI run failed on that).
    """
    from pymaild.store.maildir import _deliveryOrder

    found = [p for sub in ("new", "cur") if (home / sub).is_dir() for p in (home / sub).iterdir()]
    return sorted(found, key=lambda p: _deliveryOrder(p.name))


def postmaster_inbox(server) -> Path:
    """
    postmaster@localhost's Maildir (its INBOX) in a test server's data directory, created if it
    is not there yet, for tests that deliver into it as an MDA would.
    """
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return home


class PymaildProcess:
    """
    One pymaild server run by twistd in a temporary directory.
    """

    def __init__(self, workdir: Path, extra_config: str = "", listeners=LISTENER_NAMES):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "pymaild.toml"
        self.log_path = workdir / "pymaild.log"
        self.ports = dict(zip(listeners, free_ports(len(listeners))))
        lines = ["[listen]"]
        for name in LISTENER_NAMES:
            addresses = [f"127.0.0.1:{self.ports[name]}"] if name in self.ports else []
            lines.append(f"{name} = {addresses!r}".replace("'", '"'))
        self.config_text = "\n".join(lines) + "\n" + extra_config
        self.config_path.write_text(self.config_text)
        self.proc: subprocess.Popen | None = None

    def tls(self) -> ssl.SSLContext:
        return client_tls_context(self.cert_path)

    @property
    def cert_path(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    def postmaster_password(self) -> str:
        return (self.data_dir / "postmaster.password").read_text().strip()

    def start(self, *extra_args: str, twistd_args=(), wait: bool = True) -> PymaildProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", *twistd_args, "pymaild", "--config", str(self.config_path),
             "--data-dir", str(self.data_dir), *extra_args],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for(self._ready, what=f"pymaild to listen (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pymaild exited with {self.proc.returncode}:\n{self.log()}")
        for port in self.ports.values():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(PYMAILDCTL), "--config", str(self.config_path), "--data-dir", str(self.data_dir), *args],
            input=input, capture_output=True, text=True, timeout=60,
        )


@pytest.fixture
def make_server(tmp_path):
    """
    Build servers with C{make_server(extra_config="...")}; every one is stopped at the end.
    """
    servers: list[PymaildProcess] = []

    def make(extra_config: str = "", listeners=LISTENER_NAMES, name: str = "srv") -> PymaildProcess:
        workdir = tmp_path / f"{name}{len(servers)}"
        workdir.mkdir()
        server = PymaildProcess(workdir, extra_config, listeners)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> PymaildProcess:
    """
    A running server on the embedded defaults, with ports moved to free ephemeral ones.
    """
    return make_server().start()


def run_twistd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "pymaild", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
