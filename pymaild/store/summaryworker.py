# -*- test-case-name: tests.store.test_summarizer -*-
"""
The worker side of L{pymaild.store.summarizer}: C{python -m pymaild.store.summaryworker}
reads pickled requests C{(kind, [(uid, path), ...])} on stdin and writes the answers, pickled,
on stdout, one request at a time, until stdin closes: the summaries (C{kind} "summary",
L{summarizeAll}), the ENVELOPEs read from the headers alone, with the files' mtimes
("envelope", L{envelopeAll}), the header fields SEARCH reads, from the headers alone
("fields", L{headerFieldsAll}), or which SEARCH TEXT/BODY needles each message holds ("text",
L{textAll}).  It imports only the parser (no Twisted; SEARCH's text matching, a function the
request carries, brings L{pymaild.imap.search}, which has none either), so that a worker stays
small.
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymaild.store.summary import MessageSummary

# (the parser, pymaild.store.summary, is imported by a worker process when it starts, and by
# the server at its first request: the server imports this module for HEADER and KINDS at
# start-up, and an MX alone never parses for IMAP)

HEADER = struct.Struct("!Q")


def _readEach(paths: list[tuple[int, str]], read) -> list[tuple[int, object]]:
    """C{(uid, read(path))} for each path, None for a file that could not be read."""
    out = []
    for uid, path in paths:
        try:
            out.append((uid, read(path)))
        except OSError:
            out.append((uid, None))
    return out


def summarizeAll(paths: list[tuple[int, str]]) -> list[tuple[int, tuple[MessageSummary, str] | None]]:
    """
    The summary of each path with its JSON text for the index (L{toJSON} without the wire
    fields: encoded where the parsing is), or None for a file that could not be read.
    """
    from pymaild.store.summary import summarizePath, toJSON

    def read(path):
        summary = summarizePath(path)
        return summary, toJSON(summary, wire=False)

    return _readEach(paths, read)


def envelopeAll(paths: list[tuple[int, str]]) -> list[tuple[int, tuple[bytes | None, int] | None]]:
    """
    The ENVELOPE of each path from its header alone with the file's mtime (its internal date,
    L{envelopeAndMtime}), or None for a file that could not be read.  The ENVELOPE is None for
    a header too long for that (then the whole summary is needed).
    """
    from pymaild.store.summary import envelopeAndMtime

    return _readEach(paths, envelopeAndMtime)


def headerFieldsAll(paths: list[tuple[int, str]]) -> list[tuple[int, dict[str, str] | None]]:
    """
    The header fields SEARCH reads of each path, from its header alone
    (L{pymaild.store.summary.headerFieldsPath}), or None for a file that could not be read, or
    whose header is too long for that or failed to parse (then the whole summary is needed).
    """
    from pymaild.store.summary import headerFieldsPath

    return _readEach(paths, headerFieldsPath)


def textAll(items: list[tuple[int, tuple]]) -> list[tuple[int, object]]:
    """
    For SEARCH TEXT and BODY, items C{(uid, (path, limit, match))}: C{match(data, parts)} of
    each message whose file is at most C{limit} bytes, C{data} its bytes and C{parts} a
    function giving their part tree (L{pymaild.store.summary.partsOf}, parsed only if called);
    None for a larger file or one that could not be read (the caller then reads it its own
    way).  C{match} comes from the caller (SEARCH, a layer above: a picklable function), so
    that this module knows nothing of what is searched.
    """
    from pymaild.mime import readWhole
    from pymaild.store.summary import partsOf

    out = []
    for uid, (path, limit, match) in items:
        data = readWhole(path, limit)
        out.append((uid, None if data is None else match(data, lambda data=data: partsOf(data))))
    return out


KINDS = {"summary": summarizeAll, "envelope": envelopeAll, "fields": headerFieldsAll, "text": textAll}


def serve(stdin, stdout) -> None:
    """Answer requests until stdin closes."""
    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        (size,) = HEADER.unpack(header)
        kind, piece = pickle.loads(stdin.read(size))
        data = pickle.dumps(KINDS[kind](piece), protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(HEADER.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    import pymaild.store.summary  # noqa: F401  (now, not in the first batch: the worker starts early for that)

    serve(sys.stdin.buffer, sys.stdout.buffer)
