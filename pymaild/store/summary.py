# -*- test-case-name: tests.store.test_summary -*-
"""
What the index caches for every message, computed once from the message file: sizes, the IMAP
ENVELOPE, BODY and BODYSTRUCTURE exactly as they go on the wire, the byte offsets of every MIME
part (so that BODY[1.2], BODY[1.2.MIME] and BODY[HEADER] are streamed straight from the file),
and the decoded header fields and sort keys that SEARCH, SORT and THREAD need.

L{summarize} reads the file once, sequentially, in bounded memory: it keeps header lines and
boundary lines, and only counts bodies (a 40 MB attachment is never held in memory);
L{summarizePath} reads a file under 1 MiB in one piece and parses it in one buffer.  Messages
on disk may have LF or CRLF line ends; IMAP sizes are "virtual" sizes that count every line end
as CRLF.

The MIME structure and the ENVELOPE/BODYSTRUCTURE bytes follow Dovecot 2.3 (Debian's
C{dovecot-imapd}), which C{tests/store/test_summary.py} uses as the oracle: the same boundary
rules (a line starting with C{--} and a boundary of an enclosing multipart ends the part, the
newline before it belongs to the boundary), the same treatment of broken input (headers up to
the first empty line; missing addresses filled in as C{MISSING_MAILBOX}/C{MISSING_DOMAIN};
8-bit and CR/LF-carrying strings sent as literals; subjects and names "for humans", with
whitespace collapsed), and the same limits: MIME nesting at most 100 deep (a deeper multipart or
message/rfc822 part becomes an opaque application/octet-stream part) and at most 10,000 parts
(the rest of the message is the body of the last part).
"""

from __future__ import annotations

import calendar
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date as _date
from typing import BinaryIO

from pymaild.mime import bytesText, decodeHeader as _decodeHeader

__all__ = ["MessageSummary", "summarize", "summarizePath", "envelopeOf", "envelopePath", "envelopeAndMtime", "toJSON", "fromJSON", "wireFields", "baseSubject",
           "casemap", "decodeHeader", "parseAddresses"]

# Dovecot's MESSAGE_PARSER_DEFAULT_MAX_NESTED_MIME_PARTS and ..._MAX_TOTAL_MIME_PARTS.
MAX_NESTING = 100
MAX_PARTS = 10000
# Boundaries longer than this are truncated (RFC 2046 allows 70), as Dovecot does.
BOUNDARY_MAX = 80
_BOUNDARY_LINE_MAX = BOUNDARY_MAX + 4
# Bounded memory and time: the most of one header (with its continuation lines) that is kept,
# and the most header bytes and header lines kept for one message.  Only the headers the
# summary needs are kept (Date, Subject, the address headers, Message-ID, In-Reply-To,
# References, MIME-Version, Content-*); the others are only counted.
MAX_HEADER_VALUE = 1 << 20
MAX_KEPT_HEADER_BYTES = 8 << 20
MAX_KEPT_HEADERS = 10000
_CHUNK = 1 << 16

_NUL_REPLACEMENT = "\ufffd".encode()


# --------------------------------------------------------------------------------------------
# IMAP strings, as Dovecot's imap-quote.c writes them
# --------------------------------------------------------------------------------------------

_NEEDS_CARE = re.compile(rb'["\\\r\n\x80-\xff\x00]')
_FOR_HUMANS_CARE = re.compile(rb'[\x00\t\r\n"\\\x80-\xff]|  |^ | $')
_LWSP_RUN = re.compile(rb"[ \t\r\n]+")
_NEWLINES = re.compile(rb"[\r\n]")


def _literal(s: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(s), s)


def _nstring(s: bytes | None) -> bytes:
    """NIL, a quoted string, or a literal when the string has CR, LF, 8-bit bytes or more than
    four characters that need a backslash.  A NUL ends the string."""
    if s is None:
        return b"NIL"
    if _NEEDS_CARE.search(s) is None:
        return b'"' + s + b'"'
    if b"\0" in s:
        s = s[:s.index(b"\0")]  # a C string for Dovecot
    escapes = 0
    for c in s:
        if c == 0x22 or c == 0x5C:
            escapes += 1
            if escapes > 4:
                return _literal(s)
        elif c == 0x0D or c == 0x0A or c >= 0x80:
            return _literal(s)
    return b'"' + s.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _nstringNoLF(s: bytes | None) -> bytes:
    """L{_nstring} after removing line ends: a CR or LF before whitespace (or at the end) is
    dropped, one before anything else becomes a space."""
    if s is None or _NEWLINES.search(s) is None:
        return _nstring(s)
    out = bytearray()
    n = len(s)
    for i, c in enumerate(s):
        if c != 0x0D and c != 0x0A:
            out.append(c)
        elif i + 1 < n and s[i + 1] not in b" \t\r\n":
            out.append(0x20)
    return _nstring(bytes(out))


def _forHumans(s: bytes) -> bytes:
    """A string shown to people (Subject, display names): whitespace runs (SP, TAB, CR, LF)
    collapsed to one space and trimmed; sent as a literal whenever anything had to change or
    the string has quote-needing or 8-bit bytes."""
    if _FOR_HUMANS_CARE.search(s) is None:
        return b'"' + s + b'"'
    t = _LWSP_RUN.sub(b" ", s).strip(b" ")
    if not t:
        return b'""'
    return _literal(t.replace(b"\0", b"\x80"))


# --------------------------------------------------------------------------------------------
# RFC 822 tokens and addresses (the semantics of Dovecot's rfc822-parser.c and
# message-address.c, including their way of coping with broken input)
# --------------------------------------------------------------------------------------------

