"""
Finding plugins with twisted.plugin in the pymaild.plugins namespace ([plugins] paths added),
validating [plugins.NAME] against the keys a plugin declares, and the start-up errors that
name the plugin: missing, failing to import, an unknown or bad key, refusing its settings.
"""

from __future__ import annotations

import textwrap
import uuid

import pytest

import pymaild.plugins

from pymaild import config
from pymaild.errors import ConfigError
from pymaild.pipeline import plugin as loader

PLUGIN = '''
from zope.interface import implementer
from pymaild.interfaces import IRcptHook
from pymaild.pipeline import Plugin, keys, reject


@implementer(IRcptHook)
class Hooks:
    def __init__(self, settings, context):
        if settings["limit"] == 13:
            raise ValueError("13 is unlucky")
        if settings["limit"] == 14:
            raise RuntimeError("crashed")
        self.settings, self.context = settings, context

    def rcptTo(self, session, transaction, recipient):
        return reject()


plugin = Plugin("{name}", Hooks, keys={{
    "limit": keys.Key(keys.integer(1, 100), 10, "a limit"),
    "domains": keys.Key(keys.listOf(keys.domain, "domains"), (), "domains"),
}})
'''


@pytest.fixture(autouse=True)
def namespacePath():
    """Each test's plugin directories leave pymaild.plugins.__path__ when it ends."""
    import pymaild.plugins

    before = list(pymaild.plugins.__path__)
    yield
    pymaild.plugins.__path__[:] = before


def pluginDir(tmp_path, source: str, name: str | None = None):
    """A directory with one plugin module (a module name never used before in this process)."""
    name = name or "t" + uuid.uuid4().hex[:8]
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    (directory / f"mod_{uuid.uuid4().hex[:8]}.py").write_text(textwrap.dedent(source.replace("{name}", name).replace("{{", "{").replace("}}", "}")))
    return directory, name


def configWith(tmp_path, text: str):
    path = tmp_path / "pymaild.toml"
    path.write_text(text)
    return config.load(path)


def contextFor(name):
    return loader.PluginContext(name, None, None, None, None, "mx.example.com", ("example.com",))


def test_found_in_a_configured_path_configured_and_created(tmp_path):
    directory, name = pluginDir(tmp_path, PLUGIN)
    c = configWith(tmp_path, f'[plugins]\nenabled = ["{name}"]\npaths = ["{directory}"]\ntimeout = 3\n'
                             f'[plugins.{name}]\nlimit = 5\ndomains = ["Example.ORG"]\non_error = "tempfail"\n')
    [entry] = loader.load(c, pymaild.plugins, contextFor)
    assert entry.name == name and entry.timeout == 3 and entry.onError == "tempfail"
    assert entry.hooks.settings == {"limit": 5, "domains": ("example.org",)}
    assert entry.hooks.context.name == name


def test_the_built_in_plugins_are_found():
    found, broken = loader.discover(pymaild.plugins)
    assert {"dnsbl", "greylist", "ratelimit", "headers"} <= set(found), found
    assert not broken


@pytest.mark.parametrize("table, message", [
    ("limit = 500", "[plugins.{name}] limit: must be between 1 and 100, got 500"),
    ("limt = 5", "[plugins.{name}] limt: unknown key (did you mean 'limit'?)"),
    ("on_error = 'ignore'", "[plugins.{name}] on_error: must be one of 'continue', 'tempfail'"),
    ("limit = 13", "[plugins.{name}]: 13 is unlucky"),
    ("limit = 14", "[plugins.{name}]: the plugin failed to start: RuntimeError: crashed"),
])
def test_bad_settings_name_the_plugin_and_the_key(tmp_path, table, message):
    directory, name = pluginDir(tmp_path, PLUGIN)
    c = configWith(tmp_path, f'[plugins]\nenabled = ["{name}"]\npaths = ["{directory}"]\n[plugins.{name}]\n{table}\n')
    with pytest.raises(ConfigError) as e:
        loader.load(c, pymaild.plugins, contextFor)
    assert message.format(name=name) in str(e.value)
    assert str(tmp_path / "pymaild.toml") in str(e.value)


def test_a_missing_plugin_and_one_that_fails_to_import(tmp_path):
    directory, name = pluginDir(tmp_path, "import no_such_module_anywhere\n")
    c = configWith(tmp_path, f'[plugins]\nenabled = ["{name}"]\npaths = ["{directory}"]\n')
    with pytest.raises(ConfigError) as e:
        loader.load(c, pymaild.plugins, contextFor)
    text = str(e.value)
    assert f"no plugin named {name!r}" in text and "dnsbl" in text
    assert "failed to import" in text and "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in text


def test_a_table_for_a_plugin_nobody_has(tmp_path):
    c = configWith(tmp_path, "[plugins.nonesuch]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        loader.load(c, pymaild.plugins, None)
    assert "[plugins] [plugins.nonesuch]: no plugin named 'nonesuch'" in str(e.value)


def test_enabled_twice_and_bad_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="named twice"):
        configWith(tmp_path, '[plugins]\nenabled = ["a", "a"]\n')
    with pytest.raises(ConfigError, match="not a plugin name"):
        configWith(tmp_path, '[plugins]\nenabled = ["../a"]\n')
    with pytest.raises(ConfigError, match=r"\[plugins\] enable: unknown key"):
        configWith(tmp_path, '[plugins]\nenable = 1\n')
