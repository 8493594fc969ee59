# -*- test-case-name: tests.auth.test_passwords -*-
"""
Password hashes in Dovecot's passwd-file format, C{{SCHEME}hash}.

L{verify} checks a password against the password field of a passwd-file line as Dovecot
would; L{hash_password} makes a C{{ARGON2ID}} hash that Dovecot itself accepts, so one
passwd-file serves both servers during a migration.

Schemes (names are case-insensitive, as in Dovecot):

  - C{ARGON2ID}, C{ARGON2I}: PHC strings C{$argon2id$...} or C{$argon2i$...}, checked by
    argon2-cffi. Like Dovecot (libsodium), either scheme name accepts either variant.
  - C{BLF-CRYPT}: bcrypt C{$2y$}, C{$2b$}, C{$2a$}, checked by the bcrypt package. Only the
    first 72 bytes of the password count, as in Dovecot.
  - C{SHA512-CRYPT}, C{SHA256-CRYPT}, C{MD5-CRYPT}: C{$6$}, C{$5$}, C{$1$}, checked by passlib.
  - C{CRYPT}, and a field with no C{{SCHEME}} prefix (Dovecot's passwd-file default): the
    format is told by the hash itself (C{$6$}, C{$5$}, C{$1$}, C{$2y$}/C{$2b$}/C{$2a$},
    C{$argon2id$}, C{$argon2i$}). Dovecot's C{SHA512-CRYPT} and C{SHA256-CRYPT} call libc
    C{crypt()} as C{CRYPT} does, so they too accept any of the crypt formats (but not Argon2);
    C{BLF-CRYPT} and C{MD5-CRYPT} accept only their own.
  - C{SSHA512}, C{SSHA256}, C{SSHA}: C{base64(digest(password + salt) + salt)}, with a salt of
    any non-empty length (Dovecot writes 4 bytes).
  - C{PLAIN} (aliases C{CLEAR}, C{CLEARTEXT}): the password itself.

A scheme name may carry Dovecot's encoding suffix, C{.b64}/C{.base64} or C{.hex}
(C{{SSHA256.hex}...}, C{{PLAIN.b64}...}): the rest of the field is decoded first.

Security
========
  Where this module compares secrets itself (C{PLAIN}, the SSHA fallback) it uses
  C{hmac.compare_digest}; every other comparison happens inside passlib, libsodium
  (PyNaCl: Argon2 with one lane, as Dovecot writes it), argon2-cffi or bcrypt. There is no hand-written cryptography: the only composition here is the SSHA
  layout, C{hashlib} over C{password + salt}, for salts that passlib refuses.

  Hashing or verifying with the C{ARGON2ID} parameters here costs tens of milliseconds of CPU
  (about 0.1 s on a slow 2-core machine) and 64 MiB of memory; bcrypt and SHA-crypt at
  Dovecot's defaults cost a few milliseconds. Callers must therefore run L{verify} and
  L{hash_password} in a bounded thread pool (C{deferToThreadPool}), never on the reactor
  thread; the bound also caps the memory Argon2 takes at once. Every function here is safe
  to call from several threads, and libsodium, argon2-cffi and bcrypt release the GIL while
  they work.

  Nothing here logs: L{verify} reports a malformed hash as a failed match, and an
  unsupported scheme as L{UnknownScheme} for the caller to log.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import warnings
from types import SimpleNamespace
from typing import Callable

__all__ = [
    "ARGON2_MEMORY_COST",
    "ARGON2_PARALLELISM",
    "ARGON2_TIME_COST",
    "SUPPORTED_SCHEMES",
    "UnknownScheme",
    "hash_password",
    "needs_rehash",
    "verify",
]

#: Argon2 passes over memory; Dovecot's default for ARGON2ID.
ARGON2_TIME_COST = 3
#: Argon2 memory in KiB (64 MiB); Dovecot's default for ARGON2ID.
ARGON2_MEMORY_COST = 65536
#: Argon2 lanes; Dovecot (libsodium) always writes and accepts 1.
ARGON2_PARALLELISM = 1
#: Raw hash and salt lengths in bytes, as libsodium's C{crypto_pwhash_str} writes them.
ARGON2_HASH_LEN = 32
ARGON2_SALT_LEN = 16

#: Scheme names L{verify} accepts (case-insensitive, optionally with C{.b64}/C{.hex}).
SUPPORTED_SCHEMES = (
    "ARGON2ID",
    "ARGON2I",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "MD5-CRYPT",
    "CRYPT",
    "SSHA512",
    "SSHA256",
    "SSHA",
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
)


@functools.cache
def _lib() -> SimpleNamespace:
    """
    The hash libraries, imported at the first hash checked or made, not with this module:
    passlib, argon2-cffi and PyNaCl are ~13 ms of the server's start-up, which needs none of
    them before the first login (bcrypt comes with cryptography anyway).  Two threads may both
    import them at once: the imports are idempotent, and the result is the same.
    """
    import bcrypt
    import nacl.exceptions
    import nacl.pwhash
    from argon2 import PasswordHasher, Type
    from argon2.exceptions import InvalidHashError, VerificationError
    from passlib import hash as passlibHash
    from passlib.exc import PasslibHashWarning

    # passlib warns when it reads a SHA-crypt hash the way glibc does (a salt cut to 16
    # characters, rounds raised to 1000): those are odd hashes, not events, and this module
    # logs nothing. Set once, as warnings.catch_warnings() is not thread-safe.
    warnings.filterwarnings("ignore", category=PasslibHashWarning)
    hasher = PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_COST,
        parallelism=ARGON2_PARALLELISM,
        hash_len=ARGON2_HASH_LEN,
        salt_len=ARGON2_SALT_LEN,
        type=Type.ID,
    )
    return SimpleNamespace(
        hasher=hasher, InvalidHashError=InvalidHashError, VerificationError=VerificationError,
        bcrypt=bcrypt, naclPwhash=nacl.pwhash, naclExceptions=nacl.exceptions, passlib=passlibHash,
    )

_ALIASES = {"CLEAR": "PLAIN", "CLEARTEXT": "PLAIN"}

# Dovecot's encoding suffixes (password-scheme.c, password_scheme_lookup).
_ENCODINGS = {"B64": "base64", "BASE64": "base64", "HEX": "hex"}

# The salted SHA schemes: hashlib name of the digest and the name of passlib's handler.
_SALTED = {
    "SSHA": ("sha1", "ldap_salted_sha1"),
    "SSHA256": ("sha256", "ldap_salted_sha256"),
    "SSHA512": ("sha512", "ldap_salted_sha512"),
}


class UnknownScheme(ValueError):
    """
    The password field names a scheme, an encoding or a crypt format that this module does
    not support. C{str(error)} names it; the caller logs it and fails the login.
    """


def verify(stored: str, password: str) -> bool:
    """
    Check C{password} against a Dovecot password field.

    @param stored: the password field of a passwd-file line, such as
        C{"{SHA512-CRYPT}$6$..."}; with no C{{SCHEME}} prefix it is taken as C{CRYPT}.
    @param password: the password the client sent; it is encoded as UTF-8.
    @return: C{True} if the password matches; C{False} if it does not, or if C{stored} is
        malformed for its scheme (for example truncated, or not valid base64).
    @raise UnknownScheme: if the scheme, its encoding suffix or the crypt format is one
        this module does not support.
    """
    scheme, encoding, value = _split(stored)
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be in any stored password.
        return False
    if scheme in _SALTED:
        raw = _decode(value, encoding or "base64")
        return raw is not None and _verify_salted(scheme, raw, secret)
    raw = _decode(value, encoding)
    if raw is None:
        return False
    if scheme == "PLAIN":
        return hmac.compare_digest(raw, secret)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    return _verify_crypt(scheme, text, secret)


def hash_password(password: str) -> str:
    """
    Hash a password for a passwd-file, as Dovecot's C{doveadm pw -s ARGON2ID} would.

    @param password: the new password; it is encoded as UTF-8.
    @return: C{"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$<salt>$<hash>"}, with a fresh
        random salt. Slow on purpose: call it from a thread pool.
    """
    # Checked by hand against Dovecot 2.3.19.1: `doveadm pw -t HASH -p PASSWORD` answers
    # "(verified)" for hash_password() output, including a non-ASCII password.
    return "{ARGON2ID}" + _lib().hasher.hash(password)


def needs_rehash(stored: str) -> bool:
    """
    Tell whether a stored password should be replaced by L{hash_password}'s after the next
    successful login.

    @param stored: a password field, as for L{verify}.
    @return: C{False} only for an C{{ARGON2ID}} argon2id hash with the current parameters
        (L{ARGON2_TIME_COST}, L{ARGON2_MEMORY_COST}, L{ARGON2_PARALLELISM}); C{True} for
        anything else, including unknown schemes and malformed hashes.
    """
    try:
        scheme, encoding, value = _split(stored)
    except UnknownScheme:
        return True
    if scheme != "ARGON2ID" or encoding is not None or not value.startswith("$argon2id$"):
        return True
    lib = _lib()
    try:
        return lib.hasher.check_needs_rehash(value)
    except (lib.InvalidHashError, ValueError):
        return True


def _split(stored: str) -> tuple[str, str | None, str]:
    """
    Split a password field into its scheme, its encoding suffix and the hash.

    As in Dovecot's C{password_get_scheme}, a field that does not start with C{{} or has no
    C{}} is a C{CRYPT} hash as a whole.

    @return: C{(scheme, encoding, value)}: the canonical upper-case scheme name, C{"base64"},
        C{"hex"} or C{None} for no suffix, and the rest of the field.
    @raise UnknownScheme: for a scheme or encoding suffix not supported here.
    """
    if not stored.startswith("{"):
        return "CRYPT", None, stored
    end = stored.find("}")
    if end == -1:
        return "CRYPT", None, stored
    label = stored[1:end]
    name, dot, suffix = label.upper().partition(".")
    name = _ALIASES.get(name, name)
    if name not in SUPPORTED_SCHEMES:
        raise UnknownScheme(f"unsupported password scheme {label!r}")
    encoding = None
    if dot:
        encoding = _ENCODINGS.get(suffix)
        if encoding is None:
            raise UnknownScheme(f"unsupported password scheme encoding {label!r}")
    return name, encoding, stored[end + 1 :]


def _decode(value: str, encoding: str | None) -> bytes | None:
    """
    Decode the hash part of a field; C{None} if it is not valid in that encoding.
    """
    try:
        if encoding == "base64":
            return base64.b64decode(value, validate=True)
        if encoding == "hex":
            return binascii.a2b_hex(value)
        return value.encode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _verify_salted(scheme: str, raw: bytes, secret: bytes) -> bool:
    """
    Check an SSHA, SSHA256 or SSHA512 hash, decoded to C{digest + salt}.
    """
    digest_name, handlerName = _SALTED[scheme]
    handler = getattr(_lib().passlib, handlerName)
    size = hashlib.new(digest_name).digest_size
    if len(raw) <= size:
        # Dovecot: "password is too short"; no salt.
        return False
    salt = raw[size:]
    if handler.min_salt_size <= len(salt) <= handler.max_salt_size:
        try:
            return handler.verify(secret, handler.ident + base64.b64encode(raw).decode("ascii"))
        except (ValueError, TypeError):
            return False
    # passlib's ldap_salted_sha1/sha256/sha512 refuse salts shorter than 4 or longer than 16
    # bytes ("salt too large"), but Dovecot's ssha*_verify takes any non-empty salt, and
    # other tools write such hashes. For those, compute the same SSHA layout,
    # digest(password + salt) + salt, with hashlib and compare in constant time.
    expected = hashlib.new(digest_name, secret + salt).digest()
    return hmac.compare_digest(expected, raw[:size])


def _verify_sha512_crypt(text: str, secret: bytes) -> bool:
    return _lib().passlib.sha512_crypt.verify(secret, text)


def _verify_sha256_crypt(text: str, secret: bytes) -> bool:
    return _lib().passlib.sha256_crypt.verify(secret, text)


def _verify_md5_crypt(text: str, secret: bytes) -> bool:
    return _lib().passlib.md5_crypt.verify(secret, text)


def _verify_bcrypt(text: str, secret: bytes) -> bool:
    # bcrypt reads only 72 bytes; Dovecot's crypt_blowfish ignores the rest, while the
    # bcrypt package (4.1+) refuses longer passwords, so cut them as Dovecot does.
    return _lib().bcrypt.checkpw(secret[:72], text.encode("ascii"))


def _verify_argon2(text: str, secret: bytes) -> bool:
    # argon2-cffi takes the variant from the hash; libsodium (Dovecot) supports only these.
    if not text.startswith(("$argon2id$", "$argon2i$")):
        return False
    lib = _lib()
    if ",p=1$" in text:
        # libsodium (PyNaCl), as Dovecot: its optimised Argon2 checks Dovecot's parameters in
        # about 0.6 of the time argon2-cffi's portable build takes (90 against 140 ms here),
        # and every login waits for it.  It knows only one lane (p=1); others go below.
        module = lib.naclPwhash.argon2id if text.startswith("$argon2id$") else lib.naclPwhash.argon2i
        try:
            return module.verify(text.encode("ascii"), secret)
        except lib.naclExceptions.InvalidkeyError:
            return False  # the wrong password
        except (lib.naclExceptions.CryptoError, ValueError, TypeError, UnicodeEncodeError):
            pass  # a hash libsodium refuses: argon2-cffi decides
    try:
        return lib.hasher.verify(text, secret)
    except lib.VerificationError:
        # VerifyMismatchError, or a hash argon2 could not use.
        return False


# Crypt formats by their leading "$id$".
_CRYPT_FORMATS: dict[str, tuple[str, Callable[[str, bytes], bool]]] = {
    "$6$": ("SHA512-CRYPT", _verify_sha512_crypt),
    "$5$": ("SHA256-CRYPT", _verify_sha256_crypt),
    "$1$": ("MD5-CRYPT", _verify_md5_crypt),
    "$2y$": ("BLF-CRYPT", _verify_bcrypt),
    "$2b$": ("BLF-CRYPT", _verify_bcrypt),
    "$2a$": ("BLF-CRYPT", _verify_bcrypt),
    "$argon2id$": ("ARGON2", _verify_argon2),
    "$argon2i$": ("ARGON2", _verify_argon2),
}

_LIBC_FORMATS = frozenset({"SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "BLF-CRYPT"})

# Which formats each scheme name accepts, as Dovecot 2.3 does (checked with doveadm pw -t):
# SHA512-CRYPT and SHA256-CRYPT use libc crypt() like CRYPT; BLF-CRYPT and MD5-CRYPT check
# their own prefix; both ARGON2 names go to libsodium. CRYPT (and a field with no scheme)
# also accepts Argon2 here, which Dovecot's libc crypt() does not.
_SCHEME_FORMATS = {
    "CRYPT": _LIBC_FORMATS | {"ARGON2"},
    "SHA512-CRYPT": _LIBC_FORMATS,
    "SHA256-CRYPT": _LIBC_FORMATS,
    "BLF-CRYPT": frozenset({"BLF-CRYPT"}),
    "MD5-CRYPT": frozenset({"MD5-CRYPT"}),
    "ARGON2ID": frozenset({"ARGON2"}),
    "ARGON2I": frozenset({"ARGON2"}),
}

_CRYPT_ID = re.compile(r"\$[0-9a-z]+\$")

# A crypt(3) hash of a format not supported here, with a name for the error: "$y$"
# (yescrypt), "$gy$", "$7$", "$sha1$", "$md5,rounds=...$", ..., BSDi "_..." and DES.
_OTHER_CRYPT = (
    (re.compile(r"(\$[0-9a-z]+)[$,]"), None),
    (re.compile(r"_[./0-9A-Za-z]{19}\Z"), "BSDi DES"),
    (re.compile(r"[./0-9A-Za-z]{13}\Z"), "DES"),
)


def _verify_crypt(scheme: str, text: str, secret: bytes) -> bool:
    """
    Check a crypt-style hash under one of the crypt or Argon2 scheme names.

    @raise UnknownScheme: for a crypt(3) format, such as yescrypt, that Dovecot's libc
        C{crypt()} may know but this module does not.
    """
    match = _CRYPT_ID.match(text)
    found = _CRYPT_FORMATS.get(match.group()) if match else None
    if found is None:
        if _SCHEME_FORMATS[scheme] >= _LIBC_FORMATS:
            for pattern, label in _OTHER_CRYPT:
                other = pattern.match(text)
                if other:
                    raise UnknownScheme(
                        f"unsupported crypt format {label or other.group(1) + '$'!r}"
                        f" in a {scheme} hash"
                    )
        return False
    fmt, check = found
    if fmt not in _SCHEME_FORMATS[scheme]:
        return False
    try:
        return check(text, secret)
    except (ValueError, TypeError):
        # passlib and bcrypt raise ValueError for a malformed hash.
        return False
