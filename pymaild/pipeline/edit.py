# -*- test-case-name: tests.pipeline.test_edit -*-
"""
Header changes plugins ask for (C{addHeaders}, C{removeHeaders}), applied to a spooled message
(bytes, or a file for a large one) without reading its body into memory.

The message has LF line ends here (as the SMTP server spools it).  Fields are added after the
first C{start} bytes (pymaild's own Return-Path and Received, which are never removed); removal
takes a field with all its continuation lines.
"""

from __future__ import annotations

import os
import shutil
import uuid
from email.header import Header
from pathlib import Path

#: the header block is looked for in the first this many bytes of a spooled file
HEAD_LIMIT = 1 << 20


def fieldLines(fields) -> bytes:
    """C{(name, value)} pairs as header lines (non-ASCII values as RFC 2047 encoded-words)."""
    out = []
    for name, value in fields:
        if value.isascii():
            line = f"{name}: {value}"
        else:
            line = f"{name}: " + Header(value, "utf-8", header_name=name).encode()
        out.append(line.encode("ascii", "replace") + b"\n")
    return b"".join(out)


def headerEnd(data: bytes, start: int) -> int:
    """The offset just after the header block that begins at C{start} (its last field's LF)."""
    if data[start:start + 1] == b"\n":
        return start  # (no fields: the body starts at once)
    end = data.find(b"\n\n", start)
    return len(data) if end < 0 else end + 1


def _without(block: bytes, remove) -> bytes:
    names = {n.lower().encode("ascii", "replace") for n in remove}
    if not names:
        return block
    out, dropping = [], False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in names
        if not dropping:
            out.append(line)
    return b"".join(out)


def edit(source: bytes | str | os.PathLike, start: int, add, remove, spool: Path):
    """
    The message with the fields of C{add} inserted at C{start} and the fields named in
    C{remove} taken out of its header.

    @return: C{(new source, cleanup)}: bytes for bytes; for a file, a new file in C{spool}
        and C{cleanup()} removes it (call it when the message is stored).
    """
    added = fieldLines(add)
    if isinstance(source, (bytes, bytearray)):
        end = headerEnd(source, start)
        return bytes(source[:start]) + added + _without(source[start:end], remove) + bytes(source[end:]), lambda: None
    path = spool / f"edit-{uuid.uuid4().hex}"
    with open(source, "rb") as f:
        head = f.read(HEAD_LIMIT)
        end = headerEnd(head, start)
        with open(path, "wb") as out:
            out.write(head[:start] + added + _without(head[start:end], remove) + head[end:])
            shutil.copyfileobj(f, out, 1 << 20)

    def cleanup():
        try:
            os.unlink(path)
        except OSError:
            pass

    return path, cleanup


def readHead(source: bytes | str | os.PathLike) -> bytes:
    """The header block (with the trace fields) of a spooled message."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:headerEnd(source, 0)])
    with open(source, "rb") as f:
        head = f.read(HEAD_LIMIT)
    return head[:headerEnd(head, 0)]
