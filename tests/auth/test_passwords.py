"""
Tests for L{pymaild.auth.passwords}.

The vectors below are real Dovecot hashes, made by Dovecot 2.3.19.1 (Debian 12's
C{dovecot-core}) with C{doveadm pw -s SCHEME -p PASSWORD}, and each was checked with
C{doveadm pw -t HASH -p PASSWORD} (verified) and with a wrong password (mismatch). The
"N-byte salt" SSHA vectors were built with hashlib, for salt sizes passlib refuses, and
checked the same way with C{doveadm pw -t}. The tests do not need doveadm to run.

The reverse direction, a L{hash_password} result accepted by C{doveadm pw -t}, was checked by
hand with the same Dovecot for NON_ASCII, PUNCT and an ASCII password.

Argon2 with 64 MiB costs ~0.1 s per hash here, so the tests keep Argon2 operations few.
"""

from __future__ import annotations

import pytest

from pymaild.auth.passwords import (
    SUPPORTED_SCHEMES,
    UnknownScheme,
    hash_password,
    needs_rehash,
    verify,
)

NON_ASCII = "pässwörd €"
# Every ASCII punctuation mark but the colon (the passwd-file field separator), and a space.
PUNCT = "s3cret!#$%&'()*+,-./;<=>?@[\\]^_`{|}~ \"q"

