# -*- test-case-name: tests.store.test_store -*-
"""
The per-user index: one sqlite3 database (WAL) in the user's directory, C{pymaild.index.sqlite}.

It is a cache of the files: UIDs, flags, keywords, MODSEQs, sizes, internal dates and the
message summaries (ENVELOPE, BODYSTRUCTURE, header fields) live here so that opening and
listing a 100,000-message folder reads no message file.  Delete it and the next open rebuilds
it from the maildirs (and from C{dovecot-uidlist} files where they exist, which keeps UIDs).

UIDs and MODSEQs are assigned only inside a transaction of this database, so they never go
backwards and are never reused.  Commits use C{synchronous=FULL}: a UID a client has seen
survives a power cut.  Commits of caches alone (internal dates, summaries, directory stamps,
the flag index: C{UserStore.cacheTransaction}) use C{synchronous=NORMAL}: a crash may lose them,
and they are computed again.

Schema versions: 4 added C{expunged} (every UID removed from a folder, with the MODSEQ of its
removal, for QRESYNC's VANISHED) and C{fields} (the decoded header fields SEARCH reads, apart
from the JSON summary); 5 dropped the per-row trigger that counted unseen messages on flag
changes (the code counts them in bulk) and added C{wire} (the FETCH-ready ENVELOPE,
BODYSTRUCTURE and BODY, out of the JSON summary); 6 added C{envelopes} (the ENVELOPE of
messages not summarized yet, from their header alone), and later, within version 6,
C{flagindex} (a large folder's UIDs, flags and MODSEQs as arrays, for FETCH of flags: a cache
an older pymaild ignores, added by L{_ADD_FLAGINDEX} without a new version, which would make an
older pymaild rebuild the index).  Older indexes are migrated in place (L{_MIGRATE_3},
L{_MIGRATE_4}, L{_MIGRATE_5}), never rebuilt: a rebuild would renumber UIDs and change every
folder's UIDVALIDITY.
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.logger import Logger

log = Logger()

SCHEMA_VERSION = 6

#: Seconds a statement waits for another process's write lock.
BUSY_TIMEOUT = 30

#: The header fields kept in the C{fields} table (decoded and unfolded as in
#: C{MessageSummary.headerFields}; repeated fields joined by a newline; NULL when absent), and
#: their columns.
FIELDS = ("from", "to", "cc", "bcc", "subject", "message-id", "in-reply-to", "references", "date")
FIELD_COLUMNS = {name: "h_" + name.replace("-", "_") for name in FIELDS}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,          -- IMAP name, "INBOX" or "A/B"
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    special TEXT,                       -- RFC 6154 attribute such as \\Sent
    newstamp TEXT NOT NULL DEFAULT '',  -- new/ and cur/ as last synced (empty: scan)
    curstamp TEXT NOT NULL DEFAULT '',
    messages INTEGER NOT NULL DEFAULT 0, -- kept by Folder and the triggers below, so that opening a
    unseen INTEGER NOT NULL DEFAULT 0,   -- folder (SELECT, STATUS) reads one row, not all
    vsize INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    name TEXT NOT NULL,                 -- file name in new/ or cur/ (the unique base is the
                                        -- part before ":"; not stored twice, to keep inserts cheap)
    innew INTEGER NOT NULL,
    flags TEXT NOT NULL,                -- IMAP system flags, space separated
    keywords TEXT NOT NULL,             -- IMAP keywords, space separated
    modseq INTEGER NOT NULL,
    size INTEGER NOT NULL,              -- bytes on disk
    vsize INTEGER NOT NULL,             -- RFC822.SIZE (CRLF line ends)
    internaldate INTEGER,               -- epoch seconds (the file's mtime); NULL until first needed
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
-- summaries apart from messages, so that listing rows stays small once they are cached
CREATE TABLE IF NOT EXISTS summaries (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    summary TEXT NOT NULL,              -- JSON MessageSummary (since schema 5 without the
    PRIMARY KEY (folder, uid)           -- three FETCH-ready fields, which are in wire)
) WITHOUT ROWID;
-- The FETCH-ready ENVELOPE, BODYSTRUCTURE and BODY of a summary, written with it: a warm
-- FETCH 1:* (ENVELOPE) reads one short column per message instead of extracting it from JSON.
CREATE TABLE IF NOT EXISTS wire (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    bodystructure BLOB NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
-- The ENVELOPE of messages not summarized yet, from their header alone: what a FETCH of
-- ENVELOPE without BODYSTRUCTURE or BODY computes for mail it meets first (a client's first
-- look at a folder).  Removed when the whole summary comes (then wire has it).
CREATE TABLE IF NOT EXISTS envelopes (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
-- The header fields SEARCH reads (see FIELDS), written with the summary in one transaction, so
-- that SEARCH FROM/SUBJECT over a folder reads one column instead of decoding every summary.
CREATE TABLE IF NOT EXISTS fields (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    h_from TEXT,
    h_to TEXT,
    h_cc TEXT,
    h_bcc TEXT,
    h_subject TEXT,
    h_message_id TEXT,
    h_in_reply_to TEXT,
    h_references TEXT,
    h_date TEXT,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
-- Every UID removed from a folder (expunge, move away, a file gone in a sync) with the MODSEQ
-- of that removal: RFC 7162 VANISHED (EARLIER).  Rows go with their folder (trigger below) and
-- follow it through a rename (same id).
CREATE TABLE IF NOT EXISTS expunged (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
-- Inserts and flag changes update the counters themselves, in bulk (a trigger per row doubled
-- the cost of indexing a large folder, and was half the index's cost of STORE 1:* -FLAGS):
-- see Folder._countAdded and Folder._countUnseen.
CREATE TRIGGER IF NOT EXISTS messages_delete AFTER DELETE ON messages BEGIN
    UPDATE folders SET messages = messages - 1, unseen = unseen - (instr(OLD.flags, '\\Seen') = 0),
        vsize = vsize - OLD.vsize WHERE id = OLD.folder;
    DELETE FROM summaries WHERE folder = OLD.folder AND uid = OLD.uid;
    DELETE FROM wire WHERE folder = OLD.folder AND uid = OLD.uid;
    DELETE FROM envelopes WHERE folder = OLD.folder AND uid = OLD.uid;
    DELETE FROM fields WHERE folder = OLD.folder AND uid = OLD.uid;
END;
-- A folder's flag index (Folder.flagIndex) as it was when last read whole: UIDs, flag codes and
-- MODSEQs as native arrays, the codes' (flags, keywords) as JSON, valid while the folder's
-- key (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, count) is the one stored.  A process opening a
-- large folder reads one row instead of every message's.
CREATE TABLE IF NOT EXISTS flagindex (
    folder INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    uids BLOB NOT NULL,
    codes BLOB NOT NULL,
    modseqs BLOB NOT NULL,
    pairs TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS folders_delete AFTER DELETE ON folders BEGIN
    DELETE FROM expunged WHERE folder = OLD.id;
    DELETE FROM flagindex WHERE folder = OLD.id;
END;
CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY);
"""


