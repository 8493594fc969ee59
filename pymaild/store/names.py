# -*- test-case-name: tests.store.test_names -*-
"""
IMAP folder names and the Maildir++ directories that hold them.

Folders are laid out as Dovecot lays them out with C{mail_location = maildir:~} (the Maildir++
layout), an inbox namespace whose IMAP hierarchy separator is C{/}, and the C{listescape}
plugin with its default escape character C{\\}::

    IMAP name       directory under the user's root
    INBOX           ""  (the root itself: cur/ new/ tmp/)
    Sent            .Sent
    A/B             .A.B
    INBOX/Sub       .INBOX.Sub
    Entwürfe        .Entw&APw-rfe       (modified UTF-7, RFC 3501 section 5.1.3)
    v1.2            .v1\\2e2             ('.' is Maildir++'s separator, so it is escaped)
    ~x              .\\7ex               (Dovecot escapes '~' at the start of a component)

Every directory name this module makes is one path component directly under the user's root
that starts with C{.}; nothing a client sends can name a directory anywhere else.

User-supplied names are hostile: L{validate} refuses what could escape the user's directory
or confuse other Maildir++ tools, and L{fromDirectory} refuses every directory name that
L{toDirectory} could not have made, so that listing skips foreign junk.

The functions here work on Unicode names: the IMAP front-end decodes the modified UTF-7 it
receives with L{decodeMUTF7} and encodes what it sends with L{encodeMUTF7}.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "InvalidName",
    "MAX_DIRECTORY_BYTES",
    "MAX_LEVELS",
    "MAX_NAME_LENGTH",
    "SEPARATOR",
    "decodeMUTF7",
    "encodeMUTF7",
    "fromDirectory",
    "toDirectory",
    "validate",
]

SEPARATOR = "/"
"""The IMAP hierarchy separator."""

MAX_NAME_LENGTH = 512
"""The longest IMAP name accepted, in characters (checked before any encoding)."""

MAX_DIRECTORY_BYTES = 255
"""The longest directory name, in bytes: the usual file system limit for one component."""

MAX_LEVELS = 32
"""The deepest hierarchy accepted, in components (C{A/B/C} has three)."""

_ESCAPE = "\\"
_MAILDIR_SEPARATOR = "."
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}
_ESCAPED = re.compile(r"\\([0-9a-fA-F]{2})")
_WILDCARDS = "*%"


class InvalidName(ValueError):
    """
    A mailbox name or directory name that pymaild refuses.

    C{str(error)} is meant for the IMAP client: C{"Invalid mailbox name: <reason>"}, plain
    ASCII without control characters, whatever the name contained.

    @ivar reason: what is wrong, without the prefix.
    """

    def __init__(self, reason: str):
        super().__init__(f"Invalid mailbox name: {reason}")
        self.reason = reason


def _show(text: str, limit: int = 40) -> str:
    """
    C{text} quoted for an error message: ASCII only, control characters escaped, and cut
    after C{limit} characters, so that a hostile name cannot break the protocol line.
    """
    if len(text) > limit:
        return ascii(text[:limit])[:-1] + "...'"
    return ascii(text)


# -- modified UTF-7 ------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    bits = 0
    value = 0
    out = []
    for byte in data:
        value = (value << 8) | byte
        bits += 8
        while bits >= 6:
            bits -= 6
            out.append(_B64[(value >> bits) & 0x3F])
    if bits:
        out.append(_B64[(value << (6 - bits)) & 0x3F])
    return "".join(out)


def encodeMUTF7(name: str) -> str:
    """
    Encode a Unicode mailbox name in modified UTF-7 (RFC 3501 section 5.1.3).

    Printable ASCII stands for itself, C{&} becomes C{&-}, and every run of other characters
    becomes C{&<modified base64 of UTF-16BE>-}.

    @raise InvalidName: C{name} is not valid Unicode (a lone surrogate).
    """
    out = []
    run: list[str] = []

    def flush() -> None:
        if run:
            try:
                data = "".join(run).encode("utf-16-be")
            except UnicodeEncodeError:
                raise InvalidName("the name is not valid Unicode") from None
            out.append("&" + _b64encode(data) + "-")
            run.clear()

    for char in name:
        if "\x20" <= char <= "\x7e":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


def _decodeRun(encoded: str) -> str:
    """
    The characters of one shifted run (the text between C{&} and C{-}), strictly.
    """
    value = 0
    bits = 0
    data = bytearray()
    for char in encoded:
        digit = _B64_VALUE.get(char)
        if digit is None:
            raise InvalidName(f"{_show(char)} in a modified UTF-7 sequence")
        value = (value << 6) | digit
        bits += 6
        if bits >= 8:
            bits -= 8
            data.append((value >> bits) & 0xFF)
            value &= (1 << bits) - 1
    if bits >= 6 or value != 0 or len(data) % 2:
        raise InvalidName("truncated modified UTF-7 sequence")
    try:
        text = data.decode("utf-16-be")
    except UnicodeDecodeError:
        raise InvalidName("unpaired surrogate in a modified UTF-7 sequence") from None
    if any("\x20" <= char <= "\x7e" for char in text):
        raise InvalidName("printable ASCII encoded in modified UTF-7")
    return text


def decodeMUTF7(name: str) -> str:
    """
    Decode a modified UTF-7 mailbox name (RFC 3501 section 5.1.3), strictly.

    @raise InvalidName: C{name} is not the canonical modified UTF-7 of any name: a character
        outside printable ASCII, an unterminated or empty C{&} sequence (other than C{&-}),
        a character outside modified base64, bits left over, a lone surrogate, printable
        ASCII encoded, or one encoded sequence directly after another.
    """
    out = []
    i = 0
    length = len(name)
    previousEncoded = False
    while i < length:
        char = name[i]
        if char == "&":
            end = name.find("-", i + 1)
            if end < 0:
                raise InvalidName("unterminated '&' sequence in modified UTF-7")
            if end == i + 1:
                out.append("&")
                previousEncoded = False
            else:
                if previousEncoded:
                    raise InvalidName("two adjacent modified UTF-7 sequences")
                out.append(_decodeRun(name[i + 1 : end]))
                previousEncoded = True
            i = end + 1
            continue
        if not "\x20" <= char <= "\x7e":
            if char < "\x20" or char == "\x7f":
                raise InvalidName(f"control character U+{ord(char):04X} is not allowed")
            raise InvalidName("non-ASCII character in modified UTF-7")
        out.append(char)
        previousEncoded = False
        i += 1
    return "".join(out)


# -- validation ----------------------------------------------------------------------------


def _checkComponent(component: str) -> None:
    if component == "":
        raise InvalidName("empty hierarchy level (leading, trailing or doubled '/')")
    if component in (".", ".."):
        raise InvalidName(f"{_show(component)} is not allowed")
    if component.startswith("."):
        raise InvalidName("a name may not start with '.'")
    for char in component:
        category = unicodedata.category(char)
        if category == "Cc":
            raise InvalidName(f"control character U+{ord(char):04X} is not allowed")
        if category == "Cs":
            raise InvalidName("the name is not valid Unicode")
        if char == _ESCAPE:
            raise InvalidName("'\\' is not allowed")
        if char in _WILDCARDS:
            raise InvalidName(f"{char!r} is not allowed")


def _normalise(name: str) -> str:
    """
    C{name} with a first level of C{INBOX} in any case spelt C{INBOX}, and checked, except
    for the length of the directory name.
    """
    if not isinstance(name, str):
        raise InvalidName("the name is not text")
    if name == "":
        raise InvalidName("the name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"longer than {MAX_NAME_LENGTH} characters")
    components = name.split(SEPARATOR)
    if len(components) > MAX_LEVELS:
        raise InvalidName(f"more than {MAX_LEVELS} hierarchy levels")
    for component in components:
        _checkComponent(component)
    if components[0].upper() == "INBOX":
        components[0] = "INBOX"
    return SEPARATOR.join(components)


def validate(name: str) -> str:
    """
    Check and normalise a mailbox name a user gave (already decoded from modified UTF-7).

    C{INBOX} in any case is INBOX, also as the first level of a longer name
    (C{"inbox/Sub"} becomes C{"INBOX/Sub"}); nothing else changes (no Unicode normalisation:
    Dovecot does none either).

    Refused: the empty name; empty levels (C{a//b}, a leading or trailing C{/}); levels C{.}
    and C{..} and levels starting with C{.}; control characters (C0, DEL and C1), lone
    surrogates, C{\\} (the escape character on disk) and the IMAP wildcards C{*} and C{%};
    more than L{MAX_NAME_LENGTH} characters, more than L{MAX_LEVELS} levels, or a directory
    name longer than L{MAX_DIRECTORY_BYTES} bytes.

    @return: the normalised name.
    @raise InvalidName: with the reason, for the client.
    """
    normal = _normalise(name)
    _directory(normal)
    return normal


def _escapeComponent(component: str) -> str:
    encoded = encodeMUTF7(component).replace(".", "\\2e")
    if encoded.startswith("~"):
        encoded = "\\7e" + encoded[1:]
    return encoded


def _directory(normal: str) -> str:
    if normal == "INBOX":
        return ""
    directory = "".join(
        _MAILDIR_SEPARATOR + _escapeComponent(c) for c in normal.split(SEPARATOR)
    )
    if len(directory.encode("ascii")) > MAX_DIRECTORY_BYTES:
        raise InvalidName(f"the name is too long (over {MAX_DIRECTORY_BYTES} bytes on disk)")
    return directory


def toDirectory(name: str) -> str:
    """
    The directory under the user's root that holds the folder C{name}.

    C{name} is validated first (see L{validate}); C{"INBOX"} gives C{""}, the root itself.
    Every other result is one path component that starts with C{.}: each level is encoded
    in modified UTF-7, C{.} becomes C{\\2e} and a leading C{~} becomes C{\\7e} (as Dovecot's
    listescape plugin writes them), and levels are joined with C{.}.

    @raise InvalidName: C{name} is not a valid mailbox name.
    """
    return _directory(validate(name))


def fromDirectory(dirname: str) -> str:
    """
    The folder a directory under the user's root holds: the reverse of L{toDirectory}.

    C{""} is INBOX.  Anything else must be exactly what L{toDirectory} makes of some valid
    name: a leading C{.}, no empty level, only the escapes L{toDirectory} writes, canonical
    modified UTF-7, and a valid name once decoded.

    @raise InvalidName: C{dirname} is not a folder directory pymaild could have made (such
        as C{cur}, C{..}, C{.a..b}, C{.INBOX}, C{.x\\41}); listing skips these.
    """
    if dirname == "":
        return "INBOX"
    if not dirname.startswith(_MAILDIR_SEPARATOR) or dirname in (".", ".."):
        raise InvalidName(f"{_show(dirname)} is not a folder directory")
    if len(dirname) > MAX_DIRECTORY_BYTES:
        raise InvalidName(f"{_show(dirname)} is too long")
    components = []
    for part in dirname[1:].split(_MAILDIR_SEPARATOR):
        unescaped = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), part)
        components.append(decodeMUTF7(unescaped))
    name = _normalise(SEPARATOR.join(components))
    if _directory(name) != dirname:
        raise InvalidName(f"{_show(dirname)} is not in canonical form")
    return name
