"""
Tests for L{pymaild.store.names}: modified UTF-7, validation of hostile names, and the mapping
between IMAP names and Maildir++ directories as Dovecot lays them out.

The expected directory names in L{LAYOUT} were produced by Dovecot 2.3.19 itself
(C{mail_location = maildir:~}, separator C{/}, the listescape plugin) creating each folder
over IMAP; the modified UTF-7 in L{MUTF7} agrees with C{doveadm mailbox mutf7}.
"""

from __future__ import annotations

import random

import pytest

from pymaild.store.names import (
    MAX_DIRECTORY_BYTES,
    MAX_LEVELS,
    MAX_NAME_LENGTH,
    InvalidName,
    decodeMUTF7,
    encodeMUTF7,
    fromDirectory,
    toDirectory,
    validate,
)

MUTF7 = [
    ("", ""),
    ("INBOX", "INBOX"),
    ("Sent Items", "Sent Items"),
    ("a&b", "a&-b"),
    ("&", "&-"),
    ("&&", "&-&-"),
    ("Entwürfe", "Entw&APw-rfe"),
    ("äöü", "&AOQA9gD8-"),
    ("ä-ö x ü", "&AOQ--&APY- x &APw-"),
    ("&ä", "&-&AOQ-"),
    ("ä&", "&AOQ-&-"),
    ("日本語/メール", "&ZeVnLIqe-/&MOEw,DDr-"),
    ("😀", "&2D3eAA-"),
    ("\xa0", "&AKA-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("\uffff", "&,,8-"),
    ("tab\there", "tab&AAk-here"),
]


@pytest.mark.parametrize("text, encoded", MUTF7)
def test_encode(text, encoded):
    """
    Printable ASCII stands for itself, C{&} is C{&-}, and each run of anything else is one
    C{&...-} sequence of modified base64 over UTF-16 (astral characters as surrogate pairs).
    """
    assert encodeMUTF7(text) == encoded


@pytest.mark.parametrize("text, encoded", MUTF7)
def test_decode(text, encoded):
    """
    Decoding is the exact reverse of encoding.
    """
    assert decodeMUTF7(encoded) == text


@pytest.mark.parametrize(
    "encoded, reason",
    [
        ("&", "unterminated"),
        ("abc&AOQ", "unterminated"),
        ("&AOQ-&APY-", "two adjacent"),
        ("&AEE-", "printable ASCII encoded"),
        ("&ACY-", "printable ASCII encoded"),
        ("&AOQAQQ-", "printable ASCII encoded"),
        ("&2D0-", "unpaired surrogate"),
        ("&3gA-", "unpaired surrogate"),
        ("&AOQA-", "truncated"),
        ("&A-", "truncated"),
        ("&AO-", "truncated"),
        ("&AOR-", "truncated"),
        ("&,,,-", "truncated"),
        ("&AOQ_-", "'_' in a modified UTF-7 sequence"),
        ("&AOQ/-", "'/' in a modified UTF-7 sequence"),
        ("&AOQ=-", "'=' in a modified UTF-7 sequence"),
        ("&AO&Q-", "'&' in a modified UTF-7 sequence"),
        ("Entwürfe", "non-ASCII character"),
        ("a\x01", "control character U+0001"),
        ("a\x7f", "control character U+007F"),
        ("a\nb", "control character U+000A"),
    ],
)
def test_decode_strict(encoded, reason):
    """
    Anything that is not the canonical modified UTF-7 of some name is refused, saying why:
    an unterminated or truncated sequence, characters outside modified base64, non-zero
    padding bits, lone surrogates, encoded printable ASCII, two sequences in a row, and raw
    characters outside printable ASCII.
    """
    with pytest.raises(InvalidName) as caught:
        decodeMUTF7(encoded)
    assert reason in str(caught.value)
    assert str(caught.value).startswith("Invalid mailbox name: ")


def test_encode_lone_surrogate():
    """
    A string that is not valid Unicode (a lone surrogate, as C{surrogateescape} makes) cannot
    be encoded.
    """
    with pytest.raises(InvalidName):
        encodeMUTF7("a\udcff")


def test_decode_control_characters_then_validate():
    """
    Encoded control characters are valid modified UTF-7 (they are not printable), but
    L{validate} refuses the decoded name.
    """
    assert decodeMUTF7("&AAA-") == "\x00"
    with pytest.raises(InvalidName, match="U\\+0000"):
        validate(decodeMUTF7("&AAA-"))


def test_invalid_name_is_value_error():
    """
    L{InvalidName} is a L{ValueError} whose C{reason} is the message without the prefix.
    """
    error = InvalidName("'..' is not allowed")
    assert isinstance(error, ValueError)
    assert str(error) == "Invalid mailbox name: '..' is not allowed"
    assert error.reason == "'..' is not allowed"


@pytest.mark.parametrize(
    "name, normal",
    [
        ("INBOX", "INBOX"),
        ("inbox", "INBOX"),
        ("InBoX", "INBOX"),
        ("inbox/Sub", "INBOX/Sub"),
        ("Inbox/inbox", "INBOX/inbox"),
        ("Sub/INBOX", "Sub/INBOX"),
        ("INBOXes", "INBOXes"),
        ("Sent", "Sent"),
        ("new", "new"),
        ("cur/tmp", "cur/tmp"),
        ("a.b", "a.b"),
        ("a..", "a.."),
        ("a~b", "a~b"),
        ("~x", "~x"),
        ("Entwürfe", "Entwürfe"),
        ("a&b", "a&b"),
        ("with space", "with space"),
        (" ", " "),
        ("[Gmail]/All Mail", "[Gmail]/All Mail"),
        ("😀", "😀"),
        ("x" * 254, "x" * 254),
        ("/".join("a" * MAX_LEVELS), "/".join("a" * MAX_LEVELS)),
    ],
)
def test_validate_accepts(name, normal):
    """
    Ordinary names pass unchanged, except that a first level of INBOX in any case is spelt
    C{INBOX}.
    """
    assert validate(name) == normal


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "the name is empty"),
        ("/", "empty hierarchy level"),
        ("a//b", "empty hierarchy level"),
        ("/a", "empty hierarchy level"),
        ("a/", "empty hierarchy level"),
        ("INBOX/", "empty hierarchy level"),
        (".", "'.' is not allowed"),
        ("..", "'..' is not allowed"),
        ("a/../b", "'..' is not allowed"),
        ("a/./b", "'.' is not allowed"),
        ("../../etc", "'..' is not allowed"),
        (".foo", "may not start with '.'"),
        ("a/.foo", "may not start with '.'"),
        ("...", "may not start with '.'"),
        ("a\x00b", "control character U+0000"),
        ("a\rb", "control character U+000D"),
        ("a\nb", "control character U+000A"),
        ("\x1b[31m", "control character U+001B"),
        ("a\x7f", "control character U+007F"),
        ("a\x85", "control character U+0085"),
        ("a\udcff", "not valid Unicode"),
        ("a\\b", "'\\' is not allowed"),
        ("a\\2eb", "'\\' is not allowed"),
        ("a*", "'*' is not allowed"),
        ("a%", "'%' is not allowed"),
        ("x" * (MAX_NAME_LENGTH + 1), f"longer than {MAX_NAME_LENGTH} characters"),
        ("x" * 255, "too long"),
        ("ä" * 100, "too long"),
        ("a." * 70, "too long"),
        ("/".join("a" * (MAX_LEVELS + 1)), f"more than {MAX_LEVELS} hierarchy levels"),
    ],
)
def test_validate_refuses(name, reason):
    """
    Hostile or unusable names are refused with a reason the client can read: empty names and
    levels, C{.} and C{..} and leading dots, control characters, lone surrogates, the escape
    character, wildcards, and names too long or too deep.
    """
    with pytest.raises(InvalidName) as caught:
        validate(name)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["a\r\n* BYE", "\x1b]0;evil\x07", "ä\x00" * 300, "\u202e/../x"],
)
def test_message_is_safe(name):
    """
    Whatever the name, the error message is one short line of printable ASCII that can be put
    in an IMAP response.
    """
    with pytest.raises(InvalidName) as caught:
        validate(name)
    message = str(caught.value)
    assert message.isascii() and message.isprintable()
    assert len(message) < 120


