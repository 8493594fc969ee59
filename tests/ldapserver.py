"""
A throwaway OpenLDAP server (Debian's C{slapd}) for tests, and a corporate directory to load.

L{Slapd} writes a C{slapd.conf} into a work directory, loads an LDIF with C{slapadd} before
the first start, and runs C{slapd} in the foreground as a child of the test process on two
ephemeral ports of 127.0.0.1 (plain LDAP with StartTLS, and LDAPS), chosen once and kept across
restarts.  Start-up takes about 0.1 s; readiness is a condition (C{ldapwhoami} answers), not a
sleep.  Needs Debian's C{slapd} and C{ldap-utils} (C{scripts/test} installs them);
L{slapd_available} tells whether they are here, for a C{pytest.skip}.

The API::

    server = Slapd(tmp_path / "ldap")          # CORPORATE_LDIF unless ldif= is given
    server.start()                              # slapadd on the first start, then slapd
    server.url, server.ldapsUrl                 # "ldap://127.0.0.1:PORT", "ldaps://127.0.0.1:PORT2"
    server.certPath                             # the self-signed certificate: the CA file clients trust
    server.baseDn, server.serviceDn, server.servicePassword
    server.stop()                               # SIGTERM and wait; start() again: same ports, same data
    server.kill()                               # SIGKILL (an outage); start() again recovers too
    with Slapd(path) as server: ...             # start() ... stop()

Failover tests run two servers with the same data: L{twoServers} returns two started L{Slapd}s
on different ports, loaded from the same LDIF and sharing one certificate (so one CA file works
for both); kill one and the other still answers.

Access control (in the generated C{slapd.conf}; the root DN bypasses it):
    - the service account L{SERVICE_DN} (password L{SERVICE_PASSWORD}) reads and searches every
      entry and attribute except C{userPassword};
    - a user can bind (C{auth} on C{userPassword}) and read their own entry, nothing else:
      a base-scope search on their own DN works, a subtree search from C{ou=people} finds
      nothing (they may not see C{ou=people} itself), so look users up as the service account;
    - anonymous clients can only bind: an anonymous search finds nothing;
    - everyone can read the root DSE and the subschema entry (StartTLS and ldap3's
      C{get_info} read them).

The corporate fixture L{CORPORATE_LDIF} (passwords in L{PASSWORDS}, keyed by C{uid})::

    dc=example,dc=com
      ou=people     uid=alice   mail alice@example.com
                                mailLocalAddress a.smith@example.com, sales-lead@example.com
                    uid=bob     mail bob@example.com
                    uid=carol   mail carol@example.com, employeeType: disabled
                    uid=dave    mail dave@example.com, mailLocalAddress dave@example.org
      ou=contacts   cn=Partner Contact   mail partner@partner.example   (external, no login)
      ou=groups     cn=all-staff    mail staff@example.com  members alice, bob, cn=engineering
                    cn=engineering  mail eng@example.com    members dave, cn=Partner Contact
                    cn=loop-a       mail loop@example.com   members cn=loop-b, bob
                    cn=loop-b       mail loop-b@example.com members cn=loop-a, alice
      ou=services   cn=pymaild      the service account pymaild searches with

Site conventions the directory follows, which pymaild's LDAP configuration has to express:
    - Users are C{inetOrgPerson} + C{inetLocalMailRecipient} entries under C{ou=people}; the
      login is C{uid}, the primary address is C{mail}, extra addresses are C{mailLocalAddress}.
    - B{Disabled accounts}: carol is marked C{employeeType: disabled} (a site convention; OpenLDAP
      has no standard "disabled" flag without the ppolicy overlay).  Her password still binds at
      the LDAP level: it is the "active user" filter, L{ACTIVE_USER_FILTER}
      C{(!(employeeType=disabled))} combined with the rest, that must exclude her from logins
      and from deliveries.
    - B{Distribution lists} are C{groupOfNames} with the auxiliary C{extensibleObject}
      class added so that they can carry a C{mail} address.  C{member} values are DNs (that is
      what C{groupOfNames} requires), so B{an external recipient} is a contact entry,
      C{cn=Partner Contact,ou=contacts,...}, an C{inetOrgPerson} with C{mail:
      partner@partner.example} and no C{uid} or password, as an Active Directory "contact" or
      an Exchange "mail user" would be.  A group expands to the C{mail} of each member entry
      (a nested group expands recursively); contacts are under C{ou=contacts}, not
      C{ou=people}, so a user search based at L{PEOPLE_DN} never finds them (a search based at
      the suffix with C{(objectClass=inetOrgPerson)} would: they have no password, so they
      still cannot log in).
    - C{cn=loop-a} and C{cn=loop-b} contain each other: expansion must stop at the loop and
      deliver to alice and bob once each.
"""

