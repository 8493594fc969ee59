# -*- test-case-name: tests.store.test_dovecot -*-
"""
Dovecot's per-folder Maildir files, so that users migrated from Dovecot keep their UIDs,
UIDVALIDITY and keywords, and so that Dovecot can read what pymaild writes.

C{dovecot-uidlist} maps each message's maildir base name (the file name without its
C{:2,<flags>} part) to its UID.  Dovecot 2.x writes version 3::

    3 V1795906163 N5 G49176031715a0b6b6141000083ecc375
    1 :1795906161.M832028P16737.vm,S=149,W=156
    2 W1234 :1795906161.M833351P16737.vm,S=149,W=156

The header holds fields of one letter and a value in any order (C{V} UIDVALIDITY, C{N} the
next UID, C{G} the folder's GUID); each line is a UID, optional extension fields and C{:}
before the base name.  Dovecot appends lines without rewriting the header, so the next UID is
the larger of C{N} and one more than the last UID; lines for messages since expunged stay
until the file is rewritten.  Dovecot 1.0 wrote version 1: a header C{1 <uidvalidity>
<nextuid>} and lines C{<uid> <file name>}.

C{dovecot-keywords} names the keywords that the lower-case letters C{a} to C{z} in a file
name's flags stand for: lines C{<index> <keyword>}, index 0 for C{a} up to 25 for C{z}.

Both files are replaced the way Dovecot replaces them: the new contents are written to
C{<file>.lock} (created exclusively, so that it is also the lock Dovecot takes), synced, and
renamed over the file.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pymaild.store.delivery import fsyncDirectory

__all__ = [
    "KEYWORD_LETTERS",
    "LOCK_STALE_SECONDS",
    "LOCK_TIMEOUT_SECONDS",
    "MAX_KEYWORDS",
    "DovecotFileError",
    "Uidlist",
    "isKeyword",
    "parseKeywords",
    "parseUidlist",
    "writeKeywords",
    "writeUidlist",
]

MAX_KEYWORDS = 26
"""How many keywords a Maildir file name can carry: the letters C{a} to C{z}."""

KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
"""C{KEYWORD_LETTERS[i]} is the flag letter of keyword index C{i}."""

LOCK_STALE_SECONDS = 120
"""A C{.lock} file unchanged for this long is taken to be left by a dead process (Dovecot's
own stale timeout for the uidlist lock)."""

LOCK_TIMEOUT_SECONDS = 10
"""How long a write waits for another process's lock before giving up."""

_UID_MAX = 0xFFFFFFFF
_ATOM_SPECIALS = set('(){%*"\\]')
_GUID = re.compile(r"[0-9a-f]{32}")


class DovecotFileError(ValueError):
    """
    A Dovecot file pymaild cannot use at all (its header is garbled), naming the file and
    the line.

    @ivar path: the file.
    @ivar line: the 1-based line number.
    @ivar problem: what is wrong.
    """

    def __init__(self, path: os.PathLike | str, line: int, problem: str):
        super().__init__(f"{os.fspath(path)}: line {line}: {problem}")
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem


@dataclass
class Uidlist:
    """
    The contents of a C{dovecot-uidlist} file.

    @ivar uidvalidity: the folder's UIDVALIDITY.
    @ivar nextuid: the UID the next new message gets: the header's value, or one more than
        the highest UID listed if that is larger.
    @ivar entries: maildir base name (without C{:2,...}) -> UID.  Entries for files that no
        longer exist are normal (Dovecot rewrites the file lazily).
    @ivar guid: the folder GUID from a version 3 header (32 hex digits), if any.
    @ivar version: the file format version, 1 or 3.
    @ivar problems: C{(line number, problem)} for each line that was skipped.
    """

    uidvalidity: int
    nextuid: int
    entries: dict[str, int]
    guid: str | None = None
    version: int = 3
    problems: list[tuple[int, str]] = field(default_factory=list)


