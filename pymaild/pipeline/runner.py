# -*- test-case-name: tests.pipeline.test_pipeline -*-
"""
Runs the enabled plugins' hooks of one stage, in the configured order, and folds their verdicts
into one L{Outcome}.

Implementation summary: each hook call is C{maybeDeferred} (a coroutine is wrapped with
C{Deferred.fromCoroutine}) with its plugin's timeout on the injected clock; an exception or a
timeout is logged with the plugin's name and replaced by the plugin's C{on_error} verdict
(C{continue}, or C{tempfail} 451 4.3.0).  A stage no plugin hooks costs one dict lookup
(L{Pipeline.has}), so a server without plugins pays nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from pymaild.pipeline import verdicts as v
from pymaild.pipeline.stages import STAGES

log = Logger()

_BY_STAGE = {name: (interface, method) for name, interface, method in STAGES}

ON_ERROR = ("continue", "tempfail")


@dataclass
class Entry:
    """One enabled plugin: its name, hook object, timeout and error policy."""

    name: str
    hooks: object
    timeout: float = 10.0
    onError: str = "continue"


@dataclass
class Outcome:
    """
    What a stage's plugins decided together.

    @ivar verdict: the verdict that ended the stage (reject, tempfail, accept, quarantine), or
        L{verdicts.CONTINUE} when every plugin said continue.
    @ivar plugin: the name of the plugin whose verdict ended it (for the logs), or C{None}.
    @ivar headers: the fields every plugin asked to add, in order.
    @ivar remove: the field names plugins asked to remove.
    @ivar folder: the last folder a plugin chose (delivery), or C{None}.
    @ivar flags: the flags plugins chose (delivery).
    """

    verdict: v.Verdict = v.CONTINUE
    plugin: str | None = None
    headers: list = field(default_factory=list)
    remove: list = field(default_factory=list)
    folder: str | None = None
    flags: list = field(default_factory=list)

    @property
    def action(self) -> str:
        return self.verdict.action

    def reply(self, defaultCode: int, defaultStatus: str, defaultText: str) -> tuple[int, str, str]:
        """The refusal's C{(code, status, text)}, with the stage's defaults for what it lacks."""
        verdict = self.verdict
        if verdict.action == v.TEMPFAIL and verdict.code is None:
            return 451, "4.7.1", verdict.text or "Try again later"
        return (verdict.code or defaultCode, verdict.status or defaultStatus, verdict.text or defaultText)


_ERROR = v.Verdict(v.TEMPFAIL, 451, "4.3.0", "Temporary local problem, try again later")

#: the verdicts that mean something at each stage; others are taken as continue (and logged)
_ALLOWED = {
    "connect": {v.REJECT, v.TEMPFAIL, v.ACCEPT},
    "helo": {v.REJECT, v.TEMPFAIL, v.ACCEPT},
    "auth": {v.REJECT, v.TEMPFAIL, v.ACCEPT},
    "mail": {v.REJECT, v.TEMPFAIL, v.ACCEPT, v.QUARANTINE},
    "rcpt": {v.REJECT, v.TEMPFAIL, v.ACCEPT, v.QUARANTINE},
    "data": {v.REJECT, v.TEMPFAIL, v.ACCEPT, v.QUARANTINE},
    "delivery": {v.REJECT, v.TEMPFAIL, v.ACCEPT},
    "queue": set(),
    "login": {v.REJECT, v.TEMPFAIL, v.ACCEPT},
}


class Pipeline:
    """
    The enabled plugins, in order.  L{replace} swaps them all at once (SIGHUP): a stage that
    is running finishes with the plugins it started with.
    """

    def __init__(self, entries=(), clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.entries: list[Entry] = []
        self._byStage: dict[str, list[Entry]] = {}
        self.replace(entries)

    def replace(self, entries) -> list[Entry]:
        """Use these entries from now on; returns the previous ones (to be closed)."""
        old = self.entries
        self.entries = list(entries)
        byStage: dict[str, list[Entry]] = {}
        for name, interface, _ in STAGES:
            hooked = [e for e in self.entries if interface.providedBy(e.hooks)]
            if hooked:
                byStage[name] = hooked
        self._byStage = byStage
        return old

    def has(self, stage: str) -> bool:
        """Whether any plugin hooks C{stage} (if not, callers skip it: no cost)."""
        return stage in self._byStage

    def names(self, stage: str) -> list[str]:
        return [e.name for e in self._byStage.get(stage, ())]

    def run(self, stage: str, *args) -> defer.Deferred:
        """
        Ask each plugin hooking C{stage}, in order, until one ends the stage.

        Hooks that answer at once are folded at once (no Deferred, no timer per call); a hook
        that returns a Deferred or a coroutine gets its plugin's timeout.

        @return: a Deferred firing with an L{Outcome} (never failing; already fired when every
            hook answered at once).
        """
        outcome = self.ask(stage, *args)
        return outcome if isinstance(outcome, defer.Deferred) else defer.succeed(outcome)

    def ask(self, stage: str, *args):
        """
        L{run}, but the L{Outcome} itself when every hook answered at once (a front-end then
        answers its client without holding its input), else a Deferred of it.
        """
        _, method = _BY_STAGE[stage]
        return self._from(list(self._byStage.get(stage, ())), 0, stage, method, args, Outcome())

    def _from(self, entries, i, stage, method, args, outcome):
        while i < len(entries):
            entry = entries[i]
            verdict = self._call(entry, stage, method, args)
            if isinstance(verdict, defer.Deferred):
                return verdict.addCallback(self._later, entries, i, stage, method, args, outcome)
            if self._fold(outcome, entry, stage, verdict):
                break
            i += 1
        return outcome

    def _later(self, verdict, entries, i, stage, method, args, outcome):
        if self._fold(outcome, entries[i], stage, verdict):
            return outcome
        return self._from(entries, i + 1, stage, method, args, outcome)

    @staticmethod
    def _fold(outcome: Outcome, entry: Entry, stage: str, verdict: v.Verdict) -> bool:
        """Add a verdict to the outcome; True when it ends the stage."""
        if verdict.action not in _ALLOWED[stage] and verdict.action != v.CONTINUE_:
            log.warn("plugin {plugin}: {action} means nothing at the {stage} stage; taken as continue",
                     plugin=entry.name, action=verdict.action, stage=stage)
            verdict = v.CONTINUE
        if verdict is v.CONTINUE:
            return False
        outcome.headers.extend(verdict.headers)
        outcome.remove.extend(verdict.remove)
        if verdict.folder is not None:
            outcome.folder = verdict.folder
        outcome.flags.extend(f for f in verdict.flags if f not in outcome.flags)
        if verdict.ends:
            outcome.verdict, outcome.plugin = verdict, entry.name
            return True
        return False

    def notify(self, stage: str, *args) -> None:
        """Run a report stage (queue events, failed logins) without waiting for it."""
        if self.has(stage):
            self.run(stage, *args)

    def _failed(self, failure, entry: Entry, stage: str) -> v.Verdict:
        if failure.check(defer.TimeoutError):
            log.error("plugin {plugin}: {stage} hook did not answer within {timeout}s; {policy}",
                      plugin=entry.name, stage=stage, timeout=entry.timeout, policy=entry.onError)
        else:
            log.failure("plugin {plugin}: {stage} hook failed; {policy}", failure,
                        plugin=entry.name, stage=stage, policy=entry.onError)
        return _ERROR if entry.onError == "tempfail" else v.CONTINUE

    def _call(self, entry: Entry, stage: str, method: str, args):
        """The hook's verdict now, or a Deferred of it (with the timeout); never an exception."""
        from twisted.python.failure import Failure

        try:
            result = getattr(entry.hooks, method)(*args)
            if inspect.iscoroutine(result):
                result = defer.Deferred.fromCoroutine(result)
            if not isinstance(result, defer.Deferred):
                return v.coerce(result)
        except Exception:
            return self._failed(Failure(), entry, stage)
        box, waiting = [], []

        def relay(r):
            if waiting:
                waiting[0].callback(r)  # (a Failure runs the errbacks)
            else:
                box.append(r)

        result.addBoth(relay)
        if box:  # (it had fired already: its verdict now, without a Deferred or a timer)
            if isinstance(box[0], Failure):
                return self._failed(box[0], entry, stage)
            try:
                return v.coerce(box[0])
            except TypeError:
                return self._failed(Failure(), entry, stage)
        d = defer.Deferred(lambda _: result.cancel())
        waiting.append(d)
        if entry.timeout:
            d.addTimeout(entry.timeout, self.clock)
        d.addCallback(v.coerce)
        return d.addErrback(self._failed, entry, stage)


