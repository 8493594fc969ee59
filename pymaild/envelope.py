# -*- test-case-name: tests.auth.test_directory -*-
"""
Plain value objects that travel between the front-ends and the back ends.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


def normalizeAddress(address: str) -> str:
    """
    The form addresses are compared in: surrounding spaces and angle brackets removed, the
    domain IDNA-encoded, the whole folded to lower case.  No C{@} means no domain.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    domain = domain.rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local}@{domain}".lower()


def inNetworks(host: str, networks) -> bool:
    """
    Whether the IP address C{host} lies in one of C{networks} (C{ipaddress} network objects).
    An IPv4-mapped IPv6 address counts as its IPv4 address.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@dataclass(frozen=True)
class Resolution:
    """
    What an address is, as L{pymaild.interfaces.IDirectory.lookup} answers.

    @ivar kind: C{"user"}, C{"alias"}, C{"group"} or C{"none"}.
    @ivar users: the local account names the address delivers to.
    @ivar remote: addresses outside the local domains it forwards to.
    """

    address: str
    kind: str
    users: frozenset[str] = field(default_factory=frozenset)
    remote: frozenset[str] = field(default_factory=frozenset)

    @property
    def exists(self) -> bool:
        return self.kind != "none"
