"""
Tests for L{pymaild.auth.passwdfile}: parsing, rewriting, re-reading on change, and edits from
several processes at once.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from twisted.logger import Logger

from pymaild.auth import passwdfile
from pymaild.auth.passwdfile import (
    NoSuchUser,
    PasswdEntry,
    PasswdFile,
    UserExists,
    canonical_user,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def events(monkeypatch) -> list[dict]:
    """
    The events L{pymaild.auth.passwdfile} logs during the test.
    """
    collected: list[dict] = []
    monkeypatch.setattr(passwdfile, "log", Logger(observer=collected.append))
    return collected


def texts(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "line, expected",
    [
        ("bob@example.com:{PLAIN}x", PasswdEntry("bob@example.com", "{PLAIN}x")),
        ("bob@example.com:", PasswdEntry("bob@example.com", "")),
        (
            "Bob@Example.COM:{PLAIN}x:1000:1000:Bob B:/home/bob:/bin/sh:userdb_quota_rule=*:storage=1G",
            PasswdEntry(
                "bob@example.com",
                "{PLAIN}x",
                ("1000", "1000", "Bob B", "/home/bob", "/bin/sh", "userdb_quota_rule=*:storage=1G"),
            ),
        ),
        ("bob@example.com:{PLAIN}x::::::", PasswdEntry("bob@example.com", "{PLAIN}x", ("",) * 6)),
        ("jöe@bücher.example:{PLAIN}x", PasswdEntry("jöe@xn--bcher-kva.example", "{PLAIN}x")),
        ("bob@example.com:{PLAIN}x\r", PasswdEntry("bob@example.com", "{PLAIN}x")),
    ],
)
def test_parse_line(tmp_path, line, expected):
    """
    A line gives the canonical user, the password field and the remaining fields verbatim
    (the extra fields may contain ':').
    """
    passwd = PasswdFile(write(tmp_path / "passwd", line + "\n"))
    assert passwd.entries() == {expected.user: expected}
    assert passwd.get(expected.user.upper()) == expected


def test_missing_file_is_empty(tmp_path):
    """
    A file that does not exist reads as a file without users.
    """
    passwd = PasswdFile(tmp_path / "nothing" / "passwd")
    assert passwd.users() == []
    assert len(passwd) == 0
    assert passwd.get("bob@example.com") is None


def test_get_invalid_name_is_none(tmp_path):
    """
    C{get} of something that cannot be a user name answers C{None} rather than raising.
    """
    passwd = PasswdFile(write(tmp_path / "passwd", "bob@example.com:{PLAIN}x\n"))
    for name in ("bob", "bob:x@example.com", "", "a b@example.com"):
        assert passwd.get(name) is None


ORIGINAL = textwrap.dedent(
    """\
    # accounts for example.com
    bob@example.com:{PLAIN}b:1000:1000:Bob::

    # the boss
    Carol@Example.com:{PLAIN}c:1001:1001:Carol:/home/carol:/bin/sh:userdb_mail=maildir:~/Maildir
    this line is garbled
    """
)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda p: p.add("Dave@Example.com", "{PLAIN}d"),
            ORIGINAL + "dave@example.com:{PLAIN}d\n",
        ),
        (
            lambda p: p.set_password("carol@example.com", "{PLAIN}new"),
            ORIGINAL.replace("Carol@Example.com:{PLAIN}c:", "Carol@Example.com:{PLAIN}new:"),
        ),
        (
            lambda p: p.remove("BOB@example.com"),
            ORIGINAL.replace("bob@example.com:{PLAIN}b:1000:1000:Bob::\n", ""),
        ),
    ],
    ids=["add", "set_password", "remove"],
)
def test_rewrite_keeps_everything_else(tmp_path, edit, expected):
    """
    An edit changes its own line only: comments, blank lines, other users' lines (with their
    case and extra fields) and even garbled lines are written back verbatim.
    """
    path = write(tmp_path / "passwd", ORIGINAL)
    edit(PasswdFile(path))
    assert path.read_text() == expected


def test_rewrite_adds_missing_final_newline(tmp_path):
    """
    A file whose last line has no newline gets one before the added line.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b")
    PasswdFile(path).add("carol@example.com", "{PLAIN}c")
    assert path.read_text() == "bob@example.com:{PLAIN}b\ncarol@example.com:{PLAIN}c\n"


