# -*- test-case-name: tests.test_errors -*-
"""
Errors that cross module boundaries.

L{ConfigError} is a user's mistake in the configuration or the command line: its message is
one line meant for the administrator, and the program prints it and exits without a traceback.

L{MailError} is how a back end tells a protocol front-end what to answer: an SMTP reply code,
an RFC 3463 enhanced status code, a public text (never the internal cause), whether the failure
is temporary, and the cause for the log.
"""

from __future__ import annotations


class ConfigError(Exception):
    """
    A configuration or command-line mistake; C{str(error)} is the one line to print.
    """


def fileProblem(error: OSError) -> str:
    """
    What went wrong opening a file, in the words of a one-line message.
    """
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    return error.strerror or str(error)


class MailError(Exception):
    """
    A failure with the reply a mail client should see.

    @ivar code: the SMTP reply code (4xx temporary, 5xx permanent).
    @ivar enhanced: the RFC 3463 enhanced status code, such as C{"5.1.1"}.
    @ivar text: what the peer is told; generic, so as not to disclose the configuration.
    @ivar cause: the underlying exception or detail, for the log only.
    """

    def __init__(self, code: int, enhanced: str, text: str, cause: object = None):
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.cause = cause

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


class TemporaryFailure(MailError):
    """
    A back end (the directory, the disk) cannot answer now; the client should try again.
    """

    def __init__(self, text: str = "Temporary failure, try again later", cause: object = None):
        super().__init__(451, "4.3.0", text, cause)