_ATEXT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   b"!#$%&'*+-/=?^_`{|}~" + bytes(range(0x80, 0x100)))
_ATOM_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\xff]*")
_ATOM_OR_DOT_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\xff]*")
_MIME_TOKEN_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+\-^_`{|}~.\x80-\xff]*")
_WS_RE = re.compile(rb"[ \t\r\n]*")
_QUOTED_STOP = re.compile(rb'["\\\n\x00]')
_COMMENT_STOP = re.compile(rb"[()\\\n\x00]")
_LITERAL_STOP = re.compile(rb"[\\\[\]\n]")

_QUOTE, _BACKSLASH, _LPAREN, _DOT, _AT, _COMMA, _COLON, _SEMI, _LT, _GT, _LBRACKET = (
    0x22, 0x5C, 0x28, 0x2E, 0x40, 0x2C, 0x3A, 0x3B, 0x3C, 0x3E, 0x5B)


def _noNul(s: bytes) -> bytes:
    return s.replace(b"\0", _NUL_REPLACEMENT) if b"\0" in s else s


class _Rfc822:
    """A cursor over one header value.  Methods return 1 (more data follows), 0 (end of
    data) or -1 (syntax error), like Dovecot's."""

    __slots__ = ("data", "pos", "end", "lastComment")

    def __init__(self, data: bytes, keepComments: bool = False):
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.lastComment = bytearray() if keepComments else None

    def skipComment(self) -> int:
        data, end = self.data, self.end
        level = 1
        comment = self.lastComment
        if comment is not None:
            del comment[:]
        pos = self.pos + 1
        start = pos
        while pos < end:
            m = _COMMENT_STOP.search(data, pos)
            if m is None:
                break
            pos = m.start()
            c = data[pos]
            if c == _LPAREN:
                level += 1
            elif c == 0x29:
                level -= 1
                if level == 0:
                    if comment is not None:
                        comment += data[start:pos]
                    self.pos = pos + 1
                    return 1 if self.pos < end else 0
            elif c == 0x0A:
                # folding: the (CR)LF goes
                if comment is not None:
                    comment += data[start:pos - 1 if pos > start and data[pos - 1] == 0x0D else pos]
                start = pos + 1
            elif c == 0:
                if comment is not None:
                    comment += data[start:pos] + _NUL_REPLACEMENT
                start = pos + 1
            else:
                if comment is not None:
                    comment += data[start:pos]
                start = pos + 1
                pos += 1
                if pos >= end:
                    self.pos = pos
                    return -1
            pos += 1
        self.pos = end
        return -1

    def skipLwsp(self) -> int:
        data, end = self.data, self.end
        pos = self.pos
        if pos >= end:
            return 0
        if data[pos] > 0x28:
            return 1  # the common case: no whitespace, no comment
        while True:
            pos = _WS_RE.match(data, self.pos).end()
            self.pos = pos
            if pos >= end:
                return 0
            if data[pos] != _LPAREN:
                return 1
            if self.skipComment() < 0:
                return -1

    def _afterToken(self) -> int:
        if self.pos < self.end:
            return self.skipLwsp()
        return 0

    def atom(self, out: bytearray) -> int:
        pos = self.pos
        if pos >= self.end or self.data[pos] not in _ATEXT:
            return -1
        end = _ATOM_RE.match(self.data, pos).end()
        out += self.data[pos:end]
        self.pos = end
        return self._afterToken()

    def dotAtom(self, out: bytearray) -> int:
        data, end = self.data, self.end
        if self.pos >= end or data[self.pos] not in _ATEXT:
            return -1
        while True:
            start = self.pos
            stop = _ATOM_RE.match(data, start).end()
            out += data[start:stop]
            self.pos = stop
            if stop >= end:
                return 0
            ret = self.skipLwsp()
            if ret <= 0:
                return ret
            if data[self.pos] != _DOT:
                return 1
            self.pos += 1
            out.append(_DOT)
            # an atom must follow the dot
            if self.skipLwsp() <= 0 or data[self.pos] not in _ATEXT:
                return -1

    def _token(self, pattern, out: bytearray) -> int:
        pos = self.pos
        end = pattern.match(self.data, pos).end()
        out += self.data[pos:end]
        self.pos = end
        return self._afterToken()

    def mimeToken(self, out: bytearray) -> int:
        return self._token(_MIME_TOKEN_RE, out)

    def quotedString(self, out: bytearray) -> int:
        data, end = self.data, self.end
        pos = self.pos + 1
        start = pos
        while pos < end:
            m = _QUOTED_STOP.search(data, pos)
            if m is None:
                break
            pos = m.start()
            c = data[pos]
            if c == _QUOTE:
                out += data[start:pos]
                self.pos = pos + 1
                return self._afterToken()
            if c == 0x0A:
                stop = pos
                if stop > start and data[stop - 1] == 0x0D:
                    stop -= 1
                out += data[start:stop]
                start = pos + 1
                pos += 1
            elif c == 0:
                out += data[start:pos]
                out += _NUL_REPLACEMENT
                pos += 1
                start = pos
            else:
                pos += 1
                if pos >= end:
                    self.pos = pos
                    return -1
                out += data[start:pos - 1]
                if data[pos] == 0:
                    out += _NUL_REPLACEMENT
                    start = pos + 1
                else:
                    start = pos
                pos += 1
        self.pos = end
        return -1

    def _atomOrDot(self, out: bytearray) -> int:
        return self._token(_ATOM_OR_DOT_RE, out)

    def phrase(self, out: bytearray) -> int:
        data = self.data
        if self.pos >= self.end:
            return 0
        if data[self.pos] == _DOT:
            return -1
        while True:
            if data[self.pos] == _QUOTE:
                ret = self.quotedString(out)
            else:
                ret = self._atomOrDot(out)
            if ret <= 0:
                return ret
            c = data[self.pos]
            if c not in _ATEXT and c != _QUOTE and c != _DOT:
                break
            out.append(0x20)
        return self.skipLwsp()

    def domain(self, out: bytearray) -> int:
        self.pos += 1  # '@'
        if self.skipLwsp() <= 0:
            return -1
        if self.data[self.pos] != _LBRACKET:
            return self.dotAtom(out)
        # a domain literal: folding removed, no "[" inside
        data, end = self.data, self.end
        start = self.pos
        pos = start + 1
        while pos < end:
            m = _LITERAL_STOP.search(data, pos)
            if m is None:
                break
            pos = m.start()
            c = data[pos]
            if c == _BACKSLASH:
                pos += 2
            elif c == 0x0A:
                stop = pos - 1 if pos > start and data[pos - 1] == 0x0D else pos
                out += _noNul(data[start:stop])
                pos += 1
                start = pos
            elif c == _LBRACKET:
                self.pos = pos
                return -1
            else:
                pos += 1
                out += _noNul(data[start:pos])
                self.pos = pos
                return self.skipLwsp()
        self.pos = end
        return -1


class _Address:
    __slots__ = ("name", "route", "mailbox", "domain", "invalid")

    def __init__(self):
        self.name = self.route = self.mailbox = self.domain = None
        self.invalid = False

    def tuple(self):
        return (self.name, self.route, self.mailbox, self.domain)


class _AddressParser(_Rfc822):
    """message_address_parse() with "fill missing": a list of (name, route, mailbox, domain)
    where a group is (None, None, groupname, None) ... (None, None, None, None)."""

    __slots__ = ("addrs", "addr", "buf")

    def __init__(self, data: bytes):
        super().__init__(data, keepComments=True)
        self.addrs = []
        self.addr = _Address()
        self.buf = bytearray()

    def parse(self) -> list:
        if self.skipLwsp() > 0:
            self._addressList()
        return self.addrs

    def _add(self):
        self.addrs.append(self.addr)
        self.addr = _Address()

    def _addFixed(self):
        a = self.addr
        if a.mailbox is None:
            a.mailbox = b"MISSING_MAILBOX"
            a.invalid = True
        if not a.domain:
            a.domain = b"MISSING_DOMAIN"
            a.invalid = True
        self._add()

    def _localPart(self) -> int:
        buf = self.buf
        del buf[:]
        if self.data[self.pos] == _QUOTE:
            ret = self.quotedString(buf)
        else:
            ret = self._nonStrictDotAtom(buf)
        if ret < 0:
            return -1
        self.addr.mailbox = bytes(buf)
        return ret

    def _nonStrictDotAtom(self, out: bytearray) -> int:
        """A local part where dots may repeat or end it ("a..b", "a."), as Dovecot's
        envelope parser accepts; whitespace may precede a dot but not follow it."""
        data, end = self.data, self.end
        ret = -1
        while True:
            while data[self.pos] == _DOT:
                out.append(_DOT)
                self.pos += 1
                if self.pos >= end:
                    return 0
                ret = 1
            if data[self.pos] == _AT:
                return ret
            ret = self.atom(out)
            if ret <= 0 or data[self.pos] != _DOT:
                return ret

    def _domain(self) -> int:
        buf = self.buf
        del buf[:]
        ret = self.domain(buf)
        if ret < 0:
            return -1
        self.addr.domain = bytes(buf)
        return ret

    def _domainList(self) -> int:
        buf = self.buf
        del buf[:]
        data = self.data
        while True:
            if self.pos >= self.end:
                return 0
            if data[self.pos] != _AT:
                break
            if buf:
                buf.append(_COMMA)
            buf.append(_AT)
            ret = self.domain(buf)
            if ret <= 0:
                return ret
            while self.skipLwsp() > 0 and data[self.pos] == _COMMA:
                self.pos += 1
        self.addr.route = bytes(buf)
        return 1

    def _angleAddr(self) -> int:
        data = self.data
        self.pos += 1  # '<'
        if self.skipLwsp() <= 0:
            return -1
        if data[self.pos] == _AT:
            if self._domainList() > 0 and data[self.pos] == _COLON:
                self.pos += 1
            else:
                self.addr.route = b"INVALID_ROUTE"
                if self.pos >= self.end:
                    return -1
            if self.skipLwsp() <= 0:
                return -1
        if data[self.pos] != _GT:
            if self._localPart() <= 0:
                return -1
            if data[self.pos] == _AT:
                if self._domain() <= 0:
                    return -1
        if data[self.pos] != _GT:
            return -1
        self.pos += 1
        return self.skipLwsp()

    def _nameAddr(self) -> int:
        buf = self.buf
        del buf[:]
        if self.phrase(buf) <= 0 or self.data[self.pos] != _LT:
            return -1
        self.addr.name = bytes(buf) or None
        if self._angleAddr() < 0:
            self.addr.domain = b"SYNTAX_ERROR"
            self.addr.invalid = True
        return 1 if self.pos < self.end else 0

    def _addrSpec(self) -> int:
        ret2 = -2
        del self.lastComment[:]
        quoted = self.data[self.pos] == _QUOTE
        ret = self._localPart()
        if ret <= 0:
            self.addr.invalid = True
        if ret != 0 and self.pos < self.end and self.data[self.pos] == _AT:
            ret2 = self._domain()
            if ret2 <= 0:
                ret = ret2
        if self.lastComment:
            self.addr.name = bytes(self.lastComment)
        elif ret2 == -2:
            buf = self.buf
            buf.append(0x20)
            before = len(buf)
            self.phrase(buf)
            if len(buf) != before:
                self.addr.mailbox = None
                self.addr.name = bytes(buf)
            elif not quoted:
                self.addr.domain = b""
            self.addr.invalid = True
            ret = -1
        return ret

    def _mailbox(self) -> int:
        start = self.pos
        ret = self._nameAddr()
        if ret < 0:
            self.pos = start
            ret = self._addrSpec()
            a = self.addr
            if a.invalid and a.name is None and a.mailbox is not None and a.domain is None:
                a.name = a.mailbox
                a.mailbox = None
        if ret < 0:
            self.addr.invalid = True
        self._addFixed()
        return ret

    def _group(self) -> int:
        buf = self.buf
        del buf[:]
        if self.phrase(buf) <= 0 or self.data[self.pos] != _COLON:
            return -1
        self.pos += 1
        ret = self.skipLwsp()
        if ret <= 0:
            self.addr.invalid = True
        self.addr.mailbox = bytes(buf)
        self._add()
        data = self.data
        if ret > 0 and data[self.pos] != _SEMI:
            while True:
                self._mailbox()
                if self.pos >= self.end or data[self.pos] != _COMMA:
                    break
                self.pos += 1
                if self.skipLwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if self.pos >= self.end or data[self.pos] != _SEMI:
                ret = -1
            else:
                self.pos += 1
                ret = self.skipLwsp()
        if ret < 0:
            self.addr.invalid = True
        self._add()
        return 0 if ret == 0 else 1

    def _addressList(self):
        data = self.data
        while True:
            start = self.pos
            ret = self._group()
            if ret < 0:
                self.pos = start
                self.addr = _Address()
                ret = self._mailbox()
            if ret == 0:
                break
            if self.pos >= self.end or data[self.pos] != _COMMA:
                break
            self.pos += 1
            ret = self.skipLwsp()
            if ret <= 0:
                if ret < 0:
                    self._addFixed()
                break


_ATEXT_CLASS = rb"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\xff"
_DOMAIN = rb"[" + _ATEXT_CLASS + rb"]+(?:\.[" + _ATEXT_CLASS + rb"]+)*"
# one address in the forms almost all mail uses, and what follows it: the simple cases of
# _AddressParser, without comments, quoting inside local parts or groups
_SIMPLE_ADDRESS = re.compile(
    rb'[ \t\r\n]*(?:(?:"([^"\\\r\n\x00]*)"'
    rb'|([' + _ATEXT_CLASS + rb'][' + _ATEXT_CLASS + rb'. \t\r\n]*?))?'
    rb'[ \t\r\n]*<([' + _ATEXT_CLASS + rb'.]+)@(' + _DOMAIN + rb')>'
    rb'|([' + _ATEXT_CLASS + rb'.]+)@(' + _DOMAIN + rb'))[ \t\r\n]*(,[ \t\r\n]*|$)')


def _addresses(value: bytes) -> list:
    """The _Address list of a header value; the common forms without the full parser."""
    addrs = []
    pos = 0
    end = len(value)
    match = _SIMPLE_ADDRESS.match
    while pos < end:
        m = match(value, pos)
        if m is None:
            return _AddressParser(value).parse()
        a = _Address()
        if m.group(3) is not None:
            quoted, phrase, a.mailbox, a.domain = m.group(1, 2, 3, 4)
            if quoted:
                a.name = quoted
            elif phrase:
                a.name = b" ".join(phrase.split())
        else:
            a.mailbox, a.domain = m.group(5, 6)
        addrs.append(a)
        pos = m.end()
    return addrs


def parseAddresses(value: bytes) -> list:
    """The addresses of one header value as (name, route, mailbox, domain) tuples of bytes or
    None, groups as (None, None, name, None) ... (None, None, None, None), the way Dovecot
    parses them for ENVELOPE (missing parts filled in as MISSING_MAILBOX/MISSING_DOMAIN)."""
    return [a.tuple() for a in _AddressParser(value).parse()]


# --------------------------------------------------------------------------------------------
# MIME header values: Content-Type and its parameters (RFC 2045, RFC 2231), the others
# --------------------------------------------------------------------------------------------

def _contentParams(p: _Rfc822) -> list:
    """rfc2231_parse(): the parameters after the type, RFC 2231 continuations merged (values
    are kept encoded, as Dovecot sends them)."""
    plain = []
    extended = []
    idx = 0
    data, end = p.data, p.end
    while True:
        # rfc822_parse_content_param()
        if p.pos >= end:
            break
        ret = -1
        if data[p.pos] == _SEMI:
            p.pos += 1
            if p.skipLwsp() > 0:
                key = bytearray()
                if p.mimeToken(key) > 0 and data[p.pos] == 0x3D:
                    p.pos += 1
                    value = bytearray()
                    r = p.skipLwsp()
                    if r <= 0:
                        pass
                    elif data[p.pos] == _QUOTE:
                        r = p.quotedString(value)
                    elif data[p.pos] == 0x3D:
                        stop = p.pos
                        while stop < end and data[stop] not in b"; \t\r\n":
                            stop += 1
                        value += data[p.pos:stop]
                        p.pos = stop
                    else:
                        r = p.mimeToken(value)
                    ret = -1 if r < 0 else 1
        if ret < 0:
            if p.pos >= end:
                break
            p.pos += 1
            continue
        key = bytes(key)
        value = bytes(value)
        star = key.find(b"*")
        if star >= 0:
            # key*, key*<n> or key*<n>*; like Dovecot, "key*" keeps the index of the
            # previous parameter
            q = star
            if star + 1 < len(key):
                q += 1
                idx = 0
                while q < len(key) and 0x30 <= key[q] <= 0x39:
                    idx = idx * 10 + key[q] - 0x30
                    q += 1
            ext = q < len(key) and key[q] == 0x2A
            if ext:
                q += 1
            if q >= len(key):
                extended.append((key[:star], idx, ext, value))
                continue
        plain.append((key, value))
    if not extended:
        return plain
    extended.sort(key=lambda e: (e[0], e[1]))
    i = 0
    count = len(extended)
    while i < count:
        first = extended[i]
        lower = first[0].lower()
        ok = True
        haveExt = False
        j = i
        nextIdx = 0
        while j < count and extended[j][0].lower() == lower:
            if extended[j][1] != nextIdx:
                ok = False
            if extended[j][2]:
                haveExt = True
            nextIdx += 1
            j += 1
        if not ok:
            for k in range(i, j):
                name, index, ext, value = extended[k]
                plain.append((b"%s*%d%s" % (name, index, b"*" if ext else b""), value))
        else:
            value = bytearray()
            if not first[2] and haveExt:
                value += b"''"
            for k in range(i, j):
                if not extended[k][2] and haveExt:
                    value += extended[k][3].replace(b"%", b"%25")
                else:
                    value += extended[k][3]
            plain.append((first[0] + b"*" if haveExt else first[0], bytes(value)))
        i = j
    return plain


_TOKEN = rb"A-Za-z0-9!#$%&'+\-^_`{|}~.\x80-\xff"
_SIMPLE_CONTENT_TYPE = re.compile(
    rb'[ \t\r\n]*([' + _TOKEN + rb'*]+)[ \t\r\n]*/[ \t\r\n]*([' + _TOKEN + rb'*]+)[ \t\r\n]*'
    rb'((?:;[ \t\r\n]*[' + _TOKEN + rb']+[ \t\r\n]*=[ \t\r\n]*'
    rb'(?:[' + _TOKEN + rb'*]+|"[^"\\\r\n\x00]*")[ \t\r\n]*)*)$')