def test_validate_not_text():
    """
    A name that is not a string (bytes, say) is refused, not mangled.
    """
    with pytest.raises(InvalidName):
        validate(b"INBOX")


LAYOUT = [
    ("INBOX", ""),
    ("Sent", ".Sent"),
    ("A/B", ".A.B"),
    ("INBOX/Sub", ".INBOX.Sub"),
    ("Entwürfe", ".Entw&APw-rfe"),
    ("v1.2", ".v1\\2e2"),
    ("~tilde", ".\\7etilde"),
    ("x/~y", ".x.\\7ey"),
    ("c~d", ".c~d"),
    ("a&b", ".a&-b"),
    ("Ünter/Ördner.x", ".&ANw-nter.&ANY-rdner\\2ex"),
    ("a..", ".a\\2e\\2e"),
    ("new", ".new"),
    ("日本語/メール", ".&ZeVnLIqe-.&MOEw,DDr-"),
]


@pytest.mark.parametrize("name, directory", LAYOUT)
def test_to_directory(name, directory):
    """
    INBOX is the root; other folders are C{.}-joined levels in modified UTF-7 with C{.} and a
    leading C{~} escaped as Dovecot's listescape plugin escapes them.
    """
    assert toDirectory(name) == directory


@pytest.mark.parametrize("name, directory", LAYOUT)
def test_from_directory(name, directory):
    """
    Each directory Dovecot made reads back as the IMAP name it was made for.
    """
    assert fromDirectory(directory) == name


