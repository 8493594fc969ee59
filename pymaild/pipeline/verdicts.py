# -*- test-case-name: tests.pipeline.test_pipeline -*-
"""
What a plugin's hook answers: a L{Verdict}.

A hook returns a verdict, C{None} (the same as L{CONTINUE}), or a Deferred or coroutine of one.
The constructors below are the public way to make them::

    CONTINUE                                  go on with the next plugin
    accept()                                  this stage says yes: the later plugins of this stage are skipped
    reject(550, "5.7.1", "No thanks")         a permanent refusal (5xx)
    tempfail(451, "4.7.1", "Try later")       a temporary refusal (4xx)
    addHeaders(("X-Tag", "external"))         go on, and add these header fields to the message
    removeHeaders("X-Spam-Flag")              go on, and remove these fields from the message (end of data)
    quarantine("why")                         accept the message (250) but hold it in the quarantine
    fileInto("Lists/dev", flags=["\\\\Seen"])   local delivery: this folder and these flags

What each verdict means at each stage is in L{pymaild.pipeline.stages}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTINUE_ = "continue"
ACCEPT = "accept"
REJECT = "reject"
TEMPFAIL = "tempfail"
QUARANTINE = "quarantine"

_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 2.2 ftext


@dataclass(frozen=True)
class Verdict:
    """
    @ivar action: C{"continue"}, C{"accept"}, C{"reject"}, C{"tempfail"} or C{"quarantine"}.
    @ivar code: the SMTP reply code of a refusal (C{None}: the stage's default).
    @ivar status: its enhanced status code (RFC 3463), e.g. C{"5.7.1"}.
    @ivar text: the text the client sees (one line, ASCII).
    @ivar headers: C{((name, value), ...)} to add to the message.
    @ivar remove: header field names to remove from the message (end of data only).
    @ivar folder: local delivery: the folder to deliver into (C{None}: INBOX).
    @ivar flags: local delivery: IMAP system flags to set (C{\\Seen}, C{\\Flagged}, ...).
    """

    action: str = CONTINUE_
    code: int | None = None
    status: str | None = None
    text: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    folder: str | None = None
    flags: tuple[str, ...] = ()

    @property
    def refuses(self) -> bool:
        return self.action in (REJECT, TEMPFAIL)

    @property
    def ends(self) -> bool:
        """Whether the stage's later plugins are skipped."""
        return self.action != CONTINUE_


CONTINUE = Verdict()


def _text(text: str, default: str) -> str:
    text = " ".join(str(text if text is not None else default).split())
    return text.encode("ascii", "replace").decode("ascii")[:400] or default


def _reply(code: int, status: str, low: int, high: int, what: str) -> tuple[int, str]:
    if not isinstance(code, int) or not low <= code <= high:
        raise ValueError(f"{what} needs a reply code from {low} to {high}, not {code!r}")
    if not re.match(r"^[245]\.\d{1,3}\.\d{1,3}$", status or "") or status[0] != str(code)[0]:
        raise ValueError(f"{what}: {status!r} is not an enhanced status code of class {str(code)[0]}")
    return code, status


def accept() -> Verdict:
    """This stage says yes: the later plugins of this stage are not asked."""
    return Verdict(ACCEPT)


def reject(code: int = 550, status: str = "5.7.1", text: str = "Refused by policy") -> Verdict:
    """A permanent refusal: C{code} 500-599 with an enhanced status code of class 5."""
    code, status = _reply(code, status, 500, 599, "reject")
    return Verdict(REJECT, code, status, _text(text, "Refused by policy"))


def tempfail(code: int = 451, status: str = "4.7.1", text: str = "Try again later") -> Verdict:
    """A temporary refusal: C{code} 400-499 with an enhanced status code of class 4."""
    code, status = _reply(code, status, 400, 499, "tempfail")
    return Verdict(TEMPFAIL, code, status, _text(text, "Try again later"))


def _field(name: str, value: str) -> tuple[str, str]:
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise ValueError(f"{name!r} is not a header field name")
    value = " ".join(str(value).split())  # (one line: no header injection)
    return name, value


def addHeaders(*fields: tuple[str, str]) -> Verdict:
    """Go on, and add these C{(name, value)} header fields (at the top, after the trace fields)."""
    return Verdict(headers=tuple(_field(n, v) for n, v in fields))


def removeHeaders(*names: str) -> Verdict:
    """Go on, and remove every field with one of these names (end of data; not the trace fields)."""
    for name in names:
        _field(name, "")
    return Verdict(remove=tuple(names))


def quarantine(text: str = "Held for review") -> Verdict:
    """Accept the message but hold it in the quarantine (C{pymaildctl quarantine}) instead of delivering it."""
    return Verdict(QUARANTINE, text=_text(text, "Held for review"))


SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


def fileInto(folder: str | None = None, flags=(), headers=()) -> Verdict:
    """
    Local delivery: into C{folder} (C{None}: INBOX; a folder that does not exist means INBOX, as
    Sieve's implicit keep), with these system C{flags}, and these C{(name, value)} fields added.
    """
    canon = {f.lower(): f for f in SYSTEM_FLAGS}
    out = []
    for flag in flags:
        known = canon.get(str(flag).lower())
        if known is None:
            raise ValueError(f"{flag!r} is not an IMAP system flag ({', '.join(SYSTEM_FLAGS)})")
        out.append(known)
    return Verdict(folder=folder, flags=tuple(out), headers=tuple(_field(n, v) for n, v in headers))


def coerce(value) -> Verdict:
    """A hook's answer as a Verdict (C{None} is L{CONTINUE}); anything else is a TypeError."""
    if value is None:
        return CONTINUE
    if isinstance(value, Verdict):
        return value
    raise TypeError(f"a hook returned {value!r}, not a Verdict")
