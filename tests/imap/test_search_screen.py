"""
TEXT and BODY over a folder screen each file's raw bytes first (pymaild.imap.search.excludedBy:
a needle missing from a plain message's bytes is not in its decoded text, so it is not
decoded).  These tests run many TEXT/BODY queries over many generated messages built to
tempt that shortcut (transfer encodings, charsets that do not decode ASCII to itself, RFC 2047
and RFC 2231, folded fields, needles across line ends, field joins and part joins) through
the bulk path and through the per-message evaluator, which decodes every message, and require
the same answers.
"""

from __future__ import annotations

import base64
import quopri
import random
from pathlib import Path

import pytest

from pymaild.imap import search as S
from pymaild.mime import textCodec
from pymaild.store.maildir import MaildirStore

from tests.imap.test_search_folder import oneByOne

WORDS = ["quarterly", "report", "draft", "budget", "meeting", "invoice", "Straße", "café",
         "\u212aelvin", "\ufb01le", "naïve", "Quarterly", "REPORT", "charset", "base64", "png",
         "中文", "Ünïcode", "x:y", "a=b", "end."]
#: what half of the messages are made of: ASCII, 7bit/8bit, charsets that decode ASCII to
#: itself, no encoded-words (the messages the screen decides on)
PLAIN_WORDS = [w for w in WORDS if w.isascii() and w not in ("charset", "base64")]
PLAIN_CHARSETS = [None, "utf-8", '"UTF-8"', "us-ascii", "iso-8859-1", "windows-1252"]
#: and a quarter of 8-bit text without transfer encodings (some of it the screen decides on),
#: with characters that fold to ASCII or compose with it
EIGHT_BIT_WORDS = 8 * (PLAIN_WORDS + ["café", "naïve", "中文", "Ünïcode", "\u00b5m", "\u00ff",
                          "\u00e9quipe", "\u00c9T\u00c9", "\ufffd"]) + [
    "Straße", "\u212aelvin", "\ufb01le", "e\u0301t\u00e9", "\u0130stanbul", "\u01f0ob", "\u037e",
    "\u1fefx"]
EIGHT_BIT_CHARSETS = [None, "utf-8", "us-ascii", "iso-8859-1", "latin1", '"UTF-8"']
CHARSETS = [None, "utf-8", "UTF-8", '"utf-8"', "us-ascii", "iso-8859-1", "koi8-r", "windows-1252",
            "utf-7", "unicode_escape", "hz", "cp500", "utf-16", '"utf-8', "utf-8 (x)",
            "x-unknown"]


def utf7(text: str) -> bytes:
    """C{text} the way a UTF-7 writer may put every character in base64 (RFC 2152)."""
    return b"+" + base64.b64encode(text.encode("utf-16-be")).rstrip(b"=") + b"-"


def encode(text: str, charset: str | None) -> bytes:
    name = (charset or "").strip('"').split(" ")[0]
    if name == "utf-7":
        return utf7(text)
    if name == "unicode_escape":
        return "".join(c if c == "\n" else f"\\u{ord(c):04x}" for c in text).encode("ascii")
    if name in ("", "x-unknown"):
        name = "utf-8"
    return text.encode(name, "replace")


def body(rng: random.Random, nl: bytes, charset: str | None, plain) -> bytes:
    words = {True: PLAIN_WORDS, "8bit": EIGHT_BIT_WORDS}.get(plain, WORDS)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
             for _ in range(rng.randint(1, 6))]
    text = "\n".join(lines)
    raw = encode(text, charset)
    cte = rng.choice(["", "7bit", "8bit"] + ([] if plain else ["base64", "quoted-printable",
                                                               "Quoted-Printable"]))
    if cte == "base64":
        raw = base64.encodebytes(raw)
    elif cte.lower() == "quoted-printable":
        raw = quopri.encodestring(raw)
        if rng.random() < 0.5:  # a soft line break inside a word
            raw = raw.replace(b"ua", b"u=\nmissing".replace(b"missing", b"a"), 1)
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", nl)
    head = b""
    if charset is not None or rng.random() < 0.7:
        if rng.random() < 0.1 and charset and not plain:  # RFC 2231
            head += b"Content-Type: text/plain; charset*=us-ascii''" + charset.strip('"').encode() + nl
        elif rng.random() < 0.1 and not plain:
            head += b"Content-Type: text/plain; charset = " + (charset or "utf-7").encode() + nl
        else:
            params = b"" if charset is None else b"; charset=" + charset.encode()
            if rng.random() < 0.3:
                params += b";" + nl + b"\tformat=flowed"
            head += b"Content-Type: text/plain" + params + nl
    if cte:
        head += b"Content-Transfer-Encoding: " + cte.encode() + nl
    return head + nl + raw + nl