_SIMPLE_PARAM = re.compile(
    rb'[ \t\r\n]*([' + _TOKEN + rb']+)[ \t\r\n]*=[ \t\r\n]*'
    rb'(?:([' + _TOKEN + rb'*]+)|"([^"\\\r\n\x00]*)")')


def _contentType(value: bytes):
    """(type/subtype as parsed, type, subtype, params or None when the value is broken)."""
    m = _SIMPLE_CONTENT_TYPE.match(value)
    if m is not None:
        ctype, sub, rest = m.groups()
        params = []
        if rest:
            for pm in _SIMPLE_PARAM.finditer(rest):
                token, quoted = pm.group(2, 3)
                params.append((pm.group(1), token if token is not None else quoted))
        return ctype + b"/" + sub, ctype, sub, params
    p = _Rfc822(value)
    p.skipLwsp()
    out = bytearray()
    # rfc822_parse_content_type(): a type token at the very end is kept (and the value is
    # broken); anything else that is not "type/subtype" followed by ";" or the end leaves
    # an empty type
    ret = -1
    if p.skipLwsp() > 0 and p.mimeToken(out) > 0 and out:
        if p.data[p.pos] == 0x2F:
            p.pos += 1
            if p.skipLwsp() > 0:
                out.append(0x2F)
                mark = len(out)
                ret = p.mimeToken(out)
                if len(out) == mark or (p.pos < p.end and p.data[p.pos] != _SEMI):
                    ret = -1
        if ret < 0:
            del out[:]
    full = bytes(out)
    ctype, slash, sub = full.partition(b"/")
    params = None if ret < 0 else _contentParams(p)
    return full, ctype, sub, params


_MIME_TOKEN_ONLY = re.compile(rb"[A-Za-z0-9!#$%&'*+\-^_`{|}~.\x80-\xff]+")


def _transferEncoding(value: bytes) -> bytes | None:
    if _MIME_TOKEN_ONLY.fullmatch(value) is not None:
        return value  # the usual "7bit", "base64": one token, no blanks or comments
    p = _Rfc822(value)
    p.skipLwsp()
    out = bytearray()
    if p.mimeToken(out) >= 0 and p.skipLwsp() == 0 and out:
        return bytes(out)
    return None


def _disposition(value: bytes):
    p = _Rfc822(value)
    p.skipLwsp()
    out = bytearray()
    if p.mimeToken(out) < 0:
        return None
    return bytes(out), _contentParams(p)


def _language(value: bytes) -> list | None:
    p = _Rfc822(value)
    langs = []
    p.skipLwsp()
    while True:
        out = bytearray()
        if p.atom(out) < 0:
            break
        langs.append(bytes(out))
        if p.pos >= p.end or p.data[p.pos] != _COMMA:
            break
        p.pos += 1
        p.skipLwsp()
    return langs or None


# --------------------------------------------------------------------------------------------
# The MIME structure
# --------------------------------------------------------------------------------------------

_MULTIPART, _RFC822, _TEXT, _IS_MIME, _DIGEST = 1, 2, 4, 8, 16

_ENVELOPE_STRINGS = {b"date": 0, b"subject": 1, b"in-reply-to": 8, b"message-id": 9}
_ENVELOPE_ADDRESSES = {b"from": 2, b"sender": 3, b"reply-to": 4, b"to": 5, b"cc": 6, b"bcc": 7}
_SEARCH_HEADERS = (b"from", b"to", b"cc", b"bcc", b"subject", b"message-id", b"in-reply-to",
                   b"references", b"date")
_SEARCH_HEADER_NAMES = {name: name.decode("ascii") for name in _SEARCH_HEADERS}
_SUMMARY_HEADERS = (frozenset(_SEARCH_HEADERS) | frozenset(_ENVELOPE_STRINGS)
                    | frozenset(_ENVELOPE_ADDRESSES))
_CONTENT = {b"content-type", b"content-transfer-encoding", b"content-id", b"content-md5",
            b"content-description", b"content-disposition", b"content-language",
            b"content-location"}
_ROOT_KEEP = frozenset(_SEARCH_HEADERS) | _CONTENT | {b"sender", b"reply-to", b"mime-version"}
_ENVELOPE_KEEP = frozenset(_ENVELOPE_STRINGS) | frozenset(_ENVELOPE_ADDRESSES) | _CONTENT | {
    b"mime-version"}
_MIME_KEEP = frozenset(_CONTENT) | {b"mime-version"}


def _keptHeaders(keep) -> re.Pattern:
    """The header lines named in C{keep} (any case, blanks before the colon) with their
    continuation lines, each after a LF: C{(name, blanks, colon, blanks, value)}; the value
    runs to the line end of the last continuation line (CRs still in)."""
    names = b"|".join(re.escape(name) for name in sorted(keep))
    return re.compile(rb"\n(" + names + rb")([ \t]*:)([ \t]*)([^\n]*(?:\n[ \t][^\n]*)*)",
                      re.IGNORECASE)


_KEPT_HEADERS = {keep: _keptHeaders(keep) for keep in (_ROOT_KEEP, _ENVELOPE_KEEP, _MIME_KEEP)}


class _Part:
    __slots__ = ("parent", "children", "flags", "depth", "headerStart",
                 "hp", "hv", "hl", "bp", "bv", "bl",
                 "seenType", "boundary", "headers", "kept",
                 "ctype", "csub", "cparams", "cte", "cid", "cdesc", "cmd5", "cdisp",
                 "cdispParams", "clang", "cloc")

    def __init__(self, parent, headerStart, flags=0):
        self.parent = parent
        self.children = []
        self.flags = flags
        self.depth = 0 if parent is None else parent.depth + 1
        self.headerStart = headerStart
        self.hp = self.hv = self.hl = self.bp = self.bv = self.bl = 0
        self.seenType = False
        self.boundary = None
        self.headers = []
        self.kept = 0
        self.ctype = self.csub = self.cparams = self.cte = self.cid = self.cdesc = None
        self.cmd5 = self.cdisp = self.cdispParams = self.clang = self.cloc = None

    def clearContent(self):
        self.ctype = self.csub = self.cparams = self.cte = self.cid = self.cdesc = None
        self.cmd5 = self.cdisp = self.cdispParams = self.clang = self.cloc = None


