"""
Tests for L{pymaild.store.quota}: the Maildir++ C{maildirsize} file, its recalculation, limit
checks, and updates from several threads and processes at once.

C{tests/data/dovecot/maildirsize} and C{messages.txt} come from Dovecot 2.3.19 (see the
README there); the last test runs Dovecot on a file pymaild wrote, when Dovecot is installed.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for

from pymaild.errors import MailError
from pymaild.store import quota as quotamodule
from pymaild.store.quota import MAX_FILE_SIZE, STALE_SECONDS, Quota, QuotaExceeded

DATA = Path(__file__).resolve().parents[1] / "data" / "dovecot"
IMAP = Path("/usr/lib/dovecot/imap")


def maildir(root: Path, files: dict[str, int | str] = {}) -> Path:
    """
    A Maildir++ root with C{cur new tmp} and the message files C{files} (path relative to
    the root -> size in bytes, or contents).
    """
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * content if isinstance(content, int) else content.encode())
    return root


def dovecotMaildir(root: Path) -> Path:
    """
    Empty files named as the message files Dovecot left (their sizes are in the names).
    """
    maildir(root)
    for line in (DATA / "messages.txt").read_text().splitlines():
        path = root / line
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return root


def test_reads_dovecot_file(tmp_path):
    """
    The usage Dovecot recorded is the sum of its file's lines, read without recalculating
    (the maildir here is empty, so a recalculation would give 0).
    """
    root = maildir(tmp_path)
    shutil.copy(DATA / "maildirsize", root / "maildirsize")
    before = (root / "maildirsize").read_bytes()
    assert Quota(root, 1048576, 100).usage() == (1395, 6)
    assert (root / "maildirsize").read_bytes() == before


def test_recalculation_agrees_with_dovecot(tmp_path):
    """
    Recalculating over the files Dovecot left (INBOX, Sent, a folder in modified UTF-7 and
    Trash, which is counted) gives the usage Dovecot recorded.
    """
    root = dovecotMaildir(tmp_path)
    assert Quota(root, 1048576, 100).recalculate() == (1395, 6)
    assert (root / "maildirsize").read_text() == "1048576S,100C\n1395 6\n"


@pytest.mark.parametrize(
    "storage, messages, line",
    [
        (1048576, 100, "1048576S,100C"),
        (1048576, 0, "1048576S"),
        (0, 7, "7C"),
        (0, 0, "0S"),
    ],
)
def test_limits_line(tmp_path, storage, messages, line):
    """
    The limits line is written as Dovecot writes it for the same limits.
    """
    quota = Quota(maildir(tmp_path), storage, messages)
    assert quota.limitsLine() == line
    quota.recalculate()
    assert (tmp_path / "maildirsize").read_text() == f"{line}\n0 0\n"


@pytest.mark.parametrize(
    "header, limits",
    [
        ("1048576S,100C", (1048576, 100)),
        ("100C,1048576S", (1048576, 100)),
        (" 1048576S , 100C ", (1048576, 100)),
        ("1048576S", (1048576, 0)),
        ("100C", (0, 100)),
        ("0S", (0, 0)),
        ("", (0, 0)),
        ("0S,0C", (0, 0)),
    ],
)
def test_limits_line_read(tmp_path, header, limits):
    """
    A limits line in any of the spellings the specification allows is read as its limits:
    a file with the configured limits is used as it is.
    """
    root = maildir(tmp_path)
    (root / "maildirsize").write_text(f"{header}\n100 2\n")
    assert Quota(root, *limits).usage() == (100, 2)


@pytest.mark.parametrize(
    "content",
    [
        "1000S,10C\n100 2\n",  # other limits
        "2000S\n100 2\n",  # message limit missing
        "2000S,10C,5C\n100 2\n",  # garbled limits
        "2000S,10X\n100 2\n",
        "2000S,10C",  # no line end after the limits
        "2000S,10C\n100 2 3\n",  # garbled line
        "2000S,10C\n100\n",
        "2000S,10C\nabc 2\n",
        "2000S,10C\n100 2\n-200 -1\n",  # negative bytes
        "2000S,10C\n100 2\n-50 -3\n",  # negative count
        "2000S,10C\n" + "100 2\n" * 900,  # over 5120 bytes
    ],
)
def test_recalculates(tmp_path, content):
    """
    A file with other limits, garbled, summing to a negative usage, or over 5120 bytes is
    replaced by a recalculation from the messages.
    """
    root = maildir(tmp_path, {"cur/1.M1P1.host,S=300:2,S": 0, "new/2.M2P2.host": 40})
    (root / "maildirsize").write_text(content)
    assert Quota(root, 2000, 10).usage() == (340, 2)
    assert (root / "maildirsize").read_text() == "2000S,10C\n340 2\n"


def test_recalculates_missing(tmp_path):
    """
    A missing file is recalculated and written.
    """
    root = maildir(tmp_path, {"cur/1.M1P1.host,S=300:2,S": 0})
    assert Quota(root, 2000, 10).usage() == (300, 1)
    assert (root / "maildirsize").read_text() == "2000S,10C\n300 1\n"


def test_unfinished_last_line_ignored(tmp_path):
    """
    A last line without its line end (another process is appending it) is left out rather
    than taken for garbage.
    """
    root = maildir(tmp_path)
    (root / "maildirsize").write_text("2000S,10C\n100 2\n5")
    assert Quota(root, 2000, 10).usage() == (100, 2)


def test_limit_size_boundary(tmp_path):
    """
    A file of exactly 5120 bytes is still used; one byte more and it is recalculated.
    """
    root = maildir(tmp_path)
    content = "0S\n" + "1 0\n" * 1279 + "\n"
    assert len(content) == MAX_FILE_SIZE
    (root / "maildirsize").write_text(content)
    assert Quota(root).usage() == (1279, 0)
    (root / "maildirsize").write_text(content + "\n")
    assert Quota(root).usage() == (0, 0)


def test_recalculation_what_counts(tmp_path):
    """
    Recalculation counts cur/ and new/ of the root and of every C{.Folder} (nested folders
    and Trash too), with sizes from C{,S=} or from the file; it leaves out tmp/, dot files,
    the root's own files, directories that are not Maildir++ folders, folders reached
    through symbolic links, and subdirectories of cur/.
    """
    root = maildir(
        tmp_path,
        {
            "cur/a,S=100:2,S": 0,
            "cur/b:2,": 7,
            "new/c,S=5,W=6": 0,
            "new/d": "hello",
            ".Sent/cur/e,S=1000:2,S": 0,
            ".A.B/new/f,S=1": 0,
            ".Trash/cur/g,S=10:2,ST": 0,
            ".Entw&APw-rfe/cur/h,S=2000:2,D": 0,
            # not counted:
            "tmp/i,S=99999": 0,
            "cur/.hidden,S=99999": 0,
            ".Sent/tmp/j,S=99999": 0,
            "dovecot-uidlist": 50,
            "notafolder/cur/k,S=99999": 0,
            ".Sent/cur/sub/l,S=99999": 0,
            ".Sent/cur/sub2/m": 99999,
            "cur/n,S=12x:2,": 9,  # not a size: stat gives 9
        },
    )
    outside = maildir(tmp_path.parent / (tmp_path.name + "-outside"), {"cur/o,S=99999": 0})
    (root / ".Link").symlink_to(outside)
    (root / "cur" / "dangling").symlink_to(tmp_path / "nothing")
    quota = Quota(root)
    assert quota.recalculate() == (100 + 7 + 5 + 5 + 1000 + 1 + 10 + 2000 + 9, 9)


def test_recalculation_without_root(tmp_path):
    """
    A user whose root does not exist yet uses nothing (and nothing is written).
    """
    quota = Quota(tmp_path / "nobody")
    assert quota._scan() == (0, 0)


def test_recalculation_retries_while_changing(tmp_path, monkeypatch):
    """
    If a directory changes during the count, it is counted again, so that a message moved
    from new/ to cur/ meanwhile is counted once.
    """
    root = maildir(tmp_path, {"new/a,S=10": 0})
    listed = []
    realListdir = os.listdir

    def listdir(path):
        names = realListdir(path)
        listed.append(path)
        if len(listed) == 1 and path.endswith("cur"):
            # The message moves after cur/ was listed and before new/ is.
            os.rename(root / "new" / "a,S=10", root / "cur" / "a,S=10:2,")
            later = time.time() + 10
            os.utime(root / "cur", (later, later))
        return names

    monkeypatch.setattr(quotamodule.os, "listdir", listdir)
    assert Quota(root).recalculate() == (10, 1)
    assert len(listed) == 4


def test_recalculation_leaves_no_temporary_files(tmp_path):
    """
    The file is replaced by renaming a temporary file; none is left behind, and the file is
    private to the user.
    """
    root = maildir(tmp_path, {"cur/a,S=10": 0})
    Quota(root, 100).recalculate()
    assert sorted(p.name for p in root.iterdir()) == ["cur", "maildirsize", "new", "tmp"]
    assert os.listdir(root / "tmp") == []
    assert (root / "maildirsize").stat().st_mode & 0o777 == 0o600


def test_recalculation_failure_keeps_old_file(tmp_path, monkeypatch):
    """
    If the new file cannot be written, the old one stays and no temporary file is left.
    """
    root = maildir(tmp_path)
    (root / "maildirsize").write_text("0S\n5 1\n")

    def failingFsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quotamodule.os, "fsync", failingFsync)
    with pytest.raises(OSError, match="No space left"):
        Quota(root).recalculate()
    assert (root / "maildirsize").read_text() == "0S\n5 1\n"
    assert os.listdir(root / "tmp") == []


def test_update_appends(tmp_path):
    """
    Each update appends one line; the usage is the sum; nothing is written for no change.
    """
    root = maildir(tmp_path)
    quota = Quota(root, 10000, 10)
    quota.recalculate()
    quota.update(300, 1)
    quota.update(1200, 2)
    quota.update(-300, -1)
    quota.update(0, 0)
    assert (root / "maildirsize").read_text() == "10000S,10C\n0 0\n300 1\n1200 2\n-300 -1\n"
    assert quota.usage() == (1200, 2)


def test_update_without_file_recalculates(tmp_path):
    """
    An update when there is no file recalculates instead (counting the message the caller
    has just stored).
    """
    root = maildir(tmp_path, {"new/a,S=300": 0})
    quota = Quota(root, 10000)
    quota.update(300, 1)
    assert (root / "maildirsize").read_text() == "10000S\n300 1\n"


def test_update_goes_to_replacing_file(tmp_path):
    """
    An update that waits while a recalculation (in another process) holds the exclusive
    lock is appended to the file that replaces the old one, not lost with it.
    """
    root = maildir(tmp_path)
    path = root / "maildirsize"
    path.write_text("0S\n0 0\n")
    held = os.open(path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    done = threading.Event()
    updater = threading.Thread(target=lambda: (Quota(root).update(7, 1), done.set()))
    updater.start()
    try:
        wait_for(lambda: _flockWaiters(path), timeout=5, what="the update to wait for the lock")
        assert not done.is_set()
        (root / "new-maildirsize").write_text("0S\n100 1\n")
        os.rename(root / "new-maildirsize", path)
    finally:
        os.close(held)
        updater.join(5)
    assert done.is_set()
    assert path.read_text() == "0S\n100 1\n7 1\n"


def _flockWaiters(path: Path) -> int:
    """
    How many C{flock} requests on C{path} are waiting, from C{/proc/locks} (blocked requests
    are the lines marked C{->}).
    """
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return sum(
        1
        for line in Path("/proc/locks").read_text().splitlines()
        if "->" in line and "FLOCK" in line and inode in line.split()
    )


def test_check(tmp_path):
    """
    C{check} allows an addition up to a limit exactly and refuses one byte or one message
    more with C{552 5.2.2 Mailbox is full}.
    """
    root = maildir(tmp_path, {"cur/a,S=600:2,S": 0})
    quota = Quota(root, 1000, 3)
    assert quota.check(400) == (600, 1)
    assert quota.check(0, 2) == (600, 1)
    with pytest.raises(QuotaExceeded) as caught:
        quota.check(401)
    error = caught.value
    assert isinstance(error, MailError)
    assert (error.code, error.enhanced, error.text) == (552, "5.2.2", "Mailbox is full")
    assert not error.temporary
    assert error.cause == "storage: 600 + 401 > 1000 bytes"
    with pytest.raises(QuotaExceeded, match="Mailbox is full") as caught:
        quota.check(1, 3)
    assert caught.value.cause == "messages: 1 + 3 > 3"


@pytest.mark.parametrize(
    "storage, messages, used, add, allowed",
    [
        (0, 0, (10**12, 10**6), (10**12, 10**6), True),
        (1000, 0, (999, 10**6), (1, 10**6), True),
        (1000, 0, (999, 0), (2, 1), False),
        (0, 5, (10**12, 4), (10**12, 1), True),
        (0, 5, (0, 5), (0, 1), False),
        (1000, 5, (2000, 9), (0, 0), True),
        (1000, 5, (2000, 9), (-100, -1), True),
        (1000, 5, (2000, 4), (0, 1), True),
        (1000, 5, (1000, 5), (1, 0), False),
    ],
)
def test_check_table(tmp_path, storage, messages, used, add, allowed):
    """
    0 means unlimited; only a positive addition can exceed a limit (removing messages is
    always allowed, even over quota).
    """
    root = maildir(tmp_path)
    (root / "maildirsize").write_text(f"{storage}S,{messages}C\n{used[0]} {used[1]}\n")
    quota = Quota(root, storage, messages)
    if allowed:
        quota.check(*add)
    else:
        with pytest.raises(QuotaExceeded):
            quota.check(*add)


def test_check_without_limits_touches_nothing(tmp_path):
    """
    Without limits C{check} neither reads nor creates the file.
    """
    root = maildir(tmp_path, {"cur/a,S=600": 0})
    assert Quota(root).check(10**15) == (0, 0)
    assert not (root / "maildirsize").exists()


def test_check_recalculates_stale_file(tmp_path):
    """
    A file that would refuse a message is recalculated first if it has not changed for 15
    minutes (messages may have been removed without updating it).
    """
    root = maildir(tmp_path, {"cur/a,S=100": 0})
    path = root / "maildirsize"
    path.write_text("1000S\n990 5\n")
    quota = Quota(root, 1000)
    with pytest.raises(QuotaExceeded):
        quota.check(50)
    old = time.time() - STALE_SECONDS - 1
    os.utime(path, (old, old))
    assert quota.check(50) == (100, 1)
    assert path.read_text() == "1000S\n100 1\n"


def test_check_stale_but_really_full(tmp_path):
    """
    A stale file is recalculated, and if the recalculation is over the limit too, the
    message is refused.
    """
    root = maildir(tmp_path, {"cur/a,S=990": 0})
    path = root / "maildirsize"
    path.write_text("1000S\n990 1\n")
    old = time.time() - STALE_SECONDS - 1
    os.utime(path, (old, old))
    with pytest.raises(QuotaExceeded):
        Quota(root, 1000).check(50)
    assert path.stat().st_mtime > old + 1


@pytest.mark.parametrize("storage, messages", [(-1, 0), (0, -1), (1.5, 0), (True, 0), ("1", 0)])
def test_bad_limits(tmp_path, storage, messages):
    """
    Limits are whole numbers of 0 or more.
    """
    with pytest.raises(ValueError):
        Quota(tmp_path, storage, messages)


def test_threads(tmp_path):
    """
    Updates from many threads of one process are all recorded.
    """
    root = maildir(tmp_path)
    quota = Quota(root, 10**9, 10**6)
    quota.recalculate()

    def work(n):
        for i in range(50):
            quota.update(n * 1000 + i, 1)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sum(n * 1000 + i for n in range(8) for i in range(50))
    assert quota.usage() == (expected, 400)


def _updater(root: str, n: int, start) -> None:
    """
    One of the processes of L{test_processes}: its own L{Quota}, 50 updates.
    """
    quota = Quota(root, 10**9, 10**6)
    start.wait()
    for i in range(50):
        quota.update(n * 100 + i + 1, 1)


def test_processes(tmp_path):
    """
    Four processes appending 50 updates each at the same time lose none: the sum is exact
    and every line is whole.
    """
    root = maildir(tmp_path)
    Quota(root, 10**9, 10**6).recalculate()
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=_updater, args=(str(root), n, start)) for n in range(4)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(20)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    lines = (root / "maildirsize").read_text().splitlines()
    assert len(lines) == 2 + 200
    assert all(len(line.split()) == 2 for line in lines[1:])
    expected = sum(n * 100 + i + 1 for n in range(4) for i in range(50))
    assert Quota(root, 10**9, 10**6).usage() == (expected, 200)


@pytest.mark.skipif(
    not IMAP.exists() or (os.getuid() == 0 and shutil.which("setpriv") is None),
    reason="Dovecot's imap (Debian's dovecot-imapd) is not installed",
)
def test_dovecot_reads_what_pymaild_wrote():
    """
    Dovecot's C{quota = maildir}, given the same limits, reports the usage pymaild
    recorded (a recalculation plus updates) without recalculating it.
    """
    scratch = Path(tempfile.mkdtemp(prefix="pymaild-quota-"))
    try:
        scratch.chmod(0o755)
        home = maildir(scratch / "home", {"cur/1700000000.M1P1.host,S=2048:2,S": 0})
        quota = Quota(home, 10 * 1024 * 1024, 100)
        quota.recalculate()
        quota.update(4096, 2)
        quota.update(1024, 1)
        conf = scratch / "dovecot.conf"
        conf.write_text(
            "mail_location = maildir:~\n"
            "namespace inbox {\n  separator = /\n  inbox = yes\n  prefix =\n}\n"
            "mail_plugins = quota imap_quota\n"
            "plugin {\n  quota = maildir:User quota\n"
            "  quota_rule = *:storage=10M:messages=100\n}\n"
            f"first_valid_uid = 1\nssl = no\nbase_dir = {scratch}/run\n"
            f"log_path = {scratch}/log\nprotocols =\n"
        )
        conf.chmod(0o644)
        command = [str(IMAP), "-c", str(conf)]
        if os.getuid() == 0:
            for path in [scratch, *scratch.rglob("*")]:
                os.chown(path, 65534, 65534, follow_symlinks=False)
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        result = subprocess.run(
            command,
            input=b"a GETQUOTAROOT INBOX\r\nz LOGOUT\r\n",
            capture_output=True,
            env={"USER": "test", "HOME": str(home), "PATH": os.environ.get("PATH", "")},
            timeout=30,
        )
        answer = result.stdout.decode("utf-8", "replace")
        written = (home / "maildirsize").read_text()
    finally:
        shutil.rmtree(scratch)
    assert '* QUOTA "User quota" (STORAGE 7 10240 MESSAGE 4 100)' in answer, answer
    assert written == "10485760S,100C\n2048 1\n4096 2\n1024 1\n"
