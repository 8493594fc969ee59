# -*- test-case-name: tests.test_log -*-
"""
Logging: pymaild logs through C{twisted.logger}, one event per connection, login and delivery,
with the fields an administrator greps for as event keys (C{protocol}, C{peer}, C{user},
C{result} ...).

C{twistd --logger=pymaild.log.jsonLogger pymaild ...} replaces twistd's text log with one JSON
object per line on standard output (for journald, Loki, jq): C{time}, C{level}, C{namespace},
C{text}, then the event's own fields.

twistd's own text log (its default) keeps its lines, made faster: L{quickenTextLog}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, formatEvent, formatTime, globalLogPublisher, timeFormatRFC3339
from zope.interface import implementer


#: keys of events from the legacy C{twisted.python.log} API that C{text} already carries.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "failure", "why"})


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Write each event as one line of JSON.
    """

    def __init__(self, out: IO[str]):
        self._out = out

    def __call__(self, event: dict) -> None:
        record = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "text": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key.startswith(("log_", "_")) or key in record or key in _LEGACY_KEYS:
                continue
            record[key] = value
        try:
            line = json.dumps(record, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            line = json.dumps({k: str(v) for k, v in record.items()}, ensure_ascii=False)
        self._out.write(line + "\n")
        self._out.flush()


def jsonLogger() -> JSONLineObserver:
    """
    The log observer factory named by C{twistd --logger=pymaild.log.jsonLogger}.
    """
    return JSONLineObserver(sys.stdout)


class ClassicText:
    """
    The lines of twistd's text log (C{textFileLogObserver}: L{formatEventAsClassicLogText} with
    L{timeFormatRFC3339}), the same text made faster: Twisted's formatting cost ~50 us an
    event, about half in C{string.Formatter} and half in the time stamp: without the two log
    lines of every queued message the queue's reactor thread used a quarter less CPU.  Here the time
    stamp is made once a second, the text by C{str.format_map}; an event this does not make
    exactly as Twisted would (a traceback, a C{{name()}} call, a field that fails, a stamp that
    rounds into the next second) goes to Twisted's own formatter, C{original}.
    """

    def __init__(self, original):
        self.original = original
        self._stamp = (None, "")  # (second, its text), replaced whole: threads log too

    def __call__(self, event: dict) -> str | None:
        format = event.get("log_format")
        if type(format) is not str or "log_failure" in event or "log_flattened" in event:
            return self.original(event)
        try:
            text = format.format_map(event)
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
            else:
                system = str(system)
        except Exception:
            return self.original(event)
        if not text:
            return None
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if not 0 <= when - second < 0.9999995:  # (rounded to microseconds: the next second)
                return self.original(event)
            cached, stamp = self._stamp
            if cached != second:
                stamp = formatTime(second, timeFormatRFC3339)
                self._stamp = (second, stamp)
        line = f"{stamp} [{system}] {text}"
        return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"


def quickenTextLog(publisher=None) -> int:
    """
    Give the text log observers that twistd made (C{textFileLogObserver}, its default time
    format) L{ClassicText}: the same lines, faster.  Called once logging has begun (the
    service's start); observers made otherwise (C{--logger}, C{--syslog}) are left alone.
    Returns how many were changed.
    """
    count = 0
    publisher = globalLogPublisher if publisher is None else publisher
    for observer in list(getattr(publisher, "_observers", ())):
        made = getattr(observer, "formatEvent", None)
        if not isinstance(observer, FileLogObserver) or isinstance(made, ClassicText) \
                or getattr(made, "__qualname__", "") != "textFileLogObserver.<locals>.formatEvent":
            continue
        try:
            cells = dict(zip(made.__code__.co_freevars, (c.cell_contents for c in made.__closure__ or ())))
        except ValueError:  # (an empty cell)
            continue
        if cells.get("timeFormat") != timeFormatRFC3339:
            continue
        observer.formatEvent = ClassicText(made)
        count += 1
    return count
