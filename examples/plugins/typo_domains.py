"""
An example pymaild plugin: refuse mail to misspelt domains of your partners
("gmial.com", "exmaple.com") with a reply that says what was probably meant, and audit who
sends to them.  Copy it into a directory named in [plugins] paths and enable it:

    [plugins]
    enabled = ["typo-domains"]
    paths = ["/etc/pymaild/plugins"]

    [plugins.typo-domains]
    domains = {"gmial.com" = "gmail.com", "exmaple.com" = "example.com"}
    audit = true

docs/plugins.md walks through it; tests/test_example_plugin.py tests it.
"""

from twisted.logger import Logger
from zope.interface import implementer

from pymaild.interfaces import IRcptHook
from pymaild.pipeline import Plugin, keys, reject

log = Logger()


def _typoTable(value):
    """{typo domain: the right one}, both checked as domain names."""
    if not isinstance(value, dict):
        raise ValueError('expected a table like {"gmial.com" = "gmail.com"}')
    return {keys.domain(typo): keys.domain(right) for typo, right in value.items()}


@implementer(IRcptHook)
class TypoDomains:
    def __init__(self, settings, context):
        if not settings["domains"]:
            raise ValueError("domains is empty: nothing to refuse")
        self.domains = settings["domains"]
        self.audit = settings["audit"]

    def rcptTo(self, session, transaction, recipient):
        domain = recipient.address.rpartition("@")[2].lower()
        right = self.domains.get(domain)
        if right is None:
            return None  # (continue: the other plugins and pymaild decide)
        if self.audit:
            log.info("typo-domains: {user} ({peer}) wrote to {address}", user=session.user or "-",
                     peer=session.peer, address=recipient.address)
        local = recipient.address.rpartition("@")[0]
        return reject(550, "5.1.2", f"No such domain {domain}: did you mean {local}@{right}?")


plugin = Plugin("typo-domains", TypoDomains, keys={
    "domains": keys.Key(_typoTable, {}, "typo domain = the domain meant"),
    "audit": keys.Key(keys.boolean, False, "log who wrote to a typo domain"),
}, description="refuses mail to misspelt partner domains")
