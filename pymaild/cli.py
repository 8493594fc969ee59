# -*- test-case-name: tests.test_cli -*-
"""
C{pymaildctl}: the administrator's command line.

    pymaildctl [--config FILE] [--data-dir DIR] check-config
    pymaildctl [--config FILE] [--data-dir DIR] user add NAME [--password-stdin]
    pymaildctl [--config FILE] [--data-dir DIR] user passwd NAME [--password-stdin]
    pymaildctl [--config FILE] [--data-dir DIR] user del NAME
    pymaildctl [--config FILE] [--data-dir DIR] user list
    pymaildctl --version

C{--config} and C{--data-dir} are read exactly as C{twistd pymaild} reads them
(L{pymaild.config.load}), so the passwd-file edited here is the one the server reads; a running
server sees the change at its next lookup, without a restart or a signal.

Passwords are asked for twice at the terminal, or read as one line from standard input with
C{--password-stdin} (for scripts; the trailing newline is removed).

Exit status: 0 on success; 2 for a mistake of the user (the configuration, a name, a password,
an unknown or existing user), with one line C{pymaildctl: <message>} on standard error and no
traceback; 1 when the system refuses (a file cannot be written), also as one line.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import NoReturn, Sequence

from pymaild import __version__
from pymaild.errors import ConfigError

PROGRAM = "pymaildctl"


class UsageError(Exception):
    """
    A mistake on the command line; C{str(error)} is the one line to print.
    """


class _ArgumentParser(argparse.ArgumentParser):
    """
    An C{ArgumentParser} whose mistakes are one line and exit status 2, like every other
    mistake of the user.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _buildParser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROGRAM,
        description="Administer pymaild: check the configuration, manage passwd-file users.",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the TOML configuration file, as for twistd pymaild")
    parser.add_argument("--data-dir", metavar="DIR", help="the data directory; overrides [server] data_dir")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check-config", help="check the configuration and the files it names, print the effective configuration"
    )
    check.set_defaults(run=_checkConfig)

    user = commands.add_parser("user", help="manage the users of the passwd-file")
    userCommands = user.add_subparsers(dest="userCommand", metavar="USER-COMMAND", required=True)
    add = userCommands.add_parser("add", help="add a user (local@domain)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--password-stdin", action="store_true", help="read the password as one line from standard input")
    add.set_defaults(run=_userAdd)
    passwd = userCommands.add_parser("passwd", help="change a user's password")
    passwd.add_argument("name", metavar="NAME")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password as one line from standard input"
    )
    passwd.set_defaults(run=_userPasswd)
    remove = userCommands.add_parser("del", help="remove a user (the mail stays on disk)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(run=_userDel)
    listing = userCommands.add_parser("list", help="print the users, one per line")
    listing.set_defaults(run=_userList)
    return parser


def _loadConfig(args: argparse.Namespace):
    from pymaild import config as configmod

    return configmod.load(args.config, args.data_dir)


def _passwdFile(args: argparse.Namespace):
    from pymaild.auth.passwdfile import PasswdFile

    return PasswdFile(_loadConfig(args).auth.passwd_file)


def _userName(args: argparse.Namespace) -> str:
    """
    The account name of the command line, canonical; without a domain it gets the first local
    domain, as a login does.
    """
    from pymaild.auth.passwdfile import canonical_user

    name = args.name
    if "@" not in name:
        name = f"{name}@{_loadConfig(args).domains.local[0]}"
    return canonical_user(name)


def _readPassword(args: argparse.Namespace) -> str:
    """
    The new password, from standard input or asked twice at the terminal.

    @raise UsageError: for an empty password or two that differ.
    """
    if args.password_stdin:
        line = sys.stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
        password = line
    else:
        try:
            password = getpass.getpass("New password: ")
            again = getpass.getpass("Repeat the password: ")
        except EOFError:
            raise UsageError("no password given (end of input)") from None
        if password != again:
            raise UsageError("the passwords do not match; nothing changed")
    if not password:
        raise UsageError("the password is empty; nothing changed")
    return password


def _checkConfig(args: argparse.Namespace) -> None:
    config = _loadConfig(args)
    from pymaild.service import checkFiles

    checkFiles(config)
    sys.stdout.write(config.describe())


def _userAdd(args: argparse.Namespace) -> None:
    from pymaild.auth import passwords
    from pymaild.auth.passwdfile import PasswdFile, UserExists

    config = _loadConfig(args)
    user = _userName(args)
    domain = user.rpartition("@")[2]
    if domain not in config.domains.local:
        raise UsageError(
            f"{domain} is not a local domain (add it to [domains] local in "
            f"{config.source or 'the configuration'}; local now: {', '.join(config.domains.local)})"
        )
    passwd = PasswdFile(config.auth.passwd_file)
    if passwd.get(user) is not None:
        raise UserExists(f"user {user} already exists in {passwd.path}")
    passwd.add(user, passwords.hash_password(_readPassword(args)))
    print(f"added {user}")


def _userPasswd(args: argparse.Namespace) -> None:
    from pymaild.auth import passwords
    from pymaild.auth.passwdfile import NoSuchUser

    passwd = _passwdFile(args)
    user = _userName(args)
    if passwd.get(user) is None:
        raise NoSuchUser(f"no user {user} in {passwd.path}")
    passwd.set_password(user, passwords.hash_password(_readPassword(args)))
    print(f"changed the password of {user}")


def _userDel(args: argparse.Namespace) -> None:
    passwd = _passwdFile(args)
    user = _userName(args)
    passwd.remove(user)
    print(f"removed {user} (its mail stays on disk)")


def _userList(args: argparse.Namespace) -> None:
    for user in _passwdFile(args).users():
        print(user)


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"{PROGRAM}: {message}\n")
    sys.stderr.flush()
    return status


def run(argv: Sequence[str] | None = None) -> int:
    """
    Run one command.

    @param argv: the arguments after the program name; C{None} for C{sys.argv[1:]}.
    @return: the exit status.
    """
    try:
        args = _buildParser().parse_args(argv)
        args.run(args)
    except (UsageError, ConfigError, ValueError) as e:
        return _fail(str(e), 2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    return 0


def main() -> NoReturn:
    """
    The C{pymaildctl} console script.
    """
    sys.exit(run())
