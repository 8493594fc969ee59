# -*- test-case-name: tests.auth.test_ldap -*-
"""
The company's LDAP directory (OpenLDAP, Active Directory) as pymaild's user database, through
C{ldap3} and L{pymaild.auth.ldapwire}: L{LdapChecker} checks logins (SMTP AUTH, IMAP, POP3 alike, as a twisted.cred checker),
L{LdapDirectory} answers recipient lookups, a user's sender addresses and group expansion.

Interfaces implemented: C{ICredentialsChecker} (C{IUsernamePassword}), L{IDirectory},
L{IReloadable}.

Implementation summary:

  - logins (L{LdapChecker}) run on the reactor, through L{pymaild.auth.ldapwire}: one
    connection bound as the service account carries the users' searches, pipelined, and up to
    C{[ldap] pool_size} more the binds as users, one at a time each; the rules below (servers,
    retry, pause, temporary failures, escaping) are the same there;
  - every other call (L{LdapDirectory}'s lookups: recipients, addresses, groups) is ldap3's, in
    a dedicated, bounded thread pool (C{[ldap] pool_size} threads), never on the reactor; each
    thread keeps its own connection, bound as the service account, so no connection is ever
    shared between threads (the store's sinks that hear of an entry's quota and mailbox key
    run there too);
  - the servers of C{[ldap] urls} are tried in order (failover): a connection that fails is
    dropped and the call is tried once more from the first server; ldap3 connections do not
    recover by themselves after a server restart, this does;
  - a directory that cannot answer (down, timing out, refusing the service account) is a
    L{TemporaryFailure}: mail is deferred (SMTP 451, AUTH 454), logins get "try later", never a
    permanent "no such user";
  - a login or an address is only ever data in a filter: C{escape_filter_chars} for every value
    put into C{user_filter}, the address filters and the group filter;
  - answers are cached for C{cache_ttl} seconds (positive) and C{negative_cache_ttl} (nobody
    there); passwords are never cached.

Account names: a user's account (the avatar ID) is its primary address: the first value of the
first attribute of C{[ldap] address_attributes} (for Active Directory, the C{SMTP:} value of
C{proxyAddresses}, or C{mail}), folded to lower case.  Its mailbox is keyed by the entry's
C{[ldap] mailbox_attribute} (C{entryUUID}; AD: C{objectGUID}) through
L{pymaild.store.keys.MailboxKeys}, so a changed address or a renamed C{uid} keeps its mail, and
an address given to someone new does not hand them the old owner's.

Security: the service account needs read access to the users' address attributes and the
groups, never to passwords; users' passwords are checked by binding as the user's DN (found
with the service account), over TLS when C{start_tls} or an C{ldaps://} URL is configured. An
empty password is refused before any bind (an empty-password bind is an anonymous bind and
"succeeds").
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pymaild.envelope import Resolution, normalizeAddress
from pymaild.errors import TemporaryFailure
from pymaild.interfaces import IDirectory, IReloadable

log = Logger()


@dataclass(frozen=True)
class LdapSettings:
    urls: tuple[str, ...]
    base_dn: str
    bind_dn: str = ""
    bind_password: str = ""
    start_tls: bool = False
    ca_file: str | None = None
    user_filter: str = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"
    address_attributes: tuple[str, ...] = ("mail", "mailLocalAddress")
    active_filter: str = ""
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))"
    member_attribute: str = "member"
    group_address_attribute: str = "mail"
    quota_attribute: str = ""
    mailbox_attribute: str = "entryUUID"
    timeout: float = 5.0
    pool_size: int = 4
    cache_ttl: float = 60.0
    negative_cache_ttl: float = 10.0
    max_depth: int = 10
    bind_dn_template: str = ""
    balance: str = "failover"


class LdapUnavailable(TemporaryFailure):
    """No LDAP server answered (or the service account was refused)."""


class _Refused(LdapUnavailable):
    """The server answered a search with an error (not a broken connection)."""


#: results after which another connection (maybe to another server) may do better: busy,
#: unavailable, other, and the client-side ones ldap3 reports when the connection broke
_TRY_ELSEWHERE = frozenset({51, 52, 80, 81, 85, 91})


def LDAPExceptionTypes():
    """ldap3's exceptions (imported when needed)."""
    from ldap3.core.exceptions import LDAPException

    return LDAPException


def _escape(value: str) -> str:
    from ldap3.utils.conv import escape_filter_chars

    return escape_filter_chars(value)