def header(rng: random.Random, nl: bytes, plain) -> bytes:
    fields = [b"From: Someone <s@example.com>", b"To: bench@example.com"]
    words = {True: PLAIN_WORDS, "8bit": EIGHT_BIT_WORDS}.get(plain, WORDS)
    subject = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
    style = rng.choice(["plain", "nospace", "folded"] + {True: [], "8bit": ["latin1-8bit"]}.get(
        plain, ["b", "q", "latin1-8bit"]))
    if style == "plain":
        fields.append(("Subject: " + subject).encode("utf-8"))
    elif style == "b":
        fields.append(b"Subject: =?utf-8?b?" + base64.b64encode(subject.encode()) + b"?=")
    elif style == "q":
        fields.append(b"Subject: =?iso-8859-1?q?"
                      + quopri.encodestring(subject.encode("latin-1", "replace"), header=True).strip()
                      + b"?=")
    elif style == "latin1-8bit":
        fields.append(b"Subject: " + subject.encode("latin-1", "replace"))
    elif style == "nospace":
        fields.append(b"Subject:" + subject.encode("utf-8"))
    else:
        fields.append(b"Subject: quarterly" + nl + b"\treport " + subject.encode("utf-8"))
    if rng.random() < 0.3:
        fields.append(b"X-Note: " + rng.choice(words).encode() + nl + b" " + rng.choice(words).encode())
    if rng.random() < 0.1:
        fields.append(b"not a field line quarterly")
    rng.shuffle(fields)
    return nl.join(fields) + nl


def message(rng: random.Random) -> bytes:
    nl = rng.choice([b"\r\n", b"\n"])
    plain = rng.choice([True, True, "8bit", False])
    charsets = {True: PLAIN_CHARSETS, "8bit": EIGHT_BIT_CHARSETS}.get(plain, CHARSETS)
    top = header(rng, nl, plain) + b"MIME-Version: 1.0" + nl
    shape = rng.choice(["single", "single", "single", "mixed", "rfc822"])
    if shape == "single":
        return top + body(rng, nl, rng.choice(charsets), plain)
    if shape == "rfc822":
        inner = header(rng, nl, plain) + body(rng, nl, rng.choice(charsets), plain)
        return top + b"Content-Type: message/rfc822" + nl + nl + inner
    out = [top + b'Content-Type: multipart/mixed; boundary="b1"' + nl + nl
           + b"preamble quarterly" + nl]
    for _ in range(rng.randint(1, 3)):
        out.append(b"--b1" + nl)
        if rng.random() < 0.25:
            out.append(b"Content-Type: image/png; name=quarterly.png" + nl
                       + b"Content-Transfer-Encoding: " + (b"7bit" if plain else b"base64") + nl + nl
                       + base64.encodebytes(b"quarterly report PNG").replace(b"\n", nl))
        else:
            out.append(body(rng, nl, rng.choice(charsets), plain))
    out.append(b"--b1--" + nl + b"epilogue quarterly" + nl)
    return b"".join(out)


FIXED = [
    # plain ASCII, as most mail: the screen decides without decoding
    b"Subject: quarterly report\r\nContent-Type: text/plain; charset=\"utf-8\"; format=flowed\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n\r\nthe budget draft\r\n",
    # ASCII bytes that decode to other text: UTF-7 and unicode_escape bodies, HZ
    b"Subject: x\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n" + utf7("quarterly") + b"\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=unicode_escape\r\n\r\n\\u0071uarterly\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=hz\r\n\r\n" + "中文".encode("hz") + b"\r\n",
    # a charset parameter the parser reads whole, in odd forms
    b"Subject: x\r\nContent-Type: text/plain; charset=\"utf-7\"\r\n\r\n" + utf7("invoice") + b"\r\n",
    b"Subject: x\r\nContent-Type: text/plain; CHARSET=UTF-7\r\n\r\n" + utf7("invoice") + b"\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\tcharset=utf-7\r\n\r\n"
    + utf7("invoice") + b"\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset*=us-ascii''utf-7\r\n\r\n" + utf7("invoice") + b"\r\n",
    # RFC 2047 in a header, a field folded across lines, no space after the colon
    b"Subject: =?utf-8?q?quarterly?=\r\n\r\nbody\r\n",
    b"Subject: quarterly\r\n report\r\nX-A:draft\r\n\r\nbody\r\n",
    b"Subject: =?utf-8?b?cXVhcnRlcmx5?= news\r\n\r\nplain body\r\n",  # "quarterly" in base64
    b"Subject : quarterly\r\nX-B: quarterly\r\n\treport\r\n\r\nbudget quarterly\r\nreport\r\n",
    # quoted-printable soft line break inside a word
    b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nquar=\r\nterly\r\n",
    # Latin-1 ß and a Kelvin sign: fold to ASCII letters
    b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nStra\xdfe\r\n",
    "Subject: x\r\n\r\n\u212aelvin \ufb01le\r\n".encode("utf-8"),
]

