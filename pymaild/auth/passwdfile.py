# -*- test-case-name: tests.auth.test_passwdfile -*-
"""
The Dovecot-compatible passwd-file: one account per line.

    user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields

Only the first two fields are needed.  User names are full addresses (C{local@domain}), folded
to lower case with the domain IDNA-encoded, the form L{pymaild.envelope.normalizeAddress} gives.
The remaining fields are kept verbatim but otherwise unused for now.  C{#} comments and blank
lines are kept when the file is rewritten.

Reading: L{PasswdFile} answers from memory and re-reads the file by itself when its
C{(st_ino, st_mtime_ns, st_size)} changed (one C{os.stat} per lookup), so a running server sees
C{pymaildctl user add} at once; L{PasswdFile.reload} forces a re-read (SIGHUP).  A missing file
reads as empty.  A line that cannot be parsed is skipped and logged with its file and line
number.  A file that cannot be read (permissions, a directory, NUL bytes) keeps the last good
contents and is logged; if there never were good contents, lookups raise the C{OSError} so that
callers answer "try again later" rather than "no such user".

Writing: L{PasswdFile.add}, L{PasswdFile.set_password} and L{PasswdFile.remove} take an exclusive
C{flock} on C{<path>.lock}, re-read the file under the lock, write a temporary file in the same
directory (mode 0600, or the existing file's mode and owner), fsync it, rename it over the file
and fsync the directory.  Editors in separate processes therefore never lose each other's edits,
and readers never see a half-written file.

Every method is safe to call from several threads at once.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from twisted.logger import Logger

log = Logger()

T = TypeVar("T")

#: A file modified less than this long before it was read may be changed again within the same
#: timestamp tick without its signature changing (in-place editors); such a read is repeated
#: once this long after the modification.
_RACY_NANOSECONDS = 2_000_000_000


class UserExists(ValueError):
    """
    L{PasswdFile.add} was asked for a user the file already has.
    """


class NoSuchUser(ValueError):
    """
    L{PasswdFile.set_password} or L{PasswdFile.remove} was asked for a user the file does not have.
    """


def canonical_user(name: str) -> str:
    """
    Check a user name and return the form it is stored and compared in.

    @param name: C{local@domain}.
    @return: the name folded to lower case, with the domain IDNA-encoded.
    @raise ValueError: with a message saying what is wrong, if C{name} contains C{:}, white space
        or control characters, or does not have exactly one C{@} between a local part and a
        domain.
    """
    if not isinstance(name, str):
        raise ValueError(f"user name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("user name is empty")
    if ":" in name:
        raise ValueError(f"user name {name!r} contains ':'")
    for c in name:
        if c.isspace() or not c.isprintable():
            raise ValueError(f"user name {name!r} contains white space or a control character")
    if name.count("@") != 1:
        raise ValueError(f"user name {name!r} must be a full address, local@domain, with exactly one '@'")
    local, _, domain = name.partition("@")
    if not local:
        raise ValueError(f"user name {name!r} has nothing before the '@'")
    domain = domain.rstrip(".")
    if not domain:
        raise ValueError(f"user name {name!r} has no domain after the '@'")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"user name {name!r}: {domain!r} is not a domain name") from None
    return f"{local}@{domain}".lower()


def _check_password_field(password_hash: str) -> None:
    if not isinstance(password_hash, str) or not password_hash:
        raise ValueError("the password hash is empty")
    if ":" in password_hash or any(c.isspace() or not c.isprintable() for c in password_hash):
        raise ValueError("the password hash contains ':', white space or a control character")


@dataclass(frozen=True)
class PasswdEntry:
    """
    One account of the passwd-file.

    @ivar user: the canonical user name (see L{canonical_user}).
    @ivar password: the stored password, normally C{{SCHEME}hash}; empty when the line has none.
    @ivar fields: the raw fields after the password (uid, gid, gecos, home, shell, extra fields),
        as they are in the file; the extra fields may contain C{:}.
    """

    user: str
    password: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Line:
    """
    One physical line of the file (without its C{\\n}) and, for an account line, its user.
    """

    text: str
    user: str | None = None


@dataclass(frozen=True)
class _Snapshot(Generic[T]):
    """
    What one read of the file gave.  Never changed once built.
    """

    #: C{(st_ino, st_mtime_ns, st_size)}, or C{None} for a missing file.
    signature: tuple[int, int, int] | None
    value: T
    #: 0, or the time (C{time.time_ns()}) until which the read is "racy" (see L{_RACY_NANOSECONDS}).
    racy_until: int = 0

    def fresh(self, signature: tuple[int, int, int] | tuple[()] | None) -> bool:
        """
        Whether a file with this signature needs no re-read.
        """
        if signature != self.signature:
            return False
        return signature is None or self.racy_until == 0 or time.time_ns() < self.racy_until


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _racy_until(st: os.stat_result) -> int:
    if time.time_ns() - st.st_mtime_ns < _RACY_NANOSECONDS:
        return st.st_mtime_ns + _RACY_NANOSECONDS
    return 0


class WatchedFile(Generic[T]):
    """
    A text file parsed into a value that is re-parsed when the file changes.  L{PasswdFile} and
    L{pymaild.auth.aliases.Aliases} are built on it.

    Each call of L{current} costs one C{os.stat}; the file is read again when its
    C{(st_ino, st_mtime_ns, st_size)} changed, or once more a little after a read that came
    right after a modification (an editor writing in place may change a file twice within one
    timestamp tick without changing its size).

    @ivar path: the file.
    """

    def __init__(self, path: Path, parse: Callable[[str, T | None], T], what: str) -> None:
        """
        @param parse: turns the file's text (C{""} for a missing file) and the previous value
            (C{None} at the first read) into the new value; it logs what is wrong with the text.
        @param what: what the file is, for log messages (C{"passwd-file"}).
        """
        self.path = path
        self._parse = parse
        self._what = what
        self._lock = threading.Lock()
        self._snapshot: _Snapshot[T] | None = None
        self._last_error: str | None = None

    def current(self) -> T:
        """
        @return: the value of the file as it is now.
        @raise OSError: if the file cannot be read and never could be.  If it could be read
            before, the error is logged and the last good value returned.
        """
        try:
            signature: tuple = _signature(os.stat(self.path))
        except FileNotFoundError:
            signature = None
        except OSError:
            signature = ()  # matches nothing: the read below reports the error
        snapshot = self._snapshot
        if snapshot is not None and snapshot.fresh(signature):
            return snapshot.value
        with self._lock:
            return self._read(force=False)

    def reload(self) -> None:
        """
        Read the file now, even if it looks unchanged.  Errors are logged and the last good value
        stays in force; nothing is raised.
        """
        with self._lock:
            try:
                self._read(force=True)
            except OSError:
                pass  # _read logged it

    def install(self, text: str, st: os.stat_result) -> None:
        """
        Take C{text} as the file's contents without reading it (after writing it ourselves).

        @param st: the C{stat} of the file that holds C{text}.
        """
        with self._lock:
            previous = self._snapshot.value if self._snapshot is not None else None
            self._snapshot = _Snapshot(_signature(st), self._parse(text, previous), _racy_until(st))

    def _read(self, force: bool) -> T:
        """
        Read and parse the file unless it is unchanged.  Call with C{self._lock} held.
        """
        old = self._snapshot
        previous = old.value if old is not None else None
        try:
            try:
                with open(self.path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not force and old is not None and old.fresh(_signature(st)):
                        return old.value
                    text = _decode(f.read())
            except FileNotFoundError:
                snapshot = _Snapshot(None, self._parse("", previous))
            else:
                snapshot = _Snapshot(_signature(st), self._parse(text, previous), _racy_until(st))
        except OSError as e:
            message = e.strerror if e.filename is not None and e.strerror else str(e)
            if message != self._last_error:
                self._last_error = message
                if old is None:
                    log.error(
                        "cannot read {what} {path}: {error}",
                        what=self._what,
                        path=str(self.path),
                        error=message,
                    )
                else:
                    log.error(
                        "cannot read {what} {path}: {error}; keeping what it said before",
                        what=self._what,
                        path=str(self.path),
                        error=message,
                    )
            if old is None:
                raise
            return old.value
        if self._last_error is not None:
            log.info("{what} {path} is readable again", what=self._what, path=str(self.path))
            self._last_error = None
        self._snapshot = snapshot
        return snapshot.value


def _decode(data: bytes) -> str:
    """
    Bytes of the file to text; undecodable bytes survive a rewrite through C{surrogateescape}.

    @raise OSError: if the file holds NUL bytes (it is not a text file).
    """
    if b"\0" in data:
        raise OSError("not a text file (it contains NUL bytes)")
    return data.decode("utf-8", "surrogateescape")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _parse(text: str, path: Path, report: bool) -> tuple[list[_Line], dict[str, PasswdEntry]]:
    """
    Parse the file's text.

    @param report: log each line that is skipped.
    @return: every line (to rewrite the file) and the accounts by canonical user name.  The first
        line of a user wins; later ones are skipped.
    """
    lines: list[_Line] = []
    entries: dict[str, PasswdEntry] = {}
    for number, text in enumerate(_split_lines(text), 1):
        content = text.rstrip("\r")
        if not content.strip() or content.lstrip().startswith("#"):
            lines.append(_Line(text))
            continue
        problem = None
        user = None
        parts = content.split(":", 7)
        if len(parts) < 2:
            problem = "no ':' after the user name"
        elif any("\udc80" <= c <= "\udcff" for c in content):
            problem = "not valid UTF-8"
        else:
            try:
                user = canonical_user(parts[0])
            except ValueError as e:
                problem = str(e)
            else:
                if user in entries:
                    problem = f"user {user} is already defined on an earlier line"
        if problem is not None:
            if report:
                log.warn(
                    "{path}:{line}: {problem}; line skipped",
                    path=str(path),
                    line=number,
                    problem=problem,
                )
            lines.append(_Line(text, user))
            continue
        entries[user] = PasswdEntry(user, parts[1], tuple(parts[2:]))
        lines.append(_Line(text, user))
    return lines, entries


class PasswdFile:
    """
    A passwd-file, read on demand and edited in place.

    @ivar path: the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: WatchedFile[Mapping[str, PasswdEntry]] = WatchedFile(
            self.path, self._parse, "passwd-file"
        )

    def __repr__(self) -> str:
        return f"<PasswdFile {str(self.path)!r}>"

    def _parse(self, text: str, previous: object) -> Mapping[str, PasswdEntry]:
        _, entries = _parse(text, self.path, report=True)
        return MappingProxyType(entries)

    # --- reading ---------------------------------------------------------------------------

    def get(self, user: str) -> PasswdEntry | None:
        """
        @param user: a user name in any case.
        @return: the account, or C{None} if the file has no such user (or the name is not a
            valid user name).
        @raise OSError: if the file cannot be read and never could be.
        """
        try:
            user = canonical_user(user)
        except ValueError:
            return None
        return self._file.current().get(user)

    def entries(self) -> Mapping[str, PasswdEntry]:
        """
        @return: every account by canonical user name: one consistent, read-only snapshot.
        @raise OSError: if the file cannot be read and never could be.
        """
        return self._file.current()

    def users(self) -> list[str]:
        """
        @return: the canonical user names, sorted.
        @raise OSError: if the file cannot be read and never could be.
        """
        return sorted(self._file.current())

    def __len__(self) -> int:
        return len(self._file.current())

    def reload(self) -> None:
        """
        Re-read the file now, even if it looks unchanged (SIGHUP).  Errors are logged and the
        last good contents stay in force; nothing is raised.
        """
        self._file.reload()

    # --- editing ---------------------------------------------------------------------------

    def add(self, user: str, password_hash: str) -> None:
        """
        Add an account.

        @param user: C{local@domain}; stored in canonical form.
        @param password_hash: the stored password, such as L{pymaild.auth.passwords.hash_password}
            returns.
        @raise ValueError: for a bad user name or password hash.
        @raise UserExists: if the file already has the user.
        @raise OSError: if the file cannot be read or written.
        """
        user = canonical_user(user)
        _check_password_field(password_hash)
        with self._edit() as (lines, entries):
            if user in entries:
                raise UserExists(f"user {user} already exists in {self.path}")
            lines.append(_Line(f"{user}:{password_hash}", user))

    def set_password(self, user: str, password_hash: str) -> None:
        """
        Replace an account's stored password, keeping the rest of its line.

        @raise ValueError: for a bad user name or password hash.
        @raise NoSuchUser: if the file does not have the user.
        @raise OSError: if the file cannot be read or written.
        """
        user = canonical_user(user)
        _check_password_field(password_hash)
        with self._edit() as (lines, entries):
            if user not in entries:
                raise NoSuchUser(f"no user {user} in {self.path}")
            for i, line in enumerate(lines):
                if line.user == user:
                    carriage_return = "\r" if line.text.endswith("\r") else ""
                    parts = line.text.rstrip("\r").split(":", 7)
                    parts[1] = password_hash
                    lines[i] = _Line(":".join(parts) + carriage_return, user)
                    break

    def remove(self, user: str) -> None:
        """
        Remove an account (every line of it, if the file has duplicates).

        @raise ValueError: for a bad user name.
        @raise NoSuchUser: if the file does not have the user.
        @raise OSError: if the file cannot be read or written.
        """
        user = canonical_user(user)
        with self._edit() as (lines, entries):
            if user not in entries:
                raise NoSuchUser(f"no user {user} in {self.path}")
            lines[:] = [line for line in lines if line.user != user]

    @contextmanager
    def _edit(self) -> Iterator[tuple[list[_Line], dict[str, PasswdEntry]]]:
        """
        Lock the file, read it, let the caller change the lines, and write them back atomically.
        Nothing is written if the caller raises.
        """
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                with open(self.path, "rb") as f:
                    existing = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                existing = None
                data = b""
            try:
                text = _decode(data)
            except OSError as e:
                raise ValueError(f"{self.path}: {e}; repair it by hand") from None
            lines, entries = _parse(text, self.path, report=False)
            yield lines, entries
            text = "".join(line.text + "\n" for line in lines)
            st = self._replace(text.encode("utf-8", "surrogateescape"), existing)
            self._file.install(text, st)
        finally:
            os.close(lock_fd)  # releases the flock

    def _replace(self, data: bytes, existing: os.stat_result | None) -> os.stat_result:
        """
        Write C{data} to a temporary file next to the file and rename it over the file, with the
        fsyncs that make the change durable.

        @param existing: the C{stat} of the file being replaced, or C{None} if there is none.
        @return: the C{stat} of the new file.
        """
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            try:
                if existing is not None:
                    os.fchmod(fd, existing.st_mode & 0o7777)
                    if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                        try:
                            os.fchown(fd, existing.st_uid, existing.st_gid)
                        except PermissionError:
                            pass  # not root: the file becomes ours, as any editor would make it
                else:
                    os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return st
