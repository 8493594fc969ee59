"""
Tests for L{pymaild.auth.aliases} and L{pymaild.auth.directory}: the aliases file format and
its errors, and how the directory resolves addresses through users, aliases, groups,
catch-alls and the postmaster rule.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from pymaild.auth import aliases as aliasesmodule
from pymaild.auth import directory as directorymodule
from pymaild.auth.aliases import AliasesError, AliasesFile, parse_aliases
from pymaild.auth.directory import FileDirectory
from pymaild.auth.passwdfile import PasswdFile
from pymaild.envelope import Resolution
from pymaild.errors import TemporaryFailure
from pymaild.interfaces import IDirectory, IReloadable


def result_of(d: defer.Deferred):
    """
    The result of a Deferred that has already fired; a failure is raised.
    """
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def events(monkeypatch) -> list[dict]:
    """
    The events the aliases and directory modules log during the test.
    """
    collected: list[dict] = []
    monkeypatch.setattr(aliasesmodule, "log", Logger(observer=collected.append))
    monkeypatch.setattr(directorymodule, "log", Logger(observer=collected.append))
    return collected


def texts(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events]


# --- the aliases file --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sales@example.com: alice", {"sales@example.com": ("alice",)}),
        (
            "Sales@Example.COM:Alice@Example.com ,bob,  carol@elsewhere.example",
            {"sales@example.com": ("Alice@example.com", "bob", "carol@elsewhere.example")},
        ),
        ("abuse: postmaster", {"abuse": ("postmaster",)}),
        ("@Example.org: catchall@example.org", {"@example.org": ("catchall@example.org",)}),
        ("team@bücher.example: jöe@bücher.example", {"team@xn--bcher-kva.example": ("jöe@xn--bcher-kva.example",)}),
        ("# comment\n\n   \nx@example.com: a  # trailing comment\n", {"x@example.com": ("a",)}),
        ("x@example.com: a, a, b, a", {"x@example.com": ("a", "b")}),
        ("x#y@example.com: a#b", {"x#y@example.com": ("a#b",)}),
        ("x@example.com: a\r\n", {"x@example.com": ("a",)}),
        ("", {}),
    ],
)
def test_parse_aliases(text, expected):
    """
    Keys are folded to lower case; targets keep the order written, lose repeats, and keep the
    case of their local part.  Comments start at a '#' at the beginning or after white space.
    """
    aliases, errors = parse_aliases(text, "aliases")
    assert errors == []
    assert aliases == expected


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("ok@example.com: a\nno colon here\n", 2, "no ':' found"),
        ("\n\nx@example.com:\n", 3, "no targets"),
        (": a\n", 1, "no key"),
        ("a b@example.com: c\n", 1, "white space"),
        ("a@b@example.com: c\n", 1, "more than one '@'"),
        ("x@example.com: a,,b\n", 1, "empty target"),
        ("x@example.com: a,\n", 1, "empty target"),
        ("x@example.com: a b\n", 1, "white space"),
        ("x@example.com: @example.com\n", 1, "catch-all"),
        ("x@example.com: |/usr/bin/prog\n", 1, "program"),
        ("x@example.com: /var/mail/x\n", 1, "file"),
        ("x@example.com: :include:/etc/list\n", 1, "include"),
        ("x@example.com: a@\n", 1, "domain after '@' is empty"),
        ("x@example.com: a\n# c\nX@EXAMPLE.COM: b\n", 3, "already defined on line 1"),
        ("x@example.com: <a@example.com>\n", 1, "'<'"),
    ],
)
def test_aliases_errors_name_file_and_line(tmp_path, text, line, fragment):
    """
    Each mistake is an L{AliasesError} (a ValueError) whose message is "FILE:LINE: what is
    wrong"; check() raises the first.
    """
    path = tmp_path / "aliases"
    path.write_text(text)
    with pytest.raises(AliasesError) as info:
        AliasesFile(path).check()
    error = info.value
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"{path}:{line}: ")
    assert fragment in str(error)
    assert (error.path, error.line) == (str(path), line)


def test_aliases_check_good_and_missing(tmp_path):
    """
    check() accepts a correct file and a missing one.
    """
    path = tmp_path / "aliases"
    AliasesFile(path).check()
    path.write_text("a@example.com: b\n")
    AliasesFile(path).check()


def test_aliases_check_binary(tmp_path):
    """
    check() refuses a file with NUL bytes, naming the line.
    """
    path = tmp_path / "aliases"
    path.write_bytes(b"a@example.com: b\nx\0")
    with pytest.raises(AliasesError, match=":2: not a text file"):
        AliasesFile(path).check()


def test_aliases_bad_edit_keeps_previous(tmp_path, events):
    """
    At run time, an edit with mistakes logs each (file and line) and keeps the previous
    contents as a whole; the next correct edit is taken.
    """
    path = tmp_path / "aliases"
    path.write_text("a@example.com: b\n")
    aliases = AliasesFile(path)
    assert aliases.targets("a@example.com") == ("b",)
    path.write_text("a@example.com: c\nbroken line\n")
    assert aliases.targets("a@example.com") == ("b",)
    assert any(f"{path}:2:" in text for text in texts(events))
    path.write_text("a@example.com: c\n")
    assert aliases.targets("a@example.com") == ("c",)
    assert len(aliases) == 1


def test_aliases_first_read_uses_good_lines(tmp_path, events):
    """
    With no previous contents, a file with mistakes gives its good lines.
    """
    path = tmp_path / "aliases"
    path.write_text("a@example.com: b\nbroken\nc@example.com: d\n")
    aliases = AliasesFile(path)
    assert dict(aliases.entries()) == {"a@example.com": ("b",), "c@example.com": ("d",)}
    assert [text for text in texts(events) if f"{path}:2:" in text]


# --- the directory -----------------------------------------------------------------------

USERS = ["alice@example.com", "bob@example.com", "carol@example.org", "postmaster@example.com"]

ALIASES = textwrap.dedent(
    """\
    # aliases
    sales@example.com: alice
    Info@Example.com: Bob@Example.com
    team@example.com: alice, bob, carol@example.org
    list@example.com: team@example.com, friend@elsewhere.example, alice
    forward@example.com: Someone@Elsewhere.example
    abuse: postmaster
    help: bob
    help@example.org: carol
    nested@example.com: sales
    dangling@example.com: nobody, alice
    allgone@example.com: nobody, ghost
    loop1@example.com: loop2
    loop2@example.com: loop1, bob
    self@example.com: self
    @example.org: carol
    catchorg@example.org: missing
    """
)


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{user}:{{PLAIN}}x\n" for user in USERS))
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES)
    return passwd, aliases


@pytest.fixture
def directory(files) -> FileDirectory:
    passwd, aliases = files
    return FileDirectory(PasswdFile(passwd), AliasesFile(aliases), ["Example.com", "example.org."])


def users(*names: str) -> frozenset[str]:
    return frozenset(names)


@pytest.mark.parametrize(
    "address, kind, expected_users, remote",
    [
        ("alice@example.com", "user", users("alice@example.com"), ()),
        ("<Alice@EXAMPLE.com>", "user", users("alice@example.com"), ()),
        ("sales@example.com", "alias", users("alice@example.com"), ()),
        ("INFO@example.com", "alias", users("bob@example.com"), ()),
        ("team@example.com", "group", users("alice@example.com", "bob@example.com", "carol@example.org"), ()),
        (
            "list@example.com",
            "group",
            users("alice@example.com", "bob@example.com", "carol@example.org"),
            ("friend@elsewhere.example",),
        ),
        ("forward@example.com", "alias", users(), ("Someone@elsewhere.example",)),
        # A bare key applies in every local domain; a bare target takes the alias's domain.
        ("help@example.com", "alias", users("bob@example.com"), ()),
        ("help@example.org", "alias", users("carol@example.org"), ()),
        ("abuse@example.com", "alias", users("postmaster@example.com"), ()),
        # abuse@example.org -> postmaster@example.org -> (postmaster rule) postmaster@example.com
        ("abuse@example.org", "alias", users("postmaster@example.com"), ()),
        ("nested@example.com", "alias", users("alice@example.com"), ()),
        # Targets that resolve to nobody are dropped; nothing left is "none".
        ("dangling@example.com", "alias", users("alice@example.com"), ()),
        ("allgone@example.com", "none", users(), ()),
        # Loops are cut where they close.
        ("loop1@example.com", "alias", users("bob@example.com"), ()),
        ("self@example.com", "none", users(), ()),
        # Plus-addressing: user+tag@ is user@ (or its alias), if nobody has user+tag@ itself.
        ("alice+news@example.com", "alias", users("alice@example.com"), ()),
        ("sales+q4@example.com", "alias", users("alice@example.com"), ()),
        ("ghost+x@example.com", "none", users(), ()),
        # The catch-all has the lowest precedence.
        ("whoever@example.org", "alias", users("carol@example.org"), ()),
        ("carol@example.org", "user", users("carol@example.org"), ()),
        ("catchorg@example.org", "alias", users("carol@example.org"), ()),
        ("whoever@example.com", "none", users(), ()),
        # RFC 5321 4.5.1: postmaster.
        ("postmaster", "alias", users("postmaster@example.com"), ()),
        ("Postmaster", "alias", users("postmaster@example.com"), ()),
        ("postmaster@example.com", "user", users("postmaster@example.com"), ()),
        ("POSTMASTER@example.org", "alias", users("postmaster@example.com"), ()),
        # Not local, or no domain.
        ("alice@elsewhere.example", "none", users(), ()),
        ("sales@elsewhere.example", "none", users(), ()),
        ("alice", "none", users(), ()),
    ],
)
def test_lookup(directory, address, kind, expected_users, remote):
    """
    lookup() answers users, aliases (one final target), groups (several), remote targets and
    "none", following the precedence user, alias, bare alias, postmaster rule, catch-all.
    """
    resolution = result_of(directory.lookup(address))
    assert isinstance(resolution, Resolution)
    assert (resolution.kind, resolution.users, resolution.remote) == (kind, expected_users, frozenset(remote))


def test_lookup_address_is_normalised(directory):
    """
    The resolution carries the address asked for, normalised.
    """
    assert result_of(directory.lookup(" <Sales@Example.COM> ")).address == "sales@example.com"


def test_dropped_targets_logged_once(directory, events):
    """
    A target that resolves to nobody, and a loop, are logged (once per version of the files,
    not at every lookup).
    """
    for _ in range(3):
        result_of(directory.lookup("dangling@example.com"))
        result_of(directory.lookup("self@example.com"))
    logged = texts(events)
    assert len(logged) == 3, logged
    assert any("nobody@example.com" in text and "dangling@example.com" in text for text in logged)
    assert any("loop" in text and "self@example.com" in text for text in logged)


def chain(length: int) -> str:
    """
    Aliases a0 -> a1 -> ... -> a{length-1} -> bob.
    """
    lines = [f"a{i}@example.com: a{i + 1}" for i in range(length - 1)]
    lines.append(f"a{length - 1}@example.com: bob")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("length, kind", [(1, "alias"), (10, "alias"), (11, "none"), (40, "none")])
def test_depth_limit(tmp_path, events, length, kind):
    """
    An expansion through up to ten aliases works; deeper ones are cut and logged.
    """
    (tmp_path / "passwd").write_text("bob@example.com:{PLAIN}x\n")
    (tmp_path / "aliases").write_text(chain(length))
    directory = FileDirectory(
        PasswdFile(tmp_path / "passwd"), AliasesFile(tmp_path / "aliases"), ["example.com"]
    )
    assert result_of(directory.lookup("a0@example.com")).kind == kind
    if kind == "none":
        assert any("more than 10 aliases deep" in text for text in texts(events))


def test_postmaster_defined_otherwise(tmp_path):
    """
    The postmaster rule applies only where nothing else defines postmaster@domain: a user, an
    explicit alias or a bare one wins; it goes before the catch-all.
    """
    (tmp_path / "passwd").write_text(
        "boss@one.example:{PLAIN}x\npostmaster@two.example:{PLAIN}x\nadmin@three.example:{PLAIN}x\n"
        "catch@four.example:{PLAIN}x\n"
    )
    (tmp_path / "aliases").write_text(
        "postmaster@one.example: boss\npostmaster@three.example: admin\n@four.example: catch\n"
    )
    directory = FileDirectory(
        PasswdFile(tmp_path / "passwd"),
        AliasesFile(tmp_path / "aliases"),
        ["one.example", "two.example", "three.example", "four.example"],
    )
    expected = {
        "postmaster": {"boss@one.example"},
        "postmaster@one.example": {"boss@one.example"},
        "postmaster@two.example": {"postmaster@two.example"},
        "postmaster@three.example": {"admin@three.example"},
        "postmaster@four.example": {"boss@one.example"},
        "other@four.example": {"catch@four.example"},
    }
    for address, expected_users in expected.items():
        assert result_of(directory.lookup(address)).users == expected_users, address


def test_postmaster_nowhere(tmp_path):
    """
    Without any postmaster at all, postmaster is "none" (start-up creates one).
    """
    (tmp_path / "passwd").write_text("bob@example.com:{PLAIN}x\n")
    directory = FileDirectory(
        PasswdFile(tmp_path / "passwd"), AliasesFile(tmp_path / "aliases"), ["example.com", "example.org"]
    )
    for address in ("postmaster", "postmaster@example.com", "postmaster@example.org"):
        assert result_of(directory.lookup(address)).kind == "none"


@pytest.mark.parametrize(
    "user, expected",
    [
        ("alice@example.com", {"alice@example.com", "sales@example.com", "nested@example.com", "dangling@example.com"}),
        ("bob@example.com", {"bob@example.com", "info@example.com", "help@example.com", "loop1@example.com", "loop2@example.com"}),
        ("carol@example.org", {"carol@example.org", "help@example.org", "catchorg@example.org"}),
        (
            "postmaster@example.com",
            {
                "postmaster@example.com",
                "postmaster@example.org",
                "abuse@example.com",
                "abuse@example.org",
            },
        ),
        ("Alice@Example.COM", {"alice@example.com", "sales@example.com", "nested@example.com", "dangling@example.com"}),
        ("nobody@example.com", set()),
    ],
)
def test_addresses_of(directory, user, expected):
    """
    addressesOf() gives the user's own address and every alias address (bare keys in every
    local domain, the postmaster rule included) that resolves to that user alone; groups,
    remote forwards and catch-alls are not the user's.
    """
    assert result_of(directory.addressesOf(user)) == frozenset(expected)


def test_reread_on_change(files, directory):
    """
    Changes to either file (by pymaildctl or an editor) are seen at the next lookup.
    """
    passwd_path, aliases_path = files
    assert result_of(directory.lookup("dave@example.com")).kind == "none"
    PasswdFile(passwd_path).add("dave@example.com", "{PLAIN}d")
    assert result_of(directory.lookup("dave@example.com")).kind == "user"
    assert result_of(directory.addressesOf("dave@example.com")) == {"dave@example.com"}
    with open(aliases_path, "a") as f:
        f.write("d@example.com: dave\n")
    assert result_of(directory.lookup("d@example.com")).users == {"dave@example.com"}
    assert result_of(directory.addressesOf("dave@example.com")) == {"dave@example.com", "d@example.com"}


def test_reload_rereads_both(files, directory):
    """
    reload() re-reads both files even when their signature did not change.
    """
    _, aliases_path = files
    old = 10**18
    os.utime(aliases_path, ns=(old, old))
    result_of(directory.lookup("sales@example.com"))
    # Same size, same inode, mtime put back: invisible to the signature.
    text = aliases_path.read_text().replace("sales@example.com: alice", "sales@example.com: bob  ")
    with open(aliases_path, "r+") as f:
        f.write(text)
    os.utime(aliases_path, ns=(old, old))
    assert result_of(directory.lookup("sales@example.com")).users == {"alice@example.com"}
    directory.reload()
    assert result_of(directory.lookup("sales@example.com")).users == {"bob@example.com"}


def test_unreadable_files_are_temporary_failures(tmp_path):
    """
    A passwd-file or aliases file that cannot be read fails lookups and addressesOf with
    L{TemporaryFailure}, never a "none" that would bounce mail.
    """
    for broken in ("passwd", "aliases"):
        root = tmp_path / broken
        root.mkdir()
        (root / broken).mkdir()
        directory = FileDirectory(PasswdFile(root / "passwd"), AliasesFile(root / "aliases"), ["example.com"])
        for d in (directory.lookup("bob@example.com"), directory.addressesOf("bob@example.com")):
            with pytest.raises(TemporaryFailure):
                result_of(d)
        directory.reload()  # logs, raises nothing


@pytest.mark.parametrize(
    "domain, local",
    [
        ("example.com", True),
        ("EXAMPLE.COM.", True),
        ("bücher.example", True),
        ("xn--bcher-kva.example", True),
        ("example.net", False),
        ("com", False),
    ],
)
def test_is_local_domain(tmp_path, domain, local):
    """
    isLocalDomain() compares normalised domains (case, trailing dot, IDNA).
    """
    directory = FileDirectory(
        PasswdFile(tmp_path / "passwd"), AliasesFile(tmp_path / "aliases"), ["Example.com", "Bücher.example"]
    )
    assert directory.isLocalDomain(domain) is local


def test_needs_a_local_domain(tmp_path):
    """
    A directory without local domains is a programming error.
    """
    with pytest.raises(ValueError):
        FileDirectory(PasswdFile(tmp_path / "passwd"), AliasesFile(tmp_path / "aliases"), [])


def test_interfaces(directory):
    """
    FileDirectory provides IDirectory and IReloadable.
    """
    assert verifyObject(IDirectory, directory)
    assert verifyObject(IReloadable, directory)


def test_plus_addressing_comes_before_the_catch_all(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("carol@example.org:{PLAIN}x\npostmaster@example.org:{PLAIN}x\n")
    aliases = tmp_path / "aliases"
    aliases.write_text("@example.org: postmaster\ncarol+vip@example.org: postmaster\n")
    directory = FileDirectory(PasswdFile(passwd), AliasesFile(aliases), ["example.org"])
    assert directory.resolve("carol+lists@example.org").users == users("carol@example.org")
    assert directory.resolve("carol+vip@example.org").users == users("postmaster@example.org")
    assert directory.resolve("dave+x@example.org").users == users("postmaster@example.org")


def test_an_alias_of_its_own_tagged_forms_is_a_loop_not_a_hang(tmp_path, events):
    """
    list: list+a, ... is cut as a loop at once (it used to be expanded again and again down to
    the depth limit: exponential in the number of tagged targets, 21 s for five).
    """
    passwd = tmp_path / "passwd"
    passwd.write_text("bob@example.org:{PLAIN}x\n")
    aliases = tmp_path / "aliases"
    aliases.write_text("list: list+a, list+b, list+c, list+d, list+e, bob\nself: self+x\n")
    directory = FileDirectory(PasswdFile(passwd), AliasesFile(aliases), ["example.org"])
    assert directory.resolve("list@example.org").users == users("bob@example.org")
    assert not directory.resolve("self@example.org").exists
    assert not [t for t in texts(events) if "deep" in t], texts(events)