class _Parser:
    """
    One sequential pass over the file.  Header lines of the parts are kept (bounded); bodies
    are only counted, with C{bytes.find}/C{bytes.count} over 64 KiB windows.  Sizes are
    Dovecot's: a boundary line's leading [CR]LF belongs to the multipart, not to the part
    before it; when a part's header is cut short by a boundary line, the last header line end
    goes to the enclosing part's body.
    """

    def __init__(self, f: BinaryIO | bytes):
        if isinstance(f, bytes):
            self.f, self.buf, self.eof = None, f, True
        else:
            self.f, self.buf, self.eof = f, b"", False
        self.pos = 0          # index into buf
        self.base = 0         # file offset of buf[0]
        self.lastByte = 0x0A  # the byte before buf[pos] (at the start: as after a line end)
        self.boundaries = []  # [(boundary, owner part)], innermost last
        self.total = 1        # parts so far, the root included
        self.accounted = (0, 0, 0)  # (physical, virtual, lines) of the bytes counted so far
        self.keptTotal = 0
        self.keptCount = 0

    # -- reading --------------------------------------------------------------------------

    def fill(self, want: int) -> None:
        """Have at least C{want} bytes from pos in buf (fewer only at the end of the file)."""
        have = len(self.buf) - self.pos
        if have >= want or self.eof:
            return
        chunks = [self.buf[self.pos:]]
        self.base += self.pos
        self.pos = 0
        while have < want:
            data = self.f.read(max(_CHUNK, want - have))
            if not data:
                self.eof = True
                break
            chunks.append(data)
            have += len(data)
        self.buf = b"".join(chunks)

    def account(self, start: int, end: int):
        """(physical, virtual, lines) of buf[start:end], the bytes after the last accounted
        ones."""
        n = end - start
        if n <= 0:
            return 0, 0, 0
        buf = self.buf
        lf = buf.count(b"\n", start, end)
        if lf:
            # (a CR is looked for first: much faster than counting CRLFs in LF-only mail)
            crlf = buf.count(b"\r\n", start, end) if buf.find(b"\r", start, end) >= 0 else 0
            if buf[start] == 0x0A and self.lastByte == 0x0D:
                crlf += 1
            n2 = n + lf - crlf
        else:
            n2 = n
        self.lastByte = buf[end - 1]
        p, v, lines = self.accounted
        self.accounted = (p + n, v + n2, lines + lf)
        return n, n2, lf

    def salvage(self) -> _Part:
        """After an internal error: the whole message as the body of one text/plain part
        with no header."""
        while True:
            self.account(self.pos, len(self.buf))
            self.pos = len(self.buf)
            if self.eof:
                break
            self.fill(_CHUNK)
        root = _Part(None, 0, _TEXT)
        root.bp, root.bv, root.bl = self.accounted
        return root

    def addBody(self, part: _Part, end: int) -> None:
        p, v, lines = self.account(self.pos, end)
        self.pos = end
        part.bp += p
        part.bv += v
        part.bl += lines

    # -- boundaries -----------------------------------------------------------------------

    def boundaryAt(self, at: int):
        """(boundary, owner, closing) when the line at buf[at] is a boundary line of an
        enclosing multipart: "--" and the longest active boundary that starts the line.  buf
        must hold the line or at least its first 86 bytes."""
        buf = self.buf
        if self.total >= MAX_PARTS or buf[at:at + 2] != b"--":
            return None  # (with no more parts allowed, boundaries are no longer looked for)
        start = at + 2
        lf = buf.find(b"\n", start, start + 4096)
        if lf >= 0:
            stop = lf
            if stop > start and buf[stop - 1] == 0x0D:
                stop -= 1
            if stop - start > 2 and buf[stop - 2] == 0x2D and buf[stop - 1] == 0x2D:
                stop -= 2
            size = stop - start
        else:
            size = min(len(buf) - start, _BOUNDARY_LINE_MAX)
        best = None
        bestLen = -1
        for i in range(len(self.boundaries) - 1, -1, -1):
            b = self.boundaries[i][0]
            n = len(b)
            if bestLen < n <= size and buf.startswith(b, start):
                best = self.boundaries[i]
                bestLen = n
                if n == size:
                    break
        if best is None:
            return None
        return best[0], best[1], buf[start + bestLen:start + bestLen + 2] == b"--"

    # -- the parse ------------------------------------------------------------------------

    def run(self) -> _Part:
        root = part = _Part(None, 0)
        inHeader = True
        while True:
            if inHeader:
                part, inHeader = self.header(part)
                continue
            found = self.body(part)
            if found is None:
                while part.parent is not None:
                    _finish(part)
                    part = part.parent
                return root
            part, inHeader = self.boundary(part, found)

    def header(self, part: _Part, content: bool = True):
        """Read part's header; return what comes next: (part, False) for its body or
        (child, True) for the header of the message it encapsulates.  Without C{content} the
        Content-* fields are kept but not interpreted (L{envelopeOf} reads no further)."""
        if part.parent is None:
            keep = _ROOT_KEEP
        elif part.parent.flags & _RFC822:
            keep = _ENVELOPE_KEEP
        else:
            keep = _MIME_KEEP
        self.fill(8192)
        buf, pos = self.buf, self.pos
        # The fast path: the whole header is in the buffer and has no boundary line.
        e1 = buf.find(b"\n\n", pos)
        e2 = buf.find(b"\n\r\n", pos, e1 + 2 if e1 >= 0 else len(buf))
        eoh = e2 if e2 >= 0 else e1
        if eoh > pos and buf[pos] != 0x0A and buf[pos:pos + 2] != b"\r\n" and not (
                self.boundaries
                and (buf.startswith(b"--", pos) or buf.find(b"\n--", pos, eoh) >= 0)):
            block = buf[pos:eoh]
            if (b"\0" not in block and len(block) < MAX_HEADER_VALUE
                    and self.keptTotal + len(block) < MAX_KEPT_HEADER_BYTES
                    and self.keptCount + block.count(b"\n") + 1 < MAX_KEPT_HEADERS):
                # no limit can be reached inside this block: the kept headers at C speed
                headers = part.headers
                kept = 0
                for name, colon, blanks, value in _KEPT_HEADERS[keep].findall(b"\n" + block):
                    name = name.lower()
                    kept += len(name) + len(colon) + len(blanks) + len(value) - value.count(b"\n")
                    if b"\r" in value:
                        value = value.replace(b"\r\n", b"\n")
                        if value[-1:] == b"\r":
                            value = value[:-1]
                    if blanks and (not value or value[0] == 0x0A):
                        value = blanks[1:] + value  # blanks only: one of them goes
                    headers.append([name, value])  # (bytes: nothing is added to it later)
                    if name == b"content-type" or name == b"mime-version":
                        part.flags |= _IS_MIME
                self.keptCount += len(headers)
                self.keptTotal += kept
            elif b"\0" in block:
                current = None
                for line in block.split(b"\n"):
                    if line[-1:] == b"\r":
                        line = line[:-1]
                    current = self.headerLine(part, keep, line, current)
            else:
                # headerLine() inlined: this loop is most of the work for small messages
                headers = part.headers
                current = None
                for line in block.split(b"\n"):
                    c = line[:1]
                    if c == b" " or c == b"\t":
                        if current is not None and len(current[1]) < MAX_HEADER_VALUE:
                            current[1] += b"\n" + (line[:-1] if line[-1:] == b"\r" else line)
                            self.keptTotal += len(line)
                        continue
                    current = None
                    colon = line.find(b":")
                    if colon < 0:
                        continue
                    name = line[:colon].lower()
                    if name not in keep:
                        if name[-1:] not in b" \t" or not name:
                            continue
                        name = name.rstrip(b" \t")
                        if name not in keep:
                            continue
                    if (self.keptTotal >= MAX_KEPT_HEADER_BYTES
                            or self.keptCount >= MAX_KEPT_HEADERS):
                        continue
                    self.keptCount += 1
                    value = line[colon + 1:]
                    if value[-1:] == b"\r":
                        value = value[:-1]
                    if value[:1] in b" \t":
                        stripped = value.lstrip(b" \t")
                        value = stripped if stripped else value[1:]
                    current = [name, bytearray(value)]
                    self.keptTotal += len(line)
                    headers.append(current)
                    if name == b"content-type" or name == b"mime-version":
                        part.flags |= _IS_MIME
            end = eoh + (2 if eoh == e1 else 3)
            p, v, lines = self.account(pos, end)
            self.pos = end
            part.hp += p
            part.hv += v
            part.hl += lines
            if part.headers and content:
                _applyContent(part)
            pushed = False
            if part.boundary is not None and part.flags & _IS_MIME:
                if part.depth + 1 >= MAX_NESTING:
                    part.flags &= ~_MULTIPART
                else:
                    self.boundaries.append((part.boundary, part))
                    pushed = True
            return self.endHeader(part, pushed)
        return self.slowHeader(part, keep)

    def headerLine(self, part: _Part, keep, line: bytes, current):
        """One header line (without its line end): keep it if wanted.  Returns the header a
        following continuation line belongs to."""
        c = line[0] if line else 0
        if c == 0x20 or c == 0x09:
            if (current is not None and len(current[1]) < MAX_HEADER_VALUE
                    and self.keptTotal < MAX_KEPT_HEADER_BYTES):
                current[1] += b"\n" + line
                self.keptTotal += len(line) + 1
            return current
        colon = line.find(b":")
        if colon < 0:
            return None
        name = line[:colon].rstrip(b" \t").lower()
        if b"\0" in name:
            name = name[:name.index(b"\0")]  # compared as a C string
        if (name not in keep or self.keptTotal >= MAX_KEPT_HEADER_BYTES
                or self.keptCount >= MAX_KEPT_HEADERS):
            return None
        self.keptCount += 1
        value = line[colon + 1:]
        if value[:1] in b" \t":
            stripped = value.lstrip(b" \t")
            value = stripped if stripped else value[1:]
        current = [name, bytearray(value)]
        self.keptTotal += len(line)
        part.headers.append(current)
        if name == b"content-type" or name == b"mime-version":
            part.flags |= _IS_MIME
        return current

    def slowHeader(self, part: _Part, keep):
        """The header line by line, refilling the buffer, looking for boundary lines."""
        prevNewline = 0
        current = None
        pushed = endedByBoundary = False
        buf, pos = self.buf, self.pos
        mark = pos
        while True:
            lf = buf.find(b"\n", pos)
            if lf < 0:
                if not self.eof:
                    if len(buf) - pos >= MAX_HEADER_VALUE:
                        if (buf[pos] == 0x2D and self.boundaries
                                and self.boundaryAt(pos) is not None):
                            endedByBoundary = True
                            break
                        p, v, lines = self.account(mark, pos)
                        part.hp += p
                        part.hv += v
                        part.hl += lines
                        self.pos = pos
                        line, prevNewline = self.longLine(part)
                        buf, pos = self.buf, self.pos
                        mark = pos
                    else:
                        p, v, lines = self.account(mark, pos)
                        part.hp += p
                        part.hv += v
                        part.hl += lines
                        self.pos = pos
                        self.fill(len(buf) - pos + _CHUNK)
                        buf, pos = self.buf, self.pos
                        mark = pos
                        continue
                elif pos >= len(buf):
                    break  # the header ends at the end of the file
                else:
                    if (buf[pos] == 0x2D and self.boundaries
                            and self.boundaryAt(pos) is not None):
                        endedByBoundary = True
                        break
                    line = buf[pos:]
                    pos = len(buf)
                    prevNewline = 0
            else:
                c = buf[pos]
                if lf == pos or (lf == pos + 1 and c == 0x0D):
                    # the empty line that ends the header
                    if part.headers:
                        _applyContent(part)
                    if part.boundary is not None and part.flags & _IS_MIME:
                        if part.depth + 1 >= MAX_NESTING:
                            part.flags &= ~_MULTIPART
                        else:
                            self.boundaries.append((part.boundary, part))
                            pushed = True
                    pos = lf + 1
                    break
                if c == 0x2D and self.boundaries and self.boundaryAt(pos) is not None:
                    endedByBoundary = True
                    break
                if lf > pos and buf[lf - 1] == 0x0D:
                    line = buf[pos:lf - 1]
                    prevNewline = 2
                else:
                    line = buf[pos:lf]
                    prevNewline = 1
                pos = lf + 1
            current = self.headerLine(part, keep, line, current)
        p, v, lines = self.account(mark, pos)
        self.pos = pos
        part.hp += p
        part.hv += v
        part.hl += lines
        if endedByBoundary and prevNewline:
            # the line end before the boundary line belongs to the boundary
            part.hp -= prevNewline
            part.hv -= 2
            part.hl -= 1
            parent = part.parent
            parent.bp += prevNewline
            parent.bv += 2
            parent.bl += 1
        if not pushed and part.headers:
            _applyContent(part)
        return self.endHeader(part, pushed)

    def longLine(self, part: _Part):
        """A header line longer than MAX_HEADER_VALUE: keep its start, count the rest."""
        line = self.buf[self.pos:self.pos + MAX_HEADER_VALUE]
        while True:
            lf = self.buf.find(b"\n", self.pos)
            end = lf + 1 if lf >= 0 else len(self.buf) - (0 if self.eof else 1)
            newline = 0
            if lf >= 0:
                newline = 2 if (lf > 0 and self.buf[lf - 1] == 0x0D) or (
                    lf == 0 and self.lastByte == 0x0D) else 1
            p, v, lines = self.account(self.pos, end)
            self.pos = end
            part.hp += p
            part.hv += v
            part.hl += lines
            if lf >= 0 or self.eof:
                return line, newline
            self.fill(_CHUNK)

    def endHeader(self, part: _Part, pushed: bool):
        if not part.flags & _IS_MIME:
            part.flags = 0
            part.clearContent()
        if not part.seenType or not part.flags & _IS_MIME:
            if part.parent is not None and part.parent.flags & _DIGEST:
                part.flags |= _RFC822
            else:
                part.flags |= _TEXT
        part.boundary = None
        if part.parent is not None and not part.parent.flags & _RFC822:
            part.headers = None  # only envelopes need the headers later
        if pushed:
            return part, False
        if part.flags & _RFC822:
            if part.depth + 1 >= MAX_NESTING or self.total >= MAX_PARTS:
                part.flags &= ~_RFC822
            else:
                return self.newPart(part, 0), True
        return part, False

    def newPart(self, parent: _Part, flags: int) -> _Part:
        # where the parent's bytes end (as Dovecot places it: this is before the parent's
        # last header line end when that went to the grandparent with a boundary line)
        part = _Part(parent, parent.headerStart + parent.hp + parent.bp, flags)
        parent.children.append(part)
        self.total += 1
        return part

    def body(self, part: _Part):
        """Count part's body up to a boundary line of an enclosing multipart: return
        (boundary, owner, closing, size of the line end before it); or to the end of the
        file: return None."""
        atLineStart = self.lastByte == 0x0A
        while True:
            if not self.boundaries or self.total >= MAX_PARTS:
                while True:
                    self.addBody(part, len(self.buf))
                    if self.eof:
                        return None
                    self.fill(_CHUNK)
            self.fill(_BOUNDARY_LINE_MAX + 6)
            buf = self.buf
            if atLineStart:
                atLineStart = False
                if buf[self.pos:self.pos + 2] == b"--":
                    found = self.boundaryAt(self.pos)
                    if found is not None:
                        return found + (0,)
            idx = buf.find(b"\n--", self.pos)
            if idx < 0:
                if self.eof:
                    self.addBody(part, len(buf))
                    return None
                # keep the last bytes: they may start "\r\n--"
                self.addBody(part, max(self.pos, len(buf) - 3))
                self.fill(_CHUNK)
                continue
            cut = idx - 1 if idx > self.pos and buf[idx - 1] == 0x0D else idx
            newline = idx + 1 - cut
            self.addBody(part, cut)
            self.fill(_BOUNDARY_LINE_MAX + 6)
            found = self.boundaryAt(self.pos + newline)
            if found is not None:
                return found + (newline,)
            self.addBody(part, self.pos + newline)

    def boundary(self, part: _Part, found):
        """A boundary line: close the parts inside its multipart, count the line, and start
        the next part (or the multipart's epilogue after a closing boundary)."""
        b, owner, closing, newline = found
        while part is not owner:
            _finish(part)
            part = part.parent
        stack = self.boundaries
        while stack[-1][1] is not owner:
            stack.pop()
        if closing:
            stack.pop()
        self.addBody(owner, self.pos + newline + 2 + len(b) + (2 if closing else 0))
        while True:
            lf = self.buf.find(b"\n", self.pos)
            if lf >= 0:
                self.addBody(owner, lf + 1)
                break
            self.addBody(owner, len(self.buf))
            if self.eof:
                return owner, False  # no line end: no next part either
            self.fill(_CHUNK)
        if stack and stack[-1][1] is owner:
            return self.newPart(owner, _IS_MIME), True
        return owner, False


