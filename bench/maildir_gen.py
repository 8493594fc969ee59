"""
Generate a realistic maildir for the store benchmark, deterministically (a fixed seed).

Every message has the headers a real mailbox has (Return-Path, Received chains, a DKIM
signature, Message-ID, threading headers, MIME headers), stored with LF line ends as Dovecot and
pymaild store them.  The default mix (C{mix="mixed"}) has the sizes and MIME structures of an
office mailbox: 62% plain text of 2-4 KB, 20% multipart/alternative (text and quoted-printable
HTML, 4-12 KB), 11% multipart/mixed with a base64 attachment of 8-40 KB, 5% forwards (a
message/rfc822 part inside multipart/mixed), 2% with an attachment of 150-300 KB: about 13 KB
on average.  C{mix="plain"} is the corpus of the figures before 2026-11-29: every message
2-4 KB of plain text.  Files go straight into C{cur/} with the
names Dovecot's own delivery gives them::

    <secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>,W=<size with CRLF>:2,<flags>

so neither server has to move anything from C{new/} and both see byte-identical files.  The
file's mtime (the IMAP internal date) is its delivery time; most messages are seen, some
answered or flagged, about 15% unseen.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

SEED = 20240603

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "can more about said out up them some what could into than other time then only its also "
    "after two new first any these may such like over our even most made before must well back "
    "through years where much your way down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go "
    "came right used take three meeting budget report draft schedule review release server client "
    "invoice project quarter deadline update please thanks regards attached agenda follow minutes"
).split()

_FIRST = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy Rupert Sybil Trent Victor Walter".split()
_LAST = "Smith Jones Brown Taylor Wilson Evans Thomas Roberts Walker Wright Robinson Thompson White Hughes Edwards Green".split()
_DOMAINS = "example.org example.net lists.example.com corp.example mail.example.edu partner.example".split()
_SUBJECTS = [
    "quarterly report draft", "meeting notes", "invoice", "release schedule", "server maintenance window",
    "lunch on friday?", "budget review", "project kickoff", "your order has shipped", "weekly digest",
    "holiday plans", "contract renewal", "build failures on main", "security advisory", "travel booking",
]
_MAILERS = ["Mozilla Thunderbird 115.3", "Apple Mail (2.3731)", "Microsoft Outlook 16.0", "Mutt/2.2.9", "Roundcube Webmail/1.6"]
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

START = 1672531200  # 2023-01-01 00:00:00 UTC


def _rfc2822(t: int) -> str:
    tm = time.gmtime(t)
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year}"
            f" {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000")


class MessageFactory:
    """
    Builds message bytes quickly: bodies are slices of one pre-generated text.
    """

    def __init__(self, seed: int = SEED):
        self.rng = rng = random.Random(seed)
        lines, line = [], []
        width = 0
        for _ in range(60000):
            w = rng.choice(_WORDS)
            if width + len(w) + 1 > 72:
                lines.append(" ".join(line))
                line, width = [], 0
            line.append(w)
            width += len(w) + 1
            if rng.random() < 0.02 and line:
                lines.append(" ".join(line))
                lines.append("")
                line, width = [], 0
        self.lines = [l + "\n" for l in lines]

    def _b64(self, n: int) -> str:
        return "".join(self.rng.choice(_B64) for _ in range(n))

    def _text(self, want: int) -> str:
        body, blen = [], 0
        i = self.rng.randrange(len(self.lines))
        while blen < want:
            line = self.lines[i % len(self.lines)]
            body.append(line)
            blen += len(line)
            i += 1
        return "".join(body)

    def _base64(self, size: int) -> str:
        """C{size} bytes of attachment as base64 lines of 76 (random, so incompressible)."""
        import base64

        return base64.encodebytes(self.rng.randbytes(size)).decode("ascii").replace("\n", "\n")

    def _html(self, text: str) -> str:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        html = "<html><head><meta http-equiv=3D\"Content-Type\" content=3D\"text/html; charset=3Dutf-8\"></head>\n<body>\n"
        for p in paragraphs:
            html += "<p style=3D\"margin:0\">" + p.replace("\n", " ").strip()[:900] + "</p>\n"
        lines = []
        for line in (html + "</body></html>\n").splitlines():
            while len(line) > 75:  # (quoted-printable soft line breaks)
                lines.append(line[:75] + "=")
                line = line[75:]
            lines.append(line)
        return "\n".join(lines) + "\n"

    def structured(self, n: int, t: int, kind: str) -> bytes:
        """A MIME message: C{kind} is alternative, attachment, forward or large."""
        rng = self.rng
        boundary = f"----=_Part_{n}_{self._b64(12).replace('/', 'a').replace('+', 'b')}"
        plain = self.message(n, t, 0, headOnly=True)
        head = plain.decode("ascii").replace(
            'Content-Type: text/plain; charset="utf-8"; format=flowed\nContent-Transfer-Encoding: 7bit\n', "")
        text = self._text(rng.randint(1500, 4000))
        parts = []
        if kind == "alternative":
            ctype = "multipart/alternative"
            parts.append('Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 7bit\n\n' + text)
            parts.append('Content-Type: text/html; charset="utf-8"\nContent-Transfer-Encoding: quoted-printable\n\n'
                         + self._html(text))
        else:
            ctype = "multipart/mixed"
            parts.append('Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 7bit\n\n' + text)
            if kind == "forward":
                inner = self.message(n + 1_000_000, t - rng.randint(3600, 86400 * 30), rng.randint(2048, 6000))
                parts.append("Content-Type: message/rfc822\nContent-Disposition: inline\n\n" + inner.decode("ascii"))
            else:
                size = rng.randint(150_000, 300_000) if kind == "large" else rng.randint(8_000, 40_000)
                name, mime = rng.choice([("report.pdf", "application/pdf"), ("photo.jpg", "image/jpeg"),
                                         ("figures.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
                                         ("notes.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document")])
                parts.append(f'Content-Type: {mime}; name="{name}"\nContent-Transfer-Encoding: base64\n'
                             f'Content-Disposition: attachment; filename="{name}"\n\n' + self._base64(size))
        head = head.replace("MIME-Version: 1.0\n", f'MIME-Version: 1.0\nContent-Type: {ctype};\n\tboundary="{boundary}"\n')
        body = "This is a multi-part message in MIME format.\n"
        for part in parts:
            body += f"\n--{boundary}\n" + part
        body += f"\n--{boundary}--\n"
        return (head + body).encode("ascii")

    def message(self, n: int, t: int, size: int, headOnly: bool = False) -> bytes:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        domain = rng.choice(_DOMAINS)
        sender = f"{first.lower()}.{last.lower()}@{domain}"
        date = _rfc2822(t)
        msgid = f"<{t:x}.{n:06d}.{self._b64(8).replace('/', 'x').replace('+', 'y')}@{domain}>"
        subject = rng.choice(_SUBJECTS) + f" #{n % 997}"
        reply = rng.random() < 0.4
        h = [
            f"Return-Path: <{sender}>",
            "Delivered-To: bench@example.com",
            f"Received: from mx{rng.randint(1, 4)}.{domain} (mx.{domain} [192.0.2.{rng.randint(1, 254)}])",
            f"\tby mail.example.com (pymaild) with ESMTPS id {self._b64(10).replace('/', 'Q').replace('+', 'P')}",
            f"\tfor <bench@example.com>; {date}",
            f"Received: from [10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}] (unknown [198.51.100.{rng.randint(1, 254)}])",
            f"\tby mx.{domain} (Postfix) with ESMTPSA id {self._b64(8).replace('/', 'Z').replace('+', 'Y')}",
            f"\tfor <bench@example.com>; {date}",
            f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; s=mail;",
            f"\tt={t}; h=from:to:subject:date:message-id;",
            f"\tbh={self._b64(43)}=;",
            f"\tb={self._b64(70)}",
            f"\t {self._b64(70)}",
            f"\t {self._b64(30)}==",
            f"Message-ID: {msgid}",
            f"Date: {date}",
            f'From: "{first} {last}" <{sender}>',
            "To: Bench User <bench@example.com>",
        ]
        if rng.random() < 0.3:
            h.append(f"Cc: {rng.choice(_FIRST)} <{rng.choice(_FIRST).lower()}@{rng.choice(_DOMAINS)}>")
        h.append(f"Subject: {'Re: ' if reply else ''}{subject}")
        if reply:
            ref = f"<{t - rng.randint(60, 86400):x}.{rng.randint(0, 999999):06d}@{domain}>"
            h += [f"In-Reply-To: {ref}", f"References: {ref}"]
        h += [
            "MIME-Version: 1.0",
            'Content-Type: text/plain; charset="utf-8"; format=flowed',
            "Content-Transfer-Encoding: 7bit",
            f"User-Agent: {rng.choice(_MAILERS)}",
        ]
        head = "\n".join(h) + "\n\n"
        if headOnly:
            return head.encode("ascii")
        body = []
        blen = 0
        want = max(200, size - len(head))
        i = rng.randrange(len(self.lines))
        while blen < want:
            line = self.lines[i % len(self.lines)]
            body.append(line)
            blen += len(line)
            i += 1
        return (head + "".join(body)).encode("ascii")


def fourKilobyteMessage() -> bytes:
    """
    The message the delivery benchmark stores: exactly 4096 bytes, LF line ends.
    """
    data = MessageFactory(SEED + 1).message(1, START, 4096)
    data = data[:4095]
    return data[: data.rfind(b"\n") + 1].ljust(4095, b"x") + b"\n"


def _flags(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return ""
    letters = "S"
    if rng.random() < 0.12:
        letters = "R" + letters
    if rng.random() < 0.04:
        letters = "F" + letters
    return letters


#: the default mix: (share, kind); kinds other than plain are L{MessageFactory.structured}'s
MIX = ((0.62, "plain"), (0.20, "alternative"), (0.11, "attachment"), (0.05, "forward"), (0.02, "large"))


DEFAULT_MIX = "mixed"


def generate(maildir: Path, count: int, seed: int = SEED, progress=None, mix: str = DEFAULT_MIX) -> dict:
    """
    Write C{count} messages into C{maildir/cur} (creating C{cur new tmp}); C{mix} is "mixed"
    (sizes and MIME structures of an office mailbox) or "plain" (2-4 KB of plain text).

    @return: C{{"messages": n, "bytes": total}}.
    """
    maildir = Path(maildir)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    factory = MessageFactory(seed)
    rng = random.Random(seed + 7)
    cur = str(maildir / "cur")
    total = 0
    t = START
    for n in range(1, count + 1):
        t += rng.randint(30, 600)
        size = rng.randint(2048, 4096)
        kind = "plain"
        if mix == "mixed":
            r, acc = rng.random(), 0.0
            for share, kind in MIX:
                acc += share
                if r < acc:
                    break
        data = factory.message(n, t, size) if kind == "plain" else factory.structured(n, t, kind)
        vsize = len(data) + data.count(b"\n")
        name = (f"{t}.M{rng.randint(0, 999999)}P{rng.randint(1000, 99999)}Q{n}.mail.example.com"
                f",S={len(data)},W={vsize}:2,{_flags(rng)}")
        path = os.path.join(cur, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.utime(path, (t, t))
        total += len(data)
        if progress is not None and n % 10000 == 0:
            progress(n)
    return {"messages": count, "bytes": total, "mix": mix}


def linkCopy(src: Path, dst: Path) -> None:
    """
    A second maildir whose C{cur/} files are hard links to C{src}'s: the same bytes and inodes
    under a different directory (each server keeps its own index files in its own root).
    """
    for sub in ("cur", "new", "tmp"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("cur", "new"):
        s, d = os.path.join(src, sub), os.path.join(dst, sub)
        with os.scandir(s) as it:
            for entry in it:
                os.link(entry.path, os.path.join(d, entry.name))


def settle(maildir: Path, age: int = 3600) -> None:
    """
    Date C{cur/} and C{new/} back by C{age} seconds: a folder that last changed an hour ago,
    whose directory stamps both servers may trust (a just-changed directory is rescanned).
    """
    t = time.time() - age
    for sub in ("cur", "new", "tmp"):
        os.utime(Path(maildir) / sub, (t, t))
