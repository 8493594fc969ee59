# -*- test-case-name: tests.plugins.test_builtin_plugins -*-
"""
C{headers}: add, remove and rewrite header fields by simple rules, at the end of data.

Each rule applies C{when} the message is:

  - C{always};
  - C{external}: from a client that neither logged in nor is in C{[smtp] trusted_networks}
    (mail from the internet);
  - C{internal}: from a logged-in or trusted client.

Configuration (C{[plugins.headers]})::

    add = [{name = "X-External", value = "yes", when = "external"}]
    remove = [{name = "X-Spam-Flag", when = "external"}]          # or just ["X-Spam-Flag"]
    rewrite = [{name = "Subject", match = "^", replace = "[EXT] ", when = "external"}]

A rewrite replaces the first match of the regular expression C{match} in the field's value
(decoded, Unicode) by C{replace} (Python C{re.sub} syntax: C{\\\\1} for a group); the field is
removed and added again with the new value.  A message without the field is left alone.
"""

from __future__ import annotations

import re

from zope.interface import implementer

from pymaild.interfaces import IDataHook
from pymaild.pipeline import Plugin, Verdict, addHeaders, keys

WHEN = ("always", "external", "internal")


def _regex(value):
    value = keys.string(value)
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a regular expression: {e}") from None


def _fieldName(value):
    value = keys.string(value).strip()
    addHeaders((value, ""))  # (raises ValueError for a name that cannot be a field name)
    return value


def _removeRule(value):
    if isinstance(value, str):
        return {"name": _fieldName(value), "when": "always"}
    return keys.table({"name": keys.Key(_fieldName, "", "field name"),
                       "when": keys.Key(keys.choice(*WHEN), "always", "when")})(value)


_ADD = keys.table({
    "name": keys.Key(_fieldName, "", "the field's name"),
    "value": keys.Key(keys.string, "", "its value"),
    "when": keys.Key(keys.choice(*WHEN), "always", "always, external or internal"),
})
_REWRITE = keys.table({
    "name": keys.Key(_fieldName, "", "the field's name"),
    "match": keys.Key(_regex, re.compile(""), "a regular expression"),
    "replace": keys.Key(keys.string, "", "what the first match becomes"),
    "when": keys.Key(keys.choice(*WHEN), "always", "always, external or internal"),
})


@implementer(IDataHook)
class HeaderRules:
    def __init__(self, settings, context):
        for rule in settings["add"] + settings["rewrite"]:
            if not rule["name"]:
                raise ValueError("every add and rewrite rule needs a name")
        self.add = settings["add"]
        self.remove = settings["remove"]
        self.rewrite = settings["rewrite"]

    @staticmethod
    def _applies(when: str, session) -> bool:
        internal = bool(session.user) or session.trusted
        return when == "always" or (when == "internal") == internal

    def endOfData(self, session, transaction, message):
        add = [(r["name"], r["value"]) for r in self.add if self._applies(r["when"], session)]
        remove = [r["name"] for r in self.remove if self._applies(r["when"], session)]
        for rule in self.rewrite:
            value = message.get(rule["name"]) if self._applies(rule["when"], session) else None
            if value is None:
                continue
            remove.append(rule["name"])
            add.append((rule["name"], rule["match"].sub(rule["replace"], str(value), count=1)))
        if not add and not remove:
            return None
        return Verdict(headers=addHeaders(*add).headers, remove=tuple(remove))


headers = Plugin("headers", HeaderRules, keys={
    "add": keys.Key(keys.listOf(_ADD, "tables"), (), "fields to add: {name, value, when}"),
    "remove": keys.Key(keys.listOf(_removeRule, "field names or tables"), (), "fields to remove: name or {name, when}"),
    "rewrite": keys.Key(keys.listOf(_REWRITE, "tables"), (), "fields to rewrite: {name, match, replace, when}"),
}, description="add, remove and rewrite header fields")