# (label, password, stored password field)
VECTORS = [
    ('ARGON2ID', NON_ASCII, '{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$wbBUuqmBrhiwBAuGcFhZeQ$ZdhhLN/4OMu6o80fwPkKv6xS54P4Cg7QJ03ZzdLU+sg'),
    ('ARGON2ID', PUNCT, '{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$tsTUseiVkFvSrK8YXe/H6A$UZLK7nEiBxILUjVoADkSY0YYZcdzA8XtEukhGCAadRE'),
    ('ARGON2I', NON_ASCII, '{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$SNb3QX/gTD5fGGVrwjyZZg$2KenzzCVUmmFhDCv6alopeMcZ466Mj56Y71RfcRRAvY'),
    ('ARGON2I', PUNCT, '{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$z0CELkw67RShC2EoAjr/mQ$QT5NKP+KMIXPIXYeuI3U9rK9ZOeFouU1/qfmRQ8/RCQ'),
    ('BLF-CRYPT', NON_ASCII, '{BLF-CRYPT}$2y$05$aZeeP8NSpJ31IcrVGIir0es/KkhktLfYtFvKzT80yMYvQwnXgAZ92'),
    ('BLF-CRYPT', PUNCT, '{BLF-CRYPT}$2y$05$mP0Xef.fVbwUkdCNhJDpFOdOFvbtFxUZsQ0QdY9ifPymRQGRyCM7q'),
    ('SHA512-CRYPT', NON_ASCII, '{SHA512-CRYPT}$6$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.xhzuqDHHOwYMeVcCIsbjHqxsP6YEm987tvgJhj7nl1'),
    ('SHA512-CRYPT', PUNCT, '{SHA512-CRYPT}$6$f20nBvgU/JBOKSNo$S6OEv1pFmQG0sDBzwH2tRlqCCGs8sCXWrMuZ5uCqawExCl/9tyIxN3xpvr//u2OSV9xmiXfDlG6CkFvPzPP.40'),
    ('SHA256-CRYPT', NON_ASCII, '{SHA256-CRYPT}$5$R91uubQLZuI8KSnj$PHErwZwhKK2UmqLfYABynAWvTxSZCbmOLsoTJag6VDA'),
    ('SHA256-CRYPT', PUNCT, '{SHA256-CRYPT}$5$e4tJf.YosKFLr5FT$Whv.4bHQvTwEnpiJG380wqBukcW.BF8uvlqziAqxRs6'),
    ('MD5-CRYPT', NON_ASCII, '{MD5-CRYPT}$1$wRXKfMSc$86G/8Zlo5FfCjT/PZjcCQ/'),
    ('MD5-CRYPT', PUNCT, '{MD5-CRYPT}$1$wdX7gprv$3eAkdZXyeFiA6lesmZozW0'),
    ('CRYPT', NON_ASCII, '{CRYPT}$2y$05$.Kwpi.uAH8L1GvY96AncruT7x1t2SEPOlJxb9fNHQmMVbp0RB8qdO'),
    ('CRYPT', PUNCT, '{CRYPT}$2y$05$nAbVPVAJBFbX91QN2lVs6eWU5Bl1USjckkNkBJ934Xe.2HfMC/llu'),
    ('SSHA512', NON_ASCII, '{SSHA512}OveS5r3Y9V3HBB57YONciJujux75Rm3xb/m64awOrRS2EcXGljkB3My/ytt7ZYn7BoUEjZ+8NjEJMUrawYPoqNHxGZg='),
    ('SSHA512', PUNCT, '{SSHA512}zqtPAWE99gzF+aoo4/CfIE7ue3c8KSmf1GcochQbKLgRGbtkkhdFBrh9R3bEDePHiHT5ML4kuROqIKrTbD6ixrdgQEA='),
    ('SSHA256', NON_ASCII, '{SSHA256}8gSaJrKhUW5N0qTFIPE7p0CuV1LBMxjcSNMXhnkkWPkapr5N'),
    ('SSHA256', PUNCT, '{SSHA256}78IyNXJcSAlog31Lox20nWwpxl0J98+BnmrRfS5nvh1kEwR3'),
    ('SSHA', NON_ASCII, '{SSHA}sz8/dfBF8BMMXoUzGET4oxUt1GyENbVO'),
    ('SSHA', PUNCT, '{SSHA}gJRDhcpsVOyCNjU2KxPYWggTXjI41NEM'),
    ('PLAIN', NON_ASCII, '{PLAIN}pässwörd €'),
    ('PLAIN', PUNCT, '{PLAIN}s3cret!#$%&\'()*+,-./;<=>?@[\\]^_`{|}~ "q'),
    ('SSHA512.b64', NON_ASCII, '{SSHA512.B64}4BexeLYk6HvUht3eUNJ2BMXd+VudZKsJiFZNwB3uVlRpkrLRHUT2+TkP+3yzskrldBHwWgWmqiBDMaPS68Qtg90Mkro='),
    ('SSHA256.hex', NON_ASCII, '{SSHA256.HEX}ce19a7590c7db74c444c88225d9ab0b597306b2bab9cd1227ade5ae0015d34acaa0e45f1'),
    ('SSHA.hex', NON_ASCII, '{SSHA.HEX}f45c473c372722f047808be92ce7b5f0efae4e828ddd8051'),
    ('PLAIN.b64', NON_ASCII, '{PLAIN.B64}cMOkc3N3w7ZyZCDigqw='),
    ('PLAIN.hex', NON_ASCII, '{PLAIN.HEX}70c3a4737377c3b6726420e282ac'),
    ('SHA512-CRYPT.b64', NON_ASCII, '{SHA512-CRYPT.B64}JDYkd1N1bGZyd0JjVkxHdVEzYyR1Uzd3aW5TbzF6ZUt4ZmF1T1lTWk5lYmdVZS9nNUZFcXF1YWtUQmpQaDljTVVjMkM5b2RIdHZZY3RPYVVtc3JZLlV5SG9YeW5Pd2I4R0FEeGM5d1F2Lw=='),
    ('CLEAR', NON_ASCII, '{CLEAR}pässwörd €'),
    ('CLEARTEXT', NON_ASCII, '{CLEARTEXT}pässwörd €'),
    ('SHA512-CRYPT holding $5$', NON_ASCII, '{SHA512-CRYPT}$5$GMptFnpjooObf/RW$DyFDxgH43VjqBQum0U9LKX9hu.fVPCLdFd4nXWMuxnC'),
    ('SHA256-CRYPT holding $2y$', NON_ASCII, '{SHA256-CRYPT}$2y$05$h3HWZyG5/e.6mpGovSJCielsB0qQolnoZqirVm84V.4e6H7QqB1UW'),
    ('CRYPT holding $6$', NON_ASCII, '{CRYPT}$6$MyoF1/GYf8ATRSo4$1tecQuDSDr9xoodF3OP0ZON5w461HuwMD8FiVOvWLl7xDDtvemHxzJnExxRSs9YvfsAZaSyivLlumoeK29T8Y1'),
    ('ARGON2I holding $argon2id$', NON_ASCII, '{ARGON2I}$argon2id$v=19$m=65536,t=3,p=1$GSvGUrhAMZG4tNfBt4oltA$smZubLmyOdIccxP0tHGNwW9jl44GI4dU6Trlaj7esKI'),
    ('SSHA 1-byte salt', NON_ASCII, '{SSHA}9MO5Rf0JxT+YjnFSS7ehsIIGIFXt'),
    ('SSHA 17-byte salt', NON_ASCII, '{SSHA}kkYqwM0eqWwQYVtwGk0T5NnTBw8yjjtfvzHT/F+XKY6fSw26YA=='),
    ('SSHA 32-byte salt', NON_ASCII, '{SSHA}VQdlU6+1ghTN04DORRkK1w6vx/TqgzeJCjxulmvM4BBvtFtHHDjGLgOAD23gsNQZwM0uVw=='),
    ('SSHA256 1-byte salt', NON_ASCII, '{SSHA256}kVEbzZdyXXMZMrQbMFObcNJdfg4bPzLx1Y57LJ2M8s5N'),
    ('SSHA256 17-byte salt', NON_ASCII, '{SSHA256}65JXIYgdSvsclIxXmn0KGqjjJ90AGlafa0/e6jij3tg3og0oiUGnIx6WqXCl7ilaXA=='),
    ('SSHA256 32-byte salt', NON_ASCII, '{SSHA256}RgfJzNVIu2aPSKF/w03ZSCI8k5uXSaUBlQFuztIxP8kFT1igMxI9YlP6hs0S2alO0N2+ELjcL987IbMS/7Qp2A=='),
    ('SSHA512 1-byte salt', NON_ASCII, '{SSHA512}TNFx5HHK6Otr5gPXbHZDt0wUh2tcq92PzHbJxyORXCwaxJRleg7kxDYv2ixGyEXyUbc3bRRCR1Uqg48wL/smR5o='),
    ('SSHA512 17-byte salt', NON_ASCII, '{SSHA512}vUx/U0HH88tF+xy6Y0ItUggP5pqx13hi4W1dXc0AZ6INWZTgEM+kbu8qW/p4JWOMOTEYSeOHf8wefg1TgMGkTagNwfZaR3r3kI9V2tz5VodD'),
    ('SSHA512 32-byte salt', NON_ASCII, '{SSHA512}IOmREPm5NQ9AyTp+MDVI6ADarrfETdQHqlhdyKHXso4CBAX9SXkCiUult+DWQWLs9G1xvW97l/gLLgSh46CUmm22dWQ6qFfidOH3fUn8rVytB+eHv0F+XKGuiDFXJ0BI'),
]

