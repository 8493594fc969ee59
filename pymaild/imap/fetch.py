# -*- test-case-name: tests.imap.test_fetch -*-
"""
FETCH: the request parser (with RFC 7162's CHANGEDSINCE/VANISHED modifiers and a nesting
limit) and the response writer's per-message formatting.

Twisted's own FETCH (C{IMAP4Server.spewMessage}) spends a reactor turn and a Deferred on every
attribute of every message, re-parses the internal date it formats, and loads nothing in
bulk.  pymaild answers FETCH itself: the server (L{pymaild.imap.server}) loads messages in
batches in the store's threads, L{renderMessage} turns each into response bytes, and the
server writes a batch at a time (streaming only sections over L{STREAM_ABOVE} from the file).

What the server gets from L{parseFetch}: a L{FetchRequest} with the attributes as Twisted's
C{_FetchParser} objects (its BODY section parser is correct and kept), whether MODSEQ was
asked, the CHANGEDSINCE value and the VANISHED flag, and what the batch loader has to provide
(C{needsSummaries}: ENVELOPE, BODYSTRUCTURE, BODY, or a section that needs the MIME tree).

A message handed to L{renderMessage} is duck-typed: C{meta} (the store's C{Message}: uid,
flags, keywords, modseq, vsize, internalDate), C{path} (the file) and C{summary} (the cached
C{MessageSummary} or None when the request did not need it).
"""

from __future__ import annotations

import os
import re
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import add, gt, mul

from twisted.mail import imap4

__all__ = ["FetchError", "FetchRequest", "parseFetch", "renderMessage", "renderFlagRun", "internalDate",
           "STREAM_ABOVE", "MAX_NESTING", "Stream"]

#: Sections larger than this are streamed from the file instead of read into memory (one read
#: and one line-end conversion of an attachment of a few hundred KB costs far less than
#: streaming it 64 KiB a reactor turn: FETCH BODY.PEEK[] of 10,000 office messages, 46% of whose
#: bytes are in messages over 64 KiB, went from ~300 to ~400 MB/s when this rose from 64 KiB)
STREAM_ABOVE = 1 << 20
#: Sections up to this size are read whole (then cut to a partial range); larger ones through
#: a converting reader.
READ_WHOLE = 4 << 20
#: Parentheses or brackets nested deeper than this in a FETCH are refused.  A legitimate
#: FETCH needs 3 (attribute list, BODY[HEADER.FIELDS (...)]) ; modifiers add one.
MAX_NESTING = 8

_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_NUMBER = re.compile(rb"^\d{1,19}$")


class FetchError(ValueError):
    """
    A malformed FETCH: the server answers C{BAD} with the message.
    """


@dataclass
class FetchRequest:
    items: list
    modseq: bool = False
    changedSince: int | None = None
    vanished: bool = False
    types: set = field(default_factory=set)

    @property
    def needsSummaries(self) -> bool:
        for item in self.items:
            if item.type in ("envelope", "bodystructure", "rfc822header", "rfc822text"):
                return True
            if item.type == "body" and (item.part or item.header or item.text or item.mime or not item.empty):
                return True
        return False

    @property
    def directFields(self) -> tuple[str, ...] | None:
        """
        When the summary is needed only for ENVELOPE, BODYSTRUCTURE or BODY: those field
        names (the store reads them without decoding whole summaries); None when sections need
        the MIME tree.
        """
        fields = []
        for item in self.items:
            if item.type in ("envelope", "bodystructure") and item.type not in fields:
                fields.append(item.type)
            elif item.type in ("rfc822header", "rfc822text"):
                return None
            elif item.type == "body":
                if not (item.header or item.text or item.mime or item.empty):
                    if "body" not in fields:
                        fields.append("body")
                elif item.part or not item.empty:
                    return None
        return tuple(fields)

    @property
    def marksSeen(self) -> bool:
        """
        RFC 3501 6.4.5: BODY[...] without .PEEK, RFC822 and RFC822.TEXT set \\Seen.
        """
        for item in self.items:
            if item.type in ("rfc822", "rfc822text"):
                return True
            if item.type == "body" and not item.peek and (item.empty or item.header or item.text or item.mime):
                return True
        return False

    @property
    def wantsFlags(self) -> bool:
        return "flags" in self.types

    @property
    def wantsDates(self) -> bool:
        """INTERNALDATE asked for (ALL and FULL too): only then are unknown dates read from the files."""
        return "internaldate" in self.types

    @property
    def flagsOnly(self) -> bool:
        """
        Only UID, FLAGS and MODSEQ (a client syncing flags: C{UID FETCH 1:* (FLAGS)}): the index
        rows' flags are all it reads, not sizes, dates or file names.
        """
        return self.types <= {"uid", "flags"} and not self.marksSeen


