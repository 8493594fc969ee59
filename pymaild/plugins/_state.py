"""
Persistent state for the built-in plugins: a key-value table in sqlite under the plugin's state
directory, held in memory while pymaild runs and written back in the plugins' threads every
few seconds and at shutdown, so that the reactor never waits on the disk and a restart keeps
what the plugin knew (at most C{interval} seconds of changes are lost in a crash).

Written against the public plugin API only (a built-in is no different from a third-party one).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from twisted.logger import Logger

log = Logger()


class PersistentTable:
    """
    C{self.data}: a dict of str to JSON-able values, loaded from C{<directory>/<name>.sqlite}.
    Mark changed keys with L{changed}; L{flush} writes them (and deletes keys no longer in
    C{data}) in the plugin threads.
    """

    def __init__(self, context, name: str, interval: float = 5.0):
        self.path = Path(context.stateDirectory) / f"{name}.sqlite"
        self._run = context.run
        self._clock = context.clock
        db = sqlite3.connect(self.path)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.commit()
            self.data = {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM state")}
        finally:
            db.close()
        self._dirty: set = set()
        self._interval = interval
        self._call = None
        self._writing = None
        self._closed = False

    def changed(self, key: str) -> None:
        self._dirty.add(key)
        if self._call is None and not self._closed and self._clock is not None:
            self._call = self._clock.callLater(self._interval, self.flush)

    def flush(self):
        """Write what changed (a Deferred; chained after a write already under way)."""
        from twisted.internet import defer

        self._call = None
        if not self._dirty:
            return self._writing or defer.succeed(None)
        rows = [(key, json.dumps(self.data[key])) for key in self._dirty if key in self.data]
        gone = [(key,) for key in self._dirty if key not in self.data]
        self._dirty = set()

        def write():
            db = sqlite3.connect(self.path)
            try:
                with db:
                    db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", rows)
                    db.executemany("DELETE FROM state WHERE key = ?", gone)
            finally:
                db.close()

        previous = self._writing or defer.succeed(None)
        d = previous.addCallback(lambda _: self._run(write))
        d.addErrback(lambda f: log.failure("plugin state {path}: not written", f, path=str(self.path)))
        self._writing = d
        return d

    def close(self):
        self._closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self.flush()