VECTOR_IDS = [f"{label} {'non-ascii' if pw == NON_ASCII else 'punct'}" for label, pw, _ in VECTORS]

# Hashes in a crypt format, taken from the doveadm vectors and given with no {SCHEME}, which
# a passwd-file reads as CRYPT. One Argon2 hash only, to keep the run short.
BARE_CRYPT = [
    (label, pw, stored.split("}", 1)[1])
    for label, pw, stored in VECTORS
    if label in ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT")
    and (pw == PUNCT or not label.startswith("ARGON2"))
]

# Made by `doveadm pw -s BLF-CRYPT -p` with 80 "a"s: bcrypt reads the first 72 bytes only.
BLF_CRYPT_80_A = "{BLF-CRYPT}$2y$05$dM4.aDH4xEDt.8tbdSJ4genUAAZBwqV.JKt6Nw9zpbb2rsOHtC01S"

# Real doveadm hashes of NON_ASCII in schemes we do not support, and crypt(3) formats we
# do not know, with or without {CRYPT}.
UNSUPPORTED = [
    "{SHA}WLrsXwWKD/4HtaIdI5GNgo9kV0k=",
    "{SMD5}SbQBHM+uhPDVN4crrmHVnpM9sus=",
    "{SHA512}MmTbal+yxGQJKiR4bu0xm1wpX3R2868BWWXQ6t+GXzlAF+yDNLajjHa2X8kp1PxMLpwtXUyAXmbH5QiSKBm8Kw==",
    "{PBKDF2}$1$hSad6ykF8ULiF7oP$5000$78bb5a631d769ca05893f957327a3d03180bdc00",
    "{SCRAM-SHA-256}4096,wN8Vy+DvtitpLuygB5IU1w==,LfSoPbXadkqJAOeCDP8gevrRDlG+wD30LZ9XsLrZn0E=,"
    "62WMijqF093RfcLHi2MBDfHbh0ILdYnV+/hcg5wpZr4=",
    "{DES-CRYPT}ClUvmbnDpXK02",
    "{CRAM-MD5}0eef080241545aa714da052a236746e526ff8330945eed54e2745481da464284",
    "{LDAP-MD5}7z+3xHSwly3LJ1fG6PgnCw==",
    "{PLAIN-MD5}ef3fb7c474b0972dcb2757c6e8f8270b",
    "{CRYPT}ClUvmbnDpXK02",
    "ClUvmbnDpXK02",
    "_J9..CCCCXBrJUJV154M",
    "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
    "{SHA512-CRYPT}$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
    "$argon2d$v=19$m=65536,t=3,p=1$c29tZXNhbHQ$Ii8bZ4k3cq3rvmuq4ZZ6x1NsJ0Sa0zVnMihCx0Hb1kI",
    "{}pässwörd €",
    "{FOO}pässwörd €",
    "{PLAIN.rot13}pässwörd €",
    "{SSHA256.}8gSaJrKhUW5N0qTFIPE7p0CuV1LBMxjcSNMXhnkkWPkapr5N",
]

