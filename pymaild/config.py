# -*- test-case-name: tests.test_config -*-
"""
The configuration: one TOML file read with C{tomllib} into frozen, validated objects.

Every table and key pymaild knows is declared once in L{SCHEMA}: its type, its default and its
documentation line.  C{man/pymaild.toml.5} and C{etc/pymaild.toml.example} document the same
keys, and C{tests/test_config.py} checks that all three agree.

A mistake in the file is a L{ConfigError} whose message names the file, the table, the key and
what is wrong, in one line.  This module does no I/O but reading the file: whether a certificate
can be read or a port bound is checked by L{pymaild.service.prepare}, which raises the same error.

Relative paths in the file are taken relative to the file's directory; C{--data-dir} on the
command line is taken relative to the current directory.
"""

import difflib
import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pymaild.errors import ConfigError, fileProblem
from pymaild.uidl import checkUidlFormat

# --- value objects -----------------------------------------------------------------------
#
# NamedTuples: immutable, compared and hashed by value, as frozen dataclasses would be, at a
# tenth of the cost to create (a frozen dataclass compiles six methods: the 16 classes here were
# 11 of the ~300 ms to the first greeting).  The module has no C{from __future__ import
# annotations}, because NamedTuple compiles every annotation given as a string.  A NamedTuple is
# a tuple: code that treats tuples as lists looks for ListenAddress first (L{_toml_value}).


class ListenAddress(NamedTuple):
    """One C{host:port} a listener binds.  C{host} is an IP literal."""

    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


#: The listeners, in the order they are started, with the protocol each speaks and whether TLS
#: starts with the first byte.
LISTENERS = (
    ("smtp", "smtp", False),
    ("submission", "smtp", False),
    ("smtps", "smtp", True),
    ("imap", "imap", False),
    ("imaps", "imap", True),
    ("pop3", "pop3", False),
    ("pop3s", "pop3", True),
)


class ServerConfig(NamedTuple):
    hostname: str
    data_dir: Path
    shutdown_timeout: float


class ListenConfig(NamedTuple):
    smtp: tuple[ListenAddress, ...]
    submission: tuple[ListenAddress, ...]
    smtps: tuple[ListenAddress, ...]
    imap: tuple[ListenAddress, ...]
    imaps: tuple[ListenAddress, ...]
    pop3: tuple[ListenAddress, ...]
    pop3s: tuple[ListenAddress, ...]
    backlog: int


class TLSConfig(NamedTuple):
    #: C{None} for both means "a self-signed certificate generated in the data directory".
    cert: Path | None
    key: Path | None
    min_version: str

    @property
    def self_signed(self) -> bool:
        return self.cert is None


class DomainsConfig(NamedTuple):
    local: tuple[str, ...]


class AuthConfig(NamedTuple):
    backend: str
    passwd_file: Path
    aliases_file: Path
    plaintext_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    threads: int
    #: whether the files were named in the configuration (then they must exist) or are the
    #: defaults in the data directory (then pymaild creates them).
    passwd_file_explicit: bool = False
    aliases_file_explicit: bool = False


class SMTPConfig(NamedTuple):
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_message_size: int
    max_recipients: int
    max_line_length: int
    bare_line_ends: str
    command_timeout: float
    max_errors: int
    max_hops: int
    data_timeout: float
    vrfy: str


class StoreConfig(NamedTuple):
    quota_storage: int
    quota_messages: int
    drafts: str
    sent: str
    trash: str
    junk: str
    archive: str
    threads: int
    summary_processes: int

    @property
    def specialFolders(self) -> dict[str, str]:
        """
        RFC 6154 attribute -> folder name, for the folders created at first login.
        """
        pairs = (("\\Drafts", self.drafts), ("\\Sent", self.sent), ("\\Trash", self.trash),
                 ("\\Junk", self.junk), ("\\Archive", self.archive))
        return {attribute: name for attribute, name in pairs if name}


class IMAPConfig(NamedTuple):
    append_limit: int
    autologout: float
    max_line: int


class POP3Config(NamedTuple):
    idle_timeout: float
    uidl_format: str
    mark_seen: bool
    processes: int