#: Version 3 -> 4, in place and idempotent (two processes may both find version 3 and run it
#: one after the other): the new tables and triggers, and the header fields of the summaries
#: already cached, extracted by sqlite itself (no Python decoding of every summary).
_MIGRATE_3 = "DROP TRIGGER IF EXISTS messages_delete;" + _SCHEMA + (
    "INSERT OR IGNORE INTO fields (folder, uid, " + ", ".join(FIELD_COLUMNS.values()) + ")"
    " SELECT folder, uid, " + ", ".join(f"json_extract(summary, '$.headerFields.\"{n}\"')" for n in FIELDS)
    + " FROM summaries WHERE json_valid(summary);"  # a broken one must not fail the migration
)

#: Version 4 -> 5, idempotent: the per-row trigger that kept C{folders.unseen} on flag changes
#: goes (the code that changes flags counts them itself: L{pymaild.store.maildir.Folder}); the
#: C{wire} table comes, and the delete trigger that empties it.  Summaries cached before keep
#: their FETCH-ready fields in their JSON (read from there until the message is summarized
#: again).
_MIGRATE_4 = "DROP TRIGGER IF EXISTS messages_flags; DROP TRIGGER IF EXISTS messages_delete;" + _SCHEMA

#: Version 5 -> 6, idempotent: the C{envelopes} table comes, and the delete trigger that
#: empties it.
_MIGRATE_5 = "DROP TRIGGER IF EXISTS messages_delete;" + _SCHEMA

