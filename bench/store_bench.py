"""
The store benchmark of issue 3: pymaild's Maildir++ store side by side with Dovecot, in the
same run, on the same generated maildir.

    .venv/bin/python bench/store_bench.py [--messages 100000] [--repeat 3] [--cold]

Measures (see bench/README.md):
  1. index build: first open of a folder that has no index (pymaild: new process, UserStore +
     folder + sync + status; Dovecot: new imap process, time of the first SELECT INBOX)
  2. warm open: the same with the index in place
  3. listing every UID and its flags (pymaild: Folder.messages(); Dovecot: UID FETCH 1:* (FLAGS))
  4. fsync'd deliveries per second: a bare write+fsync+rename+fsync-dir loop (the disk's
     limit), pymaild's deliver(), and dovecot-lda (one process per message)
  5. reactor latency while StoreThreads builds the index

It prints ratios (pymaild / Dovecot, pymaild / disk limit) with each target; it asserts nothing.
Every measurement is repeated; the table shows best and median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import maildir_gen  # noqa: E402
from dovecot_extra import (  # noqa: E402
    DovecotError,
    DovecotIMAP,
    DovecotLDA,
    dovecot_imap_path,
    dovecotVersion,
    removeIndex,
    timedBulkCommand,
)
from pymaild.store.delivery import deliver  # noqa: E402

PYMAILD_INDEX_FILES = ("pymaild.index.sqlite", "maildirsize")
TARGETS = {"build": 3.0, "open": 1.5, "deliver": 0.8}
#: deliveries: the disk-limit loop and pymaild take turns in this many slices per run
CHUNKS = 10


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def dropCaches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def canDropCaches() -> bool:
    try:
        dropCaches()
        return True
    except OSError:
        return False


# --- pymaild (each measurement in a fresh process) ------------------------------------------

def removePymaildIndex(root: Path) -> None:
    for entry in os.scandir(root):
        if entry.is_file() and entry.name.startswith(PYMAILD_INDEX_FILES):
            os.unlink(entry.path)


def worker(mode: str, root: Path, *extra: str, timeout: float = 600) -> dict:
    argv = [sys.executable, str(HERE / "store_worker.py"), mode, str(root), *extra]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"store_worker {mode} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def pymaildBuild(root: Path, cold: bool, profile: str | None = None) -> dict:
    removePymaildIndex(root)
    # (before each build, the removal and what the last build left unwritten, the other
    # server's unsynced index too, go to the disk: on ext4 an fsync, such as pymaild's commit,
    # otherwise writes them out with its own, data=ordered)
    os.sync()
    return worker("build", root, *(["--cold"] if cold else []), *(["--profile", profile] if profile else []))


def pymaildOpen(root: Path, cold: bool, profile: str | None = None) -> dict:
    return worker("open", root, *(["--cold"] if cold else []), *(["--profile", profile] if profile else []))


# --- Dovecot (each measurement in a fresh imap process) -------------------------------------

def _selectExists(untagged: list[bytes], tagged: bytes) -> int:
    if b" OK " not in tagged:
        raise DovecotError(f"SELECT INBOX failed: {tagged!r}")
    for line in untagged:
        parts = line.split()
        if len(parts) == 3 and parts[2] == b"EXISTS":
            return int(parts[1])
    raise DovecotError("SELECT INBOX gave no EXISTS")


def dovecotSession(root: Path, cold: bool, listing: bool) -> dict:
    """
    A new imap process; NOOP (so the process is up and its namespaces exist); then time
    SELECT INBOX and, with C{listing}, UID FETCH 1:* (FLAGS).
    """
    with DovecotIMAP(root, timeout=600) as imap:
        imap.command("NOOP")
        if cold:
            dropCaches()
        t0 = time.perf_counter()
        untagged, tagged = imap.command("SELECT INBOX")
        selected = time.perf_counter() - t0
        out = {"open": selected, "messages": _selectExists(untagged, tagged)}
        if listing:
            elapsed, raw = timedBulkCommand(imap, "UID FETCH 1:* (FLAGS)")
            out["list"] = elapsed
            out["listed"] = raw.count(b" FETCH (")
            out["unseen"] = out["listed"] - raw.count(b"\\Seen")
        return out


def dovecotBuild(root: Path, cold: bool) -> dict:
    removeIndex(root)
    os.sync()  # (as before pymaild's build)
    return dovecotSession(root, cold, listing=False)


# --- deliveries ----------------------------------------------------------------------------

def _fsyncDir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inThreads(writers: int, count: int, fn) -> float:
    """
    Run C{fn(writer, n)} in C{writers} threads sharing C{count} items; the wall time.
    """
    shares = [count // writers + (1 if i < count % writers else 0) for i in range(writers)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i, shares[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def diskLimit(maildir: Path, data: bytes, count: int, writers: int, tag: str = "") -> float:
    """
    The disk's own limit: write to tmp/, fsync, rename into new/, fsync new/, in a tight loop.
    """
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    tmp, new = str(maildir / "tmp"), str(maildir / "new")

    def loop(w: int, n: int) -> None:
        for i in range(n):
            name = f"{i}.disk{w}{tag}"
            src = os.path.join(tmp, name)
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(src, os.path.join(new, name))
            _fsyncDir(new)

    return _inThreads(writers, count, loop)


def pymaildDeliveries(maildir: Path, data: bytes, count: int, writers: int) -> float:
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)

    def loop(w: int, n: int) -> None:
        for _ in range(n):
            deliver(maildir, data)

    return _inThreads(writers, count, loop)


def countFiles(maildir: Path) -> int:
    return len(os.listdir(maildir / "new")) + len(os.listdir(maildir / "cur"))


# --- statistics and output -----------------------------------------------------------------

def best(xs: list[float], higher: bool = False) -> float:
    return max(xs) if higher else min(xs)


def fmtTime(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 0.001:
        return f"{s * 1000:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmtRatio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def machineLine(path: Path) -> str:
    try:
        fs = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True, text=True,
                            timeout=10).stdout.split("\n")[1].split()
        fsText = f"{fs[0]} on {fs[1]}"
    except (OSError, IndexError, subprocess.SubprocessError):
        fsText = "?"
    return (f"{os.cpu_count()} cores, {fsText}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"sqlite {__import__('sqlite3').sqlite_version}{reclaimNote()}")


def reclaimNote(root: Path = Path("/sys/kernel/mm/damon/admin/kdamonds")) -> str:
    """
    ", DAMON pages out ..." when the kernel's DAMON runs a pageout scheme (as on the VMs these
    figures come from): page cache idle that long is dropped and read again from the disk
    later, while files mapped into a process (Dovecot's index) are left alone; "" otherwise.
    """
    notes = []
    for kdamond in sorted(root.glob("[0-9]*")):
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for context in sorted((kdamond / "contexts").glob("[0-9]*")):
                aggr = int((context / "monitoring_attrs/intervals/aggr_us").read_text())
                for scheme in sorted((context / "schemes").glob("[0-9]*")):
                    if (scheme / "action").read_text().strip() == "pageout":
                        age = int((scheme / "access_pattern/age/min").read_text()) * aggr / 1e6
                        notes.append(f"DAMON pages out memory idle for {age:g} s or more")
        except (OSError, ValueError):
            continue
    return "".join(f", {n}" for n in sorted(set(notes)))


def sourceFingerprint() -> dict[str, str]:
    """
    A hash of each source file the store is made of: others may edit them while the
    benchmark runs.
    """
    import hashlib

    # summary.py is left out: Folder.summary() imports it lazily, on no path measured here
    files = sorted(p for p in (REPO / "pymaild" / "store").glob("*.py") if p.name != "summary.py")
    files += [REPO / "pymaild" / "errors.py", REPO / "pymaild" / "interfaces.py"]
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in files if p.exists()}


def _sourceLine(before: dict[str, str], after: dict[str, str]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        return "pymaild/store/ unchanged during the run"
    return (f"pymaild sources CHANGED DURING THE RUN ({', '.join(changed)}): the figures may mix "
            "versions; run again")


def gitRevision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "pymaild"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes in pymaild/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def printTable(r: dict, a: argparse.Namespace) -> None:
    out = []
    w = out.append
    w("")
    w(f"pymaild store benchmark: {r['messages']:,} messages (average {r['avgSize']:,} bytes), "
      f"repeat {a.repeat}, {'COLD page cache (dropped before each timed step)' if a.cold else 'warm page cache'}")
    w(f"machine: {r['machine']}")
    w(f"pymaild {gitRevision()}; Dovecot {r['dovecotVersion']}")
    w(_sourceLine(r["sourceBefore"], r["sourceAfter"]))
    w(f"both servers saw {r['check']}")
    w("")
    L, C = 28, 11
    w(f"{'':{L}}{'pymaild':>{2 * C}}{'Dovecot':>{2 * C}}{'pymaild / Dovecot':>{2 * C}}{'target':>{C}}{'met':>6}")
    w(f"{'':{L}}" + "".join(f"{h:>{C}}" for h in ("best", "median") * 3))
    for key, label, target in (("build", "index build (first open)", TARGETS["build"]),
                               ("open", "warm open", TARGETS["open"]),
                               ("list", "list all UIDs + flags", None),
                               ("objects", "  all metadata as objects", None)):
        p, d = r["pymaild"].get(key, []), r["dovecot"].get(key, [])
        pb, pm = (min(p), statistics.median(p)) if p else (None, None)
        db, dm = (min(d), statistics.median(d)) if d else (None, None)
        rb, rm = ratio(pb, db), ratio(pm, dm)
        met = "" if target is None or rm is None else ("yes" if rm <= target else "NO")
        w(f"{label:{L}}" + "".join(f"{x:>{C}}" for x in (fmtTime(pb), fmtTime(pm), fmtTime(db), fmtTime(dm),
                                                         fmtRatio(rb), fmtRatio(rm),
                                                         f"<= {target}" if target else ""))
          + f"{met:>6}")
    w("")
    d = r["deliveries"]
    w(f"fsync'd deliveries of a 4,096-byte message: {a.deliveries:,} per run "
      f"(dovecot-lda: {d['ldaCount']:,}, one process per message)")
    L = 34
    w(f"{'':{L}}{'deliveries/s':>{2 * C}}{'ratio to disk limit':>{2 * C}}{'target':>{C}}{'met':>6}")
    w(f"{'':{L}}" + "".join(f"{h:>{C}}" for h in ("best", "median") * 2))
    rows = [("disk limit, 1 writer", "disk1", "disk1", None),
            ("pymaild deliver(), 1 writer", "pym1", "disk1", TARGETS["deliver"]),
            ("disk limit, 2 writers", "disk2", "disk2", None),
            ("pymaild deliver(), 2 writers", "pym2", "disk2", TARGETS["deliver"]),
            ("Dovecot dovecot-lda, 1 writer", "lda", "disk1", None)]
    for label, key, ref, target in rows:
        xs = d.get(key)
        if not xs:
            w(f"{label:{L}}  skipped: {d.get(key + 'Skipped', 'not run')}")
            continue
        b, m = max(xs), statistics.median(xs)
        # each run's rate over the disk limit measured in the same run, interleaved with it
        paired = [x / y for x, y in zip(xs, d[ref])] if len(xs) == len(d[ref]) else None
        rb, rm = (max(paired), statistics.median(paired)) if paired else (None, None)
        met = "" if target is None else ("yes" if rm >= target else "NO")
        w(f"{label:{L}}" + "".join(f"{x:>{C}}" for x in (f"{b:,.0f}", f"{m:,.0f}",
                                                         fmtRatio(rb) if key != ref else "1",
                                                         fmtRatio(rm) if key != ref else "1",
                                                         f">= {target}" if target else ""))
          + f"{met:>6}")
    w("")
    lat = r.get("reactor")
    if lat:
        if "error" in lat:
            w(f"reactor latency: the build failed:\n{lat['error']}")
        else:
            i, b = lat["idle"], lat["during"]
            w(f"reactor latency: LoopingCall every {a.interval * 1000:.0f} ms, lateness of each call "
              f"(StoreThreads({a.threads}) building the index of {lat['messages']:,} messages in "
              f"{fmtTime(lat['build'])})")
            w(f"{'':{L}}" + "".join(f"{h:>{C}}" for h in ("ticks", "p50", "p99", "max")))
            for label, s in (("idle reactor (baseline, 1 s)", i), ("during the index build", b)):
                if s.get("ticks"):
                    w(f"{label:{L}}" + "".join(f"{x:>{C}}" for x in (str(s["ticks"]), fmtTime(s["p50"]),
                                                                     fmtTime(s["p99"]), fmtTime(s["max"]))))
    w("")
    w("ratios: pymaild / Dovecot is a time ratio (lower is better, 1.00 = as fast as Dovecot); "
      "deliveries are a rate ratio to the disk limit (higher is better, 1.00 = the disk's limit),\n"
      "computed per run (each run interleaves the loop and the deliveries), then best and median of those.")
    w("'met' compares the median ratio with the issue's target; it is information, not a test.")
    print("\n".join(out), flush=True)


# --- the run -------------------------------------------------------------------------------

class Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise Deadline("the benchmark ran over --time-limit")


def prepareMaildirs(work: Path, messages: int) -> tuple[Path, Path, int]:
    """
    One generated maildir for pymaild (C{work/pymaild}) and a hard-linked copy for Dovecot
    (C{work/dovecot}): the same files, each server's index in its own root.  Reused when
    C{work} already holds them for this message count.
    """
    marker = work / "generated.json"
    pym, dov = work / "pymaild", work / "dovecot"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("messages") == messages and info.get("seed") == maildir_gen.SEED \
                and info.get("mix", "plain") == maildir_gen.DEFAULT_MIX \
                and countFiles(pym) == messages and countFiles(dov) == messages:
            log(f"reusing the generated maildirs in {work}")
            return pym, dov, info["bytes"]
    for p in (pym, dov, marker):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    log(f"generating {messages:,} messages in {pym}")
    info = maildir_gen.generate(pym, messages, progress=lambda n: log(f"  {n:,}"))
    log(f"hard-linking the same files into {dov}")
    maildir_gen.linkCopy(pym, dov)
    info["seed"] = maildir_gen.SEED
    marker.write_text(json.dumps(info))
    return pym, dov, info["bytes"]


def run(a: argparse.Namespace) -> None:
    if dovecot_imap_path() is None:
        sys.exit("Dovecot is not installed (apt-get install dovecot-imapd): nothing to compare with")
    if a.cold and not canDropCaches():
        sys.exit("--cold needs to write /proc/sys/vm/drop_caches (root, and a kernel that allows it)")
    keep = a.workdir is not None
    if keep:
        work = Path(a.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="pymaild-bench-", dir=a.tmpdir))
    os.chmod(work, 0o755)  # Dovecot runs as nobody and must reach its maildir
    lda = None
    try:
        pym, dov, totalBytes = prepareMaildirs(work, a.messages)
        for root in (pym, dov):
            for sub in ("cur", "new", "tmp"):
                os.chmod(root / sub, 0o755)
            os.chmod(root, 0o755)
            removePymaildIndex(root)
            removeIndex(root)
            maildir_gen.settle(root)
        os.sync()  # the generated files' writeback must not land inside a measurement

        result = {"messages": a.messages, "sourceBefore": sourceFingerprint(),
                  "avgSize": totalBytes // max(1, a.messages),
                  "dovecotVersion": dovecotVersion(), "machine": machineLine(work),
                  "pymaild": {"build": [], "open": [], "list": [], "objects": []},
                  "dovecot": {"build": [], "open": [], "list": []}}

        # 1. index build, alternating pymaild and Dovecot, and which of them goes first: in the
        # seconds after the corpus is written the machine is slower (a 64 MB mmap touched page by
        # page took 234 ms, then 65), and the build measured first took the most of it
        for i in range(a.repeat):
            if i % 2 == 0:
                p = pymaildBuild(pym, a.cold)
                d = dovecotBuild(dov, a.cold)
            else:
                d = dovecotBuild(dov, a.cold)
                p = pymaildBuild(pym, a.cold)
            result["pymaild"]["build"].append(p["build"])
            result["dovecot"]["build"].append(d["open"])
            log(f"index build {i + 1}/{a.repeat}: pymaild {fmtTime(p['build'])} (SQL {fmtTime(p.get('sql', 0))}: "
                f"the INSERT {fmtTime(p.get('insert', 0))}, COMMITs {fmtTime(p.get('commit', 0))}; "
                f"{p['messages']:,} messages), "
                f"Dovecot {fmtTime(d['open'])} ({d['messages']:,} messages)")

        # 2 + 3. warm open and listing; one untimed round first (both write back what the
        # build left pending: WAL checkpoint, Dovecot's index log to its main index)
        pymaildOpen(pym, False)
        dovecotSession(dov, False, listing=True)
        for i in range(a.repeat):
            p = pymaildOpen(pym, a.cold)
            d = dovecotSession(dov, a.cold, listing=True)
            for key in ("open", "list"):
                result["pymaild"][key].append(p[key])
                result["dovecot"][key].append(d[key])
            result["pymaild"]["objects"].append(p["objects"])
            log(f"warm open {i + 1}/{a.repeat}: pymaild {fmtTime(p['open'])} + list {fmtTime(p['list'])}, "
                f"Dovecot {fmtTime(d['open'])} + list {fmtTime(d['list'])}")
            result["check"] = (f"pymaild {p['messages']:,} messages / {p['unseen']:,} unseen; "
                               f"Dovecot {d['listed']:,} / {d['unseen']:,}"
                               + ("" if (p["messages"], p["unseen"]) == (d["listed"], d["unseen"])
                                  else "  MISMATCH: the servers disagree, the comparison is void"))

        # 4. deliveries: a fresh maildir per run, the disk limit measured next to each
        data = maildir_gen.fourKilobyteMessage()
        msgFile = work / "message.eml"
        msgFile.write_bytes(data)
        deliveries = {"ldaCount": a.lda_deliveries}
        try:
            lda = DovecotLDA(work) if a.lda_deliveries > 0 else None
            if lda is None:
                deliveries["ldaSkipped"] = "--lda-deliveries 0"
        except DovecotError as e:
            deliveries["ldaSkipped"] = str(e)
        dwork = work / "deliveries"
        for i in range(a.repeat):
            if dwork.exists():
                shutil.rmtree(dwork)
            dwork.mkdir()
            os.chmod(dwork, 0o755)
            os.sync()
            # the disk limit and pymaild alternate in CHUNKS slices, so that a neighbour's burst
            # on the shared disk hits both about equally
            elapsed = {"disk1": 0.0, "pym1": 0.0, "disk2": 0.0, "pym2": 0.0}
            for c in range(CHUNKS):
                n = a.deliveries // CHUNKS + (1 if c < a.deliveries % CHUNKS else 0)
                elapsed["disk1"] += diskLimit(dwork / "disk1", data, n, 1, f".{c}")
                elapsed["pym1"] += pymaildDeliveries(dwork / "pym1", data, n, 1)
                elapsed["disk2"] += diskLimit(dwork / "disk2", data, n, 2, f".{c}")
                elapsed["pym2"] += pymaildDeliveries(dwork / "pym2", data, n, 2)
            if lda is not None:
                try:
                    elapsed["lda"] = lda.deliverMany(dwork / "lda", msgFile, a.lda_deliveries)
                except DovecotError as e:
                    deliveries["ldaSkipped"] = str(e).splitlines()[0]
                    lda.close()
                    lda = None
            line = []
            for key, seconds in elapsed.items():
                n = a.lda_deliveries if key == "lda" else a.deliveries
                stored = countFiles(dwork / key)
                if stored != n:
                    raise RuntimeError(f"{key}: {stored} files stored, {n} expected")
                deliveries.setdefault(key, []).append(n / seconds)
                line.append(f"{key} {n / seconds:,.0f}/s")
            log(f"deliveries {i + 1}/{a.repeat}: " + ", ".join(line))
        shutil.rmtree(dwork, ignore_errors=True)
        result["deliveries"] = deliveries

        # 5. reactor latency during an index build in StoreThreads
        removePymaildIndex(pym)
        result["reactor"] = worker("reactor", pym, "--threads", str(a.threads), "--interval", str(a.interval))
        if "build" in result["reactor"]:
            log(f"reactor: build {fmtTime(result['reactor']['build'])}, max lateness "
                f"{fmtTime(result['reactor']['during'].get('max'))}")

        result["sourceAfter"] = sourceFingerprint()
        printTable(result, a)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))

        if a.profile:
            profileDir = Path(a.profile)
            profileDir.mkdir(parents=True, exist_ok=True)
            removePymaildIndex(pym)
            pymaildBuild(pym, a.cold, str(profileDir / "build.pstats"))
            pymaildOpen(pym, a.cold)
            pymaildOpen(pym, a.cold, str(profileDir / "open.pstats"))
            printProfiles(profileDir)
    finally:
        if lda is not None:
            lda.close()
        if not keep:
            log(f"removing {work}")
            shutil.rmtree(work, ignore_errors=True)


def printProfiles(profileDir: Path) -> None:
    import io
    import pstats

    for name in ("build", "open"):
        buf = io.StringIO()
        stats = pstats.Stats(str(profileDir / f"{name}.pstats"), stream=buf)
        stats.strip_dirs().sort_stats("tottime").print_stats(15)
        print(f"\n=== cProfile of pymaild's {name} (top 15 by own time; {profileDir / name}.pstats) ===")
        print(buf.getvalue().split("\n\n", 1)[-1].rstrip())
        sqlFile = profileDir / f"{name}.pstats.sql.json"
        if sqlFile.exists():
            print(f"\n--- SQL statements in pymaild's {name}, by time in execute()/executemany() ---")
            for sql, n, seconds in json.loads(sqlFile.read_text())[:8]:
                print(f"{fmtTime(seconds):>10} {n:>6}x  {sql}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000, help="messages in the generated folder (100000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (3)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache (root) before every timed open; default: warm cache for both")
    p.add_argument("--deliveries", type=int, default=None,
                   help="deliveries per run (default 2000, fewer for small --messages)")
    p.add_argument("--lda-deliveries", type=int, default=None,
                   help="dovecot-lda deliveries per run (default min(deliveries, 500); 0 skips Dovecot)")
    p.add_argument("--threads", type=int, default=4, help="StoreThreads size for the reactor test (4)")
    p.add_argument("--interval", type=float, default=0.010, help="LoopingCall interval, seconds (0.010)")
    p.add_argument("--workdir", help="keep the generated maildirs here and reuse them next time")
    p.add_argument("--tmpdir", help="where the temporary work directory goes (must be on the disk to measure)")
    p.add_argument("--profile", metavar="DIR", help="afterwards, cProfile pymaild's build and warm open into DIR")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    p.add_argument("--time-limit", type=int, default=1200, help="abort after this many seconds (1200)")
    a = p.parse_args()
    if a.messages < 1 or a.repeat < 1:
        p.error("--messages and --repeat must be positive")
    if a.deliveries is None:
        a.deliveries = max(200, min(2000, a.messages // 10))
    if a.lda_deliveries is None:
        a.lda_deliveries = min(a.deliveries, 500)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(a.time_limit)
    t0 = time.perf_counter()
    try:
        run(a)
    except Deadline as e:
        sys.exit(str(e))
    finally:
        signal.alarm(0)
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