def _finish(part: _Part) -> None:
    parent = part.parent
    parent.bp += part.hp + part.bp
    parent.bv += part.hv + part.bv
    parent.bl += part.hl + part.bl


def _headerValue(value) -> bytes:
    value = bytes(value)
    if b"\0" in value:
        value = value.replace(b"\0", _NUL_REPLACEMENT)
    return value


def _applyContent(part: _Part) -> None:
    """The Content-* headers into the part's BODYSTRUCTURE data: the first of each counts
    (a later Content-Disposition replaces earlier ones that had no parameters, as in
    Dovecot)."""
    for name, value in part.headers:
        if not name.startswith(b"content-"):
            continue
        value = bytes(value)
        if name == b"content-type":
            if part.seenType:
                continue
            part.seenType = True
            full, ctype, sub, params = _contentType(value)
            part.ctype = ctype
            part.csub = sub
            part.cparams = params
            lower = full.lower()
            if lower == b"message/rfc822":
                part.flags |= _RFC822
            elif lower.startswith(b"text") and (len(lower) == 4 or lower[4] == 0x2F):
                part.flags |= _TEXT
            elif lower.startswith(b"multipart/"):
                part.flags |= _MULTIPART
                if lower[10:] == b"digest":
                    part.flags |= _DIGEST
                if params:
                    for key, v in params:
                        if key.lower() == b"boundary":
                            part.boundary = v[:BOUNDARY_MAX]
                            break
        elif name == b"content-transfer-encoding":
            if part.cte is None:
                part.cte = _transferEncoding(value)
        elif name == b"content-id":
            if part.cid is None:
                part.cid = _headerValue(value)
        elif name == b"content-md5":
            if part.cmd5 is None:
                part.cmd5 = _headerValue(value)
        elif name == b"content-description":
            if part.cdesc is None:
                part.cdesc = _headerValue(value)
        elif name == b"content-disposition":
            if not part.cdispParams:
                d = _disposition(value)
                if d is not None:
                    part.cdisp, part.cdispParams = d
        elif name == b"content-language":
            if part.clang is None:
                part.clang = _language(value)
        elif name == b"content-location":
            if part.cloc is None:
                part.cloc = _headerValue(value)


# --------------------------------------------------------------------------------------------
# ENVELOPE, BODY, BODYSTRUCTURE and the part tree
# --------------------------------------------------------------------------------------------

_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'


