"""
Packaging: the wheel that `pip install .` builds holds the twistd plugin (without an
__init__.py that would hide Twisted's own plugins), every package and the pymaildctl script,
and twistd lists pymaild.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TWISTD

TOP = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: setuptools reuses a checkout's build/ directory, whose stale
    # files would end up in the wheel.
    source = tmp_path_factory.mktemp("source") / "pymaild"
    shutil.copytree(TOP, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "pymaild-data", "dropin.cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("pymaild-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_plugin_packages_and_script(wheel):
    """
    The wheel has twisted/plugins/pymaild_plugin.py but no twisted/__init__.py or
    twisted/plugins/__init__.py, every pymaild package, and the pymaildctl entry point.
    """
    names = set(wheel.namelist())
    assert "twisted/plugins/pymaild_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    for package in ("pymaild", "pymaild/auth", "pymaild/smtp", "pymaild/imap", "pymaild/pop3", "pymaild/store"):
        assert f"{package}/__init__.py" in names, package
    packaged = {n for n in names if n.startswith("pymaild/") and n.endswith(".py")}
    on_disk = {str(p.relative_to(TOP)) for p in (TOP / "pymaild").rglob("*.py") if "__pycache__" not in p.parts}
    assert packaged == on_disk
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "pymaildctl = pymaild.cli:main" in wheel.read(entry_points).decode()
    (metadata,) = [n for n in names if n.endswith("/METADATA")]
    requires = wheel.read(metadata).decode()
    for dependency in ("twisted[tls]", "service-identity", "pyOpenSSL", "ldap3", "libpass", "argon2-cffi", "PyNaCl", "bcrypt"):
        assert f"Requires-Dist: {dependency}" in requires, dependency


def test_twistd_lists_pymaild():
    """
    `twistd --help` lists the pymaild plugin and `twistd pymaild --help` shows its options.
    """
    listed = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True, timeout=60)
    assert any(line.split()[:1] == ["pymaild"] for line in listed.stdout.splitlines())
    own = subprocess.run([str(TWISTD), "pymaild", "--help"], capture_output=True, text=True, timeout=60)
    assert "--config=" in own.stdout and "--data-dir=" in own.stdout
