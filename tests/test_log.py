"""
pymaild.log: the text log's faster formatter (L{ClassicText}) makes exactly the lines twistd's
own makes, and L{quickenTextLog} gives it only to the observers twistd made.
"""

from __future__ import annotations

import io

import pytest
from twisted.logger import (
    FileLogObserver,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure

from pymaild.log import ClassicText, quickenTextLog


def twisted(event):
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))


class Odd:
    def __str__(self):
        raise RuntimeError("no text")

    def __repr__(self):
        return "<Odd>"


def failure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


BASE = {"log_time": 1764550000.25, "log_level": LogLevel.info, "log_namespace": "pymaild.queue.runner"}

EVENTS = [
    {"log_format": "queue: {id} to <{rcpt}> delivered via {mta}: {reply}", "id": "abc", "rcpt": "a@b.test",
     "mta": "mx.b.test", "reply": "250 2.0.0 Ok"},
    {"log_format": "plain text, no fields"},
    {"log_format": "{a!r} {b:>8} {c:.2f} {d[k]} {e.real}", "a": "x'y", "b": "right", "c": 3.14159, "d": {"k": "v"},
     "e": 5},
    {"log_format": "two\nlines and a\ttab", "log_time": 1764550000.0},
    {"log_format": "unicode: {who}", "who": "Jürgen <j@exämple.test>"},
    {"log_format": "{missing} field"},  # (Twisted's "Unable to format event" text)
    {"log_format": "a call: {f()}", "f": lambda: "called"},
    {"log_format": "positional {} and {0}"},
    {"log_format": "{odd}", "odd": Odd()},
    {"log_format": ""},  # nothing to write
    {"log_format": None},
    {"log_format": b"bytes {x}", "x": 1},
    {"log_format": "with a failure", "log_failure": failure()},
    {"log_format": "system given", "log_system": "custom,1,127.0.0.1"},
    {"log_format": "system that cannot be text", "log_system": Odd()},
    {"log_format": "no level", "log_level": None},
    {"log_format": "no namespace", "log_namespace": "-"},
    {"log_format": "no time", "log_time": None},
    {"log_format": "just before the next second", "log_time": 1764550000.9999996},
    {"log_format": "almost", "log_time": 1764550000.9999994},
    {"log_format": "whole second", "log_time": 1764550001.0},
    {"log_format": "long ago", "log_time": 86400.5},
]


@pytest.mark.parametrize("extra", EVENTS, ids=range(len(EVENTS)))
def test_the_lines_are_twisteds(extra):
    event = {**BASE, **extra}
    if extra.get("log_level", 0) is None:
        del event["log_level"]
    if extra.get("log_namespace") == "-":
        del event["log_namespace"]
    assert ClassicText(twisted)(event) == twisted(event)


def test_the_time_stamp_is_made_once_a_second_and_follows_the_clock():
    calls = []
    text = ClassicText(lambda event: calls.append(event) or "Twisted's\n")
    lines = [text({**BASE, "log_format": "n {n}", "n": n, "log_time": 1764550000 + n / 4}) for n in range(12)]
    assert calls == []
    assert lines == [twisted({**BASE, "log_format": "n {n}", "n": n, "log_time": 1764550000 + n / 4})
                     for n in range(12)]
    assert len({line.split()[0] for line in lines}) == 3


def test_twistds_text_observers_alone_get_it():
    out, other, json = io.StringIO(), io.StringIO(), io.StringIO()
    publisher = LogPublisher()
    text = textFileLogObserver(out)
    custom = textFileLogObserver(other, timeFormat="%H:%M")
    own = FileLogObserver(io.StringIO(), lambda event: "mine\n")
    jsonObserver = jsonFileLogObserver(json)
    for observer in (text, custom, own, jsonObserver):
        publisher.addObserver(observer)
    assert quickenTextLog(publisher) == 1
    assert isinstance(text.formatEvent, ClassicText)
    assert not isinstance(custom.formatEvent, ClassicText) and own.formatEvent(BASE) == "mine\n"
    assert quickenTextLog(publisher) == 0  # (once)
    for observer in (custom, own, jsonObserver):  # (JSON cannot hold a lambda: an error event)
        publisher.removeObserver(observer)
    for extra in EVENTS:
        publisher({**BASE, **extra})
    expected = "".join(twisted({**BASE, **extra}) or "" for extra in EVENTS)
    # (the failure's traceback is the same text too)
    assert out.getvalue() == expected