def _envelopeData(headers):
    """([date, subject, in-reply-to, message-id], {field: addresses}) from a part's headers:
    the last of each string header counts, the addresses of repeated address headers add up
    (as in Dovecot)."""
    strings = {}
    addresses = {}
    for name, value in headers or ():
        if name in _ENVELOPE_STRINGS:
            strings[name] = _headerValue(value)
        elif name in _ENVELOPE_ADDRESSES:
            parsed = _addresses(bytes(value))
            if parsed:
                addresses.setdefault(name, []).extend(parsed)
    return strings, addresses


def _addressList(addrs) -> bytes:
    if not addrs:
        return b"NIL"
    out = [b"("]
    for a in addrs:
        out.append(b"(")
        out.append(b"NIL" if a.name is None else _forHumans(a.name))
        out.append(b" ")
        out.append(_nstring(a.route))
        out.append(b" ")
        out.append(_nstring(a.mailbox))
        out.append(b" ")
        out.append(_nstring(a.domain))
        out.append(b")")
    out.append(b")")
    return b"".join(out)


def _envelope(strings, addresses) -> bytes:
    subject = strings.get(b"subject")
    sender = _addressList(addresses.get(b"from"))  # also Sender and Reply-To where missing
    other = addresses.get(b"sender")
    replyTo = addresses.get(b"reply-to")
    return b"".join((
        b"(", _nstringNoLF(strings.get(b"date")), b" ",
        b"NIL" if subject is None else _forHumans(subject), b" ",
        sender, b" ",
        _addressList(other) if other else sender, b" ",
        _addressList(replyTo) if replyTo else sender, b" ",
        _addressList(addresses.get(b"to")), b" ",
        _addressList(addresses.get(b"cc")), b" ",
        _addressList(addresses.get(b"bcc")), b" ",
        _nstringNoLF(strings.get(b"in-reply-to")), b" ",
        _nstringNoLF(strings.get(b"message-id")), b")"))


def _params(params, defaultCharset: bool) -> bytes:
    if not params and not defaultCharset:
        return b"NIL"
    out = []
    seen = False
    for key, value in params or ():
        if defaultCharset and key.lower() == b"charset":
            seen = True
        out.append(_nstring(key))
        out.append(_nstring(value))
    if defaultCharset and not seen:
        out.append(b'"charset" "us-ascii"')
    return b"(" + b" ".join(out) + b")"


def _extension(part: _Part, out: list) -> None:
    if part.cdisp is None:
        out.append(b" NIL")
    else:
        out.append(b" (" + _nstring(part.cdisp) + b" " + _params(part.cdispParams, False) + b")")
    if part.clang is None:
        out.append(b" NIL")
    else:
        out.append(b" (" + b" ".join(_nstring(lang) for lang in part.clang) + b")")
    out.append(b" " + _nstringNoLF(part.cloc))


def _structure(part: _Part, ext: list, body: list) -> None:
    """Dovecot's imap_bodystructure_write(): the part without its enclosing parentheses, as
    BODYSTRUCTURE (into ext) and as BODY (into body) in one walk."""
    flags = part.flags
    if flags & _MULTIPART:
        if part.children:
            for child in part.children:
                ext.append(b"(")
                body.append(b"(")
                _structure(child, ext, body)
                ext.append(b")")
                body.append(b")")
        else:
            ext.append(_EMPTY_BODYSTRUCTURE)
            body.append(_EMPTY_BODY)
        subtype = b" " + _nstring(part.csub)
        ext.append(subtype)
        body.append(subtype)
        ext.append(b" " + _params(part.cparams, False))
        _extension(part, ext)
        return
    text = False
    if flags & _RFC822:
        head = b'"message" "rfc822"'
    elif part.ctype is None:
        text = True
        head = b'"text" "plain"'
    else:
        lower = part.ctype.lower()
        if lower == b"multipart" or (lower == b"message" and part.csub.lower() == b"rfc822"):
            # not parsed as one (no subtype, or nested too deep): opaque
            head = b'"application" "octet-stream"'
        else:
            text = lower == b"text"
            head = _nstring(part.ctype) + b" " + _nstring(part.csub)
    head = b"%s %s %s %s %s %d" % (
        head, _params(part.cparams, text), _nstringNoLF(part.cid), _nstringNoLF(part.cdesc),
        b'"7bit"' if part.cte is None else _nstring(part.cte), part.bv)
    if text:
        head += b" %d" % part.bl
        ext.append(head)
        body.append(head)
    elif flags & _RFC822:
        child = part.children[0]
        head += b" " + _envelope(*_envelopeData(child.headers)) + b" ("
        ext.append(head)
        body.append(head)
        _structure(child, ext, body)
        tail = b") %d" % part.bl
        ext.append(tail)
        body.append(tail)
    else:
        ext.append(head)
        body.append(head)
    ext.append(b" " + _nstringNoLF(part.cmd5))
    _extension(part, ext)


def _isPlain7bit(root: _Part) -> bool:
    """A single text/plain part in us-ascii, 7bit, with no other MIME fields: Dovecot then
    answers with the canonical lower-case BODY/BODYSTRUCTURE whatever the case of the
    headers (from its cache, which is what clients see but the first time)."""
    if not root.flags & _TEXT or root.children:
        return False
    if root.csub is not None and root.csub.lower() != b"plain":
        return False
    params = root.cparams
    if params and (len(params) > 1 or params[0][0].lower() != b"charset"
                   or params[0][1].lower() != b"us-ascii"):
        return False
    return (root.cid is None and root.cdesc is None and root.cmd5 is None
            and root.cdisp is None and root.clang is None and root.cloc is None
            and (root.cte is None or root.cte.lower() == b"7bit"))


def _tree(part: _Part) -> dict:
    if part.flags & _MULTIPART:
        kind = "multipart"
    elif part.flags & _RFC822:
        kind = "message"
    else:
        kind = "single"
    bodyStart = part.headerStart + part.hp
    return {
        "kind": kind,
        "headerStart": part.headerStart,
        "bodyStart": bodyStart,
        "bodyEnd": bodyStart + part.bp,
        "headerVSize": part.hv,
        "bodyVSize": part.bv,
        "parts": [_tree(child) for child in part.children],
    }


# --------------------------------------------------------------------------------------------
# SEARCH, SORT and THREAD: decoded header fields and sort keys
# --------------------------------------------------------------------------------------------

_MSGID = re.compile(rb"<([^<>]*)>")
_MSGID_SPACE = re.compile(rb"[ \t\r\n]+")
_text = bytesText


def decodeHeader(raw: bytes) -> str:
    """A header value as text (L{pymaild.mime.decodeHeader}), NULs shown as U+FFFD."""
    return _decodeHeader(raw, _NUL_REPLACEMENT)


_SUBJ_BLOB = re.compile(r"\[[^\[\]]*\][ \t]*")
# subj-leader = (*subj-blob subj-refwd) / WSP; subj-refwd = ("re" / ("fw" ["d"])) *WSP
# [subj-blob] ":"; subj-blob = "[" *BLOBCHAR "]" *WSP
_SUBJ_LEADER = re.compile(
    r"(?:(?:\[[^\[\]]*\][ \t]*)*(?:re|fwd?)[ \t]*(?:\[[^\[\]]*\][ \t]*)?:|[ \t])",
    re.IGNORECASE)
_WSP_RUN = re.compile(r"[ \t\r\n]+")


def baseSubject(subject: str) -> str:
    """The base subject of RFC 5256 section 2.1 (of an already decoded subject): reply and
    forward prefixes, [blob]s, "(fwd)" trailers and "[fwd: ...]" wrappers removed, whitespace
    collapsed.  Not case-mapped."""
    return _baseSubject(subject)[0]


def _baseSubject(subject: str) -> tuple[str, bool]:
    """L{baseSubject} and whether the subject is a reply or forward in the sense of RFC 5256
    section 4 (REFERENCES step 5): a subj-refwd leader ("Re:", "Fwd:", "Fw[x]:") or a "(fwd)"
    trailer was removed.  Linear in the subject's length (it may be a megabyte of "Re: "):
    the text is never copied while leaders and trailers go, only C{start} and C{end} move."""
    s = _WSP_RUN.sub(" ", subject)
    start, end = 0, len(s)
    replyOrForward = False
    while True:
        # (2) trailers
        while end > start:
            if s[end - 1] == " ":
                end -= 1
            elif end - start >= 5 and s[end - 5:end].lower() == "(fwd)":
                end -= 5
                replyOrForward = True
            else:
                break
        # (3)-(5) leaders and blobs; s[end - 1] is no space now, so a blob may go when
        # anything follows it
        while True:
            changed = False
            m = _SUBJ_LEADER.match(s, start, end)
            while m is not None and m.end() > start:
                if m.end() > start + 1:
                    replyOrForward = True  # a subj-refwd, not just one WSP
                start = m.end()
                changed = True
                m = _SUBJ_LEADER.match(s, start, end)
            # where no leader starts at a blob, none starts at the blobs that follow it (a
            # leader's blobs run up to its "re"/"fw"): they all go at once
            m = _SUBJ_BLOB.match(s, start, end)
            while m is not None and m.end() < end:
                start = m.end()
                changed = True
                m = _SUBJ_BLOB.match(s, start, end)
            if not changed:
                break
        # (6) [fwd: ...]
        if end - start >= 6 and s[start:start + 5].lower() == "[fwd:" and s[end - 1] == "]":
            start += 5
            end -= 1
            continue
        return s[start:end], replyOrForward


def casemap(s: str) -> str:
    """
    The i;unicode-casemap collation key (RFC 5051), which RFC 5256 SORT and THREAD compare
    with: every character replaced by its (simple) titlecase mapping, then NFKD.  Comparing
    two keys as Python strings compares them code point by code point, which is the UTF-8
    octet order RFC 5051 asks for.  (Titlecase, not lower case: C{"_"} sorts after C{"A"} but
    before C{"a"}, so the two differ in order, not only in form.)
    """
    if s.isascii():
        return s.upper()
    out = []
    for c in s:
        t = c.title()
        # str.title() applies the full mappings of SpecialCasing.txt ("ß" -> "Ss"); where a
        # character has no single-character titlecase it keeps its own (the simple mapping).
        out.append(t if len(t) == 1 else c)
    return unicodedata.normalize("NFKD", "".join(out))