def _split(line: bytes) -> tuple[bytes, bytes]:
    """
    Split C{line} into the attribute part and what follows it (the modifiers), checking the
    nesting depth and the balance of parentheses and brackets.
    """
    depth = deepest = 0
    quoted = escaped = False
    end = None
    parenthesised = line[:1] == b"("
    for i, c in enumerate(line):
        if quoted:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                quoted = False
            continue
        if c == 0x22:
            quoted = True
        elif c in (0x28, 0x5B):  # ( [
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                raise FetchError(f"FETCH nested deeper than {MAX_NESTING}")
        elif c in (0x29, 0x5D):  # ) ]
            depth -= 1
            if depth < 0:
                raise FetchError("Unbalanced parentheses in FETCH")
            if depth == 0 and parenthesised and c == 0x29:
                end = i + 1
                break
        elif c == 0x20 and depth == 0 and not parenthesised:
            end = i
            break
    if quoted or (end is None and depth):
        raise FetchError("Unbalanced parentheses in FETCH")
    if end is None:
        end = len(line)
    return line[:end], line[end:].strip()


def _modifiers(text: bytes, request: FetchRequest) -> None:
    """
    RFC 7162: C{(CHANGEDSINCE <mod-sequence>)} and, with it, QRESYNC's C{VANISHED}.
    """
    if not text:
        return
    if not (text.startswith(b"(") and text.endswith(b")")):
        raise FetchError("Malformed FETCH modifiers")
    words = text[1:-1].split()
    i = 0
    while i < len(words):
        word = words[i].upper()
        if word == b"CHANGEDSINCE" and i + 1 < len(words) and _NUMBER.match(words[i + 1]):
            if request.changedSince is not None:
                raise FetchError("CHANGEDSINCE given twice")
            request.changedSince = int(words[i + 1])
            if request.changedSince >= 1 << 63:
                raise FetchError("CHANGEDSINCE out of range")
            i += 2
        elif word == b"VANISHED":
            request.vanished = True
            i += 1
        else:
            raise FetchError(f"Unknown FETCH modifier {words[i][:40]!r}")
    if request.vanished and request.changedSince is None:
        raise FetchError("VANISHED needs CHANGEDSINCE")  # RFC 7162 3.2.6
    if request.changedSince is not None:
        request.modseq = True  # RFC 7162 3.1.4.1: CHANGEDSINCE implies MODSEQ


def _withoutModseq(attributes: bytes) -> tuple[bytes, bool]:
    """
    Take the MODSEQ attribute (RFC 7162, unknown to Twisted's parser) out of the top level of
    the attribute list.
    """
    inner = attributes[1:-1] if attributes[:1] == b"(" else attributes
    tokens, depth, start = [], 0, 0
    for i, c in enumerate(inner + b" "):
        if c in (0x28, 0x5B):
            depth += 1
        elif c in (0x29, 0x5D):
            depth -= 1
        elif c == 0x20 and depth == 0:
            if i > start:
                tokens.append(inner[start:i])
            start = i + 1
    kept = [t for t in tokens if t.upper() != b"MODSEQ"]
    if len(kept) == len(tokens):
        return attributes, False
    return b"(" + b" ".join(kept) + b")", True