@pytest.mark.parametrize(
    "name, directory",
    [("inbox", ""), ("Inbox/Sub", ".INBOX.Sub"), ("inbox/inbox", ".INBOX.inbox")],
)
def test_to_directory_normalises(name, directory):
    """
    L{toDirectory} validates and normalises its argument itself.
    """
    assert toDirectory(name) == directory


@pytest.mark.parametrize("name", ["..", "a/../b", ".x", "a\x00", "", "a//b", "*"])
def test_to_directory_refuses(name):
    """
    L{toDirectory} refuses what L{validate} refuses.
    """
    with pytest.raises(InvalidName):
        toDirectory(name)


@pytest.mark.parametrize(
    "directory",
    [
        ".",
        "..",
        "cur",
        "new",
        "tmp",
        "Sent",
        "dovecot-uidlist",
        "maildirsize",
        "...",
        "..Sent",
        ".Sent.",
        ".a..b",
        ".INBOX",
        ".inbox.Sub",
        ".Inbox",
        ".\\2edot",
        ".ba\\5cck",
        ".x\\41",
        ".v1\\2E2",
        ".c\\7ed",
        ".\\7E",
        ".\\00",
        ".a\\2",
        ".Entwürfe",
        ".Entw&APw",
        ".&AOQ-&APY-",
        ".&AEE-",
        ".\\26AOQ-",
        ".a*",
        ".a%",
        ".a\x01",
        ".a\udcff",
        ".a\ud800",
        "." + "x" * 255,
        "." + ".".join("a" * (MAX_LEVELS + 1)),
    ],
)
def test_from_directory_refuses(directory):
    """
    Directory entries that are not folders pymaild could have made are refused, so that
    listing skips them: maildir subdirectories and files, names without the leading dot,
    empty levels, INBOX spelt as a folder, escapes pymaild does not write (upper-case hex,
    escaped ordinary characters, escaped backslash), non-canonical or non-ASCII modified
    UTF-7, wildcards and control characters.
    """
    with pytest.raises(InvalidName):
        fromDirectory(directory)


def _randomName(rng: random.Random) -> str:
    """
    A random valid-looking name from an alphabet rich in characters that need encoding or
    escaping.
    """
    alphabet = "aZ09 -_&~.,+[]()'\"!#$^{}|ä€ßÜ日本\xa0\u0100\ufffd\U0001f600\U0010fffd"
    levels = rng.randint(1, 4)
    parts = []
    for _ in range(levels):
        part = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if part.startswith("."):
            part = "x" + part
        parts.append(part)
    return "/".join(parts)


ROUND_TRIP = [name for name, _ in LAYOUT] + [
    "INBOX/INBOX",
    "&-",
    "a&-b",
    "&AOQ-",
    "~",
    "~/~",
    "a~",
    "x.~",
    "v..2",
    "Papierkorb (alt)",
    "a" * 254,
    "/".join("ab" for _ in range(MAX_LEVELS)),
]


@pytest.mark.parametrize("seed", range(8))
def test_round_trip_and_containment(seed):
    """
    For a table of tricky names and a few hundred random ones, C{fromDirectory(toDirectory(n))}
    is C{validate(n)}, and every directory name is one safe path component directly under the
    user's root: not empty (except INBOX), starting with C{.}, not C{.} or C{..}, without
    C{/} or NUL, printable ASCII, and at most L{MAX_DIRECTORY_BYTES} bytes.
    """
    rng = random.Random(seed)
    names = ROUND_TRIP + [_randomName(rng) for _ in range(100)]
    checked = 0
    for name in names:
        try:
            normal = validate(name)
        except InvalidName:
            continue
        directory = toDirectory(name)
        assert fromDirectory(directory) == normal, name
        checked += 1
        if normal == "INBOX":
            assert directory == ""
            continue
        assert directory.startswith(".") and directory not in (".", "..")
        assert "/" not in directory and "\x00" not in directory
        assert directory.isascii() and directory.isprintable()
        assert len(directory.encode()) <= MAX_DIRECTORY_BYTES
        assert ".." not in directory and not directory.endswith(".")
    assert checked > 80


def test_distinct_names_distinct_directories():
    """
    Two different normalised names never share a directory.
    """
    rng = random.Random(99)
    seen: dict[str, str] = {}
    for name in ROUND_TRIP + [_randomName(rng) for _ in range(500)]:
        try:
            normal = validate(name)
        except InvalidName:
            continue
        directory = toDirectory(normal)
        assert seen.setdefault(directory, normal) == normal
