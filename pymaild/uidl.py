"""
POP3 UIDLs (RFC 1939 7) from C{[pop3] uidl_format}: the configuration checks the format with
L{checkUidlFormat} when it loads, the POP3 mailbox formats each message's UIDL with
L{formatUidl}.  The variables are Dovecot's (C{pop3_uidl_format}), so a site moving from Dovecot
can keep its clients' UIDLs.
"""

from __future__ import annotations

import hashlib
import re

_FORMAT = re.compile(r"%(?:(0?)(\d*)([Xx]?)([uvf%]))")


def checkUidlFormat(fmt: str) -> str:
    """
    Validate a C{[pop3] uidl_format}: text with C{%u} (UID), C{%v} (UIDVALIDITY), C{%f} (the
    Maildir base name) and C{%%}, each optionally with Dovecot's width and hex modifiers
    (C{%08Xu}).  It must name the message for good: C{%f}, or C{%u} with C{%v} (UIDs alone start over
    when UIDVALIDITY changes).

    @raise ValueError: with the reason.
    """
    if not isinstance(fmt, str):
        raise ValueError("expected a string")
    rest = _FORMAT.sub("", fmt)
    if "%" in rest:
        raise ValueError("unknown % sequence (known: %u, %v, %f, %%, with width and X like %08Xu)")
    found = {m.group(4) for m in _FORMAT.finditer(fmt)}
    if "f" not in found and not {"u", "v"} <= found:
        # a UID alone is given again after a UIDVALIDITY change (an index rebuilt)
        raise ValueError("must contain %f (the Maildir file name), or %u (the UID) with %v (the UIDVALIDITY)")
    if any(not 0x21 <= ord(c) <= 0x7E for c in rest):
        raise ValueError("may contain only printable ASCII without spaces (RFC 1939 7)")
    return fmt


_VALID = re.compile(r"[\x21-\x7e]{1,70}")


def formatUidl(fmt: str, uid: int, uidvalidity: int, base: str) -> bytes:
    """
    The UIDL of one message.  A result RFC 1939 does not allow (empty, longer than 70
    characters, or outside 0x21-0x7E) is replaced by the SHA-1 of itself in hex: still stable,
    still unique.
    """

    def one(m: re.Match) -> str:
        zero, width, hexa, what = m.groups()
        if what == "%":
            return "%"
        if what == "f":
            text = base
        else:
            value = uid if what == "u" else uidvalidity
            text = format(value, "X" if hexa == "X" else "x" if hexa == "x" else "d")
        if width:
            text = text.rjust(int(width), "0" if zero else " ")
        return text

    text = base if fmt == "%f" else _FORMAT.sub(one, fmt)
    if _VALID.fullmatch(text):
        return text.encode("ascii")
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest().encode("ascii")