NEEDLES = ["quarterly", "QUARTERLY", "quarterly report", "quarterly\r\nreport", "report\ndraft",
           "quarterly\treport", "x-b: quarterly", "budget quarterly\nreport",
           "subject: quarterly", "subject:quarterly", "x-a: draft", "x-note: ", "invoice",
           "strasse", "STRASSE", "straße", "kelvin", "file", "café", "中文", "naïve", "png",
           "preamble", "epilogue", "charset", "utf-7", "=?utf-8?", "budget draft", "draft\n",
           ":", " ", "\n", "e", "x:y", "a=b", "end.", "not a field", "content-type: text/plain",
           "stanbul", "istanbul", "`x", ";", "ob", "ete", "equipe", "m", "ss"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    inbox = MaildirStore(tmp_path_factory.mktemp("screen") / "mail").user("u@example.com").folder("INBOX")
    rng = random.Random(20251129)
    for raw in FIXED + [message(rng) for _ in range(340)]:
        inbox.append(raw, ())
    return inbox


@pytest.mark.parametrize("key", ["TEXT", "BODY"])
@pytest.mark.parametrize("needle", NEEDLES)
def test_screened_text_same_as_decoded(folder, key, needle):
    view = folder.uids()
    predicate = S.compile([key.encode(), needle.encode("utf-8")])
    assert S.searchFolder(predicate, folder, view) == oneByOne(predicate, folder, view)


def test_screen_is_used_and_answers_are_not_trivial(folder):
    """The messages screened out and those decoded are both many; the answers neither none
    nor all."""
    view = folder.uids()
    paths = folder.paths(view)
    data = {uid: Path(paths[uid]).read_bytes() for uid in view}
    kinds = {uid: S._plainText(data[uid], data[uid].lower()) for uid in view}
    plain = [uid for uid in view if kinds[uid]]
    assert 100 < len(plain) < len(view) - 100
    assert 30 < list(kinds.values()).count("8bit") < list(kinds.values()).count(None) - 30
    for needle in ["invoice", "budget draft", "report\ndraft", "png", "end."]:
        excluded = [uid for uid in plain if S.excludedBy(data[uid], {needle})]
        assert 20 < len(excluded) < len(plain) - 20, needle
    for text in ["TEXT quarterly", "BODY quarterly", "TEXT strasse", "BODY invoice", 'TEXT "中文"']:
        key, needle = text.split(" ", 1)
        found = S.searchFolder(S.compile([key.encode(), needle.strip('"').encode()]), folder, view)
        assert 0 < len(found) < len(view), text
    # the tempting fixed messages are found: decoded, not screened out (7's parameter reads
    # as "utf-8\r\n\tcharset=utf-7", no charset: its UTF-7 stays undecoded either way)
    found = S.searchFolder(S.compile([b"OR", b"TEXT", b"quarterly", b"OR", b"TEXT", b"invoice",
                                      b"OR", b"TEXT", "中文".encode(), b"OR", b"TEXT", b"strasse",
                                      b"TEXT", b"kelvin"]), folder, view)
    assert set(range(1, 16)) - {7} <= set(found)
    assert {9, 10, 11, 12} <= set(S.searchFolder(S.compile([b"TEXT", b"subject: quarterly"]), folder, view))
    assert [12] == S.searchFolder(S.compile([b"TEXT", b"x-b: quarterly\treport"]), folder, view)
    assert 12 in S.searchFolder(S.compile([b"BODY", b"budget quarterly\nreport"]), folder, view)


@pytest.mark.parametrize("chunk, kept", [(1, 0), (7, 3000), (1000, 1 << 30)])
def test_chunks_and_kept_bytes(folder, monkeypatch, chunk, kept):
    """Screened a few candidates at a time, with few or no files kept for decoding (read
    again), or all at once: the same answers."""
    view = folder.uids()
    queries = [S.compile([b"TEXT", b"quarterly"]), S.compile([b"BODY", b"budget draft"]),
               S.compile([b"OR", b"BODY", b"invoice", b"NOT", b"TEXT", b"report"])]
    expected = [S.searchFolder(q, folder, view) for q in queries]
    monkeypatch.setattr(S, "_SCREEN_CHUNK", chunk)
    monkeypatch.setattr(S, "_KEPT_BYTES", kept)
    assert [S.searchFolder(q, folder, view) for q in queries] == expected
    assert all(0 < len(e) < len(view) for e in expected)


def test_content_cache(folder):
    """A part's type, transfer encoding and charset come from the cache as the parser reads
    them from the header (the cache is keyed by the plain header's Content-* lines)."""
    view = folder.uids()
    paths = folder.paths(view)
    S._CONTENT_CACHE.clear()
    headers = []
    for uid in view:
        data = Path(paths[uid]).read_bytes()

        def walk(part):
            headers.append(data[part["headerStart"]:part["bodyStart"]])
            for child in part.get("parts") or ():
                walk(child)
        walk(folder.summary(uid).parts)
    first = [S._contentInfo(h) for h in headers]
    assert 0 < len(S._CONTENT_CACHE) < len(headers) / 2
    assert [S._contentInfo(h) for h in headers] == first == [S._parseContent(h) for h in headers]
    assert {cte for _, cte, _ in first} >= {"", "7bit", "base64", "quoted-printable"}


@pytest.mark.parametrize("name", S._TRANSPARENT_CHARSETS)
def test_transparent_charsets_decode_ascii_to_itself(name):
    codec = textCodec(name)
    assert codec is not None
    ascii = bytes(range(128))
    assert ascii.decode(codec) == ascii.decode("ascii")


@pytest.mark.parametrize("data, plain", [
    (b"Content-Type: text/plain; charset=utf-8\r\n\r\nx", "ascii"),
    (b'Content-Type: text/plain; charset="ISO-8859-1"; format=flowed\n\nx', "ascii"),
    (b"Content-Type: text/plain; charset=iso-8859-13\r\n\r\nx", "ascii"),
    (b"Content-Type: text/plain; charset=utf-8\r\n format=flowed\r\n\r\nx", None),  # continued
    (b"Content-Type: text/plain; charset=utf-7\r\n\r\nx", None),
    (b"Content-Type: text/plain; charset=utf-8x\r\n\r\nx", None),
    (b'Content-Type: text/plain; charset="utf-8\r\n\r\nx', None),
    (b"Content-Type: text/plain; charset = utf-8\r\n\r\nx", None),
    (b"Content-Type: text/plain; charset*=utf-8\r\n\r\nx", None),
    (b"Subject: x\r\n\r\nwhich charset?", None),
    (b"Subject: =?utf-8?q?x?=\r\n\r\nx", None),
    (b"Content-Transfer-Encoding: BASE64\r\n\r\neA==", None),
    (b"Content-Transfer-Encoding: quoted-printable\r\n\r\nx", None),
    ("Subject: café\r\n\r\nx".encode(), "8bit"),
    ("Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve café 中文".encode(), "8bit"),
    (b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nna\xefve", "8bit"),
    (b"Content-Type: text/plain; charset=windows-1252\r\n\r\nna\xefve", None),
    (b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nStra\xdfe", None),  # ß: ss
    ("Subject: x\r\n\r\nStraße".encode(), None),
    ("Subject: x\r\n\r\n\u212aelvin".encode(), None),
    ("Subject: x\r\n\r\ncafe\u0301".encode(), None),  # a combining mark
    ("Subject: x\r\n\r\na\u037eb".encode(), None),  # GREEK QUESTION MARK: NFC ";"
    (b"Subject: x\r\n\r\nnothing to decode", "ascii"),
])
def test_plain_text(data, plain):
    assert S._plainText(data, data.lower()) == plain


def test_needle_words():
    assert S._needleWords("subject: quarterly\nreport") == (b"subject", b"quarterly", b"report")
    assert S._needleWords(" : \t") == ()
    assert S._needleWords("straße") is None
    plain = b"Subject: quarterly\r\n report\r\n\r\nbody\r\n"
    assert S.excludedBy(plain, {"draft", "subject: quarterly report", "ß", " ", "body"}) == {"draft", "ß"}
    assert S.excludedBy(b"Subject: x\r\n\r\nStra\xdfe", {"draft"}) == set()  # not plain: decode


def test_text_limit(folder):
    """With a small text limit, messages over it are decoded up to the limit (not screened)
    and the answers are the per-message evaluator's with the same limit."""
    view = folder.uids()
    metas = {m.uid: m for m in folder.messages()}
    paths = folder.paths(view)
    sizes = [Path(paths[uid]).stat().st_size for uid in view]
    limit = sorted(sizes)[len(sizes) // 2]
    for needle in [b"quarterly", b"report", b"budget draft", b"epilogue"]:
        predicate = S.compile([b"TEXT", needle])
        contexts = [S.SearchContext.fromFile(seq, metas[uid], paths[uid], lambda u=uid: folder.summary(u),
                                             len(view), view[-1], textLimit=limit)
                    for seq, uid in enumerate(view, 1)]
        bounded = S.searchFolder(predicate, folder, view, textLimit=limit)
        assert bounded == S.search(predicate, contexts)
        if needle == b"report":
            assert set(bounded) < set(S.searchFolder(predicate, folder, view))
