"""
The documentation agrees with the code: every configuration key is in the man page and the
example file, the example loads, and the README's quick start has exactly two commands that
.ci/run reuses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pymaild import config

TOP = Path(__file__).resolve().parent.parent
KEYS = [(table, key) for table, keys in config.SCHEMA.items() for key in keys]


def man_tables() -> dict[str, str]:
    text = (TOP / "man" / "pymaild.toml.5").read_text()
    sections = re.split(r"^\.S[HS] ", text, flags=re.M)
    tables = {}
    for section in sections:
        heading, _, body = section.partition("\n")
        m = re.fullmatch(r'"?\\?\[(\w+)\\?\]"?', heading.strip())
        if m:
            tables[m.group(1)] = body
    return tables


@pytest.mark.parametrize("table, key", KEYS)
def test_key_in_man_page(table, key):
    """
    man/pymaild.toml.5 documents the key with a .TP/.B entry under its [table] heading.
    """
    tables = man_tables()
    assert table in tables, f"no [{table}] section in man/pymaild.toml.5"
    assert re.search(rf"^\.TP\n\.B {re.escape(key)}\b", tables[table], flags=re.M), f"[{table}] {key}"


@pytest.mark.parametrize("table, key", KEYS)
def test_key_in_example(table, key):
    """
    etc/pymaild.toml.example shows the key (set, or commented out) inside its table.
    """
    text = (TOP / "etc" / "pymaild.toml.example").read_text()
    parts = re.split(r"^#? ?\[(\w+)\]\s*$", text, flags=re.M)
    bodies = dict(zip(parts[1::2], parts[2::2]))
    assert table in bodies, f"no [{table}] in the example"
    assert re.search(rf"^(# ?)?{re.escape(key)} =", bodies[table], flags=re.M), f"[{table}] {key}"


def test_example_loads():
    """
    The example configuration is valid as shipped.
    """
    c = config.load(TOP / "etc" / "pymaild.toml.example")
    assert c.server.data_dir == Path("/var/lib/pymaild")
    assert any(a.port == 25 for a in c.listen.smtp)


def test_readme_quick_start_has_two_commands_and_ci_runs_the_second():
    """
    The quick start is exactly two one-line commands; .ci/run runs the second.
    """
    readme = (TOP / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = (TOP / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


@pytest.mark.parametrize("name", ["ldap-openldap.toml.example", "ldap-activedirectory.toml.example"])
def test_ldap_examples_load(name):
    """The OpenLDAP and Active Directory examples of etc/ are valid configurations."""
    c = config.load(TOP / "etc" / name)
    assert c.auth.backend == "ldap" and c.ldap.urls and "{login}" in c.ldap.user_filter


def _builtinKeys():
    import pymaild.plugins
    from pymaild.pipeline.plugin import discover

    found, _ = discover(pymaild.plugins)
    return [(name, key) for name in ("dnsbl", "greylist", "ratelimit", "headers") for key in found[name].keys]


@pytest.mark.parametrize("plugin, key", _builtinKeys())
def test_builtin_plugin_keys_are_documented(plugin, key):
    """Each built-in plugin's keys are under .SS [plugins.NAME] in the man page and in the example."""
    text = (TOP / "man" / "pymaild.toml.5").read_text()
    section = text.split(f".SS [plugins.{plugin}]\n", 1)[1].split("\n.S", 1)[0]
    assert re.search(rf"^\.TP\n\.B {re.escape(key)}\b", section, flags=re.M), f"[plugins.{plugin}] {key}"
    example = (TOP / "etc" / "pymaild.toml.example").read_text()
    block = example.split(f"# [plugins.{plugin}]\n", 1)[1].split("\n#\n", 1)[0]
    assert re.search(rf"^# {re.escape(key)} =", block, flags=re.M), f"example [plugins.{plugin}] {key}"


def test_the_example_plugin_tables_load(tmp_path):
    """The commented plugin tables of the example, uncommented, are valid for the built-ins."""
    import pymaild.plugins
    from pymaild.pipeline.plugin import load

    example = (TOP / "etc" / "pymaild.toml.example").read_text()
    tables = example.split("# Each enabled plugin's own table", 1)[1].split("\n", 1)[1]
    text = "\n".join(line[2:] if line.startswith("# ") else "" for line in tables.splitlines())
    path = tmp_path / "plugins-example.toml"
    path.write_text('[domains]\nlocal = ["example.com"]\n[plugins]\nenabled = ["dnsbl", "greylist", "ratelimit", "headers"]\n' + text)
    load(config.load(path), pymaild.plugins)
