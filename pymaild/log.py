# -*- test-case-name: tests.test_log -*-
"""
Logging: pymaild logs through C{twisted.logger}, one event per connection, login and delivery,
with the fields an administrator greps for as event keys (C{protocol}, C{peer}, C{user},
C{result} ...).

C{twistd --logger=pymaild.log.jsonLogger pymaild ...} replaces twistd's text log with one JSON
object per line on standard output (for journald, Loki, jq): C{time}, C{level}, C{namespace},
C{text}, then the event's own fields.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import ILogObserver, formatEvent
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
