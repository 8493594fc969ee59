# -*- test-case-name: tests.auth.test_directory -*-
"""
The aliases file (C{<data>/aliases} by default): addresses that forward to other addresses.

One alias per line, C{#} starts a comment (at the start of a line or after white space)::

    # key: target, target, ...
    sales@example.com: alice, bob@example.com
    abuse: postmaster                 # a bare key applies to every local domain
    @example.org: catchall@example.org    # catch-all for a domain, lowest precedence
    list@example.com: alice, friend@elsewhere.example

A key is C{local@domain}, a bare C{local} (the same alias in every local domain), or C{@domain}
(whatever else is sent to that domain; C{user+tag@domain} reaches C{user@domain} before it).  A target is C{local@domain} or a bare C{local}, which
means the domain of the address being resolved.  Keys and targets are folded to lower case,
with the domain IDNA-encoded, the form of L{pymaild.envelope.normalizeAddress}, except
that the local part of a full target address keeps its case for remote servers.  What the
targets finally resolve to is L{pymaild.auth.directory}'s business.

L{AliasesFile} answers from memory and re-reads the file by itself when it changes (see
L{pymaild.auth.passwdfile.WatchedFile}); L{AliasesFile.reload} forces a re-read (SIGHUP).  A
missing file reads as empty.  When a re-read finds mistakes, each is logged with its file and
line, and the previous contents stay in force as a whole (a half-applied aliases file would
bounce mail for the aliases on the bad lines); only if there were no previous contents are the
good lines used.  L{AliasesFile.check} reads the file strictly, for start-up checks, and raises
L{AliasesError}.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from twisted.logger import Logger

from pymaild.auth.passwdfile import WatchedFile

log = Logger()

_COMMENT = re.compile(r"(^|\s)#.*\Z", re.DOTALL)

#: Targets that other aliases formats allow and this one does not: programs, files, includes.
_UNSUPPORTED_TARGETS = (
    ("|", "delivery to a program"),
    ("/", "delivery to a file"),
    (":include:", "an include file"),
)


class AliasesError(ValueError):
    """
    A mistake in the aliases file.  C{str(error)} is C{"FILE:LINE: what is wrong"}.

    @ivar path: the file.
    @ivar line: the line number, counted from 1.
    @ivar problem: what is wrong, without the place.
    """

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def _domain(domain: str, what: str) -> str:
    stripped = domain.rstrip(".")
    if not stripped:
        raise ValueError(f"{what}: the domain after '@' is empty")
    try:
        return stripped.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"{what}: {domain!r} is not a domain name") from None


def _check_characters(text: str, what: str) -> None:
    for c in text:
        if c.isspace() or not c.isprintable():
            raise ValueError(f"{what} contains white space or a control character")
        if c in ":,<>":
            raise ValueError(f"{what} contains {c!r}")
    if text.count("@") > 1:
        raise ValueError(f"{what} has more than one '@'")


def parse_key(key: str) -> str:
    """
    Check an alias key and return its canonical form.

    @param key: C{local@domain}, C{local} or C{@domain}.
    @raise ValueError: saying what is wrong.
    """
    what = f"key {key!r}"
    if not key:
        raise ValueError("no key before ':'")
    _check_characters(key, what)
    local, at, domain = key.rpartition("@")
    if not at:
        return key.lower()
    return f"{local.lower()}@{_domain(domain, what)}"


def parse_target(target: str) -> str:
    """
    Check an alias target and return its canonical form.

    @param target: C{local@domain} or a bare C{local}.
    @return: the target with its domain folded to lower case and IDNA-encoded.  The local part
        of a full address keeps its case: a remote server may tell C{Bob} from C{bob}.  (The
        directory folds the local part of targets in local domains itself.)  A bare C{local}
        is folded.
    @raise ValueError: saying what is wrong.
    """
    what = f"target {target!r}"
    if not target:
        raise ValueError("empty target (two commas in a row, or a comma at the end?)")
    for prefix, meaning in _UNSUPPORTED_TARGETS:
        if target.startswith(prefix):
            raise ValueError(f"{what} is {meaning}; only addresses are supported")
    _check_characters(target, what)
    local, at, domain = target.rpartition("@")
    if not at:
        return target.lower()
    if not local:
        raise ValueError(f"{what} has nothing before '@' (a catch-all '@domain' is only a key)")
    return f"{local}@{_domain(domain, what)}"


def parse_aliases(
    text: str, path: str | os.PathLike
) -> tuple[dict[str, tuple[str, ...]], list[AliasesError]]:
    """
    Parse the text of an aliases file.

    @param path: the file's name, for the errors.
    @return: the aliases (canonical key to canonical targets, in the order written, without
        repeats) from the good lines, and an error for each bad line.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    defined: dict[str, int] = {}
    errors: list[AliasesError] = []
    for number, line in enumerate(text.split("\n"), 1):
        content = _COMMENT.sub("", line).strip()
        if not content:
            continue
        try:
            if any("\udc80" <= c <= "\udcff" for c in content):
                raise ValueError("not valid UTF-8")
            key, colon, rest = content.partition(":")
            if not colon:
                raise ValueError("expected 'key: target, target, ...' (no ':' found)")
            key = parse_key(key.strip())
            if key in defined:
                raise ValueError(f"{key} is already defined on line {defined[key]}")
            if not rest.strip():
                raise ValueError(f"{key} has no targets after ':'")
            targets = tuple(dict.fromkeys(parse_target(t.strip()) for t in rest.split(",")))
        except ValueError as e:
            errors.append(AliasesError(path, number, str(e)))
            continue
        defined[key] = number
        aliases[key] = targets
    return aliases, errors