from __future__ import annotations


import atexit
import base64
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pymaild.tls import generateSelfSigned

from conftest import free_ports  # (tests/ is on sys.path: conftest.py lives there)

__all__ = [
    "ACTIVE_USER_FILTER",
    "BASE_DN",
    "CONTACTS_DN",
    "CORPORATE_LDIF",
    "GROUPS_DN",
    "PASSWORDS",
    "PEOPLE_DN",
    "ROOT_DN",
    "ROOT_PASSWORD",
    "SERVICE_DN",
    "SERVICE_PASSWORD",
    "Slapd",
    "SlapdError",
    "groupDn",
    "slapd_available",
    "sshaHash",
    "twoServers",
    "userDn",
]

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPWHOAMI = "/usr/bin/ldapwhoami"
MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson", "misc")

BASE_DN = "dc=example,dc=com"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
CONTACTS_DN = f"ou=contacts,{BASE_DN}"
SERVICES_DN = f"ou=services,{BASE_DN}"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PASSWORD = "root-secret"
SERVICE_DN = f"cn=pymaild,{SERVICES_DN}"
SERVICE_PASSWORD = "service-secret"

#: Each user's password, keyed by C{uid}.  dave's has a space and non-ASCII letters (UTF-8 on
#: the wire).  carol's binds too: her account is disabled by site convention only.
PASSWORDS: dict[str, str] = {
    "alice": "alice-password",
    "bob": "Bob's secret 42",
    "carol": "carol-password",
    "dave": "dävé pässwörd",
}

#: The site's "active user" condition: carol (C{employeeType: disabled}) fails it.
ACTIVE_USER_FILTER = "(!(employeeType=disabled))"


def userDn(uid: str) -> str:
    """The DN of the user C{uid} in the corporate fixture."""
    return f"uid={uid},{PEOPLE_DN}"


def groupDn(cn: str) -> str:
    """The DN of the group C{cn} in the corporate fixture."""
    return f"cn={cn},{GROUPS_DN}"


def sshaHash(password: str, salt: bytes | None = None) -> str:
    """
    C{{SSHA}} as slapd stores it: base64(sha1(password + salt) + salt), the password in UTF-8.
    A random 8-byte salt unless one is given.
    """
    if salt is None:
        salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _fixedSalt(name: str) -> bytes:
    # Deterministic salts keep CORPORATE_LDIF the same from one import to the next.
    return hashlib.sha256(b"pymaild-fixture-" + name.encode()).digest()[:8]


def _ldifValue(attr: str, value: str) -> str:
    # RFC 2849: a value that is not plain ASCII (or starts with a space, colon or "<") is base64.
    if value.isascii() and value[:1] not in (" ", ":", "<") and value.isprintable():
        return f"{attr}: {value}"
    return f"{attr}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def _user(
    uid: str,
    cn: str,
    sn: str,
    givenName: str,
    mail: str,
    title: str,
    employeeNumber: str,
    extraAddresses: tuple[str, ...] = (),
    employeeType: str = "staff",
) -> str:
    lines = [
        f"dn: {userDn(uid)}",
        "objectClass: top",
        "objectClass: person",
        "objectClass: organizationalPerson",
        "objectClass: inetOrgPerson",
        "objectClass: inetLocalMailRecipient",
        f"uid: {uid}",
        f"cn: {cn}",
        f"sn: {sn}",
        f"givenName: {givenName}",
        f"displayName: {cn}",
        f"mail: {mail}",
        *(f"mailLocalAddress: {a}" for a in extraAddresses),
        f"title: {title}",
        f"employeeNumber: {employeeNumber}",
        f"employeeType: {employeeType}",
        "ou: Example Corp",
        f"telephoneNumber: +1 555 0100 {employeeNumber[-2:]}",
        _ldifValue("userPassword", sshaHash(PASSWORDS[uid], _fixedSalt(uid))),
    ]
    return "\n".join(lines)


def _group(cn: str, mail: str, members: list[str], description: str) -> str:
    lines = [
        f"dn: {groupDn(cn)}",
        "objectClass: top",
        "objectClass: groupOfNames",
        "objectClass: extensibleObject",
        f"cn: {cn}",
        f"mail: {mail}",
        f"description: {description}",
        *(f"member: {m}" for m in members),
    ]
    return "\n".join(lines)