def _sortMailbox(addrs) -> str:
    """RFC 5256 FROM, TO, CC: the addr-mailbox of the first address structure, exactly as the
    ENVELOPE has it (a group's name for a group, RFC 5322's C{address = mailbox / group};
    MISSING_MAILBOX where the header names no mailbox)."""
    if not addrs or addrs[0].mailbox is None:
        return ""
    return casemap(_text(addrs[0].mailbox))


def _display(addrs) -> str:
    """RFC 5957 DISPLAYFROM, DISPLAYTO: of the first address structure, the RFC 2047-decoded
    addr-name if that is not empty (whitespace collapsed, as in the ENVELOPE: a name of spaces
    is empty), else addr-mailbox@addr-host, else addr-mailbox (a group), else the empty
    string."""
    if not addrs:
        return ""
    a = addrs[0]
    if a.name:
        name = _WSP_RUN.sub(" ", decodeHeader(a.name)).strip(" ")  # as the ENVELOPE shows it
        if name:
            return casemap(name)
    if a.mailbox is None:
        return ""
    spec = a.mailbox if a.domain is None else a.mailbox + b"@" + a.domain
    return casemap(_text(spec))


# RFC 5322 date-time, obsolete forms (section 4.3) included: [day-name ","] day month year
# [hour ":" minute [":" second] [zone]]
_DATE = re.compile(r"\s*(?:[A-Za-z]+\s*,?\s*)?(\d{1,2})\s+([A-Za-z]{3})\s+(\d{2,4})(?:\s+(.*))?$",
                   re.DOTALL)
_TIME = re.compile(r"(\d{1,2})\s*:\s*(\d{1,2})(?:\s*:\s*(\d{1,2}))?(?:\s+(\S+))?")
_NUMERIC_ZONE = re.compile(r"([+-])(\d\d)(\d\d)$")
_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
# obs-zone; the military letters and unknown names count as UTC
_ZONES = {"edt": -4, "est": -5, "cdt": -5, "cst": -6, "mdt": -6, "mst": -7, "pdt": -7, "pst": -8}
_COMMENT = re.compile(r"\([^()]*\)")


# the form almost every Date header has: the arithmetic of _sentDate() without its regexes,
# text and comment handling; anything else (or any invalid value) goes the general way
_USUAL_DATE = re.compile(
    rb"(?:[A-Za-z]+, )?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")
_MONTHS_BYTES = {name.encode(): i for name, i in _MONTHS.items()}
_EPOCH_DAY = _date(1970, 1, 1).toordinal()


def _sentDate(raw: bytes | None) -> int | None:
    """L{_anySentDate}, quicker for the usual form of the Date header."""
    if raw is not None:
        m = _USUAL_DATE.fullmatch(raw)
        if m is not None:
            day, month, year, hour, minute, second, sign, zoneHours, zoneMinutes = m.groups()
            month = _MONTHS_BYTES.get(month.lower())
            hour, minute, second = int(hour), int(minute), int(second)
            zoneMinutes = int(zoneMinutes)
            if (month is not None and hour <= 23 and minute <= 59 and second <= 60
                    and zoneMinutes <= 59):
                try:
                    days = _date(int(year), month, int(day)).toordinal() - _EPOCH_DAY
                except ValueError:
                    pass  # no such day
                else:
                    offset = (int(zoneHours) * 60 + zoneMinutes) * 60
                    return (days * 86400 + hour * 3600 + minute * 60 + second
                            - (offset if sign == b"+" else -offset))
    return _anySentDate(raw)


def _anySentDate(raw: bytes | None) -> int | None:
    """
    The sent date of RFC 5256 section 2.2 in seconds since the epoch: the Date header's date
    and time in UTC.  As section 2.2 asks, an invalid or missing time zone counts as UTC and an
    invalid or missing time as 00:00:00.  None when the header is missing or has no valid date
    (day, month, year): SORT and THREAD then use the internal date.
    """
    if raw is None:
        return None
    text = _text(raw).replace("\r", " ").replace("\n", " ")
    for _ in range(3):  # comments, nested ones from the inside out
        text = _COMMENT.sub(" ", text)
    m = _DATE.match(text)
    if m is None:
        return None
    day, month, year = int(m.group(1)), _MONTHS.get(m.group(2).lower()), m.group(3)
    y = int(year)
    if len(year) == 2:
        y += 2000 if y < 50 else 1900
    elif len(year) == 3:
        y += 1900
    if month is None or y < 1 or not 1 <= day <= calendar.monthrange(y, month)[1]:
        return None
    seconds = offset = 0
    t = _TIME.match((m.group(4) or "").strip())
    if t is not None:
        hour, minute, second = int(t.group(1)), int(t.group(2)), int(t.group(3) or 0)
        if hour <= 23 and minute <= 59 and second <= 60:
            seconds = hour * 3600 + minute * 60 + second
        zone = t.group(4) or ""
        z = _NUMERIC_ZONE.match(zone)
        if z is not None:
            if int(z.group(3)) <= 59:
                offset = (int(z.group(2)) * 60 + int(z.group(3))) * 60 * (-1 if z.group(1) == "-" else 1)
        else:
            offset = _ZONES.get(zone.lower(), 0) * 3600
    return calendar.timegm((y, month, day, 0, 0, 0)) + seconds - offset


def _validIds(raw: bytes):
    for m in _MSGID.finditer(raw):
        body = _MSGID_SPACE.sub(b"", m.group(1))
        left, at, right = body.rpartition(b"@")
        if left and right:
            yield "<" + _text(body) + ">"


def _messageIds(raw: bytes | None) -> list[str]:
    """The valid message identifiers (C{<id-left@id-right>}, RFC 5322 section 3.6.4) in a
    header value, in order, folding whitespace removed; anything else in the value is
    skipped."""
    return [] if raw is None else list(_validIds(raw))


_ONE_ID = re.compile(rb"<([^<>\s]+)>")


def _firstId(raw: bytes | None) -> str | None:
    """The first of L{_messageIds}, or None (the others are not looked for)."""
    if raw is None:
        return None
    m = _ONE_ID.fullmatch(raw)  # the usual value: one identifier, no blanks
    if m is not None:
        left, at, right = m.group(1).rpartition(b"@")
        if left and right:
            return "<" + _text(m.group(1)) + ">"
    return next(_validIds(raw), None)


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MessageSummary:
    """
    Everything the index caches about one message file.

    Sizes: C{size} is the file's size; C{vsize} (RFC822.SIZE) counts every line end as CRLF;
    the header sizes include the empty line that ends the header; C{lines} counts the body's
    lines.  C{envelope}, C{bodystructure} and C{body} are the bytes that follow C{ENVELOPE },
    C{BODYSTRUCTURE } and C{BODY } in a FETCH response (literals included).  C{parts} is the MIME
    tree with file offsets: C{{"kind": "single"|"multipart"|"message", "headerStart",
    "bodyStart", "bodyEnd", "headerVSize", "bodyVSize", "parts": [...]}}; a multipart's parts
    are its children, a message/rfc822 part's single part is the message it encapsulates.
    C{headerFields} has the decoded, unfolded From, To, Cc, Bcc, Subject, Message-ID,
    In-Reply-To, References and Date (raw) headers that are present (lower-case names;
    repeated headers joined by a newline).

    SORT and THREAD (RFC 5256, RFC 5957): C{sortSubject} is the base subject, C{sortFrom},
    C{sortTo} and C{sortCc} the addr-mailbox of the first address as the ENVELOPE has it (a
    group's name, MISSING_MAILBOX), C{displayFrom} and C{displayTo} the decoded display name
    of the first address or else its addr-spec, all as L{casemap} keys (i;unicode-casemap),
    C{""} when absent.
    C{replyOrForward} tells whether the subject had a "Re:"/"Fwd:" leader or a "(fwd)"
    trailer.  C{sentDate} is the Date header in seconds since the epoch (None when there is
    none or it has no valid date: SORT and THREAD then use the internal date).  C{messageId}
    and C{inReplyTo} are the first valid C{<id-left@id-right>} of their headers (None if there
    is none), C{references} all valid ones of the References headers, in order.
    """

    size: int
    vsize: int
    headerSize: int
    headerVSize: int
    bodyVSize: int
    lines: int
    envelope: bytes
    bodystructure: bytes
    body: bytes
    parts: dict
    headerFields: dict
    sortSubject: str = ""
    sortFrom: str = ""
    sortTo: str = ""
    sortCc: str = ""
    displayFrom: str = ""
    displayTo: str = ""
    sentDate: int | None = None
    messageId: str | None = None
    inReplyTo: str | None = None
    references: tuple = field(default_factory=tuple)
    replyOrForward: bool = False

    @property
    def bodySize(self) -> int:
        return self.size - self.headerSize


def summarize(f: BinaryIO | bytes) -> MessageSummary:
    """
    Read the message in binary file C{f} from its current position to its end, once and in
    order, and compute its L{MessageSummary}; or the message C{f} when it is bytes.  Never
    raises on malformed messages (only the file's own errors, OSError, go through).
    """
    return _parsed(f, _summary)


def partsOf(data: bytes) -> dict:
    """
    The part tree of L{summarize}C{(data)} (its C{parts}: kinds and byte offsets), without the
    rest of the summary (envelope, body structure, decoded fields: more than half the work):
    what SEARCH TEXT and BODY need to decode a message they could not screen out.
    """
    return _parsed(data, _tree)


def _parsed(f: BinaryIO | bytes, finish):
    """
    C{finish} of the root part of the message C{f} (a file, or bytes) once parsed.  A message
    this module cannot handle is a bug to fix, but it must not stop an index (re)build: then
    the rest of the file is counted and the message described as one text part.
    """
    parser = _parserOf(f)
    try:
        return finish(parser.run())
    except (OSError, MemoryError):
        raise
    except Exception:
        return finish(parser.salvage())