def parseFetch(line: bytes) -> FetchRequest:
    """
    Parse what follows the sequence set of a FETCH command.

    @raise FetchError: for anything malformed (the server answers C{BAD}).
    """
    line = line.strip()
    if not line:
        raise FetchError("FETCH needs attributes")
    attributes, rest = _split(line)
    request = FetchRequest(items=[])
    # MODSEQ (RFC 7162) is not in Twisted's parser: take it out and note it.
    attributes, request.modseq = _withoutModseq(attributes)
    if attributes in (b"()", b""):
        if not request.modseq:
            raise FetchError("FETCH needs attributes")
    else:
        parser = imap4._FetchParser()
        try:
            parser.parseString(attributes)
        except Exception as e:  # Twisted raises several types (and str/bytes mix-ups) on junk
            raise FetchError(f"Malformed FETCH attributes: {e}") from None
        if not parser.result:
            raise FetchError("FETCH needs attributes")
        request.items = parser.result
        _check(request.items, attributes)
    _modifiers(rest, request)
    request.types = {item.type for item in request.items}
    return request


#: FETCH attribute texts already parsed (what follows the sequence set, at most
#: PARSED_LONGEST bytes): a client sends the same few again and again, and parsing one with
#: Twisted's C{_FetchParser} was a tenth of a small FETCH's time on the reactor.  Shared by
#: every session (a parse depends on the text alone); emptied when PARSED_MAX are kept.
_parsed: dict[bytes, FetchRequest] = {}
PARSED_MAX = 256
PARSED_LONGEST = 300


def parseFetchCached(line: bytes) -> FetchRequest:
    """
    L{parseFetch}, from the texts parsed before when C{line} is one of them: a request of
    its own each time (the caller may add to its items and types), sharing the parsed items,
    which nothing changes.  Malformed texts are not kept (each raises L{FetchError} again).
    """
    parsed = _parsed.get(line)
    if parsed is None:
        parsed = parseFetch(line)
        if len(line) <= PARSED_LONGEST:
            if len(_parsed) >= PARSED_MAX:
                _parsed.clear()
            _parsed[line] = parsed
    return FetchRequest(items=list(parsed.items), modseq=parsed.modseq, changedSince=parsed.changedSince,
                        vanished=parsed.vanished, types=set(parsed.types))


_EMPTY_FIELDS = re.compile(rb"(?i)HEADER\.FIELDS(?:\.NOT)?\s*\(\s*\)")


def _check(items, text: bytes) -> None:
    """
    What RFC 3501's grammar refuses and Twisted's parser lets through.
    """
    if _EMPTY_FIELDS.search(text):
        raise FetchError("HEADER.FIELDS needs at least one field name")
    for item in items:
        if item.type != "body":
            continue
        if any(n < 0 for n in (item.part or ())):
            raise FetchError("Section part numbers start at 1")
        if item.mime and not item.part:
            raise FetchError("MIME needs a part number")
        if item.partialBegin is not None and not item.partialLength:
            raise FetchError("A partial fetch needs a length of at least 1")


def internalDate(t: float) -> bytes:
    """
    An INTERNALDATE in the server's time zone: C{"17-Jul-1996 02:44:25 -0700"}.
    """
    tm = time.localtime(t)
    off = tm.tm_gmtoff // 60
    sign = b"+" if off >= 0 else b"-"
    off = abs(off)
    return b'"%02d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec, sign, off // 60, off % 60,
    )


class Stream:
    """
    A section too large to build in memory: the server writes C{prefix} (the name), then
    streams C{section} (a L{pymaild.imap.mailbox.CRLFSection}) as a literal.
    """

    __slots__ = ("prefix", "section")

    def __init__(self, prefix: bytes, section):
        self.prefix = prefix
        self.section = section


