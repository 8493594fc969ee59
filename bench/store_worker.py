"""
pymaild's side of the store benchmark, run by C{store_bench.py} in a fresh process per
measurement so that no Python-level cache (sqlite page cache, open connections, interned
names) carries over from one measurement to the next.

    python bench/store_worker.py build   ROOT [--cold] [--profile FILE]
    python bench/store_worker.py open    ROOT [--cold] [--profile FILE]
    python bench/store_worker.py reactor ROOT [--threads N] [--interval S]

Prints one JSON object on its last line of stdout.  Imports happen before the clock starts;
with C{--cold} the page cache is dropped (root only) just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pymaild.store.maildir import UserStore  # noqa: E402


def dropCaches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def openFolder(root: Path):
    """
    What an IMAP SELECT does to the store: open the user, the folder, sync, read the status.
    """
    user = UserStore(root)
    folder = user.folder("INBOX")
    folder.sync()
    status = folder.status()
    return user, folder, status


class _SQLTimes:
    """
    With --profile: the time spent in each SQL statement's execute()/executemany() (for a
    SELECT that is the query up to its first row; rows fetched later are not counted).
    """

    times: dict[str, list] = {}

    @classmethod
    def install(cls) -> None:
        import sqlite3

        times = cls.times

        class TimedConnection(sqlite3.Connection):
            def _timed(self, method, sql, *args):
                t0 = time.perf_counter()
                try:
                    return method(self, sql, *args)
                finally:
                    entry = times.setdefault(" ".join(sql.split())[:160], [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.perf_counter() - t0

            def execute(self, sql, *args):
                return self._timed(sqlite3.Connection.execute, sql, *args)

            def executemany(self, sql, *args):
                return self._timed(sqlite3.Connection.executemany, sql, *args)

        original = sqlite3.connect

        def connect(*args, **kwargs):
            kwargs.setdefault("factory", TimedConnection)
            return original(*args, **kwargs)

        sqlite3.connect = connect

    @classmethod
    def dump(cls, path: str) -> None:
        rows = sorted(([sql, n, t] for sql, (n, t) in cls.times.items()), key=lambda r: -r[2])
        with open(path, "w") as f:
            json.dump(rows, f)


def _profiled(fn, profile: str | None):
    if not profile:
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result
    import cProfile

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = fn()
    prof.disable()
    elapsed = time.perf_counter() - t0
    prof.dump_stats(profile)
    _SQLTimes.dump(profile + ".sql.json")
    return elapsed, result


def build(root: Path, cold: bool, profile: str | None) -> dict:
    if cold:
        dropCaches()
    if not profile:
        _SQLTimes.install()  # (the COMMITs' share: ~30 statements, a microsecond each of timing)
    elapsed, (user, folder, status) = _profiled(lambda: openFolder(root), profile)
    user.close()
    times = _SQLTimes.times.items()
    commit = sum(t for sql, (n, t) in times if sql.startswith("COMMIT"))
    insert = sum(t for sql, (n, t) in times if sql.startswith("INSERT INTO messages"))
    return {"build": elapsed, "commit": commit, "insert": insert, "sql": sum(t for _, (n, t) in times),
            "messages": status["messages"], "unseen": status["unseen"]}


def warmOpen(root: Path, cold: bool, profile: str | None) -> dict:
    if cold:
        dropCaches()
    elapsed, (user, folder, status) = _profiled(lambda: openFolder(root), profile)
    # what a UID FETCH 1:* (FLAGS) reads: the flag index, from the index file (this process
    # has none yet)
    t0 = time.perf_counter()
    index = folder.flagIndex()
    flags = time.perf_counter() - t0
    unseen = sum("\\Seen" not in index.pairs[code][0] for code in index.codes)
    t0 = time.perf_counter()
    messages = folder.messages()
    listing = time.perf_counter() - t0
    t0 = time.perf_counter()
    uids = folder.uids()
    uidsOnly = time.perf_counter() - t0
    user.close()
    assert len(messages) == len(uids) == len(index.uids) == status["messages"]
    assert unseen == status["unseen"]
    return {"open": elapsed, "list": flags, "objects": listing, "uids": uidsOnly, "messages": status["messages"],
            "unseen": status["unseen"]}


def reactorLatency(root: Path, threads: int, interval: float, idle: float) -> dict:
    """
    Lateness of a LoopingCall on the reactor while the store's thread pool builds the index:
    first C{idle} seconds with nothing else running (the baseline), then during the build.
    """
    from twisted.internet import reactor, task

    from pymaild.store.threads import StoreThreads

    pool = StoreThreads(reactor, threads)
    pool.start()
    phase = {"name": "idle"}
    samples: dict[str, list[float]] = {"idle": [], "build": []}
    state = {"slots": 0}
    result: dict = {}

    def tick(count: int) -> None:
        state["slots"] += count
        due = lc.starttime + state["slots"] * interval
        samples[phase["name"]].append(reactor.seconds() - due)

    lc = task.LoopingCall.withCount(tick)

    def startBuild() -> None:
        phase["name"] = "build"
        t0 = time.perf_counter()

        def done(opened):
            user, folder, status = opened
            result["build"] = time.perf_counter() - t0
            result["messages"] = status["messages"]
            return pool.run(user.close)

        d = pool.run(openFolder, root)
        d.addCallback(done)
        d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
        # keep ticking a little after the build so its last moments are measured too
        d.addBoth(lambda _: task.deferLater(reactor, 5 * interval, lambda: None))
        d.addBoth(lambda _: reactor.stop())

    lc.start(interval, now=False)
    reactor.callLater(idle, startBuild)
    reactor.run()
    pool.stop()

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        if not xs:
            return {"ticks": 0}
        return {"ticks": len(xs), "max": xs[-1], "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
                "p50": xs[len(xs) // 2]}

    result["idle"] = stats(samples["idle"])
    result["during"] = stats(samples["build"])
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("build", "open", "reactor"))
    p.add_argument("root", type=Path)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--profile")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.010)
    p.add_argument("--idle", type=float, default=1.0)
    a = p.parse_args()
    if a.profile:
        _SQLTimes.install()
    if a.mode == "build":
        out = build(a.root, a.cold, a.profile)
    elif a.mode == "open":
        out = warmOpen(a.root, a.cold, a.profile)
    else:
        out = reactorLatency(a.root, a.threads, a.interval, a.idle)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
