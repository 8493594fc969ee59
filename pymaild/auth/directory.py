# -*- test-case-name: tests.auth.test_directory -*-
"""
The directory of a passwd-file installation: users from the passwd-file, aliases and groups
from the aliases file.

Interfaces implemented: L{IDirectory}, L{IReloadable}.

Implementation summary: L{FileDirectory.lookup} resolves an address in a local domain in this
order, the first match winning:

  1. a user of the passwd-file (kind C{"user"});
  2. an alias C{local@domain};
  3. a bare alias C{local}, which applies in every local domain;
  4. RFC 5321 section 4.5.1: C{postmaster@<any local domain>} and a bare C{postmaster} go to
     C{postmaster@<first local domain>};
  5. the catch-all C{@domain}.

An alias's targets resolve the same way, recursively (a bare target takes the domain of the
alias it is written for), until they reach users or addresses outside the local domains
(C{remote}).  A target already on the path being expanded (a loop), a target more than
L{FileDirectory.maxDepth} aliases deep, and a target that resolves to nobody are dropped and
logged.  What remains decides the kind: one final target is an C{"alias"}, more a C{"group"},
none C{"none"}, as is an address in a domain that is not local.

Both files are read into memory and re-read when they change (one C{os.stat} each per call), so
answers are computed on the calling thread and wrapped in C{defer.succeed}.  A file that cannot
be read (and never could) fails the Deferred with L{TemporaryFailure}, so that mail is deferred
rather than bounced.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymaild.auth.aliases import AliasesFile
from pymaild.auth.passwdfile import PasswdEntry, PasswdFile
from pymaild.envelope import Resolution, normalizeAddress
from pymaild.errors import TemporaryFailure
from pymaild.interfaces import IDirectory, IReloadable

log = Logger()

_Users = Mapping[str, PasswdEntry]
_AliasMap = Mapping[str, tuple[str, ...]]


def _normalizeDomain(domain: str | bytes) -> str:
    if isinstance(domain, bytes):
        domain = domain.decode("utf-8", "replace")
    domain = domain.strip().rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return domain.lower()


@implementer(IDirectory, IReloadable)
class FileDirectory:
    """
    L{IDirectory} over a L{PasswdFile} and an L{AliasesFile}.

    @ivar localDomains: the local domains, normalised, in the configured order; the first one
        is where C{postmaster} lives.
    @cvar maxDepth: how many aliases deep an expansion may go.
    """

    maxDepth = 10

    def __init__(self, passwdFile: PasswdFile, aliases: AliasesFile, localDomains: Iterable[str]) -> None:
        self.passwdFile = passwdFile
        self.aliases = aliases
        self.localDomains = tuple(dict.fromkeys(_normalizeDomain(d) for d in localDomains))
        if not self.localDomains:
            raise ValueError("a directory needs at least one local domain")
        self.postmaster = f"postmaster@{self.localDomains[0]}"
        self._localDomainSet = frozenset(self.localDomains)
        #: (users, aliases, {user: addresses}) for the snapshots it was computed from.
        self._addressCache: tuple[_Users, _AliasMap, dict[str, frozenset[str]]] | None = None
        #: (users, aliases, messages logged) so that a problem is logged once per file version.
        self._reported: tuple[_Users, _AliasMap, set[str]] | None = None

    # --- IDirectory -------------------------------------------------------------------------

    def isLocalDomain(self, domain: str) -> bool:
        return _normalizeDomain(domain) in self._localDomainSet

    def lookup(self, address: str) -> defer.Deferred:
        try:
            return defer.succeed(self.resolve(address))
        except OSError as e:
            return defer.fail(TemporaryFailure(cause=e))

    def addressesOf(self, user: str) -> defer.Deferred:
        try:
            users, aliases = self._snapshots()
        except OSError as e:
            return defer.fail(TemporaryFailure(cause=e))
        return defer.succeed(self._addressesByUser(users, aliases).get(normalizeAddress(user), frozenset()))

    def reload(self) -> None:
        self.passwdFile.reload()
        self.aliases.reload()

    # --- resolution -------------------------------------------------------------------------

    def resolve(self, address: str) -> Resolution:
        """
        L{lookup}, without the Deferred.

        @raise OSError: if a file cannot be read and never could be.
        """
        users, aliases = self._snapshots()
        return self._resolve(normalizeAddress(address), users, aliases)

    def _snapshots(self) -> tuple[_Users, _AliasMap]:
        return self.passwdFile.entries(), self.aliases.entries()

    def _resolve(self, address: str, users: _Users, aliases: _AliasMap) -> Resolution:
        local, at, domain = address.rpartition("@")
        if not at:
            if address != "postmaster":
                return Resolution(address, "none")
            found = self._expandTargets(address, (self.postmaster,), "", users, aliases, ())
        elif domain not in self._localDomainSet:
            return Resolution(address, "none")
        elif address in users:
            return Resolution(address, "user", frozenset([address]))
        else:
            found = self._expand(address, users, aliases, ())
        if found is None:
            return Resolution(address, "none")
        finalUsers, remote = found
        count = len(finalUsers) + len(remote)
        if count == 0:
            self._report(
                users,
                aliases,
                f"alias {address} resolves to nobody; it is treated as unknown",
            )
            return Resolution(address, "none")
        kind = "alias" if count == 1 else "group"
        return Resolution(address, kind, frozenset(finalUsers), frozenset(remote))

    def _aliasTargets(self, address: str, aliases: _AliasMap, catchAll: bool = True) -> tuple[str, ...] | None:
        """
        The targets an address in a local domain that is not a user has, by precedence.
        """
        local, _, domain = address.rpartition("@")
        targets = aliases.get(address)
        if targets is None:
            targets = aliases.get(local)
        if targets is None and local == "postmaster" and address != self.postmaster:
            targets = (self.postmaster,)
        if targets is None and catchAll:
            targets = aliases.get("@" + domain)
        return targets

    def _expand(
        self, address: str, users: _Users, aliases: _AliasMap, chain: tuple[str, ...]
    ) -> tuple[set[str], set[str]] | None:
        """
        Resolve an address in a local domain to its final users and remote addresses.

        @param chain: the aliases being expanded on the way to C{address}.
        @return: C{(users, remote)}, or C{None} if nothing matches the address.
        """
        if address in users:
            return {address}, set()
        local, _, domain = address.rpartition("@")
        targets = self._aliasTargets(address, aliases, catchAll=False)
        if targets is None and "+" in local:
            # plus-addressing: user+tag@domain is user@domain (a user or an alias), unless
            # user+tag itself exists; either comes before the domain's catch-all
            base = local.split("+", 1)[0] + "@" + domain
            if base in users:
                return {base}, set()
            if base in chain:
                return None  # an alias that points at a tagged form of itself: a loop
            targets = self._aliasTargets(base, aliases, catchAll=False)
            if targets is not None:
                address = base
        if targets is None:
            targets = aliases.get("@" + domain)
        if targets is None:
            return None
        return self._expandTargets(address, targets, domain, users, aliases, chain)

    def _expandTargets(
        self,
        address: str,
        targets: tuple[str, ...],
        domain: str,
        users: _Users,
        aliases: _AliasMap,
        chain: tuple[str, ...],
    ) -> tuple[set[str], set[str]]:
        """
        Resolve the targets of the alias C{address}.

        @param domain: the domain of bare targets.
        """
        finalUsers: set[str] = set()
        remote: set[str] = set()
        if len(chain) >= self.maxDepth:
            self._report(
                users,
                aliases,
                f"alias {chain[0]}: {address} is more than {self.maxDepth} aliases deep; dropped",
            )
            return finalUsers, remote
        chain = chain + (address,)
        for target in targets:
            if "@" not in target:
                target = f"{target}@{domain}"
            targetDomain = target.rpartition("@")[2]
            if targetDomain not in self._localDomainSet:
                remote.add(target)
                continue
            target = target.lower()
            if target in chain:
                self._report(
                    users,
                    aliases,
                    f"alias {chain[0]}: loop {' -> '.join(chain + (target,))}; {target} dropped",
                )
                continue
            found = self._expand(target, users, aliases, chain)
            if found is None:
                self._report(
                    users,
                    aliases,
                    f"alias {address}: target {target} is neither a user nor an alias; dropped",
                )
                continue
            finalUsers |= found[0]
            remote |= found[1]
        return finalUsers, remote

    def _addressesByUser(self, users: _Users, aliases: _AliasMap) -> dict[str, frozenset[str]]:
        """
        For every user, its own address and the alias addresses that resolve to it alone;
        computed once per version of the files.
        """
        cache = self._addressCache
        if cache is not None and cache[0] is users and cache[1] is aliases:
            return cache[2]
        candidates: dict[str, None] = {}
        for key in aliases:
            local, at, domain = key.rpartition("@")
            if not at:
                candidates.update((f"{key}@{d}", None) for d in self.localDomains)
            elif local and domain in self._localDomainSet:
                candidates[key] = None
        candidates.update((f"postmaster@{d}", None) for d in self.localDomains)
        found: dict[str, set[str]] = {user: {user} for user in users}
        for candidate in candidates:
            resolution = self._resolve(candidate, users, aliases)
            if len(resolution.users) == 1 and not resolution.remote:
                (user,) = resolution.users
                found[user].add(candidate)
        result = {user: frozenset(addresses) for user, addresses in found.items()}
        self._addressCache = (users, aliases, result)
        return result

    def _report(self, users: _Users, aliases: _AliasMap, message: str) -> None:
        """
        Log a problem with the files once per version of the files.
        """
        reported = self._reported
        if reported is None or reported[0] is not users or reported[1] is not aliases:
            reported = (users, aliases, set())
            self._reported = reported
        if message in reported[2]:
            return
        reported[2].add(message)
        log.warn("{problem}", problem=message, passwdFile=str(self.passwdFile.path), aliasesFile=str(self.aliases.path))
