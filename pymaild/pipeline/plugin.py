# -*- test-case-name: tests.pipeline.test_plugin_loading -*-
"""
Declaring, finding and configuring plugins.

A plugin is a module in the C{pymaild.plugins} namespace (pymaild's own C{pymaild/plugins/},
a directory named in C{[plugins] paths}, or an installed distribution that ships
C{pymaild/plugins/NAME.py} without an C{__init__.py}) holding a L{Plugin} object at module
level; C{twisted.plugin.getPlugins(IPymaildPlugin, pymaild.plugins)} finds it.

L{load} checks C{[plugins]} against what was found, validates each enabled plugin's table
against the keys the plugin declares, and creates the hook objects; any problem is a
L{ConfigError} naming the plugin (and the key), so that start-up stops with one clear line.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from pymaild.config import Key, _choice, _seconds
from pymaild.errors import ConfigError
from pymaild.interfaces import IPymaildPlugin
from pymaild.pipeline.runner import Entry

log = Logger()

#: keys every plugin's table has, whatever the plugin declares
COMMON_KEYS = {
    "timeout": Key(_seconds, None, "seconds each hook call may take ([plugins] timeout)"),
    "on_error": Key(_choice("continue", "tempfail"), None,
                    "when a hook fails or times out: continue (fail open) or tempfail (fail closed)"),
}


@implementer(IPlugin, IPymaildPlugin)
class Plugin:
    """
    The declaration a plugin module holds at module level::

        myplugin = Plugin("my-plugin", MyHooks, keys={"domains": Key(...)}, description="...")

    @param name: the name C{[plugins] enabled} and C{[plugins.NAME]} use.
    @param factory: C{factory(settings, context)} makes the hook object (often the class).
    @param keys: C{{key: pymaild.config.Key}} its table may have.
    @param onError: the default C{on_error} (C{"continue"}: fail open).
    """

    def __init__(self, name: str, factory: Callable, keys: dict | None = None, description: str = "",
                 onError: str = "continue"):
        if onError not in ("continue", "tempfail"):
            raise ValueError(f"onError must be 'continue' or 'tempfail', not {onError!r}")
        clash = set(keys or ()) & set(COMMON_KEYS)
        if clash:
            raise ValueError(f"plugin {name}: {', '.join(sorted(clash))} is a key every plugin has")
        self.name = name
        self.factory = factory
        self.keys = dict(keys or {})
        self.description = description
        self.onError = onError

    def create(self, settings: dict, context) -> Any:
        return self.factory(settings, context)

    def __repr__(self) -> str:
        return f"<Plugin {self.name}>"


@dataclass
class PluginContext:
    """
    What a plugin gets besides its settings.

    @ivar name: the plugin's name.
    @ivar clock: the reactor's time (C{callLater}, C{seconds}): use it, tests replace it.
    @ivar run: C{run(f, *args)} runs the blocking call C{f} in pymaild's plugin threads
        (C{[plugins] threads}) and returns a Deferred of its result.
    @ivar stateDirectory: C{<data_dir>/plugins/NAME/}, created, for the plugin's own files.
    @ivar resolver: a C{twisted.names} resolver (the system's, or C{[queue] nameservers}).
    @ivar hostname: C{[server] hostname}; C{localDomains}: C{[domains] local}.
    """

    name: str
    clock: Any
    run: Callable
    stateDirectory: Path
    resolver: Any
    hostname: str
    localDomains: tuple


def _namespace(namespace, paths=()):
    for path in paths:
        path = os.fspath(path)
        if path not in namespace.__path__:
            namespace.__path__.append(path)
    return namespace


def discover(namespace, paths=()) -> tuple[dict[str, Plugin], dict[str, str]]:
    """
    The plugins of the C{pymaild.plugins} namespace (with C{paths} added to it).

    @param namespace: the C{pymaild.plugins} package (passed in by the composition root: the
        built-in plugins there sit a layer above this module).

    @return: C{({name: plugin}, {module: error})}: the modules that failed to import, with the
        error's last line, so that an enabled plugin that is missing can be explained.
    """
    from twisted.plugin import getPlugins
    from twisted.python.modules import getModule

    namespace = _namespace(namespace, paths)
    broken: dict[str, str] = {}
    for module in getModule(namespace.__name__).iterModules():
        try:
            module.load()
        except BaseException as e:  # (SyntaxError, ImportError, whatever the module raised)
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            broken[module.filePath.path] = last
    found: dict[str, Plugin] = {}
    for plugin in getPlugins(IPymaildPlugin, namespace):
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            continue
        if name in found and found[name] is not plugin:
            raise ConfigError(f"two plugins are named {name!r}: {found[name]!r} and {plugin!r}")
        found[name] = plugin
    return found, broken


def settingsFor(plugin, table: dict, defaults, where: str) -> tuple[dict, float, str]:
    """
    Validate C{[plugins.NAME]}: C{(settings, timeout, onError)}.

    @raise ConfigError: an unknown key or a bad value, naming both.
    """
    import difflib

    name = plugin.name
    known = {**plugin.keys, **COMMON_KEYS}
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}: [plugins.{name}] {key}: unknown key{hint}")
    settings = {}
    for key, spec in known.items():
        if key in table:
            try:
                settings[key] = spec.parse(table[key])
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{where}: [plugins.{name}] {key}: {e}") from None
        else:
            settings[key] = spec.default
    timeout = settings.pop("timeout")
    onError = settings.pop("on_error")
    return settings, defaults.timeout if timeout is None else timeout, onError or plugin.onError


def load(config, namespace, contextFor: Callable[[str], PluginContext] | None = None) -> list[Entry]:
    """
    The enabled plugins of C{config}, created, in C{[plugins] enabled} order.

    @param namespace: the C{pymaild.plugins} package (see L{discover}).
    @param contextFor: C{contextFor(name)} makes a plugin's context; C{None} only validates
        (C{pymaildctl check-config}): nothing is created.
    @raise ConfigError: a plugin is missing, its table is wrong, or it refused its settings.
    """
    where = str(config.source) if config.source is not None else "embedded default"
    section = config.plugins
    if not section.enabled and not section.tables:
        return []
    found, broken = discover(namespace, section.paths)
    for name in list(section.enabled) + list(section.tables):
        if name not in found:
            why = ""
            if broken:
                why = "; these plugin modules failed to import: " + "; ".join(
                    f"{path}: {error}" for path, error in sorted(broken.items()))
            kind = "enabled" if name in section.enabled else f"[plugins.{name}]"
            raise ConfigError(f"{where}: [plugins] {kind}: no plugin named {name!r} "
                              f"(found: {', '.join(sorted(found)) or 'none'}){why}")
    entries = []
    for name in section.enabled:
        plugin = found[name]
        settings, timeout, onError = settingsFor(plugin, dict(section.tables.get(name, {})), section, where)
        if contextFor is None:
            continue
        try:
            hooks = plugin.create(settings, contextFor(name))
        except ValueError as e:
            raise ConfigError(f"{where}: [plugins.{name}]: {e}") from None
        except Exception as e:
            raise ConfigError(f"{where}: [plugins.{name}]: the plugin failed to start: "
                              f"{traceback.format_exception_only(type(e), e)[-1].strip()}") from None
        entries.append(Entry(name, hooks, timeout, onError))
    return entries
