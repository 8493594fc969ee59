"""
Real POP3 clients against a real server: Debian's fetchmail (STLS on 110 and POP3S on 995, in
keep + UIDL mode) and getmail6 (POP3-SSL, keeping mail on the server).  Each checks the
certificate against the server's own.  scripts/test installs both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import postmaster_inbox
from pymaild.store.delivery import deliver

FETCHMAIL = shutil.which("fetchmail")
GETMAIL = shutil.which("getmail") or (
    str(Path(os.sys.executable).parent / "getmail") if (Path(os.sys.executable).parent / "getmail").exists() else None
)


def message(subject: str) -> bytes:
    """A message whose body starts with a dot: the clients must undo the dot-stuffing once."""
    return f"Subject: {subject}\r\nFrom: alice@example.com\r\n\r\n.leading dot in {subject}\r\n".encode()


@pytest.fixture
def filled(server):
    home = postmaster_inbox(server)
    for subject in ("one", "two", "three"):
        deliver(home, message(subject))
    server.home = home
    return server


def subjects(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.iterdir()):
        text = path.read_bytes().decode()
        out.append(text.split("Subject: ", 1)[1].split("\n", 1)[0].strip())
        assert "\n.leading dot" in text.replace("\r\n", "\n"), text  # dot-stuffing undone exactly once
    return sorted(out)


def run_fetchmail(server, tmp_path: Path, port_name: str, ssl: bool) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"fetched-{port_name}"
    out.mkdir(exist_ok=True)
    rc = tmp_path / f"fetchmailrc-{port_name}"
    mda = f"/bin/sh -c 'cat > {out}/$(date +%s%N).$$'"
    rc.write_text(
        f"set no syslog\n"
        f"poll 127.0.0.1 with protocol POP3 and port {server.ports[port_name]} and uidl:\n"
        f'  user "postmaster@localhost" there with password "{server.postmaster_password()}" is "tester" here\n'
        f"  keep {'ssl' if ssl else 'sslproto tls1.2+'} sslcertck sslcommonname localhost sslcertfile \"{server.cert_path}\"\n"
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(
        [FETCHMAIL, "--nodetach", "--nosyslog", "-v", "-f", str(rc), "-i", str(tmp_path / f"ids-{port_name}")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    return result, out


@pytest.mark.skipif(FETCHMAIL is None, reason="Debian's fetchmail is not installed")
@pytest.mark.parametrize("port_name, ssl", [("pop3", False), ("pop3s", True)], ids=["stls", "pop3s"])
def test_fetchmail_keep_uidl(filled, tmp_path, port_name, ssl):
    """
    fetchmail in keep + UIDL mode: the first run fetches the three messages (over STLS, or TLS
    from the first byte), a second run fetches nothing, a new message is fetched exactly once;
    the server keeps every message.
    """
    result, out = run_fetchmail(filled, tmp_path, port_name, ssl)
    assert result.returncode == 0, result.stdout + result.stderr
    if not ssl:
        assert "STLS" in result.stdout + result.stderr
    assert subjects(out) == ["one", "three", "two"]

    result, _ = run_fetchmail(filled, tmp_path, port_name, ssl)
    assert result.returncode == 1, result.stdout + result.stderr  # 1: no new mail
    assert len(list(out.iterdir())) == 3

    deliver(filled.home, message("four"))
    result, _ = run_fetchmail(filled, tmp_path, port_name, ssl)
    assert result.returncode == 0, result.stdout + result.stderr
    assert subjects(out) == ["four", "one", "three", "two"]
    assert len(list((filled.home / "cur").iterdir())) + len(list((filled.home / "new").iterdir())) == 4


@pytest.mark.skipif(GETMAIL is None, reason="getmail6 is not installed")
def test_getmail_pop3_ssl_keeps_and_fetches_new_only(filled, tmp_path):
    """
    getmail6 over POP3-SSL with delete = false and read_all = false: the first run delivers the
    three messages to a local Maildir, a second run nothing, a new message exactly once.
    """
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    getmaildir = tmp_path / "getmail"
    getmaildir.mkdir()
    # getmail's own Maildir writer refuses to run as root (CI's user): an external MDA script
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\ncat > "{maildir}/new/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rc = getmaildir / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        "type = SimplePOP3SSLRetriever\n"
        "server = localhost\n"
        f"port = {filled.ports['pop3s']}\n"
        "username = postmaster@localhost\n"
        f"password = {filled.postmaster_password()}\n"
        f"ca_certs = {filled.cert_path}\n"
        "\n[destination]\ntype = MDA_external\n"
        f"path = {mda}\n"
        "allow_root_commands = true\n"
        "\n[options]\ndelete = false\nread_all = false\nverbose = 2\n"
    )

    def run() -> subprocess.CompletedProcess:
        result = subprocess.run([GETMAIL, f"--getmaildir={getmaildir}", f"--rcfile={rc}"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    run()
    assert subjects(maildir / "new") == ["one", "three", "two"]
    run()
    assert len(list((maildir / "new").iterdir())) == 3
    deliver(filled.home, message("four"))
    run()
    assert subjects(maildir / "new") == ["four", "one", "three", "two"]
