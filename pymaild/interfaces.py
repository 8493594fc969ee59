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


# --- plugins (see pymaild.pipeline.stages for the order and meaning of each stage) -----------


class IPymaildPlugin(Interface):
    """
    What C{twisted.plugin.getPlugins} finds in the C{pymaild.plugins} namespace: a named,
    configurable maker of hooks (L{pymaild.pipeline.Plugin} is the one implementation a plugin
    module needs).
    """

    name = Attribute("The name [plugins] enabled uses, and the name of its [plugins.NAME] table.")
    keys = Attribute("C{{key: pymaild.config.Key}}: the keys its table may have, with their defaults.")
    description = Attribute("One line for pymaildctl plugins.")

    def create(settings, context):
        """
        @param settings: a dict of the validated keys of its table (defaults filled in).
        @param context: a L{pymaild.pipeline.PluginContext}.
        @return: the hook object: provides one or more of the I*Hook interfaces below; may
            have C{close()} (called at shutdown and when SIGHUP replaces it), which may
            return a Deferred.
        @raise ValueError: the settings make no sense together (start-up stops, naming it).
        """


class IConnectHook(Interface):
    def connect(session):
        """A client connected (SMTP), before the greeting.  @return: a verdict (or a Deferred of one)."""


class IHeloHook(Interface):
    def helo(session):
        """EHLO or HELO was accepted; C{session.helo} is the name given."""


class IAuthHook(Interface):
    def auth(session, login, succeeded):
        """
        SMTP AUTH was checked.  C{succeeded}: the password was right (a reject or tempfail
        refuses the login all the same); not succeeded: a report (the verdict is ignored).
        """


class IMailHook(Interface):
    def mailFrom(session, transaction):
        """MAIL FROM passed pymaild's own checks; C{transaction.sender} is the address."""


class IRcptHook(Interface):
    def rcptTo(session, transaction, recipient):
        """RCPT TO passed pymaild's own checks (the directory knows it, relaying is allowed)."""


class IDataHook(Interface):
    def endOfData(session, transaction, message):
        """The whole message is in (a L{pymaild.pipeline.Message}), before the reply."""


class IDeliveryHook(Interface):
    def deliver(session, transaction, delivery):
        """
        A local mailbox is about to get its copy: C{fileInto} chooses its folder and flags,
        C{addHeaders} adds fields to that copy.
        """


class IQueueHook(Interface):
    def queueEvent(event):
        """A queued recipient was deferred, delivered or bounced (a report)."""


class ILoginHook(Interface):
    def login(session, login, succeeded):
        """An IMAP or POP3 login was checked (as L{IAuthHook.auth})."""
