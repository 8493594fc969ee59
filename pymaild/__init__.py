"""
pymaild: a mail server on Twisted.

SMTP, IMAP4 and POP3 over Maildir++, accounts through twisted.cred, configured by one
TOML file.  See README.md for a tour and HACKING.md for the architecture.
"""

__version__ = "0.1.0"
