"""
The layer rule of HACKING.md: imports point down only.  This walks every module's imports and
fails on an arrow that points up or sideways.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pymaild"

# Lower numbers are lower layers.  A module may import its own package and strictly lower
# layers; packages that share a layer (the front-ends; the back ends) never import each other.
RANK = {
    "interfaces": 0, "errors": 0, "envelope": 0, "uidl": 0,
    "config": 1, "log": 1, "mime": 1,
    "tls": 2, "listen": 2, "throttle": 2, "flow": 2, "sasl": 2,
    "durable": 1,
    "store": 3, "auth": 3, "queue": 3, "plugins": 3,
    "pipeline": 2, "testing": 3,
    "smtp": 3, "imap": 3, "pop3": 3,
    "handoff": 3,
    "service": 4, "worker": 4,
    "tap": 5, "cli": 5,
}


def unit(module: str) -> str:
    """pymaild.auth.realm -> auth; pymaild.config -> config."""
    return module.split(".")[1]


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == "pymaild":
            continue
        yield name, path


def imports(path: Path, name: str):
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: str(v))
def test_imports_point_down(name, path):
    """
    Every pymaild import of this module goes to its own package or to a lower layer.
    """
    mine = unit(name)
    assert mine in RANK, f"{name}: add its package to RANK in tests/test_layers.py"
    for target in imports(path, name):
        if not target.startswith("pymaild.") or target == "pymaild":
            continue
        theirs = unit(target)
        if theirs == mine:
            continue
        assert RANK[theirs] < RANK[mine], f"{name} imports {target}: an arrow pointing up or sideways"


def test_the_rule_catches_an_upward_import(tmp_path):
    """
    The checker itself fails on a front-end importing a back end (so the test above can fail).
    """
    bad = tmp_path / "bad.py"
    bad.write_text("from pymaild.store.maildir import MaildirStore\n")
    targets = list(imports(bad, "pymaild.imap.bad"))
    assert targets == ["pymaild.store.maildir"]
    assert not RANK[unit(targets[0])] < RANK["imap"]
