# -*- test-case-name: tests.pop3.test_pop3_processes -*-
"""
A worker process of L{pymaild.handoff}: serves the POP3 sessions the main process hands it
(C{[pop3] processes}).  The main process runs it as C{python -m pymaild.worker}; it is not a
command for people.

It reads its settings on standard input (a pickled dict that L{pymaild.service} writes:
C{config}, the configuration; C{pem}, C{cert}, C{key} and C{where}, the TLS certificate and key
as the main process holds them and where they came from), talks to the main process over
descriptor 3 and logs JSON lines on standard output.  It opens the mail store itself and asks
the main process for every login (L{pymaild.pop3.remote.RemoteLogins}).
"""

from __future__ import annotations

import os
import pickle
import sys


def main() -> None:
    given = pickle.load(sys.stdin.buffer)
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    import io

    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", line_buffering=True)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out, recordSeparator="")], redirectStandardIO=False)

    from pymaild.config import LISTENERS
    from pymaild.handoff import AdoptedFactory, Ready, WorkerSide
    from pymaild.listen import ConnectionRegistry
    from pymaild.pop3.mailbox import pop3Avatar
    from pymaild.pop3.remote import RemoteLogins
    from pymaild.pop3.server import POP3Factory
    from pymaild.store.maildir import MaildirStore
    from pymaild.store.threads import StoreThreads
    from pymaild.tls import ServerTLS

    config = given["config"]
    serverTLS = ServerTLS(given["cert"], given["key"], config.tls.min_version, given["where"], pem=given["pem"])
    store = MaildirStore(config.server.data_dir / "mail", config.store.quota_storage, config.store.quota_messages,
                         config.store.specialFolders, None)
    storeThreads = StoreThreads(reactor, config.store.threads)
    logins = RemoteLogins(store, pop3Avatar(store, storeThreads.run, config.pop3.uidl_format, config.pop3.mark_seen))
    registry = ConnectionRegistry(1 << 30, 1 << 30, reactor)
    listeners = {}
    for name, protocol, implicitTLS in LISTENERS:
        if protocol != "pop3":
            continue
        pop3 = POP3Factory(tls=serverTLS, plaintextNetworks=config.auth.plaintext_networks, implicitTLS=implicitTLS,
                           clock=reactor, idleTimeout=config.pop3.idle_timeout, logins=logins)
        listeners[name] = AdoptedFactory(name, pop3, registry, serverTLS if implicitTLS else None)
    side = logins.channel = WorkerSide(listeners, registry, reactor, serverTLS.reload,
                                       config.server.shutdown_timeout)
    side.serve()
    storeThreads.start()
    reactor.callWhenRunning(lambda: side.callRemote(Ready, pid=os.getpid()).addErrback(lambda f: None))
    reactor.run(installSignalHandlers=False)
    storeThreads.stop()


if __name__ == "__main__":
    main()