class QueueConfig(NamedTuple):
    relay_host: ListenAddress | None
    relay_user: str
    relay_password_file: Path | None
    tls: str
    ca_file: Path | None
    nameservers: tuple[ListenAddress, ...]
    remote_port: int
    min_backoff: float
    max_backoff: float
    max_lifetime: float
    delay_warning: float
    connections: int
    connections_per_destination: int
    connect_timeout: float
    command_timeout: float


class LdapConfig(NamedTuple):
    urls: tuple[str, ...]
    start_tls: bool
    ca_file: Path | None
    bind_dn: str
    bind_password: str
    bind_password_file: Path | None
    base_dn: str
    user_filter: str
    address_attributes: tuple[str, ...]
    active_filter: str
    group_filter: str
    member_attribute: str
    group_address_attribute: str
    quota_attribute: str
    mailbox_attribute: str
    timeout: float
    pool_size: int
    cache_ttl: float
    negative_cache_ttl: float
    bind_dn_template: str
    balance: str


class LimitsConfig(NamedTuple):
    max_connections: int
    max_connections_per_ip: int
    max_connections_per_user: int
    max_login_failures: int


class PluginsConfig(NamedTuple):
    enabled: tuple[str, ...]
    paths: tuple[Path, ...]
    timeout: float
    threads: int
    #: C{{name: {key: raw TOML value}}}: the C{[plugins.NAME]} tables, validated against each
    #: plugin's declared keys by L{pymaild.pipeline.plugin.load}
    tables: dict


class Config(NamedTuple):
    source: Path | None
    server: ServerConfig
    listen: ListenConfig
    tls: TLSConfig
    domains: DomainsConfig
    auth: AuthConfig
    smtp: SMTPConfig
    imap: IMAPConfig
    pop3: POP3Config
    store: StoreConfig
    queue: QueueConfig
    ldap: LdapConfig
    limits: LimitsConfig
    plugins: PluginsConfig

    def describe(self) -> str:
        """
        The effective configuration as TOML text (what C{pymaildctl check-config} prints).
        """
        lines = [f"# effective configuration ({self.source or 'embedded default'})"]
        for table in SCHEMA:
            section = getattr(self, table)
            lines.append(f"\n[{table}]")
            for key in SCHEMA[table]:
                lines.append(f"{key} = {_toml_value(getattr(section, key))}")
        for name, table in self.plugins.tables.items():
            lines.append(f"\n[plugins.{name}]")
            for key, value in table.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)) and not isinstance(value, ListenAddress):  # (a NamedTuple)
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- key parsers: each takes the TOML value and returns the Python value or raises ValueError ---


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