def test_set_password_keeps_crlf(tmp_path):
    """
    A line ending in CRLF keeps its CR when its password is replaced.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b:1:2\r\n")
    PasswdFile(path).set_password("bob@example.com", "{PLAIN}n")
    assert path.read_bytes() == b"bob@example.com:{PLAIN}n:1:2\r\n"


def test_round_trip(tmp_path):
    """
    add, set_password and remove are seen by the same object and by a fresh one.
    """
    path = tmp_path / "data" / "passwd"
    passwd = PasswdFile(path)
    passwd.add("Bob@Example.com", "{PLAIN}one")
    passwd.add("alice@example.com", "{PLAIN}a")
    assert passwd.users() == ["alice@example.com", "bob@example.com"]
    assert passwd.get("bob@example.com") == PasswdEntry("bob@example.com", "{PLAIN}one")
    passwd.set_password("bob@example.com", "{PLAIN}two")
    assert PasswdFile(path).get("BOB@example.com").password == "{PLAIN}two"
    passwd.remove("bob@example.com")
    assert passwd.get("bob@example.com") is None
    assert PasswdFile(path).users() == ["alice@example.com"]
    assert len(passwd) == 1


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda p: p.add("bob@example.com", "{PLAIN}x"), UserExists),
        (lambda p: p.add("BOB@EXAMPLE.COM", "{PLAIN}x"), UserExists),
        (lambda p: p.set_password("nobody@example.com", "{PLAIN}x"), NoSuchUser),
        (lambda p: p.remove("nobody@example.com"), NoSuchUser),
    ],
)
def test_existence_errors(tmp_path, edit, error):
    """
    Adding an existing user, or changing or removing a missing one, raises a L{ValueError}
    subclass that names the user, and leaves the file alone.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    with pytest.raises(error) as info:
        edit(PasswdFile(path))
    assert isinstance(info.value, ValueError)
    assert "@example.com" in str(info.value)
    assert path.read_text() == "bob@example.com:{PLAIN}b\n"


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("bob", "exactly one '@'"),
        ("bob@a@example.com", "exactly one '@'"),
        ("bob:x@example.com", "':'"),
        ("bob smith@example.com", "white space"),
        ("bob\t@example.com", "white space"),
        ("bob\x01@example.com", "control"),
        ("bob\u2028@example.com", "white space"),
        ("@example.com", "nothing before"),
        ("bob@", "no domain"),
        ("", "empty"),
    ],
)
def test_bad_names_refused(tmp_path, name, fragment):
    """
    A user name with ':', white space, a control character or not exactly one '@' is refused
    by every edit with a L{ValueError} saying why; the file is not created.
    """
    path = tmp_path / "passwd"
    passwd = PasswdFile(path)
    for edit in (passwd.add, passwd.set_password):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
            edit(name, "{PLAIN}x")
    with pytest.raises(ValueError, match=fragment):
        passwd.remove(name)
    assert not path.exists()


@pytest.mark.parametrize("password_hash", ["", "{PLAIN}a:b", "{PLAIN}a\nb", "{PLAIN}a b"])
def test_bad_password_field_refused(tmp_path, password_hash):
    """
    A password field that would break the line format is refused.
    """
    with pytest.raises(ValueError):
        PasswdFile(tmp_path / "passwd").add("bob@example.com", password_hash)


def test_canonical_user():
    """
    L{canonical_user} folds to lower case and IDNA-encodes the domain.
    """
    assert canonical_user("Bob@Example.COM") == "bob@example.com"
    assert canonical_user("Bob@Bücher.Example.") == "bob@xn--bcher-kva.example"