# Malformed fields of known schemes, and hashes of one family under a scheme name that
# Dovecot does not accept them under (doveadm pw -t: mismatch).
MALFORMED = [
    "",
    "{",
    "{PLAIN",
    "{SSHA256}",
    "{SSHA256}8gSaJrKhUW5N0qTFIPE7p0CuV1LBMxjcSNMXhnkkWPk",
    "{SSHA256}8gSaJrKhUW5N0qTFIPE7p0CuV1LBMxjcSNMXhnkkWPkapr5",
    "{SSHA256}8gSaJrKhUW5N0qTFIPE7p0CuV1LBMxjcSNMXhnkkWPkapr5N!",
    "{SSHA}sz8/dfBF8BMMXoUzGET4oxUt1Gw=",
    "{SSHA256.hex}ce19a7590c7db74c444c88225d9ab0b597306b2bab9cd1227ade5ae0015d34acaa0e45f",
    "{SSHA256.hex}zz19a7590c7db74c444c88225d9ab0b597306b2bab9cd1227ade5ae0015d34acaa0e45f1",
    "{PLAIN.b64}cMOkc3N3w7ZyZCDigqw",
    "{PLAIN.hex}70c3a4737377c3b6726420e282a",
    "{SHA512-CRYPT}$6$",
    "{SHA512-CRYPT}$6$garbage",
    "{SHA512-CRYPT}$6$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.",
    "{SHA512-CRYPT}$6$.qPcwkq/PawlnE./$!!2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.xhzuqDHHOw"
    "YMeVcCIsbjHqxsP6YEm987tvgJhj7nl1",
    "{SHA512-CRYPT}$6$rounds=10$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg."
    "xhzuqDHHOwYMeVcCIsbjHqxsP6YEm987tvgJhj7nl1",
    "{SHA512-CRYPT.b64}JDYkd1N1bGZyd0JjVkxHdVEzYy",
    "{SHA512-CRYPT.b64}w6TDtsO8",
    "$6$",
    "$6$$",
    "{SHA256-CRYPT}$5$R91uubQLZuI8KSnj$PHErwZwhKK2UmqLfYABynAWvTxSZCbmOLsoTJag6VD",
    "{MD5-CRYPT}$1$",
    "{MD5-CRYPT}$1$wRXKfMSc$86G/8Zlo5FfCjT/PZjcCQ",
    "{BLF-CRYPT}$2y$05$",
    "{BLF-CRYPT}$2y$05$aZeeP8NSpJ31IcrVGIir0es/KkhktLfYtFvKzT80yMYvQwnXgAZ9",
    "{BLF-CRYPT}$2y$99$aZeeP8NSpJ31IcrVGIir0es/KkhktLfYtFvKzT80yMYvQwnXgAZ92",
    "{BLF-CRYPT}$2y$xx$aZeeP8NSpJ31IcrVGIir0es/KkhktLfYtFvKzT80yMYvQwnXgAZ92",
    "{ARGON2ID}",
    "{ARGON2ID}$argon2id$",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$!!!$!!!",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$wbBUuqmBrhiwBAuGcFhZeQ",
    "{ARGON2ID}argon2id$v=19$m=65536,t=3,p=1$wbBUuqmBrhiwBAuGcFhZeQ$ZdhhLN/4OMu6o80fwPkKv6xS54P4Cg"
    "7QJ03ZzdLU+sg",
    "{CRYPT}",
    "{CRYPT}pässwörd €",
    "pässwörd €",
    # Wrong family for the scheme name.
    "{BLF-CRYPT}$6$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.xhzuqDHHOwYMeVc"
    "CIsbjHqxsP6YEm987tvgJhj7nl1",
    "{MD5-CRYPT}$6$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.xhzuqDHHOwYMeVc"
    "CIsbjHqxsP6YEm987tvgJhj7nl1",
    "{ARGON2ID}$6$.qPcwkq/PawlnE./$xz2UC67lYEQiTzNPcPQroMNbZOkzFs2d5Z25TeW6xIg.xhzuqDHHOwYMeVc"
    "CIsbjHqxsP6YEm987tvgJhj7nl1",
    "{SHA512-CRYPT}$argon2i$v=19$m=32768,t=4,p=1$SNb3QX/gTD5fGGVrwjyZZg$2KenzzCVUmmFhDCv6alopeMcZ"
    "466Mj56Y71RfcRRAvY",
]


