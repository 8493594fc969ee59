"""
Tests for L{pymaild.cli}: the real C{pymaildctl} console script, run as a subprocess the way an
administrator runs it, and the password prompt in-process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pymaild import __version__, cli
from pymaild.auth import passwords
from pymaild.auth.passwdfile import PasswdFile

PYMAILDCTL = Path(sys.executable).parent / "pymaildctl"

CONFIG = """\
[domains]
local = ["example.com", "Example.ORG"]
"""


@pytest.fixture
def setup(tmp_path) -> tuple[Path, Path]:
    """
    A configuration file with two local domains, and a data directory (not created yet).
    """
    config = tmp_path / "pymaild.toml"
    config.write_text(CONFIG)
    return config, tmp_path / "data"


def ctl(setup, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    config, data = setup
    return subprocess.run(
        [str(PYMAILDCTL), "--config", str(config), "--data-dir", str(data), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result


def test_script_installed():
    """
    The console script is installed next to the interpreter running the tests.
    """
    assert PYMAILDCTL.exists(), "run: .venv/bin/pip install -e ."


def test_version():
    """
    --version prints the program and version and exits 0.
    """
    result = subprocess.run([str(PYMAILDCTL), "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"pymaildctl {__version__}\n")


def test_user_round_trip(setup):
    """
    add, list, passwd and del with --password-stdin change the passwd-file in the data
    directory the configuration names, as the server would read it.
    """
    _, data = setup
    assert_ok(ctl(setup, "user", "add", "Bob@Example.com", "--password-stdin", input="first secret\n"))
    assert_ok(ctl(setup, "user", "add", "alice@example.org", "--password-stdin", input="a\r\n"))
    listing = ctl(setup, "user", "list")
    assert_ok(listing)
    assert listing.stdout == "alice@example.org\nbob@example.com\n"

    passwd = PasswdFile(data / "passwd")
    assert passwd.get("bob@example.com").password.startswith("{ARGON2ID}$argon2id$")
    assert passwords.verify(passwd.get("bob@example.com").password, "first secret")
    assert passwords.verify(passwd.get("alice@example.org").password, "a")

    assert_ok(ctl(setup, "user", "passwd", "bob@example.com", "--password-stdin", input="second"))
    assert passwords.verify(passwd.get("bob@example.com").password, "second")
    assert not passwords.verify(passwd.get("bob@example.com").password, "first secret")

    assert_ok(ctl(setup, "user", "del", "BOB@example.com"))
    listing = ctl(setup, "user", "list")
    assert listing.stdout == "alice@example.org\n"


def test_list_without_file(setup):
    """
    With no passwd-file yet, user list prints nothing and succeeds.
    """
    result = ctl(setup, "user", "list")
    assert_ok(result)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, input, fragments",
    [
        (("user", "add", "bob@example.com", "--password-stdin"), "x\n", ["bob@example.com", "already exists"]),
        (("user", "passwd", "nobody@example.com", "--password-stdin"), "x\n", ["nobody@example.com"]),
        (("user", "del", "nobody@example.com"), None, ["no user nobody@example.com"]),
        (("user", "add", "bob", "--password-stdin"), "x\n", ["bob@example.com", "already exists"]),
        (("user", "add", "@example.com", "--password-stdin"), "x\n", ["nothing before the '@'"]),
        (("user", "add", "a:b@example.com", "--password-stdin"), "x\n", ["':'"]),
        (("user", "add", "new@example.com", "--password-stdin"), "\n", ["password is empty"]),
        (("user", "add", "new@example.com", "--password-stdin"), "", ["password is empty"]),
        (
            ("user", "add", "new@elsewhere.example", "--password-stdin"),
            "x\n",
            ["elsewhere.example", "[domains] local"],
        ),
        (("user", "frobnicate"), None, ["invalid choice", "frobnicate"]),
        (("user",), None, ["required"]),
        ((), None, ["required"]),
        (("user", "add"), None, ["NAME"]),
    ],
)
def test_user_mistakes(setup, args, input, fragments):
    """
    Each mistake prints one line "pymaildctl: ..." on stderr, no traceback, and exits 2;
    the passwd-file is unchanged.
    """
    _, data = setup
    data.mkdir()
    (data / "passwd").write_text("bob@example.com:{PLAIN}b\n")
    before = (data / "passwd").read_bytes()
    result = ctl(setup, *args, input=input)
    assert result.returncode == 2, result
    assert result.stderr.startswith("pymaildctl: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert result.stdout == ""
    assert (data / "passwd").read_bytes() == before


@pytest.mark.parametrize(
    "config_text, fragment",
    [
        ("[domains\n", "not valid TOML"),
        ("[domains]\nlocal = []\n", "[domains] local"),
        ("[nope]\n", "[nope]"),
    ],
)
def test_config_mistakes(setup, config_text, fragment):
    """
    A broken configuration is one line naming the file and the key, exit 2, for every command.
    """
    config, _ = setup
    config.write_text(config_text)
    for args in (("user", "list"), ("check-config",)):
        result = ctl(setup, *args)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert str(config) in result.stderr and fragment in result.stderr


def test_missing_config_file(tmp_path):
    """
    A --config that does not exist is a one-line mistake too.
    """
    result = subprocess.run(
        [str(PYMAILDCTL), "--config", str(tmp_path / "missing.toml"), "user", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"pymaildctl: {tmp_path / 'missing.toml'}: no such file\n"


def test_check_config_prints_effective_config(setup):
    """
    check-config prints the effective configuration (with the data directory from
    --data-dir and the normalised domains) and exits 0.
    """
    _, data = setup
    result = ctl(setup, "check-config")
    assert_ok(result)
    assert "[domains]" in result.stdout
    assert 'local = ["example.com", "example.org"]' in result.stdout
    assert f'data_dir = "{data.resolve()}"' in result.stdout
    assert f'passwd_file = "{data.resolve() / "passwd"}"' in result.stdout


def test_check_config_checks_aliases(setup):
    """
    check-config also checks the files the configuration names: a mistake in the aliases file
    is one line with its file and line number, exit 2.
    """
    _, data = setup
    data.mkdir()
    (data / "aliases").write_text("ok@example.com: bob\nbroken\n")
    result = ctl(setup, "check-config")
    assert result.returncode == 2, result
    assert f"{data.resolve() / 'aliases'}:2:" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unwritable_passwd_file_is_one_line(setup):
    """
    A passwd-file the system will not let us write (here: a directory in its place) is one
    line and exit status 1, not a traceback.
    """
    _, data = setup
    (data / "passwd").mkdir(parents=True)
    result = ctl(setup, "user", "add", "bob@example.com", "--password-stdin", input="b\n")
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(data / "passwd") in result.stderr


@pytest.mark.parametrize(
    "answers, status, message",
    [
        (["s3cret", "s3cret"], 0, ""),
        (["s3cret", "other"], 2, "pymaildctl: the passwords do not match; nothing changed\n"),
        (["", ""], 2, "pymaildctl: the password is empty; nothing changed\n"),
        ([EOFError()], 2, "pymaildctl: no password given (end of input)\n"),
    ],
)
def test_password_prompt(setup, monkeypatch, capsys, answers, status, message):
    """
    Without --password-stdin the password is asked twice; the answers must match and not be
    empty.
    """
    config, data = setup
    prompts: list[str] = []

    def getpass(prompt):
        prompts.append(prompt)
        answer = answers[len(prompts) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(cli.getpass, "getpass", getpass)
    assert cli.run(["--config", str(config), "--data-dir", str(data), "user", "add", "bob@example.com"]) == status
    assert capsys.readouterr().err == message
    entry = PasswdFile(data / "passwd").get("bob@example.com")
    if status == 0:
        assert len(prompts) == 2
        assert passwords.verify(entry.password, "s3cret")
    else:
        assert entry is None


def test_user_commands_refuse_an_ldap_installation(tmp_path):
    """With [auth] backend = "ldap" the accounts are the directory's: user add/passwd/del/list say so."""
    config = tmp_path / "pymaild.toml"
    config.write_text(CONFIG + '[auth]\nbackend = "ldap"\n[ldap]\nurls = ["ldap://127.0.0.1:1"]\nbase_dn = "dc=example,dc=com"\n')
    for args in (("user", "add", "x@example.com", "--password-stdin"), ("user", "list"), ("user", "del", "x")):
        result = ctl((config, tmp_path / "data"), *args, input="secret\n")
        assert result.returncode == 2, result
        assert "LDAP directory" in result.stderr and "Traceback" not in result.stderr
