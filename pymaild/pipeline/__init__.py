"""
pymaild's plugin API: everything a plugin imports comes from here.

A plugin module (see C{docs/plugins.md} and C{examples/plugins/})::

    from zope.interface import implementer
    from pymaild.interfaces import IRcptHook
    from pymaild.pipeline import Plugin, keys, reject

    @implementer(IRcptHook)
    class NoTypos:
        def __init__(self, settings, context):
            self.domains = set(settings["domains"])

        def rcptTo(self, session, transaction, recipient):
            if recipient.address.rpartition("@")[2].lower() in self.domains:
                return reject(550, "5.1.2", "Did you mean another domain?")

    plugin = Plugin("no-typos", NoTypos, keys={"domains": keys.Key(keys.listOf(keys.domain), (), "typo domains")})

The stages, their order and what each verdict means there: L{pymaild.pipeline.stages}.
"""

from pymaild.pipeline import keys
from pymaild.pipeline.plugin import Plugin, PluginContext
from pymaild.pipeline.stages import Delivery, Message, QueueEvent, Recipient, Session, Transaction
from pymaild.pipeline.verdicts import (
    CONTINUE,
    Verdict,
    accept,
    addHeaders,
    fileInto,
    quarantine,
    reject,
    removeHeaders,
    tempfail,
)

__all__ = [
    "CONTINUE", "Delivery", "Message", "Plugin", "PluginContext", "QueueEvent", "Recipient", "Session",
    "Transaction", "Verdict", "accept", "addHeaders", "fileInto", "keys", "quarantine", "reject",
    "removeHeaders", "tempfail",
]