def _readLines(path: os.PathLike | str) -> list[tuple[bytes, bool]] | None:
    """
    The lines of C{path} as C{(line, complete)} without their line ends; C{None} if the file
    does not exist.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    pieces = data.split(b"\n")
    lines = [(piece.rstrip(b"\r"), True) for piece in pieces[:-1]]
    if pieces[-1]:
        lines.append((pieces[-1].rstrip(b"\r"), False))
    return lines


def _number(text: bytes | str, lowest: int = 0, highest: int = _UID_MAX) -> int | None:
    if isinstance(text, bytes):
        if not text.isdigit():
            return None
    elif not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if lowest <= value <= highest else None


def _parseHeader(path, line: bytes) -> tuple[int, int, int, str | None]:
    """
    C{(version, uidvalidity, nextuid, guid)} from the first line.

    @raise DovecotFileError: the header is garbled or of an unknown version.
    """
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise DovecotFileError(path, 1, "header is not ASCII") from None
    fields = text.split()
    if not fields:
        raise DovecotFileError(path, 1, "empty header")
    version = _number(fields[0])
    if version == 1:
        if len(fields) != 3:
            raise DovecotFileError(path, 1, f"garbled version 1 header {text!r}")
        uidvalidity = _number(fields[1], 1)
        nextuid = _number(fields[2], 1)
        guid = None
    elif version == 3:
        values: dict[str, str] = {}
        for item in fields[1:]:
            values.setdefault(item[0], item[1:])
        uidvalidity = _number(values.get("V", ""), 1)
        nextuid = _number(values.get("N", ""), 1)
        guid = values.get("G") or None
    else:
        raise DovecotFileError(path, 1, f"unsupported version {fields[0]!r}")
    if uidvalidity is None:
        raise DovecotFileError(path, 1, f"no valid UIDVALIDITY in header {text!r}")
    if nextuid is None:
        raise DovecotFileError(path, 1, f"no valid next UID in header {text!r}")
    return version, uidvalidity, nextuid, guid


def _parseEntry(version: int, line: bytes) -> tuple[int, str]:
    """
    C{(uid, base name)} from one line after the header.

    @raise ValueError: the line is garbled; the message says how.
    """
    uidText, _, rest = line.partition(b" ")
    uid = _number(uidText, 1)
    if uid is None:
        raise ValueError(f"invalid UID {uidText[:20]!r}")
    if version == 3:
        # Extension fields (W1234, S567, G...) come before " :<name>".
        while rest and not rest.startswith(b":"):
            _, _, rest = rest.partition(b" ")
        if not rest.startswith(b":"):
            raise ValueError("no ':' before the file name")
        rest = rest[1:]
    name = os.fsdecode(rest).partition(":")[0]
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"invalid file name {name[:60]!r}")
    return uid, name


def parseUidlist(path: os.PathLike | str) -> Uidlist | None:
    """
    Read a C{dovecot-uidlist} file (format version 3 or 1).

    Lines that cannot be used are skipped and reported in L{Uidlist.problems}: a garbled
    line, a UID out of range or not above the previous one, a file name listed twice (the
    first is kept), an unfinished last line.  File names are decoded as C{os.listdir}
    decodes them and lose any C{:2,...} part.

    @return: the contents, or C{None} if the file does not exist or is empty.
    @raise DovecotFileError: the header is garbled or of another version.
    @raise OSError: the file exists but cannot be read.
    """
    lines = _readLines(path)
    if lines is None or not any(line.strip() for line, _ in lines):
        return None
    version, uidvalidity, nextuid, guid = _parseHeader(path, lines[0][0])
    entries: dict[str, int] = {}
    problems: list[tuple[int, str]] = []
    lastUid = 0
    for number, (line, complete) in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if not complete:
            problems.append((number, "unfinished last line"))
            continue
        try:
            uid, name = _parseEntry(version, line)
        except ValueError as e:
            problems.append((number, str(e)))
            continue
        if uid <= lastUid:
            problems.append((number, f"UID {uid} is not above the previous UID {lastUid}"))
            continue
        if name in entries:
            problems.append((number, f"{name!r} is listed twice"))
            continue
        entries[name] = uid
        lastUid = uid
    if lastUid >= _UID_MAX:
        nextuid = max(nextuid, _UID_MAX)
    else:
        nextuid = max(nextuid, lastUid + 1)
    return Uidlist(uidvalidity, nextuid, entries, guid, version, problems)


def isKeyword(keyword: str) -> bool:
    """
    Whether C{keyword} is an IMAP keyword (RFC 3501 C{flag-keyword}: an atom, and not a
    system flag, which would start with C{\\}).
    """
    return (
        isinstance(keyword, str)
        and keyword != ""
        and all("\x21" <= c <= "\x7e" and c not in _ATOM_SPECIALS for c in keyword)
    )


def parseKeywords(path: os.PathLike | str) -> dict[int, str]:
    """
    Read a C{dovecot-keywords} file: keyword index (0 for flag letter C{a}, up to 25 for
    C{z}) -> keyword.

    Lines that cannot be used are skipped: no space, an index that is not a number from 0
    to 25, a keyword that is not an IMAP atom, an index or keyword already seen (the first
    wins).

    @return: the mapping; empty if the file does not exist.
    @raise OSError: the file exists but cannot be read.
    """
    lines = _readLines(path)
    keywords: dict[int, str] = {}
    if lines is None:
        return keywords
    seen = set()
    for line, _ in lines:
        indexText, space, keywordBytes = line.partition(b" ")
        index = _number(indexText, 0, MAX_KEYWORDS - 1)
        try:
            keyword = keywordBytes.decode("ascii")
        except UnicodeDecodeError:
            continue
        if not space or index is None or not isKeyword(keyword):
            continue
        if index in keywords or keyword in seen:
            continue
        keywords[index] = keyword
        seen.add(keyword)
    return keywords


def _lockAlive(lock: Path, staleAfter: float) -> bool:
    """
    Whether C{lock} exists and is recent enough to respect; removes a stale one.
    """
    try:
        changed = os.stat(lock).st_mtime
    except FileNotFoundError:
        return False
    if time.time() - changed < staleAfter:
        return True
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    return False


def _replace(
    path: os.PathLike | str,
    data: bytes,
    staleAfter: float | None = None,
    timeout: float | None = None,
) -> None:
    """
    Replace C{path} with C{data} atomically, taking Dovecot's dot-lock: write C{path.lock}
    (created exclusively), fsync it, rename it over C{path}, fsync the directory.

    @raise TimeoutError: another process held the lock for C{timeout} seconds.
    """
    if staleAfter is None:
        staleAfter = LOCK_STALE_SECONDS
    if timeout is None:
        timeout = LOCK_TIMEOUT_SECONDS
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            if not _lockAlive(lock, staleAfter):
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{lock}: locked by another process") from None
            time.sleep(0.02)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(lock, path)
    except BaseException:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        raise
    fsyncDirectory(path.parent)


def writeKeywords(path: os.PathLike | str, mapping: dict[int, str]) -> None:
    """
    Replace C{dovecot-keywords} with C{mapping} (index -> keyword), in Dovecot's format, in
    order of index, atomically and under Dovecot's lock.

    @raise ValueError: an index outside 0 to 25, a keyword that is not an IMAP atom, or a
        keyword given twice.
    @raise TimeoutError: Dovecot (or another writer) held the lock too long.
    """
    lines = []
    seen = set()
    for index in sorted(mapping):
        keyword = mapping[index]
        if not isinstance(index, int) or not 0 <= index < MAX_KEYWORDS:
            raise ValueError(f"keyword index {index!r} is not from 0 to {MAX_KEYWORDS - 1}")
        if not isKeyword(keyword):
            raise ValueError(f"{keyword!r} is not an IMAP keyword")
        if keyword in seen:
            raise ValueError(f"keyword {keyword!r} given twice")
        seen.add(keyword)
        lines.append(f"{index} {keyword}\n")
    _replace(path, "".join(lines).encode("ascii"))


def writeUidlist(
    path: os.PathLike | str,
    uidvalidity: int,
    nextuid: int,
    entries: dict[str, int],
    guid: str | None = None,
) -> None:
    """
    Replace C{dovecot-uidlist} with a version 3 file Dovecot reads: the header
    C{3 V<uidvalidity> N<nextuid> G<guid>} and one C{<uid> :<base name>} line per entry in
    order of UID, atomically and under Dovecot's lock.

    @param entries: maildir base name (without C{:2,...}) -> UID.
    @param guid: the folder GUID, 32 lower-case hex digits; a new random one if C{None}.
    @raise ValueError: UIDVALIDITY or a UID outside 1 to 2**32-1, a UID used twice,
        C{nextuid} not above every UID, a base name that is empty, starts with C{.} or
        contains C{:}, C{/}, a line end or NUL, or a malformed GUID.
    @raise TimeoutError: Dovecot (or another writer) held the lock too long.
    """
    if not (isinstance(uidvalidity, int) and 1 <= uidvalidity <= _UID_MAX):
        raise ValueError(f"UIDVALIDITY {uidvalidity!r} is not from 1 to {_UID_MAX}")
    if not (isinstance(nextuid, int) and 1 <= nextuid <= _UID_MAX):
        raise ValueError(f"next UID {nextuid!r} is not from 1 to {_UID_MAX}")
    if guid is None:
        guid = uuid.uuid4().hex
    elif not (isinstance(guid, str) and _GUID.fullmatch(guid)):
        raise ValueError(f"GUID {guid!r} is not 32 lower-case hex digits")
    byUid: dict[int, str] = {}
    for name, uid in entries.items():
        if not (isinstance(uid, int) and 1 <= uid <= _UID_MAX):
            raise ValueError(f"UID {uid!r} of {name!r} is not from 1 to {_UID_MAX}")
        if uid >= nextuid:
            raise ValueError(f"UID {uid} of {name!r} is not below the next UID {nextuid}")
        if uid in byUid:
            raise ValueError(f"UID {uid} is given to both {byUid[uid]!r} and {name!r}")
        if (
            not isinstance(name, str)
            or not name
            or name.startswith(".")
            or any(c in name for c in ":/\n\r\0")
        ):
            raise ValueError(f"{name!r} is not a maildir base name")
        byUid[uid] = name
    out = [f"3 V{uidvalidity} N{nextuid} G{guid}\n".encode("ascii")]
    for uid in sorted(byUid):
        out.append(b"%d :%s\n" % (uid, os.fsencode(byUid[uid])))
    _replace(path, b"".join(out))
