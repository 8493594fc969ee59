"""
The pipeline runner: hooks in order, verdicts folded into one outcome, accept ending a stage,
exceptions and timeouts handled by each plugin's on_error policy, Deferreds and coroutines.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from zope.interface import implementer

from pymaild.interfaces import IMailHook, IRcptHook
from pymaild.pipeline import accept, addHeaders, fileInto, quarantine, reject, removeHeaders, tempfail
from pymaild.pipeline.runner import Entry, Pipeline


@implementer(IMailHook, IRcptHook)
class Hooks:
    def __init__(self, answer, calls=None, name="x"):
        self.answer, self.calls, self.name = answer, calls if calls is not None else [], name

    def mailFrom(self, session, transaction):
        self.calls.append(self.name)
        return self.answer() if callable(self.answer) else self.answer

    rcptTo = None  # (provides the interface; only mailFrom is used here)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def pipeline(*answers, clock=None, onError="continue", timeout=5.0):
    calls = []
    entries = [Entry(f"p{i}", Hooks(a, calls, f"p{i}"), timeout, onError) for i, a in enumerate(answers)]
    return Pipeline(entries, clock or task.Clock()), calls


def test_in_order_until_one_ends_the_stage():
    p, calls = pipeline(None, addHeaders(("X-A", "1")), reject(554, "5.7.1", "no"), addHeaders(("X-B", "2")))
    outcome = result(p.run("mail", None, None))
    assert calls == ["p0", "p1", "p2"]
    assert outcome.action == "reject" and outcome.plugin == "p2"
    assert outcome.reply(550, "5.7.1", "x") == (554, "5.7.1", "no")
    assert outcome.headers == [("X-A", "1")]


def test_accept_skips_the_later_plugins_and_continue_runs_all():
    p, calls = pipeline(accept(), reject())
    assert result(p.run("mail", None, None)).action == "accept" and calls == ["p0"]
    p, calls = pipeline(None, addHeaders(("X-A", "1")), removeHeaders("X-Spam"))
    outcome = result(p.run("mail", None, None))
    assert outcome.action == "continue" and calls == ["p0", "p1", "p2"] and outcome.remove == ["X-Spam"]


def test_stage_without_hooks_is_free():
    p, _ = pipeline(None)
    assert p.has("mail") and p.has("rcpt") and not p.has("connect") and not p.has("data")


def test_an_exception_follows_the_plugins_policy():
    def boom():
        raise RuntimeError("plugin bug")

    p, calls = pipeline(boom, addHeaders(("X-After", "1")))
    outcome = result(p.run("mail", None, None))
    assert outcome.action == "continue" and outcome.headers == [("X-After", "1")]  # (fail open)
    p, calls = pipeline(boom, addHeaders(("X-After", "1")), onError="tempfail")
    outcome = result(p.run("mail", None, None))
    assert outcome.action == "tempfail" and outcome.reply(550, "5.7.1", "x")[:2] == (451, "4.3.0") and calls == ["p0"]


def test_a_hook_past_its_timeout():
    clock = task.Clock()
    never = defer.Deferred()
    p, calls = pipeline(lambda: never, addHeaders(("X-After", "1")), clock=clock, timeout=3)
    d = p.run("mail", None, None)
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.2)
    assert result(d).headers == [("X-After", "1")] and calls == ["p0", "p1"]
    p, _ = pipeline(lambda: defer.Deferred(), clock=clock, timeout=3, onError="tempfail")
    d = p.run("mail", None, None)
    clock.advance(3)
    assert result(d).action == "tempfail"


def test_deferreds_and_coroutines():
    later = defer.Deferred()

    async def coroutine():
        await defer.succeed(None)
        return tempfail(450, "4.2.0", "busy")

    p, _ = pipeline(lambda: later, coroutine)
    d = p.run("mail", None, None)
    assert not d.called
    later.callback(addHeaders(("X-Later", "yes")))
    outcome = result(d)
    assert outcome.headers == [("X-Later", "yes")] and outcome.reply(451, "4.7.1", "x") == (450, "4.2.0", "busy")


def test_a_wrong_answer_is_an_error_and_a_meaningless_verdict_continues():
    p, calls = pipeline("yes", quarantine("hm"), clock=None, onError="tempfail")
    assert result(p.run("mail", None, None)).action == "tempfail"
    p, calls = pipeline(fileInto("Lists"), None)  # (fileInto means something at delivery only)
    outcome = result(p.run("mail", None, None))
    assert outcome.action == "continue" and calls == ["p0", "p1"]


def test_verdicts_check_their_arguments():
    for bad in (lambda: reject(450), lambda: reject(550, "4.7.1"), lambda: tempfail(550),
                lambda: addHeaders(("Bad Name", "x")), lambda: fileInto("x", flags=["Seen"])):
        with pytest.raises(ValueError):
            bad()
    assert addHeaders(("X-A", "line1\r\nBcc: someone@example.com")).headers == (("X-A", "line1 Bcc: someone@example.com"),)
    assert reject(text="caf\u00e9\r\n250 OK").text == "caf? 250 OK"


def test_replace_swaps_every_plugin_at_once():
    p, _ = pipeline(reject())
    old = p.replace([Entry("new", Hooks(accept()))])
    assert [e.name for e in old] == ["p0"]
    assert result(p.run("mail", None, None)).action == "accept"