def _parserOf(f: BinaryIO | bytes) -> _Parser:
    """A parser of the message C{f}: bytes up to L{_WHOLE_FILE} in one buffer, larger ones and
    files in chunks (the same answers either way)."""
    return _Parser(io.BytesIO(f) if isinstance(f, bytes) and len(f) >= _WHOLE_FILE else f)


# Messages smaller than this are parsed in one buffer (a file read in one piece: one read
# instead of a buffered reader's several), larger ones in chunks of _CHUNK.  Below the longest
# header value kept, the answers cannot depend on where chunks end: a header line of a
# megabyte is cut where a chunked read finds no line end.
_WHOLE_FILE = MAX_HEADER_VALUE


def summarizePath(path: str) -> MessageSummary:
    """L{summarize} of the message file at C{path}."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < _WHOLE_FILE - 1:
            data = os.read(fd, size + 1)
            if len(data) <= size:  # a short read: the end of the file
                return summarize(data)
            os.lseek(fd, 0, os.SEEK_SET)  # it grew: read it in chunks
        with open(fd, "rb", closefd=False) as f:
            return summarize(f)
    finally:
        os.close(fd)


#: L{envelopePath} reads a message's header in pieces of this size, doubling, up to
#: L{_HEAD_MAX}; a longer header is left to the whole summary
_HEAD_READ = 16384
_HEAD_MAX = 1 << 20


def envelopeOf(data: bytes) -> bytes:
    """
    The ENVELOPE of a message from C{data}: the whole message, or its start with at least the
    whole header and the empty line after it.  The same bytes as L{summarize}'s C{envelope}
    (the same header parse, the same rules), without reading or parsing the body: what a
    FETCH of ENVELOPE alone needs of mail never summarized (Dovecot's answer too reads only
    the header).
    """
    parser = _parserOf(data)
    root = _Part(None, 0)
    try:
        parser.header(root, content=False)
    except Exception:
        return _envelope({}, {})  # as summarize() salvages it: one part without a header
    strings = {}
    addresses = {}
    for name, value in root.headers:
        if name in _ENVELOPE_ADDRESSES:
            parsed = _addresses(bytes(value))
            if parsed:
                known = addresses.get(name)
                addresses[name] = parsed if known is None else known + parsed
        elif name in _ENVELOPE_STRINGS:
            raw = bytes(value)
            strings[name] = raw.replace(b"\0", _NUL_REPLACEMENT) if b"\0" in raw else raw
    return _envelope(strings, addresses)


def envelopePath(path: str) -> bytes | None:
    """
    L{envelopeOf} the message file at C{path}, reading only as far as its header's end (16 KiB
    as a rule); C{None} when the header runs past L{_HEAD_MAX} (then use L{summarizePath}).
    """
    return envelopeAndMtime(path)[0]


def envelopeAndMtime(path: str) -> tuple[bytes | None, int]:
    """
    L{envelopePath} and the file's mtime in whole seconds (its IMAP internal date), read from
    the open file: a first FETCH of ENVELOPE and INTERNALDATE then needs no C{stat} of its own.
    """
    data, mtime = _headAndMtime(path)
    return (None if data is None else envelopeOf(data)), mtime


def headerFieldsPath(path: str) -> dict[str, str] | None:
    """
    The header fields SEARCH reads (C{MessageSummary.headerFields}: the same parse of the same
    header, the same decoding) of the message file at C{path}, reading only as far as its
    header's end, as L{envelopePath}; C{None} when the header runs past L{_HEAD_MAX}, or
    when anything fails (then use L{summarizePath}, which salvages what it can: its answer is
    the one kept).  A first SEARCH FROM of a folder never summarized reads this much of each
    message instead of parsing all of it (a fourth of the time).
    """
    data = _headAndMtime(path)[0]
    if data is None:
        return None
    root = _Part(None, 0)
    fields = {}
    try:
        _parserOf(data).header(root, content=False)
        for name, value in root.headers:
            key = _SEARCH_HEADER_NAMES.get(name)
            if key is not None:
                raw = bytes(value)
                decoded = _decodedField(raw.replace(b"\0", _NUL_REPLACEMENT) if b"\0" in raw else raw)
                known = fields.get(key)
                fields[key] = decoded if known is None else known + "\n" + decoded
    except Exception:
        return None
    return fields


def _headAndMtime(path: str) -> tuple[bytes | None, int]:
    """
    The start of the message file at C{path} up to at least its header's end (L{_HEAD_READ} as
    a rule), or C{None} past L{_HEAD_MAX}; and the file's mtime in whole seconds.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        mtime = int(os.fstat(fd).st_mtime)
        data = os.read(fd, _HEAD_READ)
        want = _HEAD_READ
        while len(data) >= want:  # (a short read of a regular file is its end)
            if data[:1] == b"\n" or data[:2] == b"\r\n" or b"\n\n" in data or b"\n\r\n" in data:
                break  # the header's end is in (the parse stops there)
            if len(data) >= _HEAD_MAX:
                return None, mtime
            more = os.read(fd, len(data))
            want = len(data) * 2
            data += more
    finally:
        os.close(fd)
    return data, mtime


def _decodedField(text: bytes) -> str:
    """A header field's value as C{MessageSummary.headerFields} keeps it: L{decodeHeader}, without
    its work where there is nothing to decode or unfold."""
    if b"=?" in text or b"\n" in text:
        return decodeHeader(text)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return text.decode("latin-1")


def _summary(root: _Part) -> MessageSummary:
    # one pass over the root's headers: the envelope's strings and addresses (as
    # _envelopeData), the decoded SEARCH fields, the references
    strings = {}
    addresses = {}
    fields = {}
    references = []
    subject = None
    for name, value in root.headers:
        if name not in _SUMMARY_HEADERS:
            continue  # Content-*, MIME-Version
        raw = bytes(value)
        text = raw.replace(b"\0", _NUL_REPLACEMENT) if b"\0" in raw else raw
        if name in _ENVELOPE_ADDRESSES:
            parsed = _addresses(raw)
            if parsed:
                known = addresses.get(name)
                if known is None:
                    addresses[name] = parsed
                else:
                    addresses[name] = known + parsed
        elif name in _ENVELOPE_STRINGS:
            strings[name] = text
        if name in _SEARCH_HEADER_NAMES:
            decoded = _decodedField(text)
            key = _SEARCH_HEADER_NAMES[name]
            known = fields.get(key)
            fields[key] = decoded if known is None else known + "\n" + decoded
            if name == b"subject":
                subject = decoded  # the last one is the ENVELOPE's
            elif name == b"references":
                references.extend(_messageIds(raw))

    if _isPlain7bit(root):
        body = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" %d %d)' % (root.bv, root.bl)
        bodystructure = body[:-1] + b" NIL NIL NIL NIL)"
    else:
        ext = [b"("]
        out = [b"("]
        _structure(root, ext, out)
        ext.append(b")")
        out.append(b")")
        bodystructure = b"".join(ext)
        body = b"".join(out)
    base, replyOrForward = _baseSubject(subject) if subject is not None else ("", False)
    fromAddresses = addresses.get(b"from")
    toAddresses = addresses.get(b"to")
    return MessageSummary(
        size=root.hp + root.bp,
        vsize=root.hv + root.bv,
        headerSize=root.hp,
        headerVSize=root.hv,
        bodyVSize=root.bv,
        lines=root.bl,
        envelope=_envelope(strings, addresses),
        bodystructure=bodystructure,
        body=body,
        parts=_tree(root),
        headerFields=fields,
        sortSubject=casemap(base),
        sortFrom=_sortMailbox(fromAddresses),
        sortTo=_sortMailbox(toAddresses),
        sortCc=_sortMailbox(addresses.get(b"cc")),
        displayFrom=_display(fromAddresses),
        displayTo=_display(toAddresses),
        sentDate=_sentDate(strings.get(b"date")),
        messageId=_firstId(strings.get(b"message-id")),
        inReplyTo=_firstId(strings.get(b"in-reply-to")),
        references=tuple(references),
        replyOrForward=replyOrForward,
    )


_BYTES_FIELDS = ("envelope", "bodystructure", "body")
# 2: RFC 5051 titlecase sort keys, replyOrForward, only valid message-ids
_JSON_VERSION = 2
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def toJSON(summary: MessageSummary, wire: bool = True) -> str:
    """The summary as one JSON text for the index (bytes as Latin-1 strings: exact and
    compact); without C{wire}, leaving out the FETCH-ready C{envelope}, C{bodystructure} and
    C{body} (the index keeps those apart: L{wireFields})."""
    d = {"v": _JSON_VERSION}
    d.update(summary.__dict__)  # the fields, in their order
    if wire:
        d["envelope"] = summary.envelope.decode("latin-1")
        d["bodystructure"] = summary.bodystructure.decode("latin-1")
        d["body"] = summary.body.decode("latin-1")
    else:
        del d["envelope"], d["bodystructure"], d["body"]
    d["references"] = list(summary.references)
    return _ENCODER.encode(d)


def wireFields(summary: MessageSummary) -> tuple[bytes, bytes, bytes]:
    """The summary's C{(envelope, bodystructure, body)}: what L{toJSON} leaves out without
    C{wire}."""
    return summary.envelope, summary.bodystructure, summary.body


def fromJSON(text: str, wire: tuple | None = None) -> MessageSummary:
    """
    The inverse of L{toJSON}; C{wire} gives the L{wireFields} of a JSON text that lacks them.
    Raises ValueError for a text that is not a summary (or lacks fields C{wire} does not give).
    """
    d = json.loads(text)
    if not isinstance(d, dict) or d.pop("v", None) != _JSON_VERSION:
        raise ValueError("not a pymaild message summary")
    try:
        for i, name in enumerate(_BYTES_FIELDS):
            value = d.get(name)
            if value is None and wire is not None:
                d[name] = bytes(wire[i])
            else:
                d[name] = value.encode("latin-1")
        d["references"] = tuple(d["references"])
        return MessageSummary(**d)
    except (KeyError, TypeError, AttributeError, UnicodeEncodeError) as e:
        raise ValueError(f"not a pymaild message summary: {e}") from None