def renderFlagRun(index, start: int, count: int, firstSeq: int, request: FetchRequest, uid: bool, modseq: bool,
                  recentRanges, changedSince: int | None = None) -> bytes:
    """
    The FETCH responses of a request for flags alone (L{FetchRequest.flagsOnly}) for C{count}
    consecutive messages of a folder's flag index (L{pymaild.store.maildir.FlagIndex}) from
    position C{start}, numbered from C{firstSeq}: the bytes L{renderMessage} gives for each,
    made without Python code per message (the columns are zipped and formatted at C speed).
    C{recentRanges}: the session's C{[low, high)} UID ranges with \\Recent; C{changedSince}
    leaves out messages whose MODSEQ is not above it.
    """
    end = start + count
    uids = index.uids[start:end]
    pieces, columns = [], [range(firstSeq, firstSeq + count)]
    if uid and "uid" not in request.types:
        pieces.append(b"UID %d")
        columns.append(uids)
    flagColumn = None
    for item in request.items:
        if item.type == "uid":
            pieces.append(b"UID %d")
            columns.append(uids)
        else:  # flags (flagsOnly allows nothing else)
            if flagColumn is None:
                flagColumn = _flagColumn(index, start, end, uids, recentRanges)
            pieces.append(b"FLAGS (%s)")
            columns.append(flagColumn)
    if modseq:
        pieces.append(b"MODSEQ (%d)")
        columns.append(index.modseqs[start:end])
    fmt = b"* %d FETCH (" + b" ".join(pieces) + b")\r\n"
    if changedSince is not None:
        keep = list(map(gt, index.modseqs[start:end], repeat(changedSince)))
        columns = [compress(column, keep) for column in columns]
    return b"".join(map(fmt.__mod__, zip(*columns)))


#: id(a flag index's C{pairs}) -> (that list, its length, its FLAGS texts): a folder's few
#: distinct flag pairs are formatted once per index, not at every FETCH of flags (a client
#: polling one message's flags paid for all of them).  The list is held, so its id is not
#: reused while it is a key; an index updated in place appends pairs (the length tells);
#: indexes made again get new lists (L{pymaild.store.maildir.Folder}).
_flagTexts: dict = {}
_FLAG_TEXTS_KEPT = 64


def _flagTable(pairs) -> list[bytes]:
    kept = _flagTexts.get(id(pairs))
    if kept is not None and kept[0] is pairs and kept[1] == len(pairs):
        return kept[2]
    table = [" ".join(sorted(frozenset(flags.split()) | frozenset(keywords.split()))).encode()
             for flags, keywords in pairs]
    if len(_flagTexts) >= _FLAG_TEXTS_KEPT:
        _flagTexts.clear()
    _flagTexts[id(pairs)] = (pairs, len(pairs), table)
    return table


def _flagColumn(index, start: int, end: int, uids, recentRanges) -> list[bytes]:
    """Each message's FLAGS text, as L{renderMessage} writes it (sorted, then \\Recent)."""
    table = _flagTable(index.pairs)
    codes = index.codes[start:end]
    recent = bytearray(len(codes))
    for low, high in recentRanges:
        i, j = bisect_left(uids, low), bisect_left(uids, high)
        recent[i:j] = b"\x01" * (j - i)
    if not any(recent):
        return list(map(table.__getitem__, codes))
    table = table + [(t + b" \\Recent" if t else b"\\Recent") for t in table]  # code + len(pairs): with \\Recent
    return list(map(table.__getitem__, map(add, codes, map(mul, recent, repeat(len(index.pairs))))))


#: a section read whole and longer than this is a piece of L{renderMessage}'s answer of its own
JOIN_ABOVE = 4096