class RefusedByPlugin(Exception):
    """A plugin's login hook refused a login whose password was right."""


def checkedLogin(pipeline, session, login: str, attempt):
    """
    C{attempt} (a portal login: a Deferred of C{(interface, avatar, logout)}), then, when it
    succeeded, the plugins' login hooks.  A reject fails it with
    C{twisted.cred.error.UnauthorizedLogin} (the client sees a wrong password), a tempfail with
    L{pymaild.errors.TemporaryFailure}; the avatar is logged out.  Without login hooks this is
    C{attempt()} itself.
    """
    if pipeline is None or not pipeline.has("login"):
        return defer.maybeDeferred(attempt)
    from twisted.cred.error import UnauthorizedLogin

    from pymaild.errors import TemporaryFailure

    class Refused(UnauthorizedLogin, RefusedByPlugin):
        pass

    class Later(TemporaryFailure, RefusedByPlugin):
        pass

    def loggedIn(result):
        session.user = login
        return pipeline.run("login", session, login, True).addCallback(decided, result)

    def decided(outcome, result):
        if not outcome.verdict.refuses:
            return result
        result[2]()  # (logout)
        session.user = None
        log.info("{protocol} login {user} from {peer}: refused by plugin {plugin}", protocol=session.protocol,
                 user=login, peer=session.peer, plugin=outcome.plugin)
        if outcome.action == "tempfail":
            raise Later("Temporary authentication failure, try again later")
        raise Refused()

    return defer.maybeDeferred(attempt).addCallback(loggedIn)
