# The twistd plugin: it only names the module that builds the service, so that
# `twistd --help` stays fast and pymaild is imported only when it runs.
from twisted.application.service import ServiceMaker

pymaild = ServiceMaker(
    "pymaild",
    "pymaild.tap",
    "A mail server: SMTP, submission, IMAP4 and POP3 over Maildir++",
    "pymaild",
)