class AliasesFile:
    """
    The aliases file, read on demand.

    @ivar path: the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: WatchedFile[Mapping[str, tuple[str, ...]]] = WatchedFile(
            self.path, self._parse, "aliases file"
        )

    def __repr__(self) -> str:
        return f"<AliasesFile {str(self.path)!r}>"

    def _parse(
        self, text: str, previous: Mapping[str, tuple[str, ...]] | None
    ) -> Mapping[str, tuple[str, ...]]:
        aliases, errors = parse_aliases(text, self.path)
        for error in errors:
            log.warn("{error}", error=str(error), path=error.path, line=error.line, problem=error.problem)
        if errors and previous is not None:
            log.error(
                "aliases file {path} has {count} mistake(s); keeping what it said before",
                path=str(self.path),
                count=len(errors),
            )
            return previous
        return MappingProxyType(aliases)

    def entries(self) -> Mapping[str, tuple[str, ...]]:
        """
        @return: every alias, canonical key to canonical targets, as one consistent read-only
            snapshot.
        @raise OSError: if the file cannot be read and never could be.
        """
        return self._file.current()

    def targets(self, key: str) -> tuple[str, ...] | None:
        """
        @param key: a canonical key (C{local@domain}, C{local} or C{@domain}).
        @return: its targets, or C{None} if the file does not define C{key}.
        @raise OSError: if the file cannot be read and never could be.
        """
        return self._file.current().get(key)

    def __len__(self) -> int:
        return len(self._file.current())

    def reload(self) -> None:
        """
        Re-read the file now (SIGHUP).  Errors are logged and the previous contents stay in
        force; nothing is raised.
        """
        self._file.reload()

    def check(self) -> None:
        """
        Read the file now and insist that it is correct (start-up checks).  A missing file is
        correct (and empty).

        @raise AliasesError: for the first mistake, C{"FILE:LINE: what is wrong"}.
        @raise OSError: if the file cannot be read.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if b"\0" in data:
            raise AliasesError(self.path, data[: data.index(b"\0")].count(b"\n") + 1, "not a text file (NUL byte)")
        _, errors = parse_aliases(data.decode("utf-8", "surrogateescape"), self.path)
        if errors:
            raise errors[0]