def _and(*filters: str) -> str:
    filters = [f for f in filters if f]
    if len(filters) == 1:
        return filters[0]
    return "(&" + "".join(filters) + ")"


class LdapClient:
    """
    Blocking LDAP operations for the pool's threads.  Each thread has its own connections
    (C{threading.local}); a connection that fails is thrown away and the operation is tried
    once more, from the first URL.
    """

    def __init__(self, settings: LdapSettings):
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        #: until when (time.monotonic) calls fail at once: set when the directory did not answer
        #: within the timeout (hung, unreachable network), so that logins and lookups queued
        #: behind the pool's threads do not each wait out the timeout again
        self._downUntil = 0.0
        self._tls = None
        if settings.start_tls or any(u.lower().startswith("ldaps:") for u in settings.urls):
            from ldap3 import Tls

            self._tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file,
                            version=ssl.PROTOCOL_TLS_CLIENT)

    # --- connections ------------------------------------------------------------------------

    _next = 0

    def orderedUrls(self) -> list[str]:
        """The servers' URLs in the order a new connection tries them: as configured, or with
        C{balance = "round-robin"} starting at the next server each time (the others remain
        the fallback).  Shared by the threads' connections and the logins' (L{WireLogin})."""
        urls = list(self.settings.urls)
        if self.settings.balance == "round-robin" and len(urls) > 1:
            with self._lock:
                start = self._next % len(urls)
                self._next += 1
            urls = urls[start:] + urls[:start]
        return urls

    def _servers(self):
        from ldap3 import NONE, Server

        return [Server(url, get_info=NONE, connect_timeout=self.settings.timeout, tls=self._tls)
                for url in self.orderedUrls()]

    def _open(self, user: str | None, password: str | None):
        """A new bound connection to the first server that answers; raises on none."""
        from ldap3 import SYNC, Connection
        from ldap3.core.exceptions import LDAPException

        last = None
        for server in self._servers():
            connection = Connection(server, user=user or None, password=password or None, client_strategy=SYNC,
                                    receive_timeout=max(1, int(round(self.settings.timeout))), raise_exceptions=False,
                                    auto_referrals=False)
            try:
                connection.open()
                if self.settings.start_tls and not server.ssl:
                    if not connection.start_tls():
                        raise LdapUnavailable(f"StartTLS refused by {server}")
                if user is not None and not connection.bind():
                    result = connection.result.get("description")
                    connection.unbind()
                    raise LdapUnavailable(f"{server} refused the service account ({result})")
                return connection
            except (LDAPException, OSError, LdapUnavailable) as e:
                last = e
                log.warn("ldap: {server}: {error}", server=str(server), error=str(e))
                try:
                    connection.unbind()
                except Exception:
                    pass
        raise LdapUnavailable(f"no LDAP server answered: {last}")

    def _service(self):
        connection = getattr(self._local, "service", None)
        if connection is None or connection.closed:
            connection = self._local.service = self._open(self.settings.bind_dn or "", self.settings.bind_password)
        return connection

    def _drop(self, name: str) -> None:
        connection = getattr(self._local, name, None)
        setattr(self._local, name, None)
        if connection is not None:
            try:
                connection.unbind()
            except Exception:
                pass

    #: seconds calls fail at once after the directory timed out
    DOWN_FOR = 5.0

    def _checkDown(self) -> None:
        if time.monotonic() < self._downUntil:
            raise LdapUnavailable("the directory did not answer a moment ago")

    def _failedAfter(self, started: float) -> None:
        if time.monotonic() - started >= self.settings.timeout:  # (a refusal is quick: no pause)
            self._downUntil = time.monotonic() + self.DOWN_FOR
            log.warn("ldap: no answer within {timeout}s; failing at once for {pause}s",
                     timeout=self.settings.timeout, pause=self.DOWN_FOR)

    # --- operations ---------------------------------------------------------------------------

    def search(self, ldapFilter: str, attributes, base: str | None = None, scope: str = "SUBTREE"):
        """
        C{[(dn, {attribute: [values]})]} of the entries C{ldapFilter} finds.

        @raise LdapUnavailable: no server could answer.
        """
        from ldap3 import BASE, SUBTREE
        from ldap3.core.exceptions import LDAPException

        self._checkDown()
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                connection = self._service()
                ok = connection.search(base or self.settings.base_dn, ldapFilter,
                                       search_scope=BASE if scope == "BASE" else SUBTREE,
                                       attributes=list(attributes), size_limit=100,
                                       time_limit=max(1, int(self.settings.timeout)))
                result = connection.result.get("result")
                if not ok and result not in (0, 4, 32):  # success, size limit, no such object
                    error = f"search failed: {connection.result.get('description')} ({result})"
                    if result in _TRY_ELSEWHERE:
                        raise LdapUnavailable(error)
                    # (the server answered, refusing: an admin or time limit, the service
                    # account's rights; the connection is sound, and asking again is no use)
                    log.warn("ldap: {filter}: {error}", filter=ldapFilter, error=error)
                    raise _Refused(error)
                return [(e["dn"], self._attributes(e))
                        for e in connection.response or () if e.get("type") == "searchResEntry"]
            except _Refused:
                raise
            except (LDAPException, OSError, LdapUnavailable) as e:
                self._drop("service")
                # (one more try only for a connection that broke: after a timeout, a second
                # round would double the wait for an answer that is not coming)
                if attempt == 2 or time.monotonic() - started >= self.settings.timeout:
                    self._failedAfter(started)
                    raise e if isinstance(e, LdapUnavailable) else LdapUnavailable(str(e), cause=e)
        raise AssertionError("unreachable")

    def _attributes(self, entry) -> dict:
        out = {k: _values(v) for k, v in entry["attributes"].items()}
        key = self.settings.mailbox_attribute.lower()
        if key:  # (binary, e.g. objectGUID: its raw bytes, not a lossy decoding)
            for name, raw in (entry.get("raw_attributes") or {}).items():
                if name.lower() == key:
                    out[name] = [_keyText(v) for v in raw]
        return out


