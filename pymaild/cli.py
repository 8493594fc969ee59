# -*- test-case-name: tests.test_cli -*-
"""
C{pymaildctl}: the administrator's command line.

    pymaildctl [--config FILE] [--data-dir DIR] check-config
    pymaildctl [--config FILE] [--data-dir DIR] user add NAME [--password-stdin]
    pymaildctl [--config FILE] [--data-dir DIR] user passwd NAME [--password-stdin]
    pymaildctl [--config FILE] [--data-dir DIR] user del NAME
    pymaildctl [--config FILE] [--data-dir DIR] user list
    pymaildctl [--config FILE] [--data-dir DIR] queue list [--json]
    pymaildctl [--config FILE] [--data-dir DIR] queue show ID
    pymaildctl [--config FILE] [--data-dir DIR] queue flush
    pymaildctl [--config FILE] [--data-dir DIR] queue retry|hold|release|delete|bounce ID
    pymaildctl --version

C{--config} and C{--data-dir} are read exactly as C{twistd pymaild} reads them
(L{pymaild.config.load}), so the passwd-file edited here is the one the server reads; a running
server sees the change at its next lookup, without a restart or a signal.

Passwords are asked for twice at the terminal, or read as one line from standard input with
C{--password-stdin} (for scripts; the trailing newline is removed).

The C{queue} commands read and edit the outbound queue in C{<data_dir>/queue/}
(L{pymaild.queue.files}) the same way whether the server runs or not: a command that changes a
message takes the message's lock (the runner holds it while it delivers the message, waiting
at most L{LOCK_WAIT} seconds for it), reads the envelope again under the lock, changes it and
writes it back atomically; the running server notices the new envelope by itself.

Exit status: 0 on success; 2 for a mistake of the user (the configuration, a name, a password,
an unknown or existing user, retrying a held message), with one line C{pymaildctl: <message>}
on standard error and no traceback; 1 when the system refuses (a file cannot be written) or a
queue message is not there (an unknown or malformed ID, a damaged envelope), also as one line;
75 (C{EX_TEMPFAIL}) when the message is being delivered right now and stays locked.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Sequence

from pymaild import __version__
from pymaild.errors import ConfigError

PROGRAM = "pymaildctl"

LOCK_WAIT = 10.0
"""
How long (seconds) a C{queue} command waits for a message's lock before it gives up with
L{EX_TEMPFAIL}: the runner holds it for the whole of one delivery attempt.
"""

EX_TEMPFAIL = 75


class UsageError(Exception):
    """
    A mistake on the command line; C{str(error)} is the one line to print.
    """


class CommandFailed(Exception):
    """
    A command that cannot be carried out, for another reason than a mistake on the command
    line; C{str(error)} is the one line to print, L{status} the exit status.
    """

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


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
        description="Administer pymaild: check the configuration, manage passwd-file users and the mail queue.",
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

    queue = commands.add_parser("queue", help="inspect and manage the outbound mail queue")
    queueCommands = queue.add_subparsers(dest="queueCommand", metavar="QUEUE-COMMAND", required=True)
    queueList = queueCommands.add_parser("list", help="list the queued messages, oldest first")
    queueList.add_argument("--json", action="store_true", help="print the envelopes as a JSON list")
    queueList.set_defaults(run=_queueList)
    show = queueCommands.add_parser("show", help="print a message's envelope and header")
    show.add_argument("id", metavar="ID")
    show.set_defaults(run=_queueShow)
    flush = queueCommands.add_parser("flush", help="make every pending recipient of every message not held due now")
    flush.set_defaults(run=_queueFlush)
    for name, run, summary in [
        ("retry", _queueRetry, "make a message's pending recipients due now"),
        ("hold", _queueHold, "keep a message in the queue without trying it"),
        ("release", _queueRelease, "release a held message; its pending recipients are due now"),
        ("delete", _queueDelete, "remove a message from the queue without any report"),
        ("bounce", _queueBounce, "fail a message's pending recipients and report it to the sender"),
    ]:
        _idCommand(queueCommands, name, run, summary)
    quarantine = commands.add_parser("quarantine", help="messages plugins held instead of delivering")
    quarantineCommands = quarantine.add_subparsers(dest="quarantineCommand", metavar="QUARANTINE-COMMAND",
                                                   required=True)
    quarantineList = quarantineCommands.add_parser("list", help="list the held messages, oldest first")
    quarantineList.set_defaults(run=_quarantineList)
    for name, run, summary in [
        ("show", _quarantineShow, "print a held message's envelope and header"),
        ("release", _quarantineRelease, "deliver a held message to the recipients it was for"),
        ("delete", _quarantineDelete, "throw a held message away"),
    ]:
        _idCommand(quarantineCommands, name, run, summary)
    return parser


def _idCommand(commands, name: str, run: Callable, summary: str) -> None:
    """A subcommand taking one message ID."""
    command = commands.add_parser(name, help=summary)
    command.add_argument("id", metavar="ID")
    command.set_defaults(run=run)


def _quarantine(args: argparse.Namespace):
    from pymaild.queue.quarantine import Quarantine

    config = _loadConfig(args)
    return config, Quarantine(config.server.data_dir / "quarantine")


def _quarantineRecord(quarantine, id: str) -> dict:
    try:
        return quarantine.record(id)
    except (KeyError, FileNotFoundError):
        raise CommandFailed(f"no message {id} in the quarantine (see '{PROGRAM} quarantine list')") from None


def _quarantineList(args: argparse.Namespace) -> None:
    _, quarantine = _quarantine(args)
    records = sorted((quarantine.record(id) for id in quarantine.ids()), key=lambda r: r["held"])
    for r in records:
        held = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["held"]))
        recipients = list(r["users"]) + [address for address, _, _ in r.get("recipients") or ()]
        print(f"{r['id']}  {held}  <{r['sender']}> -> {', '.join(recipients)}  ({r['reason']})")
    print(f"-- {_plural(len(records), 'message')} held")


def _quarantineShow(args: argparse.Namespace) -> None:
    _, quarantine = _quarantine(args)
    record = _quarantineRecord(quarantine, args.id)
    print(json.dumps(record, indent=2, ensure_ascii=False))
    print()
    sys.stdout.flush()
    with open(quarantine.messagePath(args.id), "rb") as message:
        for line in message:
            if line in (b"\n", b"\r\n"):
                break
            sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


def _quarantineRelease(args: argparse.Namespace) -> None:
    """
    The local copies into the mailboxes the message was for, the rest into the outbound queue
    (a running server sends it at once), then the quarantine's copy goes.
    """
    from pymaild.queue.files import Envelope, QueueFiles, Recipient
    from pymaild.store.delivery import deliverToUsers
    from pymaild.store.maildir import MaildirStore

    config, quarantine = _quarantine(args)
    record = _quarantineRecord(quarantine, args.id)
    path = quarantine.messagePath(args.id)
    users = record["users"]
    if users:
        store = MaildirStore(config.server.data_dir / "mail", config.store.quota_storage, config.store.quota_messages,
                             config.store.specialFolders)
        for user, home in (record.get("homes") or {}).items():
            store.place(user, home)
        deliverToUsers(store, path, users)
    recipients = record.get("recipients") or []
    if recipients:
        envelope = Envelope(id="", sender=record["sender"],
                            recipients=[Recipient(address, orcpt=orcpt, notify=notify)
                                        for address, notify, orcpt in recipients],
                            body=record.get("body"), smtputf8=bool(record.get("smtputf8")), ret=record.get("ret"),
                            envid=record.get("envid"), client=record.get("client") or {})
        QueueFiles(config.server.data_dir / "queue").prepare(path, envelope, skip=record.get("skip") or 0).commit()
    quarantine.delete(args.id)
    print(f"released {args.id}: {len(users)} local, {_plural(len(recipients), 'queued recipient')}")


def _quarantineDelete(args: argparse.Namespace) -> None:
    _, quarantine = _quarantine(args)
    _quarantineRecord(quarantine, args.id)
    quarantine.delete(args.id)
    print(f"deleted {args.id}")


def _loadConfig(args: argparse.Namespace):
    from pymaild import config as configmod

    return configmod.load(args.config, args.data_dir)


def _passwdFile(args: argparse.Namespace):
    from pymaild.auth.passwdfile import PasswdFile

    return PasswdFile(_accountsConfig(args).auth.passwd_file)


def _accountsConfig(args: argparse.Namespace):
    """The configuration, if its accounts are in the passwd-file (not in LDAP)."""
    config = _loadConfig(args)
    if config.auth.backend == "ldap":
        raise UsageError('the accounts are in the LDAP directory ([auth] backend = "ldap"): '
                         "add, change and remove them there")
    return config


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
    import pymaild.plugins
    from pymaild.pipeline.plugin import load
    from pymaild.service import checkFiles

    checkFiles(config)
    load(config, pymaild.plugins)  # (the plugins are found and their tables checked, not started)
    sys.stdout.write(config.describe())


def _userAdd(args: argparse.Namespace) -> None:
    from pymaild.auth import passwords
    from pymaild.auth.passwdfile import PasswdFile, UserExists

    config = _accountsConfig(args)
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


def _queueFiles(args: argparse.Namespace):
    from pymaild.queue.files import QueueFiles

    return QueueFiles(_loadConfig(args).server.data_dir / "queue")


def _noMessage(id: str) -> CommandFailed:
    return CommandFailed(f"no message {id} in the queue (see '{PROGRAM} queue list')")


def _badId(id: str) -> CommandFailed:
    return CommandFailed(f"{id!r} is not a queue ID (8 to 40 letters and digits; see '{PROGRAM} queue list')")


def _damaged(id: str, why: object) -> CommandFailed:
    return CommandFailed(f"message {id} is damaged ({why}); the server moves it to queue/corrupt/")


def _load(files, id: str):
    """
    The envelope of C{id}.

    @raise CommandFailed: it is not queued, or damaged.
    """
    from pymaild.queue.files import CorruptEnvelope

    try:
        return files.load(id)
    except KeyError:
        raise _noMessage(id) from None
    except CorruptEnvelope as e:
        raise _damaged(id, e) from None


@contextmanager
def _locked(files, id: str, damagedToo: bool = False) -> Iterator:
    """
    Hold the lock of message C{id} (waiting at most L{LOCK_WAIT} seconds) and give its
    envelope, read under the lock.

    @param damagedToo: give C{None} instead of failing when the envelope is damaged.
    @raise CommandFailed: the ID is malformed or not queued (1), the envelope is damaged (1),
        the message stays locked (L{EX_TEMPFAIL}).
    """
    from pymaild.queue.files import Busy, CorruptEnvelope

    try:
        lock = files.lock(id, wait=LOCK_WAIT)
    except KeyError:
        raise _badId(id) from None
    try:
        lock.__enter__()
    except FileNotFoundError:
        if files.paths(id)[1].exists():
            raise _damaged(id, "message file missing") from None
        raise _noMessage(id) from None
    except Busy:
        raise CommandFailed(
            f"message {id} is being delivered right now (still locked after {LOCK_WAIT:g} seconds); try again",
            EX_TEMPFAIL,
        ) from None
    try:
        try:
            envelope = files.load(id)
        except KeyError:
            raise _noMessage(id) from None  # (delivered or deleted while we waited)
        except CorruptEnvelope as e:
            if not damagedToo:
                raise _damaged(id, e) from None
            envelope = None
        yield envelope
    finally:
        lock.__exit__()


def _edit(args: argparse.Namespace, change: Callable) -> None:
    """
    Apply C{change(envelope)} to the envelope of C{args.id} under the message's lock and write
    the envelope back.
    """
    files = _queueFiles(args)
    with _locked(files, args.id) as envelope:
        change(envelope)
        files.save(envelope)


def _dueNow(envelope) -> int:
    """
    Make every pending recipient of C{envelope} due now; how many there are.
    """
    now = time.time()
    pending = envelope.pending()
    for recipient in pending:
        recipient.next_attempt = now
    return len(pending)


def _localTime(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _oneLine(text: str) -> str:
    return " ".join(text.split())


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _queueEntries(files) -> list:
    """
    Every message in the queue, oldest first, as C{(id, envelope)}, then the damaged ones as
    C{(id, reason)} (left where they are: the server moves them aside).
    """
    from pymaild.queue.files import CorruptEnvelope

    if not files.messages.is_dir():
        return []  # (the server never ran with this data directory)
    entries, damaged = [], []
    for id in files.ids():
        try:
            entries.append((id, files.load(id)))
        except KeyError:
            continue  # (delivered or deleted meanwhile)
        except CorruptEnvelope as e:
            damaged.append((id, str(e)))
    entries.sort(key=lambda entry: (entry[1].arrival, entry[0]))
    return entries + damaged


def _queueList(args: argparse.Namespace) -> None:
    from pymaild.queue.files import DELIVERED, PENDING

    entries = _queueEntries(_queueFiles(args))
    if args.json:
        envelopes = []
        for id, envelope in entries:
            if isinstance(envelope, str):
                sys.stderr.write(f"{PROGRAM}: message {id} is damaged ({envelope}); left out\n")
            else:
                envelopes.append(json.loads(envelope.toJSON()))
        sys.stderr.flush()
        print(json.dumps(envelopes, indent=1))
        return
    if not entries:
        print("Mail queue is empty")
        return
    now = time.time()
    total = count = 0
    print(f"{'-Queue ID-':<24} {'--Size--':>8}  {'---Arrival Time----':<19}  -Sender/Recipient-")
    for id, envelope in entries:
        if isinstance(envelope, str):
            print(f"{id:<24} damaged: {_oneLine(envelope)} (the server moves it to queue/corrupt/)")
            print()
            continue
        count += 1
        total += envelope.size
        marked = id + ("!" if envelope.held else "")
        print(f"{marked:<24} {envelope.size:>8}  {_localTime(envelope.arrival)}  {envelope.sender or '<>'}")
        for r in envelope.recipients:
            if r.state == DELIVERED:
                continue
            words = [r.state, _plural(r.attempts, "attempt")]
            if r.state == PENDING:
                words.append("held" if envelope.held else
                             "due now" if r.next_attempt <= now else f"next {_localTime(r.next_attempt)}")
            else:
                words.append("report sent" if r.reported else "report to send")
            line = f"    {r.address}  {', '.join(words)}"
            if r.reply:
                line += f"  ({_oneLine(r.reply)})"
            print(line)
        print()
    print(f"-- {math.ceil(total / 1024)} Kbytes in {_plural(count, 'message')}.")


def _queueShow(args: argparse.Namespace) -> None:
    files = _queueFiles(args)
    try:
        files.paths(args.id)
    except KeyError:
        raise _badId(args.id) from None
    envelope = _load(files, args.id)
    try:
        message = files.open(args.id)
    except FileNotFoundError:
        raise _noMessage(args.id) from None  # (delivered or deleted meanwhile)
    with message:
        header = []
        for line in message:
            if line in (b"\n", b"\r\n"):
                break
            header.append(line)
    print(json.dumps(json.loads(envelope.toJSON()), indent=2, ensure_ascii=False))
    print()
    sys.stdout.flush()
    sys.stdout.buffer.write(b"".join(header))
    sys.stdout.buffer.flush()


def _queueFlush(args: argparse.Namespace) -> None:
    """
    Every message not held with a pending recipient is due now.  A message being delivered
    right now is not waited for: it is being tried already.
    """
    from pymaild.queue.files import Busy, CorruptEnvelope

    files = _queueFiles(args)
    flushed = held = busy = damaged = 0
    for id in files.ids() if files.messages.is_dir() else []:
        try:
            with files.lock(id):
                envelope = files.load(id)
                if envelope.held:
                    held += 1
                elif _dueNow(envelope):
                    files.save(envelope)
                    flushed += 1
        except Busy:
            busy += 1
        except (FileNotFoundError, KeyError):
            continue  # (delivered or deleted meanwhile)
        except CorruptEnvelope:
            damaged += 1
    notes = [f"{busy} being delivered right now"] if busy else []
    notes += [f"{held} held"] if held else []
    notes += [f"{damaged} damaged"] if damaged else []
    print(f"flushed {_plural(flushed, 'message')}" + (f" ({', '.join(notes)})" if notes else ""))


def _queueRetry(args: argparse.Namespace) -> None:
    due = []

    def retry(envelope) -> None:
        if envelope.held:
            raise UsageError(f"message {envelope.id} is held; release it with '{PROGRAM} queue release {envelope.id}'")
        due.append(_dueNow(envelope))

    _edit(args, retry)
    print(f"retrying {args.id} ({_plural(due[0], 'recipient')} due now)")


def _queueHold(args: argparse.Namespace) -> None:
    def hold(envelope) -> None:
        envelope.held = True

    _edit(args, hold)
    print(f"held {args.id}")


def _queueRelease(args: argparse.Namespace) -> None:
    def release(envelope) -> None:
        envelope.held = False
        _dueNow(envelope)

    _edit(args, release)
    print(f"released {args.id}")


def _queueDelete(args: argparse.Namespace) -> None:
    files = _queueFiles(args)
    with _locked(files, args.id, damagedToo=True):
        files.remove(args.id)
    print(f"deleted {args.id}")


def _queueBounce(args: argparse.Namespace) -> None:
    from pymaild.queue.files import FAILED

    bounced = []

    def bounce(envelope) -> None:
        for recipient in envelope.pending():
            recipient.state = FAILED
            recipient.status = "5.0.0"
            recipient.reply = "bounced by the administrator"
            recipient.reported = not recipient.wants("FAILURE") or not envelope.sender
            bounced.append(recipient)
        envelope.held = False

    _edit(args, bounce)
    reported = sum(not r.reported for r in bounced)
    print(f"bounced {_plural(len(bounced), 'recipient')} of {args.id} "
          f"({reported} to report to the sender)")


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
    except CommandFailed as e:
        return _fail(str(e), e.status)
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
