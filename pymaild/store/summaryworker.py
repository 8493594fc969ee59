# -*- test-case-name: tests.store.test_summarizer -*-
"""
The worker side of L{pymaild.store.summarizer}: C{python -m pymaild.store.summaryworker}
reads pickled lists of C{(uid, path)} on stdin and writes their summaries, pickled, on stdout,
one request at a time, until stdin closes.  It imports only the parser (no Twisted), so that a
worker stays small.
"""

from __future__ import annotations

import pickle
import struct
import sys

from pymaild.store.summary import MessageSummary, summarizePath, toJSON

HEADER = struct.Struct("!Q")


def summarizeAll(paths: list[tuple[int, str]]) -> list[tuple[int, tuple[MessageSummary, str] | None]]:
    """
    The summary of each path with its JSON text for the index (L{toJSON} without the wire
    fields: encoded where the parsing is), or None for a file that could not be read.
    """
    out = []
    for uid, path in paths:
        try:
            summary = summarizePath(path)
        except OSError:
            out.append((uid, None))
            continue
        out.append((uid, (summary, toJSON(summary, wire=False))))
    return out


def serve(stdin, stdout) -> None:
    """Answer requests until stdin closes."""
    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        (size,) = HEADER.unpack(header)
        piece = pickle.loads(stdin.read(size))
        data = pickle.dumps(summarizeAll(piece), protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(HEADER.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