@pytest.fixture(scope="module")
def two_hashes() -> tuple[str, str]:
    """
    Two L{hash_password} results for NON_ASCII, made once for the module (Argon2 is slow).
    """
    return hash_password(NON_ASCII), hash_password(NON_ASCII)


@pytest.mark.parametrize("label, password, stored", VECTORS, ids=VECTOR_IDS)
def test_vector_verifies(label: str, password: str, stored: str) -> None:
    """
    Each hash that Dovecot made or accepts verifies with its password.
    """
    assert verify(stored, password) is True


@pytest.mark.parametrize("label, password, stored", VECTORS, ids=VECTOR_IDS)
def test_vector_wrong_password(label: str, password: str, stored: str) -> None:
    """
    Each hash fails with a wrong password: one more character, or the other test password.
    """
    assert verify(stored, password + "x") is False
    if not label.startswith("ARGON2"):
        other = PUNCT if password == NON_ASCII else NON_ASCII
        assert verify(stored, other) is False
        assert verify(stored, "") is False


@pytest.mark.parametrize("label, password, stored", BARE_CRYPT, ids=[v[0] for v in BARE_CRYPT])
def test_bare_crypt_hash(label: str, password: str, stored: str) -> None:
    """
    A field with no C{{SCHEME}} is CRYPT, its format told by its C{$id$}.
    """
    assert not stored.startswith("{")
    assert verify(stored, password) is True
    assert verify("{CRYPT}" + stored, password) is True
    if not label.startswith("ARGON2"):
        assert verify(stored, password + "x") is False


@pytest.mark.parametrize(
    "label, password, stored",
    [v for v in VECTORS if not v[0].startswith("ARGON2")],
    ids=[i for i, v in zip(VECTOR_IDS, VECTORS) if not v[0].startswith("ARGON2")],
)
@pytest.mark.parametrize("case", [str.lower, str.title, str.swapcase])
def test_scheme_name_case_insensitive(label: str, password: str, stored: str, case) -> None:
    """
    Scheme names and their encoding suffixes are matched without regard to case.
    """
    name, rest = stored[1:].split("}", 1)
    assert verify("{" + case(name) + "}" + rest, password) is True


def test_blf_crypt_reads_72_bytes() -> None:
    """
    Like Dovecot, bcrypt hashes count only the first 72 bytes of a password, and a longer
    password does not make the bcrypt package raise.
    """
    assert verify(BLF_CRYPT_80_A, "a" * 80) is True
    assert verify(BLF_CRYPT_80_A, "a" * 72) is True
    assert verify(BLF_CRYPT_80_A, "a" * 200) is True
    assert verify(BLF_CRYPT_80_A, "a" * 71) is False


@pytest.mark.parametrize("stored", UNSUPPORTED)
def test_unknown_scheme(stored: str) -> None:
    """
    A scheme, encoding suffix or crypt(3) format that is not supported raises
    L{UnknownScheme}, a L{ValueError}, whose message names it.
    """
    with pytest.raises(UnknownScheme) as caught:
        verify(stored, NON_ASCII)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_returns_false(stored: str) -> None:
    """
    A malformed hash of a known scheme (truncated, bad base64 or hex, garbage after
    C{$6$}, empty), or a hash of a family the scheme name does not take, fails the match
    without raising.
    """
    assert verify(stored, NON_ASCII) is False


@pytest.mark.parametrize("scheme", SUPPORTED_SCHEMES)
def test_supported_schemes_accepted(scheme: str) -> None:
    """
    Every name in L{SUPPORTED_SCHEMES} is known to L{verify}, with or without an encoding.
    """
    for suffix in ("", ".b64", ".hex"):
        assert verify("{" + scheme + suffix + "}", NON_ASCII) is False


