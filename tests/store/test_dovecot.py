"""
Tests for L{pymaild.store.dovecot}: reading and writing Dovecot's C{dovecot-uidlist} and
C{dovecot-keywords}.

The files in C{tests/data/dovecot/} were written by Dovecot 2.3.19 itself (see the README
there).  The last test runs Dovecot on files pymaild wrote, when Dovecot is installed; the
others do not need it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pymaild.store import dovecot
from pymaild.store.dovecot import (
    KEYWORD_LETTERS,
    DovecotFileError,
    Uidlist,
    isKeyword,
    parseKeywords,
    parseUidlist,
    writeKeywords,
    writeUidlist,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "dovecot"
IMAP = Path("/usr/lib/dovecot/imap")


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_dovecot_inbox_uidlist():
    """
    The INBOX uidlist Dovecot wrote: version 3 header, five lines (UID 5 was expunged after
    the file was last rewritten, so it is still listed), and the next UID one above the last
    line's although the header still says 5.
    """
    uidlist = parseUidlist(DATA / "inbox.dovecot-uidlist")
    assert uidlist == Uidlist(
        uidvalidity=1795906163,
        nextuid=6,
        entries={
            "1795906161.M832028P16737.vm,S=149,W=156": 1,
            "1795906161.M833351P16737.vm,S=149,W=156": 2,
            "1795906161.M834856P16737.vm,S=650,W=658": 3,
            "1795906161.M835780P16737.vm,S=149,W=156": 4,
            "1795906161.M837410P16737.vm,S=149,W=156": 5,
        },
        guid="49176031715a0b6b6141000083ecc375",
        version=3,
        problems=[],
    )


def test_dovecot_sent_uidlist():
    """
    A subfolder's uidlist Dovecot wrote: its own UIDVALIDITY and GUID.
    """
    uidlist = parseUidlist(DATA / "sent.dovecot-uidlist")
    assert uidlist.uidvalidity == 1795906161
    assert uidlist.nextuid == 2
    assert uidlist.guid == "281e3d31715a0b6b6141000083ecc375"
    assert uidlist.entries == {"1795906161.M838289P16737.vm,S=149,W=156": 1}


def test_dovecot_keywords():
    """
    The keywords file Dovecot wrote, in the order the keywords were first used.
    """
    assert parseKeywords(DATA / "inbox.dovecot-keywords") == {
        0: "$Label1",
        1: "Work",
        2: "$Forwarded",
        3: "Important",
        4: "Personal",
    }


def test_dovecot_files_agree():
    """
    Every message file left in Dovecot's INBOX has a UID in the uidlist, and its keyword
    letters name the keywords the test session set (C{$Label1} on UID 2 was expunged with
    its message; UID 3 has C{Important}; UID 4 has C{Work} and C{$Forwarded}).
    """
    uidlist = parseUidlist(DATA / "inbox.dovecot-uidlist")
    keywords = parseKeywords(DATA / "inbox.dovecot-keywords")
    found = {}
    for line in (DATA / "messages.txt").read_text().splitlines():
        if not line.startswith("cur/"):
            continue
        base, _, flags = line[len("cur/") :].partition(":2,")
        letters = [c for c in flags if c in KEYWORD_LETTERS]
        found[uidlist.entries[base]] = sorted(keywords[KEYWORD_LETTERS.index(c)] for c in letters)
    assert found == {1: [], 3: ["Important"], 4: ["$Forwarded", "Work"]}


def test_missing_files(tmp_path):
    """
    A folder Dovecot never saw has no uidlist (C{None}) and no keywords (C{{}}).
    """
    assert parseUidlist(tmp_path / "dovecot-uidlist") is None
    assert parseKeywords(tmp_path / "dovecot-keywords") == {}


@pytest.mark.parametrize("text", ["", "\n", "  \n\n"])
def test_empty_uidlist(tmp_path, text):
    """
    An empty uidlist (Dovecot creates the file, then crashes) is as good as none.
    """
    assert parseUidlist(write(tmp_path / "dovecot-uidlist", text)) is None


@pytest.mark.parametrize(
    "header, uidvalidity, nextuid, guid",
    [
        ("3 V1 N1 G0123456789abcdef0123456789abcdef", 1, 1, "0123456789abcdef0123456789abcdef"),
        ("3 N7 V42", 42, 7, None),
        ("3 G00 N7 V42 X9 Zfoo", 42, 7, "00"),
        ("3  V42   N7 ", 42, 7, None),
        ("3 V4294967295 N4294967295", 4294967295, 4294967295, None),
        ("1 42 7", 42, 7, None),
        ("3 V42 N7\r", 42, 7, None),
    ],
)
def test_headers(tmp_path, header, uidvalidity, nextuid, guid):
    """
    Header fields are a letter and a value, in any order, unknown ones ignored; version 1
    has two bare numbers.
    """
    uidlist = parseUidlist(write(tmp_path / "dovecot-uidlist", header + "\n"))
    assert (uidlist.uidvalidity, uidlist.nextuid, uidlist.guid) == (uidvalidity, nextuid, guid)
    assert uidlist.entries == {} and uidlist.problems == []
    assert uidlist.version == int(header[0])


@pytest.mark.parametrize(
    "header, problem",
    [
        ("2 V1 N1", "unsupported version '2'"),
        ("V1 N1", "unsupported version 'V1'"),
        ("x", "unsupported version 'x'"),
        ("3 N7", "no valid UIDVALIDITY"),
        ("3 V0 N7", "no valid UIDVALIDITY"),
        ("3 V-1 N7", "no valid UIDVALIDITY"),
        ("3 Vx N7", "no valid UIDVALIDITY"),
        ("3 V4294967296 N7", "no valid UIDVALIDITY"),
        ("3 V1", "no valid next UID"),
        ("3 V1 N0", "no valid next UID"),
        ("3 V1 N", "no valid next UID"),
        ("1 42", "garbled version 1 header"),
        ("1 42 7 9", "garbled version 1 header"),
        ("1 0 7", "no valid UIDVALIDITY"),
        ("3 V\xe4 N1", "not ASCII"),
        ("\n1 :a", "empty header"),
    ],
)
def test_garbled_header(tmp_path, header, problem):
    """
    A uidlist whose header cannot be read cannot be used at all: the error names the file,
    line 1 and the problem.
    """
    path = write(tmp_path / "dovecot-uidlist", header + "\n1 :a\n")
    with pytest.raises(DovecotFileError) as caught:
        parseUidlist(path)
    assert str(caught.value).startswith(f"{path}: line 1: ")
    assert problem in str(caught.value)
    assert (caught.value.path, caught.value.line) == (str(path), 1)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "line, entry",
    [
        ("1 :name", ("name", 1)),
        ("1 :name:2,S", ("name", 1)),
        ("1 :name:2,", ("name", 1)),
        ("1 W1234 :name", ("name", 1)),
        ("1 W1234 S1200 G0123456789abcdef0123456789abcdef :name,S=1200", ("name,S=1200", 1)),
        ("1 P:x :name", ("name", 1)),
        ("1 :name with space", ("name with space", 1)),
        ("4294967295 :name", ("name", 4294967295)),
        ("1 :1795906161.M834856P16737.vm,S=650,W=658", ("1795906161.M834856P16737.vm,S=650,W=658", 1)),
        ("1 :n\xe4me", ("n\xe4me", 1)),
        (b"1 :n\xffme", ("n\udcffme", 1)),
        ("1 :name\r", ("name", 1)),
    ],
)
def test_version3_lines(tmp_path, line, entry):
    """
    A version 3 line is the UID, optional extension fields, then C{:} and the file name;
    any C{:2,...} info is dropped; names decode as C{os.listdir} decodes them.
    """
    data = b"3 V1 N1\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n"
    uidlist = parseUidlist(write(tmp_path / "dovecot-uidlist", data))
    assert uidlist.entries == dict([entry])
    assert uidlist.problems == []
    assert uidlist.nextuid == min(entry[1] + 1, 2**32 - 1)


@pytest.mark.parametrize(
    "line, entry",
    [
        ("1 name", ("name", 1)),
        ("1 name:2,RS", ("name", 1)),
        ("17 1035478339.27041_118.foo.org:2,S", ("1035478339.27041_118.foo.org", 17)),
    ],
)
def test_version1_lines(tmp_path, line, entry):
    """
    A version 1 line is the UID and the full file name (info part dropped).
    """
    uidlist = parseUidlist(write(tmp_path / "dovecot-uidlist", f"1 99 5\n{line}\n"))
    assert uidlist.entries == dict([entry])
    assert uidlist.version == 1 and uidlist.uidvalidity == 99
    assert uidlist.problems == []


def test_garbled_lines_are_skipped(tmp_path):
    """
    Lines that cannot be used are skipped and reported with their line numbers; the good
    lines around them are kept.
    """
    text = (
        "3 V7 N3\n"
        "1 :good1\n"
        "x :bad-uid\n"
        "0 :zero-uid\n"
        "-4 :negative\n"
        "4294967296 :too-high\n"
        "2 W12\n"
        "2 W12 name-without-colon\n"
        "2 :\n"
        "2 :.hidden\n"
        "2 :a/b\n"
        "\n"
        "3 :good3\n"
        "2 :descending\n"
        "3 :repeated-uid\n"
        "4 :good1\n"
        "5 :good5:2,S\n"
        "6 :unfinished"
    )
    uidlist = parseUidlist(write(tmp_path / "dovecot-uidlist", text))
    assert uidlist.entries == {"good1": 1, "good3": 3, "good5": 5}
    assert uidlist.nextuid == 6
    assert [number for number, _ in uidlist.problems] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 18]
    problems = dict(uidlist.problems)
    assert "invalid UID" in problems[3]
    assert "no ':'" in problems[7]
    assert "invalid file name" in problems[10]
    assert "not above the previous UID 3" in problems[14]
    assert "listed twice" in problems[16]
    assert problems[18] == "unfinished last line"


def test_nextuid_from_header_when_higher(tmp_path):
    """
    The header's next UID wins when it is above the last line's UID (UIDs of messages
    expunged and dropped from the file are never reused).
    """
    uidlist = parseUidlist(write(tmp_path / "dovecot-uidlist", "3 V7 N100\n1 :a\n5 :b\n"))
    assert uidlist.nextuid == 100


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0 $Junk\n", {0: "$Junk"}),
        ("25 z\n", {25: "z"}),
        ("26 z\n", {}),
        ("-1 z\n", {}),
        ("x z\n", {}),
        ("0\n", {}),
        ("0 \n", {}),
        ("0 two words\n", {}),
        ("0 \\Seen\n", {}),
        ("0 a(b\n", {}),
        ("0 a]b\n", {}),
        ("0 a*b\n", {}),
        ("0 caf\xe9\n", {}),
        ("0 a\n0 b\n", {0: "a"}),
        ("0 a\n1 a\n2 b\n", {0: "a", 2: "b"}),
        ("3 c\n1 a\n", {1: "a", 3: "c"}),
        ("0 a\r\n1 b", {0: "a", 1: "b"}),
        ("\n\n0 a\n", {0: "a"}),
    ],
)
def test_parse_keywords(tmp_path, text, expected):
    """
    Keyword lines are C{<index> <keyword>} with an index from 0 to 25 and an IMAP atom;
    anything else is skipped, and the first of a repeated index or keyword wins.
    """
    assert parseKeywords(write(tmp_path / "dovecot-keywords", text)) == expected


@pytest.mark.parametrize(
    "keyword, valid",
    [
        ("$Label1", True),
        ("NonJunk", True),
        ("a.b-c_d+e/f", True),
        ("", False),
        ("\\Seen", False),
        ("a b", False),
        ("a\tb", False),
        ('a"b', False),
        ("a%", False),
        ("a{", False),
        ("a)", False),
        ("\xe9", False),
        ("a\x7f", False),
    ],
)
def test_is_keyword(keyword, valid):
    """
    A keyword is a non-empty IMAP atom: printable ASCII without atom-specials.
    """
    assert isKeyword(keyword) is valid


def test_write_keywords(tmp_path):
    """
    L{writeKeywords} writes Dovecot's format in order of index, and reads back the same.
    """
    path = tmp_path / "dovecot-keywords"
    mapping = {3: "Important", 0: "$Label1", 25: "Z"}
    writeKeywords(path, mapping)
    assert path.read_text() == "0 $Label1\n3 Important\n25 Z\n"
    assert parseKeywords(path) == mapping
    assert not (tmp_path / "dovecot-keywords.lock").exists()


def test_write_keywords_round_trip_dovecot(tmp_path):
    """
    Rewriting Dovecot's own keywords file gives back the same bytes.
    """
    path = tmp_path / "dovecot-keywords"
    writeKeywords(path, parseKeywords(DATA / "inbox.dovecot-keywords"))
    assert path.read_bytes() == (DATA / "inbox.dovecot-keywords").read_bytes()


@pytest.mark.parametrize(
    "mapping, problem",
    [
        ({26: "a"}, "not from 0 to 25"),
        ({-1: "a"}, "not from 0 to 25"),
        ({0: "a b"}, "not an IMAP keyword"),
        ({0: "\\Seen"}, "not an IMAP keyword"),
        ({0: ""}, "not an IMAP keyword"),
        ({0: "a", 1: "a"}, "given twice"),
    ],
)
def test_write_keywords_refuses(tmp_path, mapping, problem):
    """
    L{writeKeywords} refuses what Dovecot could not read back, and leaves the file alone.
    """
    path = write(tmp_path / "dovecot-keywords", "0 old\n")
    with pytest.raises(ValueError, match=problem):
        writeKeywords(path, mapping)
    assert path.read_text() == "0 old\n"


def test_write_uidlist(tmp_path):
    """
    L{writeUidlist} writes a version 3 file in order of UID that reads back the same.
    """
    path = tmp_path / "dovecot-uidlist"
    entries = {"1700000002.M3P1.host": 20, "1700000000.M1P1.host,S=20": 7, "n\udcffme": 9}
    writeUidlist(path, 12345, 30, entries, guid="0123456789abcdef0123456789abcdef")
    assert path.read_bytes() == (
        b"3 V12345 N30 G0123456789abcdef0123456789abcdef\n"
        b"7 :1700000000.M1P1.host,S=20\n"
        b"9 :n\xffme\n"
        b"20 :1700000002.M3P1.host\n"
    )
    assert parseUidlist(path) == Uidlist(12345, 30, entries, "0123456789abcdef0123456789abcdef")


def test_write_uidlist_round_trip_dovecot(tmp_path):
    """
    Dovecot's uidlist rewritten by pymaild, header values and lines, gives back the same
    bytes (apart from the next UID, which pymaild brings up to date).
    """
    original = parseUidlist(DATA / "sent.dovecot-uidlist")
    path = tmp_path / "dovecot-uidlist"
    writeUidlist(path, original.uidvalidity, original.nextuid, original.entries, original.guid)
    expected = (DATA / "sent.dovecot-uidlist").read_bytes().replace(b" N1 ", b" N2 ")
    assert path.read_bytes() == expected


def test_write_uidlist_new_guid(tmp_path):
    """
    Without a GUID, each file gets a new random one of 32 hex digits, as Dovecot's are.
    """
    guids = set()
    for name in ("a", "b"):
        writeUidlist(tmp_path / name, 1, 1, {})
        guids.add(parseUidlist(tmp_path / name).guid)
    assert len(guids) == 2
    assert all(len(g) == 32 and int(g, 16) >= 0 for g in guids)


@pytest.mark.parametrize(
    "uidvalidity, nextuid, entries, guid, problem",
    [
        (0, 1, {}, None, "UIDVALIDITY 0"),
        (2**32, 1, {}, None, "UIDVALIDITY"),
        (1, 0, {}, None, "next UID 0"),
        (1, 2**32, {}, None, "next UID"),
        (1, 5, {"a": 0}, None, "UID 0"),
        (1, 5, {"a": 5}, None, "not below the next UID 5"),
        (1, 5, {"a": 1, "b": 1}, None, "UID 1 is given to both"),
        (1, 5, {"a:2,S": 1}, None, "not a maildir base name"),
        (1, 5, {"a/b": 1}, None, "not a maildir base name"),
        (1, 5, {"": 1}, None, "not a maildir base name"),
        (1, 5, {".hidden": 1}, None, "not a maildir base name"),
        (1, 5, {"a\nb": 1}, None, "not a maildir base name"),
        (1, 5, {}, "ABC", "GUID"),
        (1, 5, {}, "0123456789ABCDEF0123456789ABCDEF", "GUID"),
    ],
)
def test_write_uidlist_refuses(tmp_path, uidvalidity, nextuid, entries, guid, problem):
    """
    L{writeUidlist} refuses values Dovecot would reject or misread, and leaves the file
    alone.
    """
    path = write(tmp_path / "dovecot-uidlist", "3 V1 N1\n")
    with pytest.raises(ValueError, match=problem):
        writeUidlist(path, uidvalidity, nextuid, entries, guid)
    assert path.read_text() == "3 V1 N1\n"


def test_write_keeps_mode(tmp_path):
    """
    A replaced file keeps the permissions of the one it replaces.
    """
    path = write(tmp_path / "dovecot-keywords", "0 a\n")
    path.chmod(0o640)
    writeKeywords(path, {0: "b"})
    assert path.stat().st_mode & 0o777 == 0o640


def test_write_waits_for_lock(tmp_path, monkeypatch):
    """
    A writer waits (polling) while another process holds Dovecot's lock, then replaces the
    file once the lock is gone.
    """
    path = tmp_path / "dovecot-keywords"
    lock = write(tmp_path / "dovecot-keywords.lock", "")
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:
            lock.unlink()

    monkeypatch.setattr(dovecot.time, "sleep", sleep)
    writeKeywords(path, {0: "a"})
    assert len(waits) == 3
    assert parseKeywords(path) == {0: "a"}
    assert not lock.exists()


def test_write_times_out_on_lock(tmp_path, monkeypatch):
    """
    A lock held past the timeout makes the write fail with L{TimeoutError}, naming the lock;
    the file and the other process's lock are left alone.
    """
    monkeypatch.setattr(dovecot, "LOCK_TIMEOUT_SECONDS", 0)
    path = write(tmp_path / "dovecot-keywords", "0 old\n")
    lock = write(tmp_path / "dovecot-keywords.lock", "theirs")
    with pytest.raises(TimeoutError, match="dovecot-keywords.lock"):
        writeKeywords(path, {0: "a"})
    assert path.read_text() == "0 old\n"
    assert lock.read_text() == "theirs"


def test_write_breaks_stale_lock(tmp_path):
    """
    A lock unchanged for longer than Dovecot's stale timeout was left by a dead process and
    is taken over.
    """
    path = tmp_path / "dovecot-uidlist"
    lock = write(tmp_path / "dovecot-uidlist.lock", "junk")
    old = time.time() - dovecot.LOCK_STALE_SECONDS - 5
    os.utime(lock, (old, old))
    writeUidlist(path, 3, 4, {"a": 1})
    assert parseUidlist(path).entries == {"a": 1}
    assert not lock.exists()


def test_failed_write_leaves_no_lock(tmp_path, monkeypatch):
    """
    If writing fails half-way, the lock is removed and the old file is untouched.
    """
    path = write(tmp_path / "dovecot-keywords", "0 old\n")

    def failingFsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dovecot.os, "fsync", failingFsync)
    with pytest.raises(OSError, match="No space left"):
        writeKeywords(path, {0: "new"})
    assert path.read_text() == "0 old\n"
    assert not (tmp_path / "dovecot-keywords.lock").exists()


def _runDovecot(home: Path, commands: list[str]) -> str:
    """
    Run Dovecot's IMAP server pre-authenticated on the Maildir C{home}, with the layout
    pymaild uses, and return what it answered to C{commands}.
    """
    conf = home.parent / "dovecot.conf"
    conf.write_text(
        f"mail_location = maildir:~\n"
        f"namespace inbox {{\n  separator = /\n  inbox = yes\n  prefix =\n}}\n"
        f"mail_plugins = listescape\n"
        f"first_valid_uid = 1\n"
        f"ssl = no\n"
        f"base_dir = {home.parent}/run\n"
        f"log_path = {home.parent}/log\n"
        f"protocols =\n"
    )
    conf.chmod(0o644)
    command = [str(IMAP), "-c", str(conf)]
    if os.getuid() == 0:
        # Dovecot refuses mail access as root: run as nobody.
        for path in [home.parent, *home.parent.rglob("*")]:
            os.chown(path, 65534, 65534)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    script = "".join(f"t{i} {c}\r\n" for i, c in enumerate(commands)) + "z LOGOUT\r\n"
    result = subprocess.run(
        command,
        input=script.encode(),
        capture_output=True,
        env={"USER": "test", "HOME": str(home), "PATH": os.environ.get("PATH", "")},
        timeout=30,
    )
    return result.stdout.decode("utf-8", "replace")


@pytest.mark.skipif(
    not IMAP.exists() or (os.getuid() == 0 and shutil.which("setpriv") is None),
    reason="Dovecot's imap (Debian's dovecot-imapd) is not installed",
)
def test_dovecot_reads_what_pymaild_wrote():
    """
    Dovecot itself, opening a Maildir whose uidlist and keywords pymaild wrote, reports
    pymaild's UIDVALIDITY, next UID and UIDs, and reads the keyword letters as pymaild
    meant them.
    """
    scratch = Path(tempfile.mkdtemp(prefix="pymaild-dovecot-"))
    try:
        scratch.chmod(0o755)
        home = scratch / "home"
        for sub in ("cur", "new", "tmp"):
            (home / sub).mkdir(parents=True)
        files = {
            "1700000000.M1P1.host,S=22": (7, "S"),
            "1700000001.M2P1.host,S=22": (9, "ad"),
            "1700000002.M3P1.host": (20, "FSb"),
        }
        for base, (_, flags) in files.items():
            write(home / "cur" / f"{base}:2,{flags}", "Subject: x\r\n\r\nhello\r\n")
        writeUidlist(home / "dovecot-uidlist", 12345, 30, {b: u for b, (u, _) in files.items()})
        writeKeywords(home / "dovecot-keywords", {0: "$Label1", 1: "Work", 3: "Important"})
        answer = _runDovecot(home, ["SELECT INBOX", "UID FETCH 1:* (FLAGS)"])
    finally:
        shutil.rmtree(scratch)
    assert "[UIDVALIDITY 12345]" in answer, answer
    assert "[UIDNEXT 30]" in answer, answer
    assert "* 1 FETCH (UID 7 FLAGS (\\Seen))" in answer, answer
    assert "* 2 FETCH (UID 9 FLAGS ($Label1 Important))" in answer, answer
    assert "* 3 FETCH (UID 20 FLAGS (\\Flagged \\Seen Work))" in answer, answer