def _nonempty_string(value: Any) -> str:
    value = _string(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_type_name(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number of seconds, got {_type_name(value)}")
    if not 0 <= value <= 86400:
        raise ValueError(f"must be between 0 and 86400 seconds, got {value}")
    return float(value)


def _duration(value: Any) -> float:
    """
    A length of time: seconds (a number), or a string with a unit: "90s", "30m", "4h", "5d".
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip()[-1:].lower() in units:
        number = value.strip()[:-1].strip()
        try:
            seconds = float(number) * units[value.strip()[-1].lower()]
        except ValueError:
            raise ValueError(f'expected a duration such as 300, "30m", "4h" or "5d", got {value!r}') from None
    else:
        raise ValueError(f'expected a duration such as 300, "30m", "4h" or "5d", got {value!r}')
    if not 0 <= seconds <= 365 * 86400:
        raise ValueError(f"must be between 0 seconds and 365 days, got {value!r}")
    return seconds


def _relay(value: Any) -> ListenAddress | None:
    """"" (deliver by MX) or "host:port" (host a name or an IP literal; port 25 if left out)."""
    value = _string(value).strip()
    if not value:
        return None
    host, port = value, "25"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "25"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number (1-65535)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = _domain(host)
    return ListenAddress(host, int(port))


def _nameserver(value: Any) -> ListenAddress:
    """"ip" or "ip:port" (port 53 if left out)."""
    value = _string(value).strip()
    if value.count(":") > 1 and not value.startswith("["):
        value = f"[{value}]:53"
    elif ":" not in value:
        value = f"{value}:53"
    return parse_listen_address(value)


def _ldapUrl(value: Any) -> str:
    value = _nonempty_string(value).strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("ldap", "ldaps") or not rest.strip("/"):
        raise ValueError(f'{value!r} is not an LDAP URL (ldap://host[:port] or ldaps://host[:port])')
    return value


def _ldapFilter(value: Any) -> str:
    value = _string(value).strip()
    if not value:
        return value
    depth = 0
    for c in value:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            break
    if not (value.startswith("(") and value.endswith(")")) or depth != 0:
        raise ValueError(f"{value!r} is not an LDAP filter (parenthesised, balanced)")
    return value


def _attribute(value: Any) -> str:
    value = _string(value).strip()
    if value and not all(c.isalnum() or c in "-;" for c in value):
        raise ValueError(f"{value!r} is not an attribute name")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _uidl_format(value: Any) -> str:
    return checkUidlFormat(_nonempty_string(value))


def _path(value: Any) -> str:
    return _nonempty_string(value)


def _optional_path(value: Any) -> str | None:
    value = _string(value)
    return value or None


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        value = _string(value)
        if value not in choices:
            raise ValueError(
                f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
            )
        return value

    return parse


def _list_of(item: Callable[[Any], Any], what: str) -> Callable[[Any], tuple]:
    def parse(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {what}, got {_type_name(value)}")
        out = []
        for i, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as e:
                raise ValueError(f"item {i + 1} ({element!r}): {e}") from None
        return tuple(out)

    return parse


def parse_listen_address(value: Any) -> ListenAddress:
    """
    Parse C{"host:port"}: C{"127.0.0.1:25"}, C{"0.0.0.0:25"}, C{"[::1]:25"}, C{"[::]:25"}.
    """
    value = _string(value)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError('expected "host:port", for example "127.0.0.1:25" or "[::]:25"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address (use 0.0.0.0 or [::] for all addresses; "
                "IPv6 addresses go in brackets)"
            ) from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number (0-65535)")
    return ListenAddress(host, int(port))


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value: Any) -> int:
    """
    A size in bytes: an integer, or a string with a K, M, G or T suffix ("512M", "2G").
    """
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("B")
        unit = text[-1:] if text[-1:] in "KMGT" and text[-1:] else ""
        digits = text[: len(text) - len(unit)].strip()
        if not digits.isdigit():
            raise ValueError(f'expected a size such as 1048576, "512M" or "2G", got {value!r}')
        number = int(digits)
    else:
        raise ValueError(f"expected a size, got {_type_name(value)}")
    if number < 0:
        raise ValueError("must not be negative")
    return number * _SIZE_UNITS[unit]


def _folderName(value: Any) -> str:
    value = _string(value)
    if value and (value.upper() == "INBOX" or "/" in value or value.startswith(".") or any(ord(c) < 32 for c in value)):
        raise ValueError(f"{value!r} cannot be a special-use folder (not INBOX, no '/', no leading '.')")
    return value


def _network(value: Any):
    value = _string(value)
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("not an IP network (for example 192.0.2.0/24 or 2001:db8::/32)") from None


def _domain(value: Any) -> str:
    value = _nonempty_string(value).strip().lower().rstrip(".")
    try:
        ascii_name = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{value!r} is not a domain name") from None
    labels = ascii_name.split(".")
    if any(not label or len(label) > 63 for label in labels) or not all(
        c.isalnum() or c in "-." for c in ascii_name
    ):
        raise ValueError(f"{value!r} is not a domain name")
    return ascii_name


def _pluginName(value: Any) -> str:
    value = _nonempty_string(value)
    if not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"{value!r} is not a plugin name (letters, digits, - and _)")
    return value


def _hostname(value: Any) -> str:
    return _domain(value)


# --- the schema ----------------------------------------------------------------------------


class Key(NamedTuple):
    parse: Callable[[Any], Any]
    #: the default, or a callable taking the partially built settings of the file (for
    #: defaults that depend on other keys such as the data directory).
    default: Any
    doc: str = ""


def _default_hostname() -> str:
    name = socket.gethostname() or "localhost"
    try:
        return _domain(name)
    except ValueError:
        return "localhost"


def _default_listen(port: int) -> tuple[ListenAddress, ...]:
    return (ListenAddress("127.0.0.1", port),)


_listen_list = _list_of(parse_listen_address, '"host:port" strings')
_networks = _list_of(_network, "IP networks")

SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key(_hostname, lambda s: _default_hostname(), "name in greetings and Received: headers"),
        "data_dir": Key(_path, "pymaild-data", "mail, queue, index, certificate and passwd-file live here"),
        "shutdown_timeout": Key(_seconds, 30.0, "seconds in-flight transactions get on SIGTERM"),
    },
    "listen": {
        "smtp": Key(_listen_list, _default_listen(2525), "MX (port 25)"),
        "submission": Key(_listen_list, _default_listen(2587), "submission with STARTTLS (port 587)"),
        "smtps": Key(_listen_list, _default_listen(2465), "submission over implicit TLS (port 465)"),
        "imap": Key(_listen_list, _default_listen(2143), "IMAP with STARTTLS (port 143)"),
        "imaps": Key(_listen_list, _default_listen(2993), "IMAP over implicit TLS (port 993)"),
        "pop3": Key(_listen_list, _default_listen(2110), "POP3 with STLS (port 110)"),
        "pop3s": Key(_listen_list, _default_listen(2995), "POP3 over implicit TLS (port 995)"),
        "backlog": Key(_integer(1, 65535), 1024, "listen(2) backlog of every listener"),
    },
    "tls": {
        "cert": Key(_optional_path, None, "PEM certificate chain, leaf first"),
        "key": Key(_optional_path, None, "PEM private key"),
        "min_version": Key(_choice("TLSv1.2", "TLSv1.3"), "TLSv1.2", "oldest TLS version accepted"),
    },
    "domains": {
        "local": Key(
            _list_of(_domain, "domain names"),
            lambda s: tuple(dict.fromkeys(["localhost", s["server"]["hostname"]])),
            "domains whose mail is delivered here",
        ),
    },
    "auth": {
        "backend": Key(_choice("passwd-file", "ldap"), "passwd-file", "where accounts live"),
        "passwd_file": Key(_path, "passwd", "Dovecot-style passwd-file"),
        "aliases_file": Key(_path, "aliases", "aliases and distribution lists"),
        "plaintext_networks": Key(_networks, (), "networks where login without TLS is allowed"),
        "threads": Key(_integer(1, 64), 4, "size of the thread pool that checks passwords"),
    },
    "smtp": {
        "trusted_networks": Key(_networks, (), "networks that may relay without AUTH"),
        "max_message_size": Key(_size, 50 << 20, "largest message accepted (SIZE)"),
        "max_recipients": Key(_integer(1, 100_000), 1000, "recipients of one message"),
        "max_line_length": Key(_integer(1000, 1 << 20), 1000, "longest line of a message, CRLF included"),
        "bare_line_ends": Key(_choice("reject", "normalize"), "reject", "bare CR or LF in DATA: refuse, or make CRLF"),
        "command_timeout": Key(_seconds, 300.0, "seconds a client may stay silent (RFC 5321: 5 minutes)"),
        "max_errors": Key(_integer(1, 1000), 20, "refused commands in one session before it is closed (421)"),
        "max_hops": Key(_integer(1, 1000), 50, "Received headers a message may carry (more: a mail loop)"),
        "data_timeout": Key(_seconds, 300.0, "seconds a client may stay silent inside DATA or a BDAT chunk"),
        "vrfy": Key(_choice("off", "trusted", "on"), "off", "VRFY answers: off (always 252), trusted (logged-in clients and trusted_networks), on"),
    },
    "imap": {
        "append_limit": Key(_size, 50 << 20, "largest message APPEND accepts (APPENDLIMIT)"),
        "autologout": Key(_seconds, 1800.0, "seconds an idle session lives (RFC 3501: at least 1800)"),
        "max_line": Key(_integer(1024, 1 << 20), 65536, "longest command line, in bytes"),
    },
    "pop3": {
        "idle_timeout": Key(_seconds, 600.0, "seconds an idle session lives (RFC 1939: at least 600)"),
        "uidl_format": Key(_uidl_format, "%f", "UIDL of a message: %f Maildir base name, %u UID, %v UIDVALIDITY"),
        "mark_seen": Key(_boolean, True, "messages retrieved with RETR get \\Seen when the session QUITs"),
        "processes": Key(_integer(0, 64), 0, "processes that serve POP3 sessions, the main one included (0: one per CPU core; 1: the main process alone)"),
    },
    "store": {
        "quota_storage": Key(_size, 0, "bytes a user may store (0: no limit)"),
        "quota_messages": Key(_integer(0, 1 << 40), 0, "messages a user may store (0: no limit)"),
        "drafts": Key(_folderName, "Drafts", "\\Drafts folder created at first login (empty: none)"),
        "sent": Key(_folderName, "Sent", "\\Sent folder created at first login"),
        "trash": Key(_folderName, "Trash", "\\Trash folder created at first login"),
        "junk": Key(_folderName, "Junk", "\\Junk folder created at first login"),
        "archive": Key(_folderName, "Archive", "\\Archive folder created at first login"),
        "threads": Key(_integer(1, 64), 4, "size of the thread pool for mail store work"),
        "summary_processes": Key(_integer(0, 64), 2, "worker processes that parse messages in bulk for FETCH, SEARCH and SORT (0: none, parse in the server)"),
    },
    "queue": {
        "relay_host": Key(_relay, None, '"" = deliver by MX; "host:port" = send everything through this smarthost (465: implicit TLS)'),
        "relay_user": Key(_string, "", "user name for AUTH at the relay host (empty: no AUTH)"),
        "relay_password_file": Key(_optional_path, None, "file holding the relay password (first line)"),
        "tls": Key(_choice("may", "encrypt", "verify"), "may", "outbound TLS: may (opportunistic), encrypt (required), verify (required, certificate checked)"),
        "ca_file": Key(_optional_path, None, 'CA certificates for tls = "verify" (empty: the system\'s)'),
        "nameservers": Key(_list_of(_nameserver, '"ip:port" strings'), (), "DNS servers for MX lookups (empty: /etc/resolv.conf)"),
        "remote_port": Key(_integer(1, 65535), 25, "port of remote mail servers"),
        "min_backoff": Key(_duration, 300.0, "first retry after a temporary failure; doubles each time"),
        "max_backoff": Key(_duration, 3600.0, "longest wait between retries"),
        "max_lifetime": Key(_duration, 5 * 86400.0, "how long a message is retried before it bounces"),
        "delay_warning": Key(_duration, 0.0, "send the sender a delay notice after this long (0: never)"),
        "connections": Key(_integer(1, 10000), 100, "outbound connections, all destinations together"),
        "connections_per_destination": Key(_integer(1, 1000), 20, "outbound connections to one domain"),
        "connect_timeout": Key(_duration, 30.0, "seconds to wait for a TCP connection"),
        "command_timeout": Key(_duration, 300.0, "seconds to wait for each reply (RFC 5321 4.5.3.2)"),
    },
    "ldap": {
        "urls": Key(_list_of(_ldapUrl, "LDAP URLs"), (), "directory servers, tried in order (failover)"),
        "start_tls": Key(_boolean, False, "StartTLS on ldap:// URLs"),
        "ca_file": Key(_optional_path, None, "CA certificates the servers' certificates must chain to (empty: the system's)"),
        "bind_dn": Key(_string, "", "the service account that searches (empty: anonymous)"),
        "bind_password": Key(_string, "", "its password (or bind_password_file)"),
        "bind_password_file": Key(_optional_path, None, "a file whose first line is its password"),
        "base_dn": Key(_string, "", "where users and groups are searched"),
        "user_filter": Key(_ldapFilter, "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",
                           "finds the user of a login; {login} is replaced by the login, escaped"),
        "address_attributes": Key(_list_of(_attribute, "attribute names"), ("mail", "mailLocalAddress"),
                                  "attributes holding a user's addresses, the primary one first"),
        "active_filter": Key(_ldapFilter, "", "only users matching it log in and receive mail (empty: all)"),
        "group_filter": Key(_ldapFilter, "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))",
                            "what a distribution list is"),
        "member_attribute": Key(_attribute, "member", "a group's members (member, uniqueMember, memberUid)"),
        "group_address_attribute": Key(_attribute, "mail", "a group's address"),
        "quota_attribute": Key(_attribute, "", "a user's storage quota in bytes (empty: [store] quota_storage)"),
        "mailbox_attribute": Key(_attribute, "entryUUID",
                                 "a user's stable key: its mailbox survives address and uid changes (empty: the address)"),
        "timeout": Key(_seconds, 5.0, "seconds to connect, and to wait for each answer"),
        "pool_size": Key(_integer(1, 64), 4, "threads (each with its own connections) for LDAP lookups; connections for logins' binds"),
        "cache_ttl": Key(_seconds, 60.0, "seconds an answer about an existing user or group is reused"),
        "negative_cache_ttl": Key(_seconds, 10.0, "seconds an answer of nobody is reused"),
        "bind_dn_template": Key(_string, "", "the user's DN made from the login ({login}), instead of searching it"),
        "balance": Key(_choice("failover", "round-robin"), "failover", "servers in order, or each new connection at the next one"),
    },
    "limits": {
        "max_connections": Key(_integer(1, 1_000_000), 2000, "open connections, all listeners together"),
        "max_connections_per_ip": Key(_integer(1, 1_000_000), 100, "open connections from one client address"),
        "max_connections_per_user": Key(_integer(1, 1_000_000), 50, "logged-in IMAP/POP3 sessions of one user"),
        "max_login_failures": Key(_integer(1, 1_000_000), 10, "failed logins per address or user in 5 minutes"),
    },
    "plugins": {
        "enabled": Key(_list_of(_pluginName, "plugin names"), (), "the plugins to run, in this order"),
        "paths": Key(_list_of(_path, "directories"), (), "more directories to find plugin modules in"),
        "timeout": Key(_seconds, 10.0, "seconds a hook call may take (each plugin's own timeout overrides it)"),
        "threads": Key(_integer(1, 256), 4, "threads for plugins' blocking work"),
    },
}

_SECTION_TYPES = {
    "server": ServerConfig,
    "listen": ListenConfig,
    "tls": TLSConfig,
    "domains": DomainsConfig,
    "auth": AuthConfig,
    "smtp": SMTPConfig,
    "imap": IMAPConfig,
    "pop3": POP3Config,
    "store": StoreConfig,
    "queue": QueueConfig,
    "ldap": LdapConfig,
    "limits": LimitsConfig,
    "plugins": PluginsConfig,
}


def _unknown(kind: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return f"unknown {kind}{hint}"


def load(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Config:
    """
    Read and validate the configuration.

    @param path: the TOML file, or C{None} for the embedded default.
    @param data_dir: C{--data-dir} from the command line; it wins over C{[server] data_dir}.
    @raise ConfigError: with a one-line message naming the file, table and key.
    """
    where = str(path) if path is not None else "embedded default"
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: {fileProblem(e)}") from None
        path = path.resolve()
        base = path.parent

    def fail(table: str, key: str | None, message: str) -> ConfigError:
        name = f"[{table}] {key}" if key else f"[{table}]"
        return ConfigError(f"{where}: {name}: {message}")

    settings: dict[str, dict[str, Any]] = {}
    for table, value in raw.items():
        if table not in SCHEMA:
            raise fail(table, None, _unknown("table", table, SCHEMA))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {table}: expected a table [{table}], got {_type_name(value)}")
        for key in value:
            if table == "plugins" and isinstance(value[key], dict):
                continue  # ([plugins.NAME]: checked against the plugin's keys when it is loaded)
            if key not in SCHEMA[table]:
                raise fail(table, key, _unknown("key", key, SCHEMA[table]))

    for table, keys in SCHEMA.items():
        given = raw.get(table, {})
        settings[table] = {}
        for key, spec in keys.items():
            if key in given:
                try:
                    settings[table][key] = spec.parse(given[key])
                except ValueError as e:
                    raise fail(table, key, str(e)) from None
            else:
                settings[table][key] = spec.default(settings) if callable(spec.default) else spec.default

    # Paths: relative to the file (or to the current directory for the embedded default and
    # for --data-dir).
    server = settings["server"]
    if data_dir is not None:
        server["data_dir"] = (Path.cwd() / Path(data_dir)).resolve()
    else:
        server["data_dir"] = (base / Path(server["data_dir"])).resolve()
    data = server["data_dir"]

    auth = settings["auth"]
    given_auth = raw.get("auth", {})
    auth["passwd_file_explicit"] = "passwd_file" in given_auth
    auth["aliases_file_explicit"] = "aliases_file" in given_auth
    auth["passwd_file"] = (base if auth["passwd_file_explicit"] else data) / Path(auth["passwd_file"])
    auth["aliases_file"] = (base if auth["aliases_file_explicit"] else data) / Path(auth["aliases_file"])
    ldap = settings["ldap"]
    for key in ("ca_file", "bind_password_file"):
        if ldap[key] is not None:
            ldap[key] = base / Path(ldap[key])
    if ldap["bind_password"] and ldap["bind_password_file"] is not None:
        raise fail("ldap", "bind_password_file", "give bind_password or bind_password_file, not both")
    if auth["backend"] == "ldap":
        if not ldap["urls"]:
            raise fail("ldap", "urls", 'at least one server is needed with [auth] backend = "ldap"')
        if not ldap["base_dn"]:
            raise fail("ldap", "base_dn", 'needed with [auth] backend = "ldap"')
        if "{login}" not in ldap["user_filter"]:
            raise fail("ldap", "user_filter", "must contain {login}")
        if ldap["bind_dn_template"] and "{login}" not in ldap["bind_dn_template"]:
            raise fail("ldap", "bind_dn_template", "must contain {login}")
        if not ldap["address_attributes"]:
            raise fail("ldap", "address_attributes", "at least one attribute is needed")
    if ldap["timeout"] <= 0:
        raise fail("ldap", "timeout", "must be more than 0 seconds")

    tls = settings["tls"]
    if (tls["cert"] is None) != (tls["key"] is None):
        missing = "key" if tls["key"] is None else "cert"
        raise fail("tls", missing, "cert and key must be given together (or neither, for a self-signed certificate)")
    for key in ("cert", "key"):
        if tls[key] is not None:
            tls[key] = base / Path(tls[key])

    domains = settings["domains"]["local"]
    if not domains:
        raise fail("domains", "local", "at least one local domain is needed")
    settings["domains"]["local"] = tuple(dict.fromkeys(domains))

    seen: dict[tuple[str, int], str] = {}
    for name, _, _ in LISTENERS:
        for address in settings["listen"][name]:
            if address.port == 0:
                continue
            other = seen.get((address.host, address.port))
            if other is not None:
                raise fail("listen", name, f"{address} is also used by [listen] {other}")
            seen[(address.host, address.port)] = name

    special: dict[str, str] = {}
    for key in ("drafts", "sent", "trash", "junk", "archive"):
        name = settings["store"][key]
        if name and name.lower() in special:
            raise fail("store", key, f"{name!r} is also the [store] {special[name.lower()]} folder")
        special[name.lower()] = key

    if settings["smtp"]["data_timeout"] < 1:
        raise fail("smtp", "data_timeout", "must be at least 1 second")

    if settings["imap"]["autologout"] < 1800:
        raise fail("imap", "autologout", "RFC 3501 5.4 wants at least 1800 seconds (30 minutes)")

    if settings["pop3"]["idle_timeout"] < 600:
        raise fail("pop3", "idle_timeout", "RFC 1939 3 wants at least 600 seconds (10 minutes)")

    queue = settings["queue"]
    for key in ("relay_password_file", "ca_file"):
        if queue[key] is not None:
            queue[key] = base / Path(queue[key])
    if queue["relay_user"] and queue["relay_password_file"] is None:
        raise fail("queue", "relay_password_file", "relay_user needs a relay_password_file")
    if queue["relay_password_file"] is not None and not queue["relay_user"]:
        raise fail("queue", "relay_user", "relay_password_file is given but relay_user is empty")
    if queue["relay_user"] and queue["relay_host"] is None:
        raise fail("queue", "relay_user", "AUTH credentials need a relay_host")
    if queue["min_backoff"] < 1:
        raise fail("queue", "min_backoff", "must be at least 1 second")
    if queue["max_backoff"] < queue["min_backoff"]:
        raise fail("queue", "max_backoff", "must not be shorter than min_backoff")
    if queue["connections_per_destination"] > queue["connections"]:
        raise fail("queue", "connections_per_destination", "must not be larger than connections")
    for key in ("connect_timeout", "command_timeout"):
        if queue[key] <= 0:
            raise fail("queue", key, "must be more than 0 seconds")

    plugins = settings["plugins"]
    plugins["paths"] = tuple(base / Path(p) for p in plugins["paths"])
    plugins["tables"] = {k: v for k, v in raw.get("plugins", {}).items() if isinstance(v, dict)}
    if len(set(plugins["enabled"])) != len(plugins["enabled"]):
        raise fail("plugins", "enabled", "a plugin is named twice")

    limits = settings["limits"]
    if limits["max_connections_per_ip"] > limits["max_connections"]:
        raise fail("limits", "max_connections_per_ip", "must not be larger than max_connections")

    sections = {table: _SECTION_TYPES[table](**values) for table, values in settings.items()}
    return Config(source=path, **sections)

