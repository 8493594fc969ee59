"""
A test plugin that hooks every stage: it writes each call to a file (so a test can check the
order) and answers as its [plugins.probe] table says.  Loaded through [plugins] paths by
tests/integration/test_plugins.py, like any third-party plugin.
"""

from twisted.internet import defer
from zope.interface import implementer

from pymaild import interfaces as i
from pymaild.pipeline import (Plugin, accept, addHeaders, fileInto, keys, quarantine, reject, removeHeaders,
                              tempfail)


@implementer(i.IConnectHook, i.IHeloHook, i.IAuthHook, i.IMailHook, i.IRcptHook, i.IDataHook, i.IDeliveryHook,
             i.IQueueHook, i.ILoginHook)
class Probe:
    def __init__(self, settings, context):
        self.s = settings
        self.clock = context.clock
        self.stateDirectory = context.stateDirectory

    def _record(self, stage, session, *words):
        """One line: the stage, the session's id (or -), what the hook was given."""
        with open(self.s["record"], "a") as f:
            f.write(" ".join([stage, session.id if session is not None else "-", *map(str, words)]) + "\n")

    def _special(self, stage):
        if self.s["fail"] == stage:
            raise RuntimeError(f"probe fails at {stage}")
        if self.s["hang"] == stage:
            return defer.Deferred()
        if self.s["later"] == stage:
            d = defer.Deferred()
            self.clock.callLater(0.2, d.callback, addHeaders(("X-Later", stage)))
            return d
        return None

    def connect(self, session):
        self._record("connect", session, session.protocol, session.peer)
        return self._special("connect")

    def helo(self, session):
        self._record("helo", session, session.helo)
        if session.helo in self.s["tempfail_helo"]:
            return tempfail(450, "4.7.1", "probe: come back later")
        return self._special("helo")

    def auth(self, session, login, succeeded):
        self._record("auth", session, login, succeeded)
        if succeeded and login in self.s["refuse_login"]:
            return reject()

    def mailFrom(self, session, transaction):
        self._record("mail", session, transaction.sender, session.user)
        return self._special("mail")

    def rcptTo(self, session, transaction, recipient):
        self._record("rcpt", session, recipient.address, recipient.kind, ",".join(sorted(recipient.users)))
        if recipient.address in self.s["reject_rcpt"]:
            return reject(553, "5.7.1", "probe says no")
        return self._special("rcpt")

    def endOfData(self, session, transaction, message):
        self._record("data", session, message.size, message.headers["Subject"])
        with message.open() as f:
            assert f.read(13) == b"Return-Path: "
        special = self._special("data")
        if special is not None:
            return special
        if self.s["accept_data"]:
            return accept()
        if self.s["quarantine_subject"] and self.s["quarantine_subject"] in (message.headers["Subject"] or ""):
            return quarantine("probe: suspicious subject")
        if self.s["remove"]:
            return removeHeaders(*self.s["remove"])
        if self.s["header"]:
            return addHeaders(("X-Probe", "seen"), ("X-Probe-Sender", transaction.sender))

    def deliver(self, session, transaction, delivery):
        self._record("delivery", session, delivery.user, delivery.recipient)
        for rule in self.s["folders"]:
            user, folder, flag = rule.split(":")
            if user == delivery.user:
                return fileInto(folder, flags=[flag] if flag else [], headers=[("X-Filed", folder)])
        return self._special("delivery")

    def queueEvent(self, event):
        self._record("queue", None, event.kind, event.recipient)

    def login(self, session, login, succeeded):
        self._record("login", session, session.protocol, login, succeeded)
        if succeeded and login in self.s["refuse_login"]:
            return reject()


def _stage(value):
    value = keys.string(value)
    if value and value not in ("connect", "helo", "auth", "mail", "rcpt", "data", "delivery", "login"):
        raise ValueError(f"{value!r} is not a stage")
    return value


probe = Plugin("probe", Probe, keys={
    "record": keys.Key(keys.string, "", "where each call is written"),
    "reject_rcpt": keys.Key(keys.listOf(keys.string), (), "recipients to reject"),
    "tempfail_helo": keys.Key(keys.listOf(keys.string), (), "HELO names to tempfail"),
    "refuse_login": keys.Key(keys.listOf(keys.string), (), "logins to refuse after a right password"),
    "header": keys.Key(keys.boolean, False, "add X-Probe fields at end of data"),
    "accept_data": keys.Key(keys.boolean, False, "accept at end of data (the later plugins are not asked)"),
    "remove": keys.Key(keys.listOf(keys.string), (), "header fields to remove at end of data"),
    "quarantine_subject": keys.Key(keys.string, "", "quarantine messages whose subject has this"),
    "folders": keys.Key(keys.listOf(keys.string), (), "user:folder:flag delivery rules"),
    "fail": keys.Key(_stage, "", "raise at this stage"),
    "hang": keys.Key(_stage, "", "never answer at this stage"),
    "later": keys.Key(_stage, "", "answer 0.2 s later at this stage"),
}, description="records every hook call (tests)")