def _keyText(raw: bytes) -> str:
    """A stable key's value as text: itself when printable ASCII (entryUUID), else hex (objectGUID)."""
    if raw.isascii():
        text = raw.decode("ascii")
        if text and text.isprintable():  # (for ASCII: bytes 32 to 126)
            return text
    return "x" + raw.hex()


def _values(value) -> list:
    if isinstance(value, (list, tuple)):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value]
    if value is None:
        return []
    return [value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)]


@dataclass
class _Cache:
    ttl: float
    negativeTtl: float
    entries: dict = field(default_factory=dict)

    def get(self, key):
        hit = self.entries.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key, value, negative: bool = False) -> None:
        if len(self.entries) > 50_000:
            self.entries.clear()
        self.entries[key] = (time.monotonic() + (self.negativeTtl if negative else self.ttl), value)


class _Lookups:
    """The blocking lookups both the checker and the directory use (in pool threads)."""

    def __init__(self, client: LdapClient):
        self.client = client
        self.settings = client.settings

    def addressesOf(self, attributes: dict) -> list[str]:
        """An entry's addresses, primary first (AD's proxyAddresses: only smtp: values)."""
        out = []
        for name in self.settings.address_attributes:
            values = _get(attributes, name)
            if name.lower() == "proxyaddresses":
                primary = [v[5:] for v in values if v.startswith("SMTP:")]
                others = [v[5:] for v in values if v[:5].lower() == "smtp:" and not v.startswith("SMTP:")]
                values = primary + others
            for value in values:
                address = normalizeAddress(value)
                if "@" in address and address not in out:
                    out.append(address)
        return out

    def addressFilter(self, address: str) -> str:
        value = _escape(address)
        parts = []
        for name in self.settings.address_attributes:
            parts.append(f"({name}=smtp:{value})" if name.lower() == "proxyaddresses" else f"({name}={value})")
        return parts[0] if len(parts) == 1 else "(|" + "".join(parts) + ")"

    def attributes(self) -> list[str]:
        names = list(self.settings.address_attributes)
        for extra in (self.settings.quota_attribute, self.settings.mailbox_attribute):
            if extra:
                names.append(extra)
        return names

    def quotaOf(self, attributes: dict) -> int | None:
        """The entry's storage quota in bytes (a number, or with K/M/G/T), None when it has none."""
        name = self.settings.quota_attribute
        if not name:
            return None
        for value in _get(attributes, name):
            text = value.strip().upper().removesuffix("B")
            factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
            digits = text[:-1] if factor != 1 else text
            if digits.isdigit():
                return int(digits) * factor
            log.warn("ldap: quota {value!r} in {name} is not a size; ignored", value=value, name=name)
        return None

    def noteEntry(self, attributes: dict, primary: str) -> None:
        """Tell the store what a user's entry says about its mailbox: its quota, its stable key."""
        if self.quotaSink is not None and self.settings.quota_attribute:
            self.quotaSink(primary, self.quotaOf(attributes))
        if self.keySink is not None and self.settings.mailbox_attribute:
            values = _get(attributes, self.settings.mailbox_attribute)
            if not values and not self._warnedNoKey:
                self._warnedNoKey = True
                log.warn("ldap: the entry of {user} has no {name} (or the service account cannot read it): "
                         "its mailbox is keyed by its address", user=primary, name=self.settings.mailbox_attribute)
            self.keySink(primary, values[0] if values else None)

    _warnedNoKey = False

    #: C{quotaSink(user, bytes or None)}, called in the pool's threads whenever a user's entry
    #: is read (login, lookup): the store applies it (L{pymaild.store.maildir.MaildirStore.setStorageLimit})
    quotaSink = None
    #: C{keySink(user, key or None)}, likewise with the entry's C{mailbox_attribute}
    #: (L{pymaild.store.maildir.MaildirStore.setMailboxKey})
    keySink = None

    def findUserByLogin(self, login: str):
        s = self.settings
        if s.bind_dn_template:
            # the user's DN is made from the login (its RDN value escaped, RFC 4514); read it
            # there (as the service account) for its addresses and the active filter
            from ldap3.utils.dn import escape_rdn

            dn = s.bind_dn_template.replace("{login}", escape_rdn(login))
            return self.client.search(s.active_filter or "(objectClass=*)", self.attributes(), base=dn, scope="BASE")
        ldapFilter = _and(s.user_filter.replace("{login}", _escape(login)), s.active_filter)
        return self.client.search(ldapFilter, self.attributes())

    def findUserByAddress(self, address: str):
        s = self.settings
        return self.client.search(_and(self.addressFilter(address), s.active_filter, _userClass(s)), self.attributes())