def renderMessage(seq: int, msg, request: FetchRequest, uid: bool, modseq: bool, sectionOpener) -> list:
    """
    The pieces of one C{* n FETCH (...)} response, to be written in order: C{bytes}, or
    L{Stream} for a large section.  C{sectionOpener(path, start, end, length, skip, limit)}
    opens a CRLF section of the file.
    """
    meta = msg.meta
    out = [b"* %d FETCH (" % seq]
    items = []
    whole = 0  # bytes of sections read whole so far
    if uid and "uid" not in request.types:
        items.append(b"UID %d" % meta.uid)
    pieces = []  # (index in items, Stream) for large sections
    for item in request.items:
        t = item.type
        if t == "uid":
            items.append(b"UID %d" % meta.uid)
        elif t == "flags":
            flags = sorted(meta.flags | meta.keywords)
            if getattr(msg, "recent", False):
                flags.append("\\Recent")
            items.append(b"FLAGS (" + " ".join(flags).encode() + b")")
        elif t == "internaldate":
            items.append(b"INTERNALDATE " + internalDate(meta.internalDate))
        elif t == "rfc822size":
            items.append(b"RFC822.SIZE %d" % meta.vsize)
        elif t == "envelope":
            items.append(b"ENVELOPE " + msg.summary.envelope)
        elif t == "bodystructure":
            items.append(b"BODYSTRUCTURE " + msg.summary.bodystructure)
        else:
            section = _section(item, msg)
            if section is None:
                continue
            if isinstance(section, bytes):
                items.append(section)
                continue
            name, start, end, length, partial = section
            skip, limit = partial if partial is not None else (0, None)
            full = max(0, length - skip) if limit is None else min(limit, max(0, length - skip))
            if full > STREAM_ABOVE or whole + full > STREAM_ABOVE:
                # (the sections of one message read whole stay within STREAM_ABOVE together: a
                # FETCH naming BODY[] a thousand times streams them, it does not hold them all)
                # Twisted's FileProducer writes the literal's "{size}\r\n" itself
                pieces.append((len(items), Stream(name + b" ",
                                                  sectionOpener(msg.path, start, end, length, skip, limit))))
                items.append(None)
                continue
            whole += full
            if length <= READ_WHOLE:
                data = readSection(msg.path, start, end, skip, limit, meta.size)
            else:  # a small part of a large section: read through it, not into memory
                f = sectionOpener(msg.path, start, end, length, skip, limit)
                try:
                    data = f.read()
                finally:
                    f.close()
            items.append((name + b" {%d}\r\n" % len(data), data))  # (joined once, below: no copy here)
    if modseq:
        items.append(b"MODSEQ (%d)" % meta.modseq)
    # the small items joined; a section's bytes (over JOIN_ABOVE) stay a piece of their own, not
    # copied again between the read and the socket (the caller hands the pieces to sendmsg)
    current = [out[0]]
    result = []
    for i, item in enumerate(items):
        if i:
            current.append(b" ")
        if item is None:  # a large section: bytes up to it, the stream, then the rest
            stream = next(s for at, s in pieces if at == i)
            current.append(stream.prefix)
            result.append(b"".join(current))
            result.append(stream)
            current = []
        elif type(item) is tuple:
            if len(item[1]) > JOIN_ABOVE:
                current.append(item[0])
                result.append(b"".join(current))
                result.append(item[1])
                current = []
            else:
                current += item
        else:
            current.append(item)
    current.append(b")\r\n")
    result.append(b"".join(current))
    return result


#: section names by attribute object (the same few for every message of a FETCH)
_NAMES: dict[int, tuple] = {}


def _sectionName(item) -> bytes:
    """
    C{BODY[section]} as the client asked, field names in its own case (Twisted's C{getBytes}
    title-cases them and appends a partial suffix of its own).
    """
    numbers = b".".join(b"%d" % (n + 1) for n in (item.part or ()))
    if item.header:
        text = b"HEADER"
        if item.header.fields:
            fields = [f if isinstance(f, bytes) else f.encode() for f in item.header.fields]
            fields = [imap4._quote(f) if imap4._needsQuote(f) else f for f in fields]
            text += (b".FIELDS.NOT (" if item.header.negate else b".FIELDS (") + b" ".join(fields) + b")"
    elif item.text:
        text = b"TEXT"
    elif item.mime:
        text = b"MIME"
    else:
        text = b""
    return b"BODY[" + b".".join(p for p in (numbers, text) if p) + b"]"


def readSection(path, start: int, end: int, skip: int = 0, limit: int | None = None,
                size: int | None = None) -> bytes:
    """
    A small section of a message file (stored with LF line ends) as IMAP sends it: with CRLF
    line ends, then the partial range C{<skip.limit>} of that.  C{end} past 2**40: to the end
    of the file, whose C{size} the index gives (else an C{fstat}); the file is read to its end
    whatever its size turns out to be.
    """
    fd = os.open(path, os.O_RDONLY)  # a raw descriptor: Python's buffered open costs more
    try:
        if start:
            os.lseek(fd, start, os.SEEK_SET)
        chunks = []
        if end - start < 1 << 40:
            want = end - start
            while want > 0:
                chunk = os.read(fd, want)
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
        else:
            # one byte more than expected: a read that comes back short has met the end (a
            # regular file), so the usual file is read in one call, without an fstat
            want = (size if size is not None else os.fstat(fd).st_size) - start + 1
            while True:
                chunk = os.read(fd, max(want, 1))
                chunks.append(chunk)
                if len(chunk) < want:
                    break
                want = 65536
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    data = raw.replace(b"\n", b"\r\n")
    if skip or limit is not None:
        data = data[skip:] if limit is None else data[skip : skip + limit]
    return data


