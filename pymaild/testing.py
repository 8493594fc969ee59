"""
Fakes for testing plugins (and pymaild's own built-ins use them too): a plugin context with a
controllable clock and a real state directory, and quick ways to make the objects each stage's
hook receives.  See C{docs/plugins.md}::

    from pymaild.testing import PluginHarness

    def test_blocks_typos(tmp_path):
        h = PluginHarness(myplugin.plugin, {"domains": ["gmial.com"]}, tmp_path)
        verdict = h.call("rcptTo", h.session(), h.transaction("a@example.org"), h.recipient("x@gmial.com"))
        assert verdict.action == "reject"

C{PluginHarness.call} runs the hook and returns its verdict (a Deferred's result once it
fires; C{advance} moves the fake clock on for hooks that wait on it).  Settings are validated
as C{[plugins.NAME]} would be, so a wrong key fails the test as it would fail start-up.
"""

from __future__ import annotations

import inspect
import io
import tempfile
from pathlib import Path

from twisted.internet import defer, task

from pymaild.errors import ConfigError
from pymaild.pipeline import Delivery, Message, PluginContext, Recipient, Session, Transaction
from pymaild.pipeline.plugin import settingsFor
from pymaild.pipeline.verdicts import coerce


class _Defaults:
    timeout = 10.0


class PluginHarness:
    """
    One plugin, created with C{settings} (a dict as its TOML table would be) in a fake context.

    @ivar clock: a L{twisted.internet.task.Clock}: the plugin's C{context.clock}.
    @ivar hooks: the hook object the plugin made.
    """

    def __init__(self, plugin, settings: dict | None = None, stateDirectory: Path | None = None,
                 resolver=None, hostname: str = "mx.example.com", localDomains=("example.com",)):
        self.clock = task.Clock()
        state = Path(stateDirectory or tempfile.mkdtemp(prefix="pymaild-plugin-")) / plugin.name
        state.mkdir(parents=True, exist_ok=True)
        values, self.timeout, self.onError = settingsFor(plugin, dict(settings or {}), _Defaults, "test")
        self.context = PluginContext(plugin.name, self.clock, self._run, state, resolver, hostname, tuple(localDomains))
        self.hooks = plugin.create(values, self.context)

    @staticmethod
    def _run(f, *args, **kw):
        """Blocking work runs at once here (in the server it runs in the plugin threads)."""
        return defer.maybeDeferred(f, *args, **kw)

    def call(self, method: str, *args):
        """The verdict of C{hooks.method(*args)} (L{pymaild.pipeline.CONTINUE} for None)."""
        result = getattr(self.hooks, method)(*args)
        if inspect.iscoroutine(result):
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            out = []
            result.addBoth(out.append)
            if not out:
                raise AssertionError(f"{method} has not answered (advance the clock, or it waits on the network)")
            result = out[0]
            if hasattr(result, "raiseException"):
                result.raiseException()
        return coerce(result)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def close(self):
        close = getattr(self.hooks, "close", None)
        return defer.maybeDeferred(close) if close is not None else defer.succeed(None)

    # --- what the hooks receive ---------------------------------------------------------------

    @staticmethod
    def session(peer: str = "192.0.2.1", protocol: str = "smtp", user: str | None = None, tls: bool = False,
                trusted: bool = False, helo: str | None = "client.example.net") -> Session:
        return Session("TEST", protocol, peer, 40000, 25, tls, trusted, helo, user)

    @staticmethod
    def transaction(sender: str = "someone@example.net", recipients=(), **params) -> Transaction:
        return Transaction("0123456789AB", sender, dict(params), list(recipients))

    @staticmethod
    def recipient(address: str, kind: str = "user", users=None, remote=()) -> Recipient:
        if users is None:
            users = frozenset([address]) if kind != "remote" else frozenset()
        return Recipient(address, kind, frozenset(users), tuple(remote))

    @staticmethod
    def message(data: bytes) -> Message:
        """A Message over C{data} (LF or CRLF line ends)."""
        data = data.replace(b"\r\n", b"\n")
        end = data.find(b"\n\n")
        return Message(data if end < 0 else data[:end + 1], len(data), lambda: io.BytesIO(data))

    @staticmethod
    def delivery(user: str, recipient: str | None = None) -> Delivery:
        return Delivery(user, recipient or user)


__all__ = ["PluginHarness", "ConfigError"]