def _userClass(settings: LdapSettings) -> str:
    """(Groups carry addresses too: a user is what the user filter's object classes say.)"""
    f = settings.user_filter
    start = f.find("(objectClass=")
    if start < 0:
        return ""
    end = f.find(")", start)
    return f[start:end + 1]


def _get(attributes: dict, name: str) -> list:
    for key, values in attributes.items():
        if key.lower() == name.lower():
            return values
    return []


@implementer(ICredentialsChecker)
class LdapChecker:
    """
    Logins against the directory: the user is searched with the service account (C{user_filter}
    with the login escaped, and C{active_filter}), then the password is checked by binding as
    the entry found.  The avatar ID is the user's primary address.

    Both run on the reactor (L{pymaild.auth.ldapwire.WireLogin}); the client's settings and its
    "directory down" pause are shared with the directory's threads.  The entry's quota and
    mailbox key reach the store's sinks in the directory's thread pool (they take the store's
    locks and may write its key database), before the avatar ID is returned.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, client: LdapClient, threadpool, reactor):
        from pymaild.auth.ldapwire import WireLogin

        self.lookups = _Lookups(client)
        self._threadpool = threadpool  # (the directory's: logins use it only for the store's sinks)
        self._reactor = reactor
        self.wire = WireLogin(client, reactor)
        self._userFilter = None

    def close(self) -> None:
        """Unbind and close the login connections (they open again at the next login)."""
        self.wire.close()

    def requestAvatarId(self, credentials) -> defer.Deferred:
        try:
            login = credentials.username
            login = login.decode("utf-8") if isinstance(login, bytes) else login
            password = credentials.password
            password = password.decode("utf-8") if isinstance(password, bytes) else password
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin())
        login = login.strip()
        if not login or not password or "\0" in login:
            log.debug("login {user}: {result}", user=login, result="empty-password" if login else "bad-login")
            return defer.fail(UnauthorizedLogin())
        d = defer.ensureDeferred(self._check(login, password))
        d.addErrback(self._failed, login)
        return d

    def _findUserByLogin(self, login: str):
        """L{_Lookups.findUserByLogin}'s search, on the reactor's connections (L{pymaild.auth.ldapwire})."""
        from pymaild.auth.ldapwire import SCOPE_BASE, SCOPE_SUBTREE, FilterError, FilterTemplate

        s = self.lookups.settings
        try:
            if self._userFilter is None:
                if "{login}" in s.active_filter:  # (left as it is: only user_filter's {login} is the login)
                    template = None
                elif s.bind_dn_template:
                    template = s.active_filter or "(objectClass=*)"
                else:
                    template = _and(s.user_filter, s.active_filter)
                self._userFilter = (FilterTemplate(template) if template else None, tuple(self.lookups.attributes()))
            userFilter, attributes = self._userFilter
            if s.bind_dn_template:
                from ldap3.utils.dn import escape_rdn, safe_dn

                base = safe_dn(s.bind_dn_template.replace("{login}", escape_rdn(login)))
                if userFilter is None:
                    from pymaild.auth.ldapwire import encodeFilter

                    return self.wire.search(encodeFilter(s.active_filter), attributes, base, SCOPE_BASE)
                return self.wire.search(userFilter.encode(login), attributes, base, SCOPE_BASE)
            if userFilter is None:
                from pymaild.auth.ldapwire import encodeFilter

                filterBer = encodeFilter(_and(s.user_filter.replace("{login}", _escape(login)), s.active_filter))
            else:
                filterBer = userFilter.encode(login)
            return self.wire.search(filterBer, attributes, self._base(), SCOPE_SUBTREE)
        except (FilterError, ValueError, LDAPExceptionTypes()) as e:
            # (ldap3 refused the filter or the DN: as the threads' client, a temporary failure)
            return defer.fail(LdapUnavailable(f"search for {login!r}: {e}"))

    _safeBase = None

    def _base(self) -> str:
        if self._safeBase is None:
            from ldap3.utils.dn import safe_dn

            base = self.lookups.settings.base_dn
            self._safeBase = safe_dn(base) if base else base
        return self._safeBase

    async def _check(self, login: str, password: str) -> str:
        entries = await self._findUserByLogin(login)
        if len(entries) != 1:
            log.debug("login {user}: {result}", user=login, result="unknown-user" if not entries else "ambiguous")
            raise UnauthorizedLogin()
        dn, attributes = entries[0]
        addresses = self.lookups.addressesOf(attributes)
        if not addresses:
            log.warn("ldap: {dn} has no address in {attributes}; it cannot log in", dn=dn,
                     attributes=", ".join(self.lookups.settings.address_attributes))
            raise UnauthorizedLogin()
        if not await self.wire.checkPassword(dn, password):
            log.debug("login {user}: {result}", user=login, result="bad-password")
            raise UnauthorizedLogin()
        if self.lookups.quotaSink is not None or self.lookups.keySink is not None:
            # (the store's sinks take its locks and may write the key database: never on the reactor)
            await deferToThreadPool(self._reactor, self._threadpool, self.lookups.noteEntry, attributes, addresses[0])
        # (a login that succeeds is logged once, by the protocol: "imap login ... ok")
        return addresses[0]

    def _failed(self, failure, login):
        if failure.check(UnauthorizedLogin):
            return failure
        failure.trap(TemporaryFailure)
        log.warn("ldap: login {user} could not be checked: {error}", user=login, error=str(failure.value))
        return failure


@implementer(IDirectory, IReloadable)
class LdapDirectory:
    """
    Recipient lookups in the directory: an address of a user (any of its address attributes,
    C{user+tag@} as C{user@}), or of a group (C{group_address_attribute} on an entry matching
    C{group_filter}), whose members are expanded: users (active ones only), nested groups (loops
    and depth beyond C{max_depth} cut and logged), and other entries with an address outside the
    local domains (external members).  C{postmaster@} any local domain falls back to
    C{postmaster@} the first one.
    """

    def __init__(self, client: LdapClient, threadpool, reactor, localDomains):
        self.lookups = _Lookups(client)
        self.settings = client.settings
        self._threadpool = threadpool
        self._reactor = reactor
        self.localDomains = tuple(d.lower() for d in localDomains)
        self._cache = _Cache(self.settings.cache_ttl, self.settings.negative_cache_ttl)

    def isLocalDomain(self, domain) -> bool:
        if isinstance(domain, bytes):
            domain = domain.decode("utf-8", "replace")
        domain = domain.strip().rstrip(".").lower()
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            pass
        return domain in self.localDomains

    def _run(self, f, *args):
        return deferToThreadPool(self._reactor, self._threadpool, f, *args)

    def lookup(self, address: str) -> defer.Deferred:
        address = normalizeAddress(address)
        cached = self._cache.get(("lookup", address))
        if cached is not None:
            return defer.succeed(cached)
        d = self._run(self._resolve, address)

        def store(resolution):
            self._cache.put(("lookup", address), resolution, negative=not resolution.exists)
            return resolution

        return d.addCallback(store)

    def addressesOf(self, user: str) -> defer.Deferred:
        user = normalizeAddress(user)
        cached = self._cache.get(("addresses", user))
        if cached is not None:
            return defer.succeed(cached)

        def find():
            entries = self.lookups.findUserByAddress(user)
            if len(entries) != 1:
                return frozenset()
            return frozenset(self.lookups.addressesOf(entries[0][1]))

        d = self._run(find)

        def store(addresses):
            self._cache.put(("addresses", user), addresses, negative=not addresses)
            return addresses

        return d.addCallback(store)

    def reload(self) -> None:
        self._cache.entries.clear()

    # --- in the pool's threads ------------------------------------------------------------

    def _resolve(self, address: str) -> Resolution:
        local, _, domain = address.rpartition("@")
        if not self.isLocalDomain(domain):
            return Resolution(address, "none")
        for candidate in self._candidates(address):
            users = self.lookups.findUserByAddress(candidate)
            if len(users) == 1:
                primary = self.lookups.addressesOf(users[0][1])
                if primary:
                    self.lookups.noteEntry(users[0][1], primary[0])
                    return Resolution(address, "user", frozenset([primary[0]]))
            elif len(users) > 1:
                log.warn("ldap: {address} belongs to {n} entries; refused", address=candidate, n=len(users))
                return Resolution(address, "none")
            groups = self.lookups.client.search(
                _and(self.settings.group_filter, f"({self.settings.group_address_attribute}={_escape(candidate)})"),
                [self.settings.member_attribute])
            if groups:
                users, remote = self._expand(groups[0][0], groups[0][1], {groups[0][0].lower()}, 0)
                if users or remote:
                    return Resolution(address, "group", frozenset(users), frozenset(remote))
                log.warn("ldap: group {dn} ({address}) has no member mail can reach", dn=groups[0][0], address=candidate)
                return Resolution(address, "none")
        return Resolution(address, "none")

    def _candidates(self, address: str) -> list[str]:
        local, _, domain = address.rpartition("@")
        out = [address]
        if "+" in local:
            out.append(f"{local.split('+', 1)[0]}@{domain}")
        if local == "postmaster" and domain != self.localDomains[0]:
            out.append(f"postmaster@{self.localDomains[0]}")
        return out

    def _expand(self, dn: str, attributes: dict, seen: set, depth: int):
        users, remote = set(), set()
        if depth >= self.settings.max_depth:
            log.warn("ldap: group {dn} nested deeper than {n}; not expanded further", dn=dn, n=self.settings.max_depth)
            return users, remote
        memberAttribute = self.settings.member_attribute
        for member in _get(attributes, memberAttribute):
            if memberAttribute.lower() == "memberuid":  # (posixGroup: user names, not DNs)
                found = self.lookups.findUserByLogin(member)
                if len(found) == 1:
                    addresses = self.lookups.addressesOf(found[0][1])
                    if addresses:
                        self.lookups.noteEntry(found[0][1], addresses[0])
                        users.add(addresses[0])
                continue
            if member.lower() in seen:
                log.warn("ldap: group loop at {dn}; cut", dn=member)
                continue
            seen.add(member.lower())
            entries = self.lookups.client.search(
                "(objectClass=*)", self.lookups.attributes() + [memberAttribute, "objectClass"], base=member, scope="BASE")
            if not entries:
                continue  # (a member that does not exist any more)
            entryDn, entry = entries[0]
            isGroup = any(self._matches(entryDn, self.settings.group_filter) for _ in (0,)) if _get(entry, memberAttribute) else False
            if isGroup:
                u, r = self._expand(entryDn, entry, seen, depth + 1)
                users |= u
                remote |= r
                continue
            addresses = self.lookups.addressesOf(entry)
            if not addresses:
                continue
            primary = addresses[0]
            if self.isLocalDomain(primary.rpartition("@")[2]):
                active = self.lookups.findUserByAddress(primary)
                if len(active) == 1:
                    account = self.lookups.addressesOf(active[0][1])[0]
                    self.lookups.noteEntry(active[0][1], account)
                    users.add(account)
            else:
                remote.add(primary)
        return users, remote

    def _matches(self, dn: str, ldapFilter: str) -> bool:
        return bool(self.lookups.client.search(ldapFilter, ["objectClass"], base=dn, scope="BASE"))