def test_password_not_utf8_encodable() -> None:
    """
    A password that cannot be encoded as UTF-8 (a lone surrogate) fails without raising.
    """
    assert verify("{PLAIN}\udcff", "\udcff") is False


def test_hash_password_shape(two_hashes: tuple[str, str]) -> None:
    """
    L{hash_password} writes an C{{ARGON2ID}} hash with Dovecot's default parameters.
    """
    for stored in two_hashes:
        assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
        salt, digest = stored.split("$")[4:]
        assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes, unpadded base64


def test_hash_password_round_trip(two_hashes: tuple[str, str]) -> None:
    """
    A L{hash_password} result verifies with its password and not with another one.
    """
    stored = two_hashes[0]
    assert verify(stored, NON_ASCII) is True
    assert verify(stored, NON_ASCII[:-1]) is False


def test_hash_password_distinct_salts(two_hashes: tuple[str, str]) -> None:
    """
    Two hashes of one password differ, salts included.
    """
    first, second = two_hashes
    assert first != second
    assert first.split("$")[4] != second.split("$")[4]


def test_needs_rehash_current(two_hashes: tuple[str, str]) -> None:
    """
    A hash from L{hash_password}, or Dovecot's own C{ARGON2ID} hash (same parameters),
    needs no rehash.
    """
    assert needs_rehash(two_hashes[0]) is False
    dovecot = next(stored for label, _, stored in VECTORS if label == "ARGON2ID")
    assert needs_rehash(dovecot) is False
    assert needs_rehash(dovecot.replace("{ARGON2ID}", "{argon2id}")) is False


@pytest.mark.parametrize(
    "stored",
    [stored for label, _, stored in VECTORS if label != "ARGON2ID"]
    + [
        "{ARGON2ID}$argon2id$v=19$m=65536,t=2,p=1$wbBUuqmBrhiwBAuGcFhZeQ$ZdhhLN/4OMu6o80fwPkKv6xS54P4"
        "Cg7QJ03ZzdLU+sg",
        "{ARGON2ID}$argon2id$v=19$m=32768,t=3,p=1$wbBUuqmBrhiwBAuGcFhZeQ$ZdhhLN/4OMu6o80fwPkKv6xS54P4"
        "Cg7QJ03ZzdLU+sg",
        "$argon2id$v=19$m=65536,t=3,p=1$wbBUuqmBrhiwBAuGcFhZeQ$ZdhhLN/4OMu6o80fwPkKv6xS54P4Cg7QJ03ZzdL"
        "U+sg",
        "{ARGON2ID}$argon2id$garbage",
        "{ARGON2ID}",
        "{FOO}bar",
        "",
    ],
)
def test_needs_rehash_other(stored: str) -> None:
    """
    Anything but a current C{{ARGON2ID}} hash needs a rehash; nothing raises.
    """
    assert needs_rehash(stored) is True


def test_argon2_with_several_lanes_still_verifies():
    """
    Dovecot's Argon2 hashes (one lane) are checked by libsodium; a hash made by another tool
    with several lanes, which libsodium cannot check, goes to argon2-cffi and still works.
    """
    from argon2 import PasswordHasher, Type

    several = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=4, type=Type.ID).hash("s3cret")
    assert ",p=4$" in several
    assert verify("{ARGON2ID}" + several, "s3cret")
    assert not verify("{ARGON2ID}" + several, "wrong")
    one = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1, type=Type.I).hash("s3cret")
    assert verify("{ARGON2I}" + one, "s3cret") and not verify("{ARGON2I}" + one, "s3cre")
    assert not verify("{ARGON2ID}" + one.replace("$argon2i$", "$argon2id$"), "s3cret")


def test_the_server_imports_no_hash_library_before_the_first_hash():
    """
    passlib, argon2-cffi and PyNaCl are imported at the first hash checked or made (~13 ms of
    the start-up otherwise); cryptography imports bcrypt for its own use, so bcrypt is not
    in the list.
    """
    import subprocess
    import sys

    code = (
        "import sys, pymaild.service; heavy = ('passlib', 'argon2', 'nacl');"
        " print(sorted(m for m in heavy if m in sys.modules));"
        " from pymaild.auth import passwords; passwords.verify('{SSHA}' + 'A' * 40, 'x');"
        " print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "['argon2', 'nacl', 'passlib']"]
