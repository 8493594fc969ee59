# -*- test-case-name: tests.integration.test_startup -*-
"""
The twistd entry point: C{twistd [twistd options] pymaild [--config FILE] [--data-dir DIR]}.

A mistake in the configuration prints one line (C{pymaild: FILE: [table] key: problem}) on
standard error and exits with status 2, before anything is bound; a user's mistake never shows
a traceback.
"""

from __future__ import annotations

import gc
import sys

from twisted.python import usage

from pymaild import __version__
from pymaild.errors import ConfigError


class Options(usage.Options):
    synopsis = "[--config FILE] [--data-dir DIR]"
    longdesc = (
        "Run pymaild: SMTP (MX and submission), IMAP4 and POP3 over Maildir++. With no --config "
        "it runs the embedded default: data in ./pymaild-data, listeners on 127.0.0.1 "
        "(SMTP 2525, submission 2587, SMTPS 2465, IMAP 2143, IMAPS 2993, POP3 2110, POP3S 2995), "
        "a self-signed certificate and a passwd-file with a first postmaster account. "
        "See pymaild(8) and pymaild.toml(5)."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file (see pymaild.toml(5))."],
        ["data-dir", "d", None, "The data directory; overrides [server] data_dir."],
    ]

    def opt_version(self):
        """
        Print pymaild's version and exit.
        """
        print(f"pymaild {__version__}")
        sys.exit(0)


def makeService(options: Options):
    # Building the service imports most of pymaild and makes some 78,000 objects that live as
    # long as the process: a garbage collection meanwhile finds nothing to free (several, ~25
    # ms of the ~300 ms to the first greeting).  Afterwards they are frozen (gc.freeze), so
    # that no later collection scans them either.
    collecting = gc.isenabled()
    gc.disable()
    parent = getattr(options, "parent", None) or {}
    try:
        from pymaild import config as configmod

        config = configmod.load(options["config"], options["data-dir"])
        from pymaild.service import build

        service = build(config, uid=parent.get("uid"), gid=parent.get("gid"))
    except ConfigError as e:
        sys.stderr.write(f"pymaild: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    finally:
        if collecting:
            gc.freeze()
            gc.enable()
    return service