def _corporateLdif() -> str:
    entries = [
        f"""dn: {BASE_DN}
objectClass: top
objectClass: dcObject
objectClass: organization
dc: example
o: Example Corp""",
        f"""dn: {PEOPLE_DN}
objectClass: top
objectClass: organizationalUnit
ou: people""",
        f"""dn: {GROUPS_DN}
objectClass: top
objectClass: organizationalUnit
ou: groups""",
        f"""dn: {CONTACTS_DN}
objectClass: top
objectClass: organizationalUnit
ou: contacts
description: External recipients (no login)""",
        f"""dn: {SERVICES_DN}
objectClass: top
objectClass: organizationalUnit
ou: services""",
        f"""dn: {SERVICE_DN}
objectClass: top
objectClass: applicationProcess
objectClass: simpleSecurityObject
cn: pymaild
description: pymaild looks up users and groups with this account
userPassword: {sshaHash(SERVICE_PASSWORD, _fixedSalt("pymaild"))}""",
        _user(
            "alice",
            "Alice Smith",
            "Smith",
            "Alice",
            "alice@example.com",
            "Head of Sales",
            "1001",
            ("a.smith@example.com", "sales-lead@example.com"),
        ),
        _user("bob", "Bob Jones", "Jones", "Bob", "bob@example.com", "Accountant", "1002"),
        _user(
            "carol",
            "Carol White",
            "White",
            "Carol",
            "carol@example.com",
            "Former Engineer",
            "1003",
            employeeType="disabled",
        ),
        _user(
            "dave",
            "Dave Brown",
            "Brown",
            "Dave",
            "dave@example.com",
            "Engineer",
            "1004",
            ("dave@example.org",),
        ),
        f"""dn: cn=Partner Contact,{CONTACTS_DN}
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: inetOrgPerson
cn: Partner Contact
sn: Contact
o: Partner Inc
mail: partner@partner.example""",
        _group(
            "all-staff",
            "staff@example.com",
            [userDn("alice"), userDn("bob"), groupDn("engineering")],
            "Everyone (nests engineering)",
        ),
        _group(
            "engineering",
            "eng@example.com",
            [userDn("dave"), f"cn=Partner Contact,{CONTACTS_DN}"],
            "Engineering, with an external partner",
        ),
        _group(
            "loop-a",
            "loop@example.com",
            [groupDn("loop-b"), userDn("bob")],
            "Misconfigured: contains loop-b, which contains loop-a",
        ),
        _group(
            "loop-b",
            "loop-b@example.com",
            [groupDn("loop-a"), userDn("alice")],
            "Misconfigured: contains loop-a, which contains loop-b",
        ),
    ]
    return "\n\n".join(entries) + "\n"


#: The corporate directory described in this module's docstring.
CORPORATE_LDIF = _corporateLdif()


class SlapdError(Exception):
    """slapd or slapadd failed, or slapd did not become ready; the message has its log."""


def slapd_available() -> bool:
    """Whether Debian's slapd and ldap-utils are installed (for C{pytest.skip})."""
    return all(os.access(p, os.X_OK) for p in (SLAPD, SLAPADD, LDAPWHOAMI))


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


# Environment for the OpenLDAP command-line tools: ignore /etc/ldap/ldap.conf and ~/.ldaprc.
_TOOLS_ENV = {**os.environ, "LDAPNOINIT": "1"}


