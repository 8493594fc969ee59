# -*- test-case-name: tests.imap.test_search -*-
"""
The IMAP SEARCH evaluator (RFC 3501 section 6.4.4, RFC 9051 section 6.4.4 where it differs,
and the simple form of RFC 7162's MODSEQ key).

Twisted's C{IMAP4Server.arg_searchkeys} hands the mailbox's C{search(query, uid)} the result of
C{imap4.parseNestedParens}: a flat list whose items are C{bytes} tokens (atoms, quoted strings
with the quotes removed, literals), C{None} for an unquoted C{NIL}, and nested lists for
parenthesised groups (and, a Twisted quirk, for C{[...]}).  Quoted strings and atoms cannot be
told apart.  For example C{SEARCH OR FROM alice (UNSEEN LARGER 100) SUBJECT "x y"} arrives as::

    [b'OR', b'FROM', b'alice', [b'UNSEEN', b'LARGER', b'100'], b'SUBJECT', b'x y']

Twisted's quirks, as of 26.10, that the server (not this module) has to deal with: a literal
(C{SUBJECT {5}}) gets no continuation request and arrives as C{b""}; C{[x]} becomes a sublist
(so C{SUBJECT [PATCH]} is refused here as "not a parenthesised list"); C{\\\\} inside a quoted
string is not unescaped; C{do_SEARCH} does not pass CHARSET on to C{search()}; and for UID
SEARCH C{__cbSearch} maps the returned numbers through C{getUID}, so C{search()} must always
return sequence numbers.

L{compile} parses that once into a tree of predicates (raising L{SearchError}, a C{ValueError},
for anything malformed: the server answers C{BAD}, or C{NO [BADCHARSET (UTF-8 US-ASCII)]} when
C{code == "BADCHARSET"}).  The tree is evaluated in one of two ways, with the same answers:

- over a whole folder, in bulk: L{searchFolder} (what C{StoreMailbox.search} calls).  Each
  predicate's C{select} narrows a list of candidates with one loop over data loaded once for
  the folder: flag, keyword, size, date and MODSEQ keys over the index rows
  (C{Folder.messages()}), FROM/TO/CC/BCC/SUBJECT, SENT* and HEADER on a field the index keeps
  over one column of decoded header fields (C{Folder.headerFields()}: no summary is decoded);
  NOT/AND/OR combine the lists.  Keys that read the file (HEADER on another field, TEXT, BODY)
  go one message at a time, together, through one cursor.  A search on flags, sizes, dates or
  UIDs thus reads only the index's message rows.  TEXT and BODY first screen each file's raw
  bytes (L{excludedBy}): a plain message (L{_plainText}: no transfer or RFC 2047 encoding,
  ASCII in a charset that decodes ASCII to itself or 8-bit text whose characters fold apart
  from ASCII) whose lower-cased bytes lack a piece of the needle is not decoded; the others
  are decoded as in the per-message path.  With a folder that can (C{textMatches}), reading,
  screening and decoding run in the store's summary workers and the calling thread at once
  (L{matchText}, over the part offsets parsed from the file), no summary read.
- per message: C{predicate.matches(ctx)}, where C{ctx} is a L{SearchContext}: sequence number,
  UID, index metadata and lazy callables for the message summary, the raw header and the
  decoded text, so that a search on flags never opens a file and one on headers never decodes
  bodies.

This module imports nothing from pymaild.store (the layer rule): the folder and the summary
are duck-typed (C{headerFields}, C{parts}); RFC 2047 decoding comes from L{pymaild.mime}.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.parser
import email.policy
import email.utils
import functools
import io
import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pymaild.mime import bytesText, decodeBytes, decodeHeader, readWhole as _readWhole

__all__ = ["SearchError", "SearchContext", "MessageText", "Predicate", "compile", "search", "searchFolder",
           "readHeaderBytes", "readMessageText", "excludedBy", "SUPPORTED_CHARSETS", "MAX_TEXT"]

#: What C{NO [BADCHARSET (...)]} lists.
SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
#: The most bytes of one message read for TEXT/BODY (headers and parts together).
MAX_TEXT = 10 << 20
#: The most header bytes read for HEADER on a field the summary does not keep.
MAX_HEADER_BYTES = 1 << 20
#: Parenthesised groups nested deeper than this are refused.
MAX_NESTING = 32
#: NOT/OR chains deeper than this are refused (long left-nested OR chains, as clients build
#: them for "any of these senders", are legitimate; this only bounds recursion).
MAX_OPERATOR_DEPTH = 256
_MAX_NUMBER = (1 << 63) - 1  # number64 (RFC 9051), mod-sequence-value (RFC 7162)
_MAX_SEQ = (1 << 32) - 1  # nz-number


class SearchError(ValueError):
    """
    A malformed or unsupported SEARCH.  C{code} is an IMAP response code (C{"BADCHARSET"}) or
    None: the server answers C{NO [BADCHARSET (UTF-8 US-ASCII)]} for the former, C{BAD} with
    the message otherwise.
    """

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Text helpers: RFC 2047, case folding, transfer encodings
# --------------------------------------------------------------------------------------------

_bytesText = bytesText
_decodeBytes = decodeBytes


def decodeHeaderValue(raw: bytes) -> str:
    """A header value as text: unfolded, RFC 2047 encoded-words decoded (whitespace between
    adjacent encoded-words dropped), other 8-bit bytes read as UTF-8, else Latin-1."""
    return decodeHeader(raw)


def fold(s: str) -> str:
    """The form both sides of a substring match are compared in: case-folded (so C{"STRASSE"}
    finds C{"Straße"}), NFC-normalised, CRLF as LF."""
    if s.isascii():
        return s.lower().replace("\r\n", "\n")
    return unicodedata.normalize("NFC", s).casefold().replace("\r\n", "\n")


_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def _unbase64(data: bytes) -> bytes:
    """Forgiving base64: anything outside the alphabet is skipped, a ragged end is padded
    (a lone trailing sextet is dropped)."""
    data = _B64_JUNK.sub(b"", data)
    extra = len(data) % 4
    if extra == 1:
        data = data[:-1]
    elif extra:
        data += b"=" * (4 - extra)
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return b""


def _headerFields(raw: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, value bytes) of each field of a header block, in order; continuation
    lines stay in the value (L{decodeHeaderValue} unfolds)."""
    out: list[tuple[str, bytes]] = []
    for line in raw.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if out:
                out[-1] = (out[-1][0], out[-1][1] + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            continue
        out.append((name.strip().lower().decode("latin-1"), value))
    return out


_CONTINUATION = re.compile(r"\n(?=[ \t])")


_UNKNOWN = object()


def _decodeHeaderBlock(raw: bytes, plain=_UNKNOWN) -> str:
    """Every field of a header block as a C{name: value} line, lower-case names, values
    unfolded, decoded and stripped.  C{plain}: L{_plainHeader}C{(raw)} if known."""
    if plain is _UNKNOWN:
        plain = _plainHeader(raw)
    if plain is not None and raw.isascii() and b"=?" not in raw:
        # nothing to decode, every line a field or a continuation: unfold the whole block at
        # once (the same text as field by field below, at a fraction of the cost)
        out = []
        for line in _CONTINUATION.sub("", raw.decode("ascii").replace("\r\n", "\n")).split("\n"):
            name, colon, value = line.partition(":")
            name = name.strip()
            if colon and name:
                out.append(f"{name.lower()}: {value.strip()}")
        return "\n".join(out)
    return "\n".join(
        f"{name}: {decodeHeaderValue(value).strip()}" for name, value in _headerFields(raw))


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
#: a header block as the email package's parser reads it to its end: field lines (its
#: feedparser.headerRE, less the "From " line it treats apart) and their continuation lines
_CLEAN_HEADER = re.compile(rb"(?:[\041-\071\073-\176]*:[^\r\n]*(?:\r\n|\r|\n)(?:[ \t][^\r\n]*(?:\r\n|\r|\n))*)*")
_PARSED_NAMES = (b"content-type:", b"content-transfer-encoding:")


def _plainHeader(header: bytes) -> bytes | None:
    """
    C{header} up to its empty line if every line before it is a field or a continuation of
    one, with LF or CRLF line ends; else None.
    """
    end = _CLEAN_HEADER.match(header).end()
    if end == len(header) or header[end] not in b"\r\n":
        return None
    head = header[:end]
    if head.count(b"\r") != head.count(b"\r\n"):
        return None
    return head


def _parsedFields(header: bytes, plain=_UNKNOWN) -> bytes | None:
    """
    The Content-Type and Content-Transfer-Encoding fields of C{header} (with their
    continuation lines), if it is a L{_plainHeader}: the email parser then reads those fields
    from these lines exactly as from the whole header, at a fraction of the cost (a header has
    a dozen fields, Received and DKIM among them).  None for any other header (a stray line
    ends the parser's header early; lone CRs; no empty line): parse it whole.  C{plain}:
    L{_plainHeader}C{(header)} if known.
    """
    head = _plainHeader(header) if plain is _UNKNOWN else plain
    if head is None:
        return None
    low = head.lower()
    out = []
    for name in _PARSED_NAMES:
        start = low.find(name)
        while start >= 0:
            stop = start
            while True:  # the field's line and its continuation lines
                stop = head.find(b"\n", stop) + 1
                if stop == 0 or head[stop:stop + 1] not in (b" ", b"\t"):
                    break
            if stop == 0:
                stop = len(head)
            if start == 0 or head[start - 1] == 0x0A:  # at the start of a line
                out.append(head[start:stop])
            start = low.find(name, start + 1)
    return b"".join(out)


def _parseContent(header: bytes) -> tuple[str, str, str | None]:
    """(main type, transfer encoding, charset) of a part, as the email package's parser
    reads them from C{header}."""
    try:
        msg = _HEADER_PARSER.parsebytes(header)
        maintype = msg.get_content_maintype()
        cte = str(msg.get("content-transfer-encoding", "")).strip().lower()
        charset = msg.get_param("charset")
        if isinstance(charset, tuple):  # RFC 2231
            charset = email.utils.collapse_rfc2231_value(charset)
    except Exception:  # the header parser is tolerant; this is belt and braces
        return "text", "", None
    return maintype, cte, charset


#: L{_parseContent} of the L{_parsedFields} of plain headers: most parts of a mailbox say one
#: of a few things (C{text/plain; charset="utf-8"} and C{7bit} ...), and parsing costs more
#: than the rest of decoding a small part.  Cleared when full.
_CONTENT_CACHE: dict[bytes, tuple] = {}
_CONTENT_CACHE_SIZE = 4096


def _contentInfo(header: bytes, plain=_UNKNOWN) -> tuple[str, str, str | None]:
    """L{_parseContent} of a part's C{header} (from the cache when it is a plain one)."""
    try:
        fields = _parsedFields(header, plain)
    except Exception:  # belt and braces, as in _parseContent
        return "text", "", None
    if fields is None:
        return _parseContent(header)
    info = _CONTENT_CACHE.get(fields)
    if info is None:
        info = _parseContent(fields)
        if len(_CONTENT_CACHE) >= _CONTENT_CACHE_SIZE:
            _CONTENT_CACHE.clear()
        _CONTENT_CACHE[fields] = info
    return info


def _decodePart(header: bytes, body: bytes, plain=_UNKNOWN) -> str | None:
    """A leaf part's content as text (transfer encoding and charset decoded), or None for a
    non-text part (images, PDFs ...: their bytes are not searched, their MIME headers are)."""
    maintype, cte, charset = _contentInfo(header, plain)
    if maintype not in ("text", "message"):
        return None
    if cte == "base64":
        body = _unbase64(body)
    elif cte == "quoted-printable":
        body = binascii.a2b_qp(body)
    return _decodeBytes(body, charset).replace("\r\n", "\n")


class MessageText:
    """
    A message's text for TEXT and BODY: C{header} has every header block (the message's, each
    MIME part's and each encapsulated message's) unfolded and RFC 2047 decoded, one
    C{name: value} line per field; C{body} the decoded content of the text parts, one after
    another.  C{folded*} are the same in L{fold}ed form, computed once.  Given raw header
    C{blocks} (C{(bytes, L{_plainHeader} or _UNKNOWN)} pairs) instead of C{header}, the
    header text is decoded the first time it is asked for (TEXT looks at the body first, BODY
    only at the body).
    """

    __slots__ = ("_header", "_blocks", "body", "_folded")

    def __init__(self, header: str | None, body: str, blocks: list | None = None):
        self._header, self._blocks, self.body, self._folded = header, blocks, body, {}

    @property
    def header(self) -> str:
        if self._header is None:
            self._header = "\n".join(_decodeHeaderBlock(raw, plain) for raw, plain in self._blocks or ())
            self._blocks = None
        return self._header

    def __repr__(self) -> str:
        return f"MessageText(header={self.header!r}, body={self.body!r})"

    def folded(self, which: str) -> str:
        s = self._folded.get(which)
        if s is None:
            s = self._folded[which] = fold(getattr(self, which))
        return s


def readHeaderBytes(f, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The header of the message in binary file C{f} (from its current position to the empty
    line, at most C{limit} bytes)."""
    out = []
    total = 0
    for line in f:
        if line in (b"\n", b"\r\n"):
            break
        out.append(line)
        total += len(line)
        if total >= limit:
            break
    return b"".join(out)[:limit]


def readMessageText(f, parts: dict, limit: int = MAX_TEXT) -> MessageText:
    """
    The L{MessageText} of the message in seekable binary file C{f}, walking the summary's part
    tree (C{MessageSummary.parts}: C{kind}, C{headerStart}, C{bodyStart}, C{bodyEnd},
    C{parts}).  At most C{limit} bytes are read; what lies beyond is not searched.
    """
    budget = [limit]
    headers: list[tuple[bytes, Any]] = []
    bodies: list[str] = []

    def read(start: int, end: int) -> bytes:
        n = min(max(0, end - start), budget[0])
        if n <= 0:
            return b""
        f.seek(start)
        data = f.read(n)
        budget[0] -= len(data)
        return data

    def walk(part: dict, depth: int) -> None:
        if budget[0] <= 0:
            return
        header = read(part["headerStart"], part["bodyStart"])
        children = part.get("parts") or ()
        if part.get("kind") in ("multipart", "message") and children and depth < 200:
            headers.append((header, _UNKNOWN))
            for child in children:
                walk(child, depth + 1)
            return
        plain = _plainHeader(header)
        headers.append((header, plain))
        text = _decodePart(header, read(part["bodyStart"], part["bodyEnd"]), plain)
        if text is not None:
            bodies.append(text)

    walk(parts, 0)
    return MessageText(None, "\n".join(bodies), headers)


# --------------------------------------------------------------------------------------------
# Screening raw files (the bulk path): a needle absent from the bytes cannot be in the text
# --------------------------------------------------------------------------------------------

#: charsets that decode every ASCII byte string to itself (stateless, ASCII-compatible): the
#: lower-case spellings a screened message may name (tests check each against its codec)
_TRANSPARENT_CHARSETS = (
    b"us-ascii", b"ascii", b"utf-8", b"utf8", b"iso-8859-1", b"iso-8859-2", b"iso-8859-3",
    b"iso-8859-4", b"iso-8859-5", b"iso-8859-6", b"iso-8859-7", b"iso-8859-8", b"iso-8859-9",
    b"iso-8859-10", b"iso-8859-13", b"iso-8859-14", b"iso-8859-15", b"iso-8859-16", b"latin1",
    b"windows-1250", b"windows-1251", b"windows-1252", b"windows-1253", b"windows-1254",
    b"windows-1255", b"windows-1256", b"windows-1257", b"windows-1258", b"koi8-r", b"koi8-u",
)
#: those of them a message with 8-bit bytes may name: each decodes a byte string to the
#: characters of its UTF-8 or Latin-1 reading, or to U+FFFD (L{_plainText} checks both)
_EIGHT_BIT_CHARSETS = (b"us-ascii", b"ascii", b"utf-8", b"utf8", b"iso-8859-1", b"latin1")


def _charsetParam(names: tuple[bytes, ...]) -> re.Pattern:
    """A charset parameter whose value the header parser reads as exactly one of C{names}:
    C{charset=} at once, the name bare or in balanced quotes, then only blanks up to a C{;}
    or the end of the field (a line end not followed by a continuation line, or the data's
    end)."""
    alternatives = b"|".join(map(re.escape, names))
    return re.compile(rb'charset=(?:"(?:' + alternatives + rb')"|(?:' + alternatives
                      + rb'))[ \t]*(?:;|\r?\n(?![ \t])|\Z)')


_CHARSET_PARAM = _charsetParam(_TRANSPARENT_CHARSETS)
_CHARSET_PARAM_8BIT = _charsetParam(_EIGHT_BIT_CHARSETS)
_SEPARATE: dict[str, bool] = {}


def _foldsApart(c: str) -> bool:
    """Whether the non-ASCII character C{c} stays apart from ASCII when L{fold}ed: no
    combining mark (which NFC may compose with the letter before it), and its folded form
    has no ASCII character (as C{"ß"} -> C{"ss"}, KELVIN SIGN -> C{"k"}, GREEK QUESTION MARK
    -> C{";"} have)."""
    apart = _SEPARATE.get(c)
    if apart is None:
        apart = not unicodedata.category(c).startswith("M") and not any(x.isascii() for x in fold(c))
        if len(_SEPARATE) >= 1 << 16:
            _SEPARATE.clear()
        _SEPARATE[c] = apart
    return apart


_NON_ASCII = re.compile(r"[^\x00-\x7f]")
#: the bytes whose Latin-1 character does not fold apart (C{"ß"})
_LATIN1_JOINING = re.compile(b"[" + b"".join(
    re.escape(bytes([b])) for b in range(0x80, 0x100) if not _foldsApart(chr(b))) + b"]")


def _needleWords(needle: str) -> tuple[bytes, ...] | None:
    """
    The pieces of a L{fold}ed needle between blanks and colons, as ASCII bytes (the empty
    tuple if there are none), or None if the needle is not ASCII.  Decoding a plain message
    (L{_plainText}) only drops or inserts blanks, line ends and C{": "}, and lower-cases: so
    each piece of an occurrence lies in one stretch of the file's bytes.
    """
    if not needle.isascii():
        return None
    words, word = [], []
    for c in needle:
        if c.isspace() or c == ":":
            if word:
                words.append("".join(word).encode("ascii"))
                word = []
        else:
            word.append(c)
    if word:
        words.append("".join(word).encode("ascii"))
    return tuple(words)


def _plainText(data: bytes, low: bytes) -> str | None:
    """
    C{"ascii"} if the message C{data} (its whole file; C{low} is C{data.lower()}) decodes
    for TEXT/BODY (L{readMessageText}) to ASCII stretches of its own bytes: all bytes ASCII,
    no RFC 2047 encoded-word, no base64 or quoted-printable anywhere, and every charset
    parameter one that decodes ASCII to itself.  Then the decoded, folded text is the file's
    lower-cased bytes less some blanks and line ends, cut where fields and parts join, with
    C{"name: "} before each field value: no other character.

    C{"8bit"} if, with 8-bit bytes but otherwise as above, every charset parameter is one
    of L{_EIGHT_BIT_CHARSETS} and every non-ASCII character of the bytes read as UTF-8 (or
    Latin-1, which is what a part that is not UTF-8 is read as) L{_foldsApart}: then each
    ASCII stretch of the folded text is likewise in one ASCII stretch of the bytes (UTF-8,
    Latin-1 and U+FFFD map 8-bit bytes to non-ASCII characters only).

    None for any other message.
    """
    if (b"?" in data and b"=?" in data) or b"base64" in low or b"quoted-printable" in low:
        return None
    ascii = data.isascii()
    count = low.count(b"charset")
    if count and count != len((_CHARSET_PARAM if ascii else _CHARSET_PARAM_8BIT).findall(low)):
        return None
    if ascii:
        return "ascii"
    if _LATIN1_JOINING.search(data):
        return None
    for c in set(_NON_ASCII.findall(data.decode("utf-8", "replace"))):
        if not _foldsApart(c):
            return None
    return "8bit"


def excludedBy(data: bytes, needles: Iterable[str], words: dict | None = None) -> set[str]:
    """
    The L{fold}ed needles that cannot occur in the TEXT/BODY text of the message whose
    whole file is C{data}, as far as its bytes show without decoding: for a L{_plainText}
    message, an ASCII needle with a piece (L{_needleWords}) missing from the lower-cased
    bytes, and, if the message is all ASCII, a non-ASCII needle.  Others may occur (the
    text must be decoded to know).  C{words}: C{{needle: _needleWords(needle)}} if known.
    """
    low = data.lower()
    out = {}
    for needle in needles:
        pieces = words[needle] if words is not None else _needleWords(needle)
        if pieces is None or any(w not in low for w in pieces):
            out[needle] = pieces
    if not out:
        return set()
    kind = _plainText(data, low)
    if kind is None:
        return set()
    return {n for n, pieces in out.items() if kind == "ascii" or pieces is not None}


def matchText(needles: tuple[str, ...], headerToo: tuple[bool, ...], limit: int, data: bytes,
              parts: Callable[[], dict]) -> tuple[int, int]:
    """
    Which of the L{fold}ed C{needles} the TEXT/BODY text of a message holds, as L{Text}
    finds them: a bit mask of those in its body text, and one of those in its header text but
    not its body (looked for only where C{headerToo}: a TEXT key, not only BODY keys).  C{data}
    is the whole file (at most C{limit} bytes); it is screened first (L{excludedBy}) and
    decoded (L{readMessageText} over C{parts()}, the summary's part tree) only if a needle
    may be there.  What the summary workers run, a chunk of a folder at a time
    (C{Folder.textMatches}): a top-level function, so that a C{functools.partial} of it pickles.
    """
    excluded = excludedBy(data, needles)
    rest = [k for k, needle in enumerate(needles) if needle not in excluded]
    body = header = 0
    if rest:
        text = readMessageText(io.BytesIO(data), parts(), limit)
        for k in rest:
            if needles[k] in text.folded("body"):
                body |= 1 << k
            elif headerToo[k] and needles[k] in text.folded("header"):
                header |= 1 << k
    return body, header


# --------------------------------------------------------------------------------------------
# The per-message context
# --------------------------------------------------------------------------------------------

def _once(fn: Callable[[], Any]) -> Callable[[], Any]:
    if getattr(fn, "_searchOnce", False):
        return fn
    cache: list = []

    def call():
        if not cache:
            cache.append(fn())
        return cache[0]

    call._searchOnce = True
    return call


def _missing():
    raise RuntimeError("this SearchContext was built without that callable")


@dataclass
class SearchContext:
    """
    One message as a search sees it.

    @ivar seq: its sequence number in the session's view.
    @ivar uid: its UID.
    @ivar meta: the index's metadata (C{flags} frozenset of system flags such as C{"\\\\Seen"},
        C{keywords} frozenset, C{size}, C{vsize}, C{internalDate} seconds since the epoch,
        C{modseq}): C{pymaild.store.maildir.Message} or anything with those attributes.
    @ivar lastSeq: the highest sequence number (what C{*} means in a sequence set).
    @ivar lastUid: the highest UID (what C{*} means in C{UID} sets).
    @ivar summary: () -> the C{MessageSummary} (for C{headerFields}, C{parts}); called only
        when a key needs headers.
    @ivar headerBytes: () -> the raw header block, for HEADER on a field the summary does not
        keep.
    @ivar text: () -> L{MessageText}, for TEXT and BODY.

    The three callables are wrapped to run at most once.
    """

    seq: int
    uid: int
    meta: Any
    lastSeq: int
    lastUid: int
    summary: Callable[[], Any] = _missing
    headerBytes: Callable[[], bytes] = _missing
    text: Callable[[], MessageText] = _missing

    def __post_init__(self):
        self.summary = _once(self.summary)
        self.headerBytes = _once(self.headerBytes)
        self.text = _once(self.text)

    @classmethod
    def fromFile(cls, seq: int, meta, path, summary: Callable[[], Any], lastSeq: int,
                 lastUid: int, textLimit: int = MAX_TEXT) -> SearchContext:
        """
        A context for the message stored at C{path} (C{meta.uid} is its UID), with the
        summary from C{summary()} (the store's cached one).  Files are opened only if a key
        needs them.  For use in a store thread.
        """
        ctx = cls(seq=seq, uid=meta.uid, meta=meta, lastSeq=lastSeq, lastUid=lastUid,
                  summary=summary)

        def headerBytes():
            with open(path, "rb") as f:
                return readHeaderBytes(f)

        def text():
            parts = ctx.summary().parts
            with open(path, "rb") as f:
                return readMessageText(f, parts, textLimit)

        ctx.headerBytes = _once(headerBytes)
        ctx.text = _once(text)
        return ctx

    def field(self, name: str) -> str | None:
        """The decoded value of a header field the summary keeps (L{_SUMMARY_FIELDS}), or None
        if the message has no such field."""
        return self.summary().headerFields.get(name)

    def excludes(self, needle: str) -> bool:
        """Whether the message is known not to hold C{needle} (L{fold}ed) in its TEXT/BODY
        text without decoding it: never here (the per-message path decodes every text; the
        bulk path screens files first, L{_FolderCursor.excludes})."""
        return False

    def found(self, needle: str) -> tuple[bool, bool] | None:
        """Whether C{needle} is in the message's body text, and in its header text, if that is
        known already (the bulk path's L{_FolderCursor.found}); None here."""
        return None


#: L{_FolderCursor.each} searches the text of this many candidates at a time (L{find}: one call
#: of the summary workers, in pieces of a third; or L{screen}, where the summaries a chunk
#: lacks were made in one call: a first SEARCH TEXT of 10,000 messages, 3,748 summaries made,
#: took 1.9-2.3 s in chunks of 256 and 1.4-1.6 s in chunks of 4,096) ...
_SCREEN_CHUNK = 4096
#: ... and keeps at most this many bytes of their files for decoding.
_KEPT_BYTES = 8 << 20


class _Gone(Exception):
    """The message left the folder while it was being searched: it is not a match."""


class _FolderCursor:
    """
    The L{SearchContext} interface over a whole folder for L{searchFolder}: one object per
    search, not one per message.  Predicates take the candidates in bulk (L{Predicate.select},
    indices into C{view}); the keys that need one message at a time see the cursor moved to
    it (L{each}).  What a key needs is loaded for every message at once, the first time a key
    needs it: the index rows (flags, sizes, dates, MODSEQ) with C{folder.messages()}, one
    header field with C{folder.headerFields()} (one column of the index, no summary
    decoded), the file names with C{folder.paths()} (HEADER on a field the index does not
    keep, TEXT, BODY).  So a search on flags, sizes, dates or UIDs reads only the messages
    table; one on FROM/SUBJECT/... adds one column per field and decodes no summary.  For
    TEXT and BODY, L{screen} reads each file once and loads with C{folder.summaries()} (part
    offsets) only the summaries of the messages that may hold a needle.

    @ivar gone: indices of messages found missing from the folder while searching (no match,
        whatever the keys: L{searchFolder} leaves them out).
    """

    __slots__ = ("seq", "uid", "lastSeq", "lastUid", "view", "gone", "recent", "_folder", "_uids",
                 "_textLimit", "_metas", "_fields", "_summaries", "_paths", "_headerBytes", "_text",
                 "_screened", "_kept", "_found", "_bits", "_match")

    def __init__(self, folder, view: list[int], uids: list[int], textLimit: int):
        self._folder, self.view, self._uids, self._textLimit = folder, view, uids, textLimit
        self.lastSeq, self.lastUid = len(view), (view[-1] if view else 0)
        self.gone: set[int] = set()
        self.recent = _never
        self._metas = self._paths = None
        self._summaries: dict[int, Any] = {}
        self._fields: dict[str, dict[int, str]] = {}
        self._screened: dict[str, dict[int, bool]] = {}  # needle -> {index: excluded}
        self._kept: dict[int, bytes] = {}  # index -> file bytes read by screen(), for text()
        self._found: dict[int, tuple[int, int]] = {}  # index -> L{matchText}'s masks (L{find})
        self._bits: dict[str, int] = {}  # needle -> its bit in those masks
        self._match = None
        self.seq = self.uid = 0
        self._headerBytes = self._text = None

    # -- bulk --------------------------------------------------------------------------------

    def metas(self) -> dict:
        """C{{uid: index metadata}} of the whole folder (loaded once)."""
        if self._metas is None:
            self._metas = {m.uid: m for m in self._folder.messages()}
        return self._metas

    def column(self, name: str) -> dict[int, str]:
        """C{{uid: decoded value}} of header field C{name} (one the index keeps), loaded once."""
        column = self._fields.get(name)
        if column is None:
            column = self._fields[name] = self._folder.headerFields([name])[name]
        return column

    def each(self, predicate: Predicate, candidates: list[int]) -> list[int]:
        """The candidates that match C{predicate.matches}, the cursor moved to each in turn
        (after L{screen}ing them for the TEXT/BODY needles among its keys, a chunk at a time,
        so that the files read by the screen are kept for L{text} in bounded memory)."""
        needles = _textNeedles(predicate)
        step = _SCREEN_CHUNK if needles else max(1, len(candidates))
        out = []
        view, matches = self.view, predicate.matches
        for start in range(0, len(candidates), step):
            chunk = candidates[start:start + step]
            if needles and not self.find(predicate, needles, chunk):
                self.screen(needles, chunk)
            for i in chunk:
                self.seq, self.uid = i + 1, view[i]
                self._headerBytes = self._text = None
                try:
                    if matches(self):
                        out.append(i)
                except _Gone:
                    self.gone.add(i)
            self._kept.clear()
            self._found.clear()  # (memory bounded by a chunk, not by the folder)
        return out

    def screen(self, needles: set[str], candidates: list[int]) -> None:
        """
        Read the file of each candidate once and note which C{needles} it cannot hold
        (L{excludedBy}: no decoding); then load, in one call, the summaries (part offsets) of
        the candidates that may hold one, the only ones L{text} will be asked for, and keep
        their files' bytes for it (up to L{_KEPT_BYTES}).
        """
        todo = [n for n in needles if n not in self._screened]
        for n in todo:
            self._screened[n] = {}
        fresh = [i for i in candidates if any(i not in self._screened[n] for n in needles)]
        if not fresh:
            return
        paths = self.paths()
        view, limit, screened, wanted = self.view, self._textLimit, self._screened, []
        words = {n: _needleWords(n) for n in needles}
        kept = sum(map(len, self._kept.values()))
        for i in fresh:
            path = paths.get(view[i])
            data = None if path is None else _readWhole(path, limit)
            excluded = excludedBy(data, needles, words) if data is not None else ()
            for n in needles:
                screened[n][i] = n in excluded
            if len(excluded) < len(needles):
                if view[i] not in self._summaries:
                    wanted.append(view[i])
                if data is not None and kept + len(data) <= _KEPT_BYTES:
                    self._kept[i] = data
                    kept += len(data)
        if wanted:
            self._summaries.update(self._folder.summaries(wanted))

    def find(self, predicate: Predicate, needles: set[str], candidates: list[int]) -> bool:
        """
        Look for every TEXT/BODY needle of C{predicate} in the candidates at once, in the
        summary workers and this thread (C{folder.textMatches}, L{matchText}: each file read,
        screened, and decoded if need be, on every core), noting what each holds for L{found}.
        False (and nothing done) if the folder cannot; a message the workers did not answer
        for (a file over the limit, or one that could not be read) is left to L{text}.  The
        answers are kept for the chunk being evaluated (L{each} drops them after it).
        """
        textMatches = getattr(self._folder, "textMatches", None)
        if textMatches is None:
            return False
        order = tuple(sorted(needles))
        headerToo = _headerNeedles(predicate)
        wanted = tuple(n in headerToo for n in order)
        if self._match is None or self._match.args[:2] != (order, wanted):
            self._bits = {needle: k for k, needle in enumerate(order)}
            self._match = functools.partial(matchText, order, wanted, self._textLimit)
            self._found.clear()
        paths, view = self.paths(), self.view
        todo = {view[i]: i for i in candidates if i not in self._found}
        found = textMatches({uid: paths[uid] for uid in todo if uid in paths}, self._textLimit, self._match)
        for uid, masks in found.items():
            if masks is not None:
                self._found[todo[uid]] = masks
        return True

    def found(self, needle: str) -> tuple[bool, bool] | None:
        """Whether the current message's body text, and its header text, hold C{needle}, as
        L{find} found; None if it was not looked for that way."""
        masks = self._found.get(self.seq - 1)
        k = self._bits.get(needle)
        if masks is None or k is None:
            return None
        return bool(masks[0] >> k & 1), bool(masks[1] >> k & 1)

    def excludes(self, needle: str) -> bool:
        """Whether the current message was L{screen}ed and cannot hold C{needle}."""
        return self._screened.get(needle, {}).get(self.seq - 1, False)

    # -- the SearchContext interface, for the current message ------------------------------

    @property
    def meta(self):
        meta = self.metas().get(self.uid)
        if meta is None:
            raise _Gone()
        return meta

    def field(self, name: str) -> str | None:
        return self.column(name).get(self.uid)

    def summary(self):
        found = self._summaries.get(self.uid)
        return found if found is not None else self._folder.summary(self.uid)

    def paths(self) -> dict[int, str]:
        """C{{uid: file name}} of the messages searched (loaded once)."""
        if self._paths is None:
            self._paths = self._folder.paths(self._uids)
        return self._paths

    def _path(self):
        path = self.paths().get(self.uid)
        if path is None:
            raise _Gone()
        return path

    def _read(self, reader):
        """
        C{reader(path)} on the current message's file.  A file renamed since the names were
        read (a STORE meanwhile) is read where it is now, under the folder's lock
        (C{folder.withFile}); a message gone is not a match (L{_Gone}).
        """
        try:
            return reader(self._path())
        except FileNotFoundError:
            withFile = getattr(self._folder, "withFile", None)
            if withFile is None:
                raise _Gone() from None
            try:
                return withFile(self.uid, reader)
            except Exception as e:
                if getattr(e, "code", None) == "EXPUNGEISSUED":  # (the store's StoreError)
                    raise _Gone() from None
                raise

    def headerBytes(self) -> bytes:
        if self._headerBytes is None:
            self._headerBytes = self._read(_readHeader)
        return self._headerBytes

    def text(self) -> MessageText:
        if self._text is None:
            parts, limit = self.summary().parts, self._textLimit
            data = self._kept.pop(self.seq - 1, None)
            if data is None:
                data = _readWhole(self._path(), limit)  # (None if it cannot be read: _read then)
            if data is not None:  # the whole file, as the screen read it or in one read
                self._text = readMessageText(io.BytesIO(data), parts, limit)
            else:
                self._text = self._read(lambda path: _readText(path, parts, limit))
        return self._text


def _readHeader(path: str) -> bytes:
    with open(path, "rb") as f:
        return readHeaderBytes(f)


def _readText(path: str, parts, limit: int) -> MessageText:
    with open(path, "rb") as f:
        return readMessageText(f, parts, limit)


def _never(uid: int) -> bool:
    return False


def _textNeedles(predicate: Predicate) -> set[str]:
    """The non-empty needles of the TEXT and BODY keys in C{predicate}'s tree."""
    return {p.needle for p in _walk(predicate) if isinstance(p, Text) and p.needle}


def _headerNeedles(predicate: Predicate) -> set[str]:
    """The needles of the TEXT keys (not BODY: those look at the body alone) in C{predicate}'s
    tree."""
    return {p.needle for p in _walk(predicate) if isinstance(p, Text) and not p.bodyOnly and p.needle}


def _walk(predicate: Predicate):
    stack = [predicate]
    while stack:
        p = stack.pop()
        yield p
        if isinstance(p, Not):
            stack.append(p.child)
        elif isinstance(p, (And, Or)):
            stack.extend(p.children)


def searchFolder(predicate: Predicate, folder, view: list[int], textLimit: int = MAX_TEXT,
                 recent=None) -> list[int]:
    """
    The sequence numbers (positions in C{view}, 1-based) of the messages of C{view} (a
    session's UIDs, ascending) that match, evaluated over C{folder} in bulk (see
    L{_FolderCursor}).  C{folder} is duck-typed: C{uids()}, C{messages()},
    C{headerFields(names)}, C{summaries(uids)}, C{summary(uid)}, C{paths(uids)}, as
    C{pymaild.store.maildir.Folder} has them.  Messages of C{view} no longer in the folder are
    left out.  For use in a store thread.
    """
    present = set(folder.uids())
    candidates = [i for i, uid in enumerate(view) if uid in present]
    cursor = _FolderCursor(folder, view, [view[i] for i in candidates], textLimit)
    if recent is not None:
        cursor.recent = recent
    matched = predicate.select(cursor, candidates)
    return [i + 1 for i in matched if i not in cursor.gone]


# --------------------------------------------------------------------------------------------
# Predicates
# --------------------------------------------------------------------------------------------

# Evaluation cost classes: And/Or try cheap children first (no key has side effects).
_COST_META, _COST_SUMMARY, _COST_HEADER, _COST_TEXT = 0, 1, 2, 3


class Predicate:
    """A compiled search key.  C{matches(ctx)} says whether the message matches; C{cost} is
    what evaluating it may have to load (0 metadata, 1 summary, 2 header file, 3 text)."""

    cost = _COST_META

    def matches(self, ctx: SearchContext) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, cursor: _FolderCursor, candidates: list[int]) -> list[int]:
        """The C{candidates} (ascending indices into C{cursor.view}) that match, as a list in
        the same order.  By default one message at a time; the keys that can, override it
        with a loop over one bulk-loaded column."""
        return cursor.each(self, candidates)


class _MetaKey(Predicate):
    """A key on the index metadata alone: C{test(meta)}."""

    def test(self, meta) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def matches(self, ctx):
        return self.test(ctx.meta)

    def select(self, cursor, candidates):
        metas, view, test, out = cursor.metas(), cursor.view, self.test, []
        for i in candidates:
            meta = metas.get(view[i])
            if meta is None:
                cursor.gone.add(i)
            elif test(meta):
                out.append(i)
        return out


@dataclass(frozen=True)
class Const(Predicate):
    """ALL (always true)."""

    value: bool

    def matches(self, ctx):
        return self.value

    def select(self, cursor, candidates):
        return candidates if self.value else []


@dataclass(frozen=True)
class Recent(Predicate):
    """RECENT (and OLD, C{present=False}): the session's \\Recent messages (RFC 3501 2.3.2),
    which the server hands L{searchFolder} as C{recent}, a predicate on UIDs."""

    present: bool = True

    def matches(self, ctx):
        return bool(getattr(ctx, "recent", False)) == self.present

    def select(self, cursor, candidates):
        recent, view, present = cursor.recent, cursor.view, self.present
        return [i for i in candidates if recent(view[i]) == present]


@dataclass(frozen=True)
class Flag(_MetaKey):
    """ANSWERED/DELETED/DRAFT/FLAGGED/SEEN and their UN- forms."""

    flag: str
    present: bool = True

    def test(self, meta):
        return (self.flag in meta.flags) == self.present


@dataclass(frozen=True)
class Keyword(_MetaKey):
    """KEYWORD/UNKEYWORD: keywords compare case-insensitively; a system flag given as a
    keyword (C{KEYWORD \\Seen}, which some clients send) is looked up among the flags."""

    name: str
    present: bool = True

    def test(self, meta):
        wanted = self.name.lower()
        pool = meta.flags if wanted.startswith("\\") else meta.keywords
        found = any(k.lower() == wanted for k in pool)
        return found == self.present


@dataclass(frozen=True)
class SequenceSet(Predicate):
    """A sequence set (of sequence numbers, or of UIDs after the UID key).  C{ranges} holds
    (a, b) pairs with None for C{*}; resolved against lastSeq/lastUid at match time."""

    ranges: tuple
    uid: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def _resolved(self, last: int):
        spans = self._cache.get(last)
        if spans is None:
            spans = []
            for a, b in self.ranges:
                a = last if a is None else a
                b = last if b is None else b
                if a > b:
                    a, b = b, a
                spans.append((a, b))
            spans.sort()
            merged: list[list[int]] = []
            for a, b in spans:
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            spans = ([m[0] for m in merged], [m[1] for m in merged])
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[last] = spans
        return spans

    def matches(self, ctx):
        n, last = (ctx.uid, ctx.lastUid) if self.uid else (ctx.seq, ctx.lastSeq)
        starts, ends = self._resolved(last)
        i = bisect_right(starts, n) - 1
        return i >= 0 and n <= ends[i]


@dataclass(frozen=True)
class Size(_MetaKey):
    """LARGER n / SMALLER n, on RFC822.SIZE (the size with CRLF line ends)."""

    n: int
    larger: bool

    def test(self, meta):
        size = meta.vsize
        return size > self.n if self.larger else size < self.n


@dataclass(frozen=True)
class ModSeq(_MetaKey):
    """MODSEQ n (RFC 7162): the message's mod-sequence is n or more."""

    n: int

    def test(self, meta):
        return meta.modseq >= self.n


def _compareDates(op: str, have: datetime.date, want: datetime.date) -> bool:
    if op == "BEFORE":
        return have < want
    if op == "ON":
        return have == want
    return have >= want  # SINCE


def _internalDay(meta) -> datetime.date:
    # RFC 3501 disregards time and time zone; pymaild takes the internal date's UTC day.
    return datetime.datetime.fromtimestamp(meta.internalDate, datetime.timezone.utc).date()


@dataclass(frozen=True)
class InternalDate(_MetaKey):
    """BEFORE/ON/SINCE: the UTC day of the internal date."""

    op: str
    date: datetime.date

    def test(self, meta):
        return _compareDates(self.op, _internalDay(meta), self.date)


@dataclass(frozen=True)
class SentDate(Predicate):
    """SENTBEFORE/SENTON/SENTSINCE: the day written in the Date header, in the header's own
    time zone (time and zone disregarded).  A message whose Date is missing or unreadable is
    compared by its internal date, as Dovecot does (and as SORT DATE does)."""

    op: str
    date: datetime.date
    cost = _COST_SUMMARY

    def matches(self, ctx):
        raw = ctx.field("date")
        day = None
        if raw:
            parsed = email.utils.parsedate_tz(raw.split("\n", 1)[0])
            if parsed is not None:
                try:
                    day = datetime.date(parsed[0], parsed[1], parsed[2])
                except (ValueError, TypeError):
                    day = None
        if day is None:
            day = _internalDay(ctx.meta)
        return _compareDates(self.op, day, self.date)


# The fields MessageSummary.headerFields keeps (decoded, repeated ones joined by "\n").
_SUMMARY_FIELDS = frozenset(("from", "to", "cc", "bcc", "subject", "message-id", "in-reply-to",
                             "references", "date"))


@dataclass(frozen=True)
class Header(Predicate):
    """FROM, TO, CC, BCC, SUBJECT and HEADER name value: a case-insensitive substring of the
    decoded value of a field of the message's own header; an empty value matches every
    message that has the field at all.  C{needle} is already L{fold}ed."""

    name: str
    needle: str

    @property
    def cost(self):
        return _COST_SUMMARY if self.name in _SUMMARY_FIELDS else _COST_HEADER

    def matches(self, ctx):
        if self.name in _SUMMARY_FIELDS:
            value = ctx.field(self.name)
            if value is None:
                return False
            return not self.needle or self.needle in fold(value)
        values = [decodeHeaderValue(v).strip() for name, v in _headerFields(ctx.headerBytes())
                  if name == self.name]
        if not values:
            return False
        return not self.needle or any(self.needle in fold(v) for v in values)

    def select(self, cursor, candidates):
        if self.name not in _SUMMARY_FIELDS:
            return cursor.each(self, candidates)
        column, view, needle = cursor.column(self.name), cursor.view, self.needle
        out = []
        for i in candidates:
            value = column.get(view[i])
            if value is not None and (not needle or needle in fold(value)):
                out.append(i)
        return out


@dataclass(frozen=True)
class Text(Predicate):
    """TEXT (header or body) and BODY (body only): a case-insensitive substring of the
    decoded text (L{MessageText}).  C{needle} is already L{fold}ed."""

    needle: str
    bodyOnly: bool
    cost = _COST_TEXT

    def matches(self, ctx):
        if not self.needle:
            return True
        found = ctx.found(self.needle)
        if found is not None:
            return found[0] or (not self.bodyOnly and found[1])
        if ctx.excludes(self.needle):
            return False
        text = ctx.text()
        if self.needle in text.folded("body"):
            return True
        return not self.bodyOnly and self.needle in text.folded("header")


@dataclass(frozen=True)
class Not(Predicate):
    child: Predicate

    @property
    def cost(self):
        return self.child.cost

    def matches(self, ctx):
        return not self.child.matches(ctx)

    def select(self, cursor, candidates):
        if self.child.cost > _COST_SUMMARY:
            return cursor.each(self, candidates)
        matched = set(self.child.select(cursor, candidates))
        return [i for i in candidates if i not in matched]  # (cursor.gone is left out later)


@dataclass(frozen=True)
class And(Predicate):
    """A list of keys (the whole query, a parenthesised group): all must match.  C{keys} is
    the set of key names the whole query uses (set on the root: the server answers a query
    with C{"MODSEQ"} in it with the RFC 7162 C{(MODSEQ n)} response)."""

    children: tuple
    keys: frozenset = field(default=frozenset(), compare=False)

    @property
    def cost(self):
        return max((c.cost for c in self.children), default=_COST_META)

    def matches(self, ctx):
        for child in self.children:
            if not child.matches(ctx):
                return False
        return True

    def select(self, cursor, candidates):
        # The cheap keys (index rows, header columns) narrow the candidates in bulk, cheapest
        # first; the keys that read files go one message at a time, together, so that a
        # message's header or text is read once for all of them.
        rest = []
        for child in self.children:
            if child.cost > _COST_SUMMARY:
                rest.append(child)
            elif candidates:
                candidates = child.select(cursor, candidates)
        if rest and candidates:
            candidates = cursor.each(And(tuple(rest)), candidates)
        return candidates


@dataclass(frozen=True)
class Or(Predicate):
    """OR a b, with nested ORs flattened: any child must match."""

    children: tuple

    @property
    def cost(self):
        return max((c.cost for c in self.children), default=_COST_META)

    def matches(self, ctx):
        for child in self.children:
            if child.matches(ctx):
                return True
        return False

    def select(self, cursor, candidates):
        # As And: cheap keys in bulk, each on the messages no earlier key matched; then the
        # keys that read files, one message at a time, on what is left.
        matched: set[int] = set()
        remaining, rest = candidates, []
        for child in self.children:
            if child.cost > _COST_SUMMARY:
                rest.append(child)
            elif remaining:
                found = child.select(cursor, remaining)
                if found:
                    matched.update(found)
                    remaining = [i for i in remaining if i not in matched]
        if rest and remaining:
            matched.update(cursor.each(Or(tuple(rest)), remaining))
        return [i for i in candidates if i in matched]


def _byCost(children) -> tuple:
    return tuple(sorted(children, key=lambda c: c.cost))  # stable: ties keep query order


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_CONST_KEYS = {"ALL": True}
_HEADER_KEYS = {"FROM": "from", "TO": "to", "CC": "cc", "BCC": "bcc", "SUBJECT": "subject"}
_DATE_KEYS = {"BEFORE": (InternalDate, "BEFORE"), "ON": (InternalDate, "ON"),
              "SINCE": (InternalDate, "SINCE"), "SENTBEFORE": (SentDate, "BEFORE"),
              "SENTON": (SentDate, "ON"), "SENTSINCE": (SentDate, "SINCE")}
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")
_NUMBER = re.compile(r"[0-9]+\Z")
_SEQ_NUMBER = re.compile(r"(?:[1-9][0-9]*|\*)\Z")
_ATOM_SPECIALS = re.compile(r'[(){ %*"\\\]\x00-\x20\x7f]')
_ENTRY_TYPES = ("priv", "shared", "all")


def _display(token) -> str:
    if isinstance(token, list):
        return "(...)"
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else str(token)


def _normalize(token):
    """A token as bytes (or a list for a group): Twisted's tokens are bytes, None for an
    unquoted NIL (the atom "NIL"), and 1-tuples for literals before they are collapsed; str
    tokens (from tests or other callers) are UTF-8 encoded."""
    if isinstance(token, (bytes, list)):
        return token
    if token is None:
        return b"NIL"
    if isinstance(token, str):
        return token.encode("utf-8")
    if isinstance(token, tuple) and len(token) == 1 and isinstance(token[0], bytes):
        return token[0]
    if isinstance(token, (bytearray, memoryview)):
        return bytes(token)
    raise SearchError(f"unexpected search token {token!r}")


def parseSequenceSet(text: str) -> tuple:
    """
    C{"1:3,5,7:*"} -> C{((1, 3), (5, 5), (7, None))}: None stands for C{*}; a range may be
    given in either order.  Raises L{SearchError} for anything else (C{0}, numbers over
    4294967295, C{1:*:*}, empty items).
    """
    if not text:
        raise SearchError("empty sequence set")
    ranges = []
    for item in text.split(","):
        ends = item.split(":")
        if len(ends) > 2:
            raise SearchError(f"bad sequence range {item!r} in {text!r}")
        values = []
        for end in ends:
            if not _SEQ_NUMBER.match(end):
                raise SearchError(f"bad sequence number {end!r} in {text!r}")
            if end == "*":
                values.append(None)
            else:
                n = int(end)
                if n > _MAX_SEQ:
                    raise SearchError(f"sequence number {end} out of range in {text!r}")
                values.append(n)
        ranges.append((values[0], values[-1]))
    return tuple(ranges)


class _Parser:
    def __init__(self):
        self.keys: set[str] = set()

    # -- arguments ---------------------------------------------------------------------------

    @staticmethod
    def _next(items: list, pos: int, key: str, what: str):
        if pos >= len(items):
            raise SearchError(f"{key} needs {what}")
        return _normalize(items[pos])

    def _string(self, items, pos, key, what="a string") -> str:
        token = self._next(items, pos, key, what)
        if isinstance(token, list):
            raise SearchError(f"{key} needs {what}, not a parenthesised list")
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            raise SearchError(f"{key}: the search string is not valid UTF-8") from None

    def _number(self, items, pos, key) -> int:
        text = self._string(items, pos, key, "a number")
        if not _NUMBER.match(text):
            raise SearchError(f"{key} needs a number, not {text!r}")
        n = int(text)
        if n > _MAX_NUMBER:
            raise SearchError(f"{key}: number {text} is too large")
        return n

    def _date(self, items, pos, key) -> datetime.date:
        text = self._string(items, pos, key, "a date (like 1-Feb-2025)")
        m = _DATE.match(text)
        month = _MONTHS.get(m.group(2).lower()) if m else None
        if month is None:
            raise SearchError(f"{key} needs a date like 1-Feb-2025, not {text!r}")
        try:
            return datetime.date(int(m.group(3)), month, int(m.group(1)))
        except ValueError:
            raise SearchError(f"{key}: no such date {text!r}") from None

    # -- keys --------------------------------------------------------------------------------

    def keyList(self, items: list, parens: int, ops: int) -> Predicate:
        if not items:
            raise SearchError("empty search" if parens == 0 else "empty parenthesised group")
        children = []
        pos = 0
        while pos < len(items):
            predicate, pos = self.key(items, pos, parens, ops)
            if isinstance(predicate, And):  # a group inside a list: same meaning, flattened
                children.extend(predicate.children)
            else:
                children.append(predicate)
        if len(children) == 1 and parens > 0:
            return children[0]
        return And(_byCost(children))

    def key(self, items: list, pos: int, parens: int, ops: int) -> tuple[Predicate, int]:
        token = _normalize(items[pos])
        pos += 1
        if isinstance(token, list):
            if parens + 1 > MAX_NESTING:
                raise SearchError(f"search keys nested more than {MAX_NESTING} deep")
            return self.keyList(token, parens + 1, ops), pos
        try:
            word = token.decode("ascii")
        except UnicodeDecodeError:
            raise SearchError(f"unknown search key {_display(token)!r}") from None
        if word[:1].isdigit() or word[:1] == "*":
            self.keys.add("SEQUENCE")
            return SequenceSet(parseSequenceSet(word)), pos
        name = word.upper()
        self.keys.add(name)
        if name in _CONST_KEYS:
            return Const(_CONST_KEYS[name]), pos
        if name in ("RECENT", "OLD"):
            return Recent(name == "RECENT"), pos
        if name == "NEW":  # RFC 3501: RECENT UNSEEN
            return And((Recent(True), Flag(*_FLAG_KEYS["UNSEEN"]))), pos
        if name in _FLAG_KEYS:
            return Flag(*_FLAG_KEYS[name]), pos
        if name in _HEADER_KEYS:
            return Header(_HEADER_KEYS[name], fold(self._string(items, pos, name))), pos + 1
        if name == "HEADER":
            field_ = self._string(items, pos, name, "a field name")
            if not field_ or _ATOM_SPECIALS.search(field_) or ":" in field_:
                raise SearchError(f"HEADER: bad field name {field_!r}")
            value = self._string(items, pos + 1, name, "a field name and a string")
            return Header(field_.lower(), fold(value)), pos + 2
        if name in ("BODY", "TEXT"):
            return Text(fold(self._string(items, pos, name)), name == "BODY"), pos + 1
        if name in _DATE_KEYS:
            cls, op = _DATE_KEYS[name]
            return cls(op, self._date(items, pos, name)), pos + 1
        if name in ("LARGER", "SMALLER"):
            return Size(self._number(items, pos, name), name == "LARGER"), pos + 1
        if name in ("KEYWORD", "UNKEYWORD"):
            kw = self._string(items, pos, name, "a keyword")
            if not kw or _ATOM_SPECIALS.search(kw.lstrip("\\")):
                raise SearchError(f"{name}: bad keyword {kw!r}")
            return Keyword(kw, name == "KEYWORD"), pos + 1
        if name == "UID":
            text = self._string(items, pos, name, "a sequence set")
            return SequenceSet(parseSequenceSet(text), uid=True), pos + 1
        if name == "MODSEQ":
            # MODSEQ [entry-name entry-type-req] mod-sequence-valzer: the entry is ignored
            # (pymaild keeps one mod-sequence per message).
            first = self._string(items, pos, name, "a mod-sequence")
            if not _NUMBER.match(first):
                kind = self._string(items, pos + 1, name, "an entry type and a mod-sequence")
                if kind.lower() not in _ENTRY_TYPES:
                    raise SearchError(f"MODSEQ: bad entry type {kind!r}")
                pos += 2
            return ModSeq(self._number(items, pos, name)), pos + 1
        if name in ("NOT", "OR"):
            if ops + 1 > MAX_OPERATOR_DEPTH:
                raise SearchError(f"NOT/OR nested more than {MAX_OPERATOR_DEPTH} deep")
            if pos >= len(items):
                raise SearchError(f"{name} needs {'a search key' if name == 'NOT' else 'two search keys'}")
            a, pos = self.key(items, pos, parens, ops + 1)
            if name == "NOT":
                return (a.child if isinstance(a, Not) else Not(a)), pos
            if pos >= len(items):
                raise SearchError("OR needs two search keys")
            b, pos = self.key(items, pos, parens, ops + 1)
            children = []
            for c in (a, b):
                children.extend(c.children if isinstance(c, Or) else (c,))
            return Or(_byCost(children)), pos
        raise SearchError(f"unknown search key {word!r}")


def _checkCharset(charset) -> None:
    if charset is None:
        return
    if isinstance(charset, (bytes, bytearray)):
        charset = bytes(charset).decode("ascii", "replace")
    name = charset.strip().strip('"').upper()
    if name not in SUPPORTED_CHARSETS:
        raise SearchError(f"unsupported charset {charset}", code="BADCHARSET")


def compile(query, *, charset=None) -> And:
    """
    Parse Twisted's SEARCH token list (see the module docstring) into a predicate.

    @param charset: the C{CHARSET} argument (Twisted's C{do_SEARCH} receives it but does not
        pass it to C{search}); UTF-8 and US-ASCII, in any case, are accepted (strings are read
        as UTF-8 in both cases).  If C{query} itself starts with C{CHARSET x} that is used.
    @return: an L{And} over the top-level keys; its C{keys} names the keys used.
    @raise SearchError: malformed (C{code} None) or unsupported charset (C{"BADCHARSET"}).
    """
    if isinstance(query, (bytes, str)):
        raise SearchError("the query must be Twisted's token list, not a string")
    items = list(query)
    if (charset is None and items and not isinstance(items[0], list)
            and _normalize(items[0]).upper() == b"CHARSET"):
        if len(items) < 2:
            raise SearchError("CHARSET needs a charset name")
        charset = _normalize(items[1])
        if isinstance(charset, list):
            raise SearchError("CHARSET needs a charset name")
        items = items[2:]
    _checkCharset(charset)
    parser = _Parser()
    root = parser.keyList(items, 0, 0)
    return And(root.children, frozenset(parser.keys))


def search(predicate: Predicate, contexts: Iterable[SearchContext]) -> list[int]:
    """The sequence numbers of the contexts that match, in order.  (Twisted's C{__cbSearch}
    maps sequence numbers to UIDs itself for UID SEARCH, so C{search(query, uid)} returns
    sequence numbers either way.)"""
    return [ctx.seq for ctx in contexts if predicate.matches(ctx)]