def test_reread_when_changed(tmp_path):
    """
    Another writer's change (new size, or a new inode by rename) is seen at the next lookup,
    without reload().
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    passwd = PasswdFile(path)
    assert passwd.users() == ["bob@example.com"]
    write(path, "bob@example.com:{PLAIN}b\ncarol@example.com:{PLAIN}c\n")
    assert passwd.users() == ["bob@example.com", "carol@example.com"]
    # Same size, different inode.
    replacement = write(tmp_path / "new", "dave@example.com:{PLAIN}d\neve1@example.com:{PLAIN}e\n")
    assert replacement.stat().st_size == path.stat().st_size
    os.rename(replacement, path)
    assert passwd.users() == ["dave@example.com", "eve1@example.com"]
    path.unlink()
    assert passwd.users() == []


def test_no_reread_when_unchanged(tmp_path, monkeypatch):
    """
    An unchanged (and not recently modified) file is not read again: a lookup costs one stat.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    passwd = PasswdFile(path)
    passwd.get("bob@example.com")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    for _ in range(5):
        assert passwd.get("bob@example.com") is not None
    assert opened == []


def same_size_in_place_edit(path: Path, text: str) -> None:
    """
    Rewrite C{path} in place with text of the same size and put its mtime back, as an editor
    could within one timestamp tick: the (inode, mtime, size) signature does not change.
    """
    st = path.stat()
    assert len(text.encode()) == st.st_size
    with open(path, "r+b") as f:
        f.write(text.encode())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_reload_forces_reread(tmp_path):
    """
    A change the signature cannot show is seen after reload() (SIGHUP).
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    passwd = PasswdFile(path)
    assert passwd.get("bob@example.com").password == "{PLAIN}b"
    same_size_in_place_edit(path, "bob@example.com:{PLAIN}x\n")
    assert passwd.get("bob@example.com").password == "{PLAIN}b"
    passwd.reload()
    assert passwd.get("bob@example.com").password == "{PLAIN}x"


def test_racy_read_repeated(tmp_path, monkeypatch):
    """
    A read made right after the file was modified is repeated once the file's timestamp is
    old enough, so a same-size in-place change within one timestamp tick is seen too.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    passwd = PasswdFile(path)
    assert passwd.get("bob@example.com").password == "{PLAIN}b"
    same_size_in_place_edit(path, "bob@example.com:{PLAIN}x\n")
    later = time.time_ns() + 3 * 10**9
    monkeypatch.setattr(passwdfile.time, "time_ns", lambda: later)
    assert passwd.get("bob@example.com").password == "{PLAIN}x"


def test_garbled_lines_skipped_and_logged(tmp_path, events):
    """
    Lines that cannot be accounts are skipped, each logged with the file and its line number;
    the good lines still count, and the first line of a duplicated user wins.
    """
    path = tmp_path / "passwd"
    path.write_bytes(
        b"# comment\n"
        b"bob@example.com:{PLAIN}b\n"
        b"no colon here\n"
        b"two@at@example.com:{PLAIN}x\n"
        b"BOB@example.com:{PLAIN}second\n"
        b"bad\xff@example.com:{PLAIN}x\n"
        b"carol@example.com:{PLAIN}c\n"
    )
    passwd = PasswdFile(path)
    assert passwd.users() == ["bob@example.com", "carol@example.com"]
    assert passwd.get("bob@example.com").password == "{PLAIN}b"
    logged = texts(events)
    for line in (3, 4, 5, 6):
        assert any(f"{path}:{line}:" in text for text in logged), (line, logged)
    assert len(logged) == 4
    assert all(e["log_level"].name == "warn" for e in events)


def test_remove_removes_duplicates(tmp_path):
    """
    Removing a user removes its ignored duplicate lines too, so that none of them comes back.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}1\nx@example.com:{PLAIN}x\nBob@example.com:{PLAIN}2\n")
    PasswdFile(path).remove("bob@example.com")
    assert path.read_text() == "x@example.com:{PLAIN}x\n"


def test_unreadable_file_keeps_last_good(tmp_path, events):
    """
    When the file becomes unreadable (a directory in its place, NUL bytes), the users read
    before stay, the error is logged once, and the file is used again once it is fixed.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    passwd = PasswdFile(path)
    assert passwd.users() == ["bob@example.com"]

    path.write_bytes(b"carol@example.com:{PLAIN}c\n\0\0\0")
    assert passwd.users() == ["bob@example.com"]
    assert passwd.users() == ["bob@example.com"]
    assert len(events) == 1 and "NUL" in texts(events)[0]

    path.unlink()
    path.mkdir()
    assert passwd.users() == ["bob@example.com"]
    passwd.reload()
    assert passwd.users() == ["bob@example.com"]
    assert len(events) == 2 and str(path) in texts(events)[1]

    path.rmdir()
    write(path, "carol@example.com:{PLAIN}c\n")
    assert passwd.users() == ["carol@example.com"]


