# -*- test-case-name: tests.test_interfaces -*-
"""
Every zope Interface pymaild defines: the seams between the protocol front-ends and the back
ends.  Implementations say C{@implementer(I...)} and have a C{verifyObject} test.

Methods that may block (a directory on the network, the disk) return Deferreds; the passwd-file
implementations answer from memory and return plain values wrapped in C{succeed}.
"""

from zope.interface import Attribute, Interface


class IDirectory(Interface):
    """
    Who exists: the users, their addresses, aliases and groups (distribution lists).

    Addresses are folded to lower case as a whole, as Dovecot and Postfix do by default.  Every method
    returns a Deferred; a directory that cannot answer now fails it with
    L{pymaild.errors.TemporaryFailure}, never with a permanent answer.
    """

    def isLocalDomain(domain):
        """
        @param domain: a domain name (any case, IDNA or Unicode).
        @return: C{True} if mail for C{domain} is delivered here (a plain bool, no I/O).
        """

    def lookup(address):
        """
        Resolve a recipient address.

        @param address: C{"local@domain"}.
        @return: a Deferred firing with an L{pymaild.envelope.Resolution}: C{kind} is
            C{"user"} (C{users} holds the one account name), C{"alias"} or C{"group"} (C{users}
            holds the local account names and C{remote} the outside addresses it expands to),
            or C{"none"} for an address nobody has.
        """

    def addressesOf(user):
        """
        @param user: an account name as the checker returns it (the avatarId).
        @return: a Deferred firing with the frozenset of addresses that belong to C{user}:
            its own address and the aliases that point at it alone (used to decide which
            C{MAIL FROM} a logged-in user may use).
        """

    def reload():
        """
        Re-read the directory's sources now (SIGHUP).  Errors are logged, and the directory
        keeps answering from what it had.
        """


class IUserStore(Interface):
    """
    Where a user's mail lives on disk.  The store issue fills this in; the foundation only needs
    the place.
    """

    root = Attribute("The directory under which every user's maildir lives.")

    def userDirectory(user):
        """
        @param user: an account name (C{"local@domain"}).
        @return: the L{pathlib.Path} of the user's Maildir++ root (created if missing).
        """


class IReloadable(Interface):
    """
    Something that re-reads its files on SIGHUP.
    """

    def reload():
        """
        Re-read now.  Raise nothing: log errors and keep the old state.
        """
