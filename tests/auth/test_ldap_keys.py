"""
The text form of an entry's stable key (L{pymaild.auth.ldap._keyText}): every byte value at the
edges of "printable ASCII", so that a key is never stored under another text than before.
"""

from __future__ import annotations

from pymaild.auth.ldap import _keyText


def _expected(raw: bytes) -> str:
    """The rule, spelled out: the text itself when every byte is 32 to 126, else C{x} and hex."""
    if raw and all(32 <= b < 127 for b in raw):
        return raw.decode("ascii")
    return "x" + raw.hex()


def test_every_byte_value_alone_and_inside_a_key():
    for b in range(256):
        for raw in (bytes([b]), b"uuid-" + bytes([b]) + b"-end", bytes([b]) * 16):
            assert _keyText(raw) == _expected(raw), raw


def test_the_edges_of_printable_ascii():
    assert _keyText(b" ~") == " ~"  # (32 and 126: kept)
    assert _keyText(b"a\x7f") == "x617f"  # (DEL: hex)
    assert _keyText(b"a\x1f") == "x611f"
    assert _keyText(b"\xc3\xa9") == "xc3a9"  # (UTF-8 text is not ASCII: hex)
    assert _keyText(b"") == "x"