def _section(item, msg):
    """
    A section attribute as bytes (BODY, RFC822.*, HEADER.FIELDS, NIL for a missing part) or
    C{(name, start, end, length, partial)} for a byte range of the file.
    """
    summary = msg.summary
    if item.type == "rfc822":
        return (b"RFC822", 0, 1 << 62, msg.meta.vsize, None)
    if item.type == "rfc822header":
        top = summary.parts
        return (b"RFC822.HEADER", top["headerStart"], top["bodyStart"], top["headerVSize"], None)
    if item.type == "rfc822text":
        top = summary.parts
        return (b"RFC822.TEXT", top["bodyStart"], top["bodyEnd"], top["bodyVSize"], None)
    if item.type != "body":
        raise FetchError(f"Unsupported FETCH attribute {item.type}")
    if not (item.header or item.text or item.mime or item.empty):
        return b"BODY " + summary.body
    name = _NAMES.get(id(item))
    if name is None or name[0] is not item:
        name = _NAMES[id(item)] = (item, _sectionName(item))
        if len(_NAMES) > 256:
            _NAMES.clear()
    name = name[1]
    partial = (item.partialBegin, item.partialLength) if item.partialBegin is not None else None
    if partial is not None:
        name += b"<%d>" % item.partialBegin
    path = list(item.part or ())
    if item.empty and not path:
        return (name, 0, 1 << 62, msg.meta.vsize, partial)
    node = summary.parts
    for number in path:
        node = _child(node, number)
        if node is None:
            return name + b" NIL"
    if item.mime and path:
        return (name, node["headerStart"], node["bodyStart"], node["headerVSize"], partial)
    if item.empty:
        return (name, node["bodyStart"], node["bodyEnd"], node["bodyVSize"], partial)
    if path:  # HEADER/TEXT of a part: only a message/rfc822 part has them
        if node.get("kind") != "message":
            return name + b" NIL"
        node = node["parts"][0]
    if item.text:
        return (name, node["bodyStart"], node["bodyEnd"], node["bodyVSize"], partial)
    start, end = node["headerStart"], node["bodyStart"]
    if item.header.fields:
        data = headerFields(msg.path, start, end, item.header.fields, item.header.negate)
        if partial is not None:
            data = data[partial[0] : partial[0] + partial[1]]
        return name + b" {%d}\r\n" % len(data) + data
    return (name, start, end, node["headerVSize"], partial)


def _child(node, number: int):
    """
    Part C{number} (0-based) below C{node} in the summary's part tree (RFC 3501 6.4.5 section
    numbering): a multipart's parts; a message/rfc822 part's enclosed message's parts; a
    single part has only its own body as part 1.
    """
    kind = node.get("kind")
    if kind == "message":
        return _child(node["parts"][0], number)
    if kind == "multipart":
        parts = node.get("parts") or []
        return parts[number] if 0 <= number < len(parts) else None
    return node if number == 0 else None


_FIELD = re.compile(rb"^([^:\s]+)[ \t]*:", re.M)


def headerFields(path, start: int, end: int, fields, negate: bool) -> bytes:
    """
    The header lines (with their continuation lines) whose names are in C{fields} (or not, with
    C{negate}), as stored, with CRLF line ends and the blank line that ends a header.
    """
    wanted = {f.lower() if isinstance(f, bytes) else f.encode().lower() for f in fields}
    with open(path, "rb") as f:
        f.seek(start)
        header = f.read(end - start)
    out, keep = [], False
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        m = _FIELD.match(line)
        keep = m is not None and ((m.group(1).lower() in wanted) != negate)
        if keep:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out) + b"\r\n"
