"""
swaks (Debian's SMTP test tool) against a real server: plain MX delivery with PIPELINING,
STARTTLS + AUTH on submission, implicit TLS on 465, and a refused relay.  scripts/test installs it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import maildir_files, postmaster_inbox

SWAKS = shutil.which("swaks")
pytestmark = pytest.mark.skipif(SWAKS is None, reason="Debian's swaks is not installed")


def swaks(server, port: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(server.ports[port]), "--helo", "client.example",
                           "--timeout", "30", *args], capture_output=True, text=True, timeout=120)


def delivered(server) -> list[bytes]:
    home = postmaster_inbox(server)
    return [p.read_bytes() for p in maildir_files(home)]


def test_swaks_mx_with_pipelining(server):
    r = swaks(server, "smtp", "--to", "postmaster@localhost", "--from", "alice@example.org", "--pipeline",
              "--header", "Subject: swaks pipelined")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PIPELINING" in r.stdout and "250 2.0.0 OK: queued as" in r.stdout
    (message,) = delivered(server)
    assert b"Subject: swaks pipelined" in message and message.startswith(b"Return-Path: <alice@example.org>")


def test_swaks_submission_starttls_auth(server):
    r = swaks(server, "submission", "--to", "postmaster@localhost", "--from", "postmaster@localhost", "--tls",
              "--tls-ca-path", str(server.cert_path), "--tls-verify", "--tls-sni", "localhost",
              "--auth", "PLAIN", "--auth-user", "postmaster@localhost",
              "--auth-password=" + server.postmaster_password())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout
    (message,) = delivered(server)
    assert b"with ESMTPSA" in message


def test_swaks_smtps_auth_login(server):
    r = swaks(server, "smtps", "--to", "postmaster@localhost", "--from", "postmaster@localhost", "--tls-on-connect",
              "--auth", "LOGIN", "--auth-user", "postmaster@localhost",
              "--auth-password=" + server.postmaster_password())
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(delivered(server)) == 1


def test_swaks_relay_is_refused(server):
    r = swaks(server, "smtp", "--to", "someone@example.net", "--from", "alice@example.org")
    assert r.returncode != 0
    assert "554 5.7.1 Relay access denied" in r.stdout
    assert delivered(server) == []