class Slapd:
    """
    One slapd in C{workdir}: C{slapd.conf}, C{data/} (the mdb database), C{slapd.log} (its
    output), and C{cert.pem}/C{key.pem} unless a certificate is given.
    """

    def __init__(
        self,
        workdir: Path,
        ldif: str | None = None,
        *,
        certPath: Path | None = None,
        keyPath: Path | None = None,
        databaseConfig: str = "",
    ) -> None:
        """
        @param databaseConfig: more slapd.conf lines for the database (C{limits}, ...).
        """
        self.workdir = Path(workdir)
        self.databaseConfig = databaseConfig
        self.ldif = CORPORATE_LDIF if ldif is None else ldif
        self._certPath = Path(certPath) if certPath else self.workdir / "cert.pem"
        self._keyPath = Path(keyPath) if keyPath else self.workdir / "key.pem"
        self.port, self.ldapsPort = free_ports(2)
        self.process: subprocess.Popen | None = None
        self._log = None
        self._atexitRegistered = False

    # -- addresses and credentials ------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldapsUrl(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldapsPort}"

    @property
    def certPath(self) -> Path:
        """The server's self-signed certificate: the CA file a client trusts."""
        return self._certPath

    @property
    def keyPath(self) -> Path:
        return self._keyPath

    baseDn = BASE_DN
    serviceDn = SERVICE_DN
    servicePassword = SERVICE_PASSWORD
    rootDn = ROOT_DN
    rootPassword = ROOT_PASSWORD

    @property
    def confPath(self) -> Path:
        return self.workdir / "slapd.conf"

    @property
    def dataDir(self) -> Path:
        return self.workdir / "data"

    @property
    def logPath(self) -> Path:
        return self.workdir / "slapd.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> "Slapd":
        """
        Start slapd (a no-op if it is running) and wait until it answers.  The first start
        writes the configuration and certificate and loads the LDIF.
        """
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self._certPath.exists() and self._keyPath.exists()):
            generateSelfSigned(self._certPath, self._keyPath, "127.0.0.1")
        self.confPath.write_text(self._config())
        if not (self.dataDir / "data.mdb").exists():
            self._load()
        if self._log is None:
            self._log = open(self.logPath, "ab")
        self.process = subprocess.Popen(
            [SLAPD, "-f", str(self.confPath), "-h", f"{self.url}/ {self.ldapsUrl}/", "-d", "none"],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            close_fds=True,
        )
        if not self._atexitRegistered:
            atexit.register(self.kill)
            self._atexitRegistered = True
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                self.process = None
                raise SlapdError(f"slapd exited during start-up:\n{self._logText()}")
            if time.monotonic() > deadline:
                self.kill()
                raise SlapdError(f"slapd did not answer within {timeout}s:\n{self._logText()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait for slapd to exit (reaped: no zombie is left); SIGKILL after C{timeout}."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL slapd and reap it: an abrupt outage (mdb recovers on the next start)."""
        self._end(signal.SIGKILL, 10.0)

    def close(self) -> None:
        """Stop slapd and close its log file."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _end(self, sig: int, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _answers(self) -> bool:
        try:
            result = subprocess.run(
                [LDAPWHOAMI, "-x", "-H", self.url, "-o", "nettimeout=2"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_TOOLS_ENV,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _load(self) -> None:
        if self.dataDir.exists():
            shutil.rmtree(self.dataDir)
        self.dataDir.mkdir(parents=True)
        ldifPath = self.workdir / "fixture.ldif"
        ldifPath.write_text(self.ldif, encoding="utf-8")
        result = subprocess.run(
            [SLAPADD, "-q", "-f", str(self.confPath), "-l", str(ldifPath)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_TOOLS_ENV,
            timeout=60,
        )
        if result.returncode != 0:
            shutil.rmtree(self.dataDir, ignore_errors=True)
            output = (result.stdout + result.stderr).decode("utf-8", "replace")
            raise SlapdError(f"slapadd failed ({result.returncode}):\n{output}")

    def _logText(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.logPath.read_text("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def _config(self) -> str:
        includes = "\n".join(f"include {SCHEMA_DIR}/{name}.schema" for name in SCHEMAS)
        return f"""\
# Generated by tests/ldapserver.py
{includes}

modulepath {MODULE_PATH}
moduleload back_mdb

pidfile {_quote(self.workdir / "slapd.pid")}
argsfile {_quote(self.workdir / "slapd.args")}

TLSCertificateFile {_quote(self._certPath)}
TLSCertificateKeyFile {_quote(self._keyPath)}

# Everyone may read the root DSE and the schema (StartTLS and ldap3's get_info).
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read

database mdb
maxsize 67108864
suffix "{BASE_DN}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {_quote(self.dataDir)}

index objectClass eq
index uid,mail,mailLocalAddress eq
index member eq
index employeeType eq
{self.databaseConfig}

# Passwords: anyone may bind with them (anonymous and self: auth), nobody may read them.
access to attrs=userPassword
    by anonymous auth
    by self auth
    by * none

# Entries: the service account reads everything; a user reads their own entry.
access to *
    by dn.exact="{SERVICE_DN}" read
    by self read
    by * none
"""


def checkerSettings(*urls: str, **kw):
    """C{LdapSettings} for pymaild's checker and directory on this fixture (the service account, the active filter, no cache)."""
    from pymaild.auth.ldap import LdapSettings

    values = dict(urls=tuple(urls), base_dn=BASE_DN, bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                  active_filter=ACTIVE_USER_FILTER, timeout=2.0, cache_ttl=0, negative_cache_ttl=0)
    values.update(kw)
    return LdapSettings(**values)


def twoServers(tmp: Path, ldif: str | None = None) -> tuple[Slapd, Slapd]:
    """
    Two started slapds for failover tests, in C{tmp/primary} and C{tmp/secondary}, loaded
    with the same LDIF (L{CORPORATE_LDIF} by default) and sharing one certificate
    (C{tmp/cert.pem}, so either's C{certPath} trusts both).  The caller stops both.
    """
    tmp = Path(tmp)
    certPath, keyPath = tmp / "cert.pem", tmp / "key.pem"
    generateSelfSigned(certPath, keyPath, "127.0.0.1")
    primary = Slapd(tmp / "primary", ldif, certPath=certPath, keyPath=keyPath)
    secondary = Slapd(tmp / "secondary", ldif, certPath=certPath, keyPath=keyPath)
    primary.start()
    try:
        secondary.start()
    except BaseException:
        primary.close()
        raise
    return primary, secondary
