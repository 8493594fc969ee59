# -*- test-case-name: tests.store.test_summary -*-
"""
Decoding header text: RFC 2047 encoded-words and MIME charsets, shared by the store's message
summaries and IMAP SEARCH (stdlib only, so that both layers may use it); and reading a message
file whole for SEARCH TEXT (L{readWhole}).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
import re

ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")


def bytesText(raw: bytes) -> str:
    """
    8-bit header or body bytes as text: UTF-8 when they are, else Latin-1 (never fails).
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def textCodec(charset) -> str | None:
    """
    The codec name for a MIME charset, or None when Python has no I{text} codec by that name
    (C{codecs.lookup("zlib")} succeeds but is not a charset).
    """
    if not charset:
        return None
    if isinstance(charset, bytes):
        charset = charset.decode("ascii", "replace")
    try:
        info = codecs.lookup(charset.strip().strip('"'))
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def decodeBytes(raw: bytes, charset) -> str:
    codec = textCodec(charset)
    if codec is None:
        return bytesText(raw)
    try:
        return raw.decode(codec, "replace")
    except Exception:  # a broken stateful codec (ISO-2022 variants) on broken input
        return bytesText(raw)


def decodeWord(m) -> str | None:
    """
    One encoded-word matched by L{ENCODED_WORD}, or None if its payload is not valid.
    """
    charset = m.group(1).split(b"*", 1)[0]
    data = m.group(3)
    try:
        if m.group(2) in b"Bb":
            raw = base64.b64decode(data + b"=" * (-len(data) % 4))
        else:
            raw = binascii.a2b_qp(data, header=True)
    except (binascii.Error, ValueError):
        return None
    return decodeBytes(raw, charset)


def decodeHeader(raw: bytes, nul: bytes | None = None) -> str:
    """
    A header value as text: unfolded, RFC 2047 encoded-words decoded (whitespace between two
    encoded-words dropped), other 8-bit bytes read as UTF-8 (or Latin-1 when they are not
    UTF-8).  With C{nul}, NUL bytes are replaced by it first.
    """
    raw = raw.replace(b"\r\n", b"").replace(b"\n", b"")
    if nul is not None and b"\0" in raw:
        raw = raw.replace(b"\0", nul)
    if b"=?" not in raw:
        return bytesText(raw)
    out = []
    pos = 0
    for m in ENCODED_WORD.finditer(raw):
        word = decodeWord(m)
        if word is None:
            continue
        between = raw[pos : m.start()]
        if pos == 0 or between.strip(b" \t"):
            out.append(bytesText(between))
        out.append(word)
        pos = m.end()
    out.append(bytesText(raw[pos:]))
    return "".join(out)


def readWhole(path: str, limit: int) -> bytes | None:
    """The whole message file at C{path}, or None if it is larger than C{limit} (or cannot be
    read: the caller's other way meets the same error).  For SEARCH TEXT and BODY, in the server
    and in the summary workers."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            return None
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, size + 1 - total if total <= size else 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                return None
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]
    except OSError:
        return None
    finally:
        os.close(fd)
