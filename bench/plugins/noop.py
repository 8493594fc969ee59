"""
A plugin that hooks every SMTP stage and says nothing (bench/plugins_bench.py): what the
pipeline itself costs, apart from what the built-ins do.
"""

from zope.interface import implementer

from pymaild import interfaces as i
from pymaild.pipeline import Plugin


@implementer(i.IConnectHook, i.IHeloHook, i.IMailHook, i.IRcptHook, i.IDataHook, i.IDeliveryHook)
class Noop:
    def __init__(self, settings, context):
        pass

    def connect(self, session):
        return None

    def helo(self, session):
        return None

    def mailFrom(self, session, transaction):
        return None

    def rcptTo(self, session, transaction, recipient):
        return None

    def endOfData(self, session, transaction, message):
        return None

    def deliver(self, session, transaction, delivery):
        return None


noop = Plugin("noop", Noop, description="hooks every SMTP stage and says nothing")