#: Within version 6, idempotent: the C{flagindex} table and the folder trigger that empties it,
#: added to an index that lacks them.  A cache an older pymaild ignores, so the schema version
#: stays (a new version would make an older pymaild rebuild the index and renumber every UID).
_ADD_FLAGINDEX = "DROP TRIGGER IF EXISTS folders_delete;" + _SCHEMA


class IndexError_(Exception):
    """
    The index file is unusable (corrupt, or from a newer version); it will be rebuilt.
    """


class MigrationFailed(RuntimeError):
    """
    Migrating the index to this version failed for a reason that may pass (locked, disk full,
    I/O error).  Not an L{IndexError_}: the index is left as it was, never rebuilt, since a
    rebuild would renumber its UIDs.
    """


#: A write of many rows (the first index of a large folder, a STORE on thousands of messages)
#: commits without sqlite's automatic checkpoint (C{UserStore.deferCheckpoint}), which would
#: copy the WAL into the database and fsync it before the answer; the checkpoint runs after,
#: in this one thread, on a connection of its own (a WAL checkpoint blocks no reader and no
#: writer).  Should it not run (a crash, an error), the next commit's automatic checkpoint does
#: the work; a crash before it loses nothing (the WAL is the database until then).
_checkpointer: ThreadPoolExecutor | None = None
_checkpointLock = threading.Lock()
_checkpointsPending: set[str] = set()


def checkpointLater(path: Path) -> None:
    """Checkpoint the index at C{path} soon, in the checkpoint thread (once if asked twice)."""
    global _checkpointer
    key = str(path)
    with _checkpointLock:
        if key in _checkpointsPending:
            return
        if _checkpointer is None:
            _checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymaild-checkpoint")
        _checkpointsPending.add(key)
        _checkpointer.submit(_checkpoint, key)


def _checkpoint(path: str) -> None:
    with _checkpointLock:
        _checkpointsPending.discard(path)
    try:
        # (mode=rw: a user's directory removed meanwhile gets no new empty index)
        db = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        log.warn("checkpoint of {path} failed (the next commit does it): {error}", path=path, error=str(e))


def waitForCheckpoints() -> None:
    """Return once the checkpoints asked for so far have run (for tests and benchmarks)."""
    with _checkpointLock:
        executor = _checkpointer
    if executor is not None:
        executor.submit(lambda: None).result()


def connect(path: Path) -> sqlite3.Connection:
    """
    Open (creating if needed) the index at C{path}.  A corrupt or foreign file is moved aside
    and a fresh index created: the files are the truth.
    """
    try:
        return _open(path)
    except (sqlite3.DatabaseError, IndexError_):
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(path) + suffix)
            if p.exists():
                p.rename(Path(str(path) + ".corrupt" + suffix))
        return _open(path)


def reopen(path: Path) -> sqlite3.Connection:
    """
    Open the index at C{path} again for a connection that had to be dropped: like L{connect},
    but an error is raised, never taken for a corrupt file (the file is not moved aside: an
    I/O error must not cost the index its UIDs).
    """
    return _open(path)


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("PRAGMA cache_size=-16000")
        db.execute("PRAGMA temp_store=MEMORY")  # (sorts, and temporary tables if any)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        elif version in (3, 4, 5):
            steps = ((_MIGRATE_3 if version == 3 else "") + (_MIGRATE_4 if version <= 4 else "")
                     + _MIGRATE_5 + _ADD_FLAGINDEX)
            try:
                db.executescript("BEGIN IMMEDIATE;" + steps + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            except sqlite3.OperationalError as e:
                raise MigrationFailed(f"cannot migrate {path} from schema {version} to {SCHEMA_VERSION}: {e}") from e
        elif version != SCHEMA_VERSION:
            raise IndexError_(f"index schema {version} is not {SCHEMA_VERSION}")
        else:
            trigger = db.execute("SELECT sql FROM sqlite_master WHERE name='folders_delete'").fetchone()
            if trigger is None or "flagindex" not in trigger[0]:
                try:
                    db.executescript("BEGIN IMMEDIATE;" + _ADD_FLAGINDEX + "COMMIT;")
                except sqlite3.OperationalError as e:
                    raise MigrationFailed(f"cannot add the flag index table to {path}: {e}") from e
    except BaseException:
        db.close()
        raise
    return db