def test_unreadable_at_first_raises(tmp_path):
    """
    A file that could never be read raises the OSError, so callers can answer "try again
    later" instead of "no such user".
    """
    path = tmp_path / "passwd"
    path.mkdir()
    passwd = PasswdFile(path)
    with pytest.raises(OSError):
        passwd.get("bob@example.com")
    passwd.reload()  # logs, raises nothing


def test_edit_refuses_binary_file(tmp_path):
    """
    An edit does not rewrite a file that is not text; it raises ValueError naming the file.
    """
    path = tmp_path / "passwd"
    path.write_bytes(b"bob@example.com:{PLAIN}b\n\0")
    with pytest.raises(ValueError, match="NUL"):
        PasswdFile(path).add("carol@example.com", "{PLAIN}c")
    assert path.read_bytes() == b"bob@example.com:{PLAIN}b\n\0"


def test_new_file_mode_0600(tmp_path):
    """
    A new passwd-file is created with mode 0600, whatever the umask, and no temporary files are
    left behind.
    """
    old = os.umask(0)
    try:
        path = tmp_path / "passwd"
        PasswdFile(path).add("bob@example.com", "{PLAIN}b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd", "passwd.lock"]


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o644])
def test_existing_mode_kept(tmp_path, mode):
    """
    Rewriting keeps the existing file's mode.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")
    path.chmod(mode)
    passwd = PasswdFile(path)
    passwd.add("carol@example.com", "{PLAIN}c")
    passwd.set_password("carol@example.com", "{PLAIN}d")
    passwd.remove("bob@example.com")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_failed_write_leaves_file_alone(tmp_path, monkeypatch):
    """
    If writing the new file fails, the old file is untouched and the temporary file removed.
    """
    path = write(tmp_path / "passwd", "bob@example.com:{PLAIN}b\n")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(passwdfile.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        PasswdFile(path).add("carol@example.com", "{PLAIN}c")
    assert path.read_text() == "bob@example.com:{PLAIN}b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd", "passwd.lock"]


def test_threads_read_while_editing(tmp_path):
    """
    Lookups from several threads during edits see whole files only: never an error, never a
    partial set of users.
    """
    path = tmp_path / "passwd"
    passwd = PasswdFile(path)
    passwd.add("keep@example.com", "{PLAIN}k")
    problems: list[object] = []
    stop = threading.Event()

    def read():
        reader = PasswdFile(path)
        while not stop.is_set():
            try:
                users = reader.users()
                if "keep@example.com" not in users:
                    problems.append(users)
            except Exception as e:  # pragma: no cover - reported below
                problems.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(30):
            passwd.add(f"user{i}@example.com", "{PLAIN}x")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == []
    assert len(PasswdFile(path)) == 31


ADDER = """
import sys
from pymaild.auth.passwdfile import PasswdFile
path, worker = sys.argv[1], sys.argv[2]
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.read(1)  # the go: every worker is ready
passwd = PasswdFile(path)
for i in range(5):
    passwd.add(f"w{worker}u{i}@example.com", "{PLAIN}x")
"""


def test_concurrent_processes_lose_nothing(tmp_path):
    """
    Eight separate processes, each adding five users at the same moment, lose none of the
    forty edits (each edit locks, re-reads and replaces the file).
    """
    path = tmp_path / "passwd"
    write(path, "# shared\nfirst@example.com:{PLAIN}f\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen([sys.executable, "-c", ADDER, str(path), str(n)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for n in range(8)
    ]
    for worker in workers:  # each says when it is ready (blocking reads, no polling)
        assert worker.stdout.readline() == b"ready\n"
    for worker in workers:
        worker.stdin.write(b"g")
        worker.stdin.close()
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    expected = {"first@example.com"} | {f"w{n}u{i}@example.com" for n in range(8) for i in range(5)}
    assert set(PasswdFile(path).users()) == expected
    assert path.read_text().startswith("# shared\nfirst@example.com:{PLAIN}f\n")
    assert len(path.read_text().splitlines()) == 42
