# -*- test-case-name: tests.store.test_store -*-
"""
Running store operations off the reactor thread.

The store blocks (file system, sqlite, fsync); the protocols call it through
L{StoreThreads.run}, which runs the call in a dedicated, bounded thread pool and returns a
Deferred.  Operations on one user are serialised by that user's lock, so a sync of 100,000 new
messages in one mailbox occupies one thread and never the reactor.
"""

from __future__ import annotations

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class StoreThreads:
    def __init__(self, reactor, size: int = 4):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name="pymaild-store")

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def run(self, f, *args, **kwargs):
        """
        Call C{f(*args, **kwargs)} in the store's thread pool; a Deferred of its result.
        """
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)
