"""
What one IMAP command costs the server when it has been idle before it: two or more versions of
pymaild side by side (git revisions of this checkout, or the working tree), each command kind
alone, paced as imap_bench's paced mixed row paces its sessions.

    .venv/bin/python bench/paced_cpu.py [--ops "NOOP,FETCH FLAGS,FETCH BODY"] [--rounds 4] REV [REV ...]

REV is a git revision (archived into a temporary directory) or C{worktree}. For every round,
every command kind and every version in turn (the order reversed every other round), ten
sessions send that command alone at Poisson times, C{--rate} commands a second in all, for
C{--seconds}; the server's CPU time over that window (every thread, from
C{/proc/PID/task/*/schedstat}) is divided by the commands answered. It prints, per command
kind and version, the median and every round's CPU per command and p50 latency at the client.

The servers log in with a {PLAIN} password (imap_bench's argon2id hash would put the ten
logins' hashing into the window). Use it to compare versions of pymaild on the same machine in
the same minutes; Dovecot's processes are not measured here (imap_bench.py compares with it).
Nothing here is a test; it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imap_bench as B  # noqa: E402
from store_bench import log  # noqa: E402


def cpuNs(root: int) -> int:
    total = 0
    for pid, _ in B.processTree(root):
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revs", nargs="+", help="git revisions, or 'worktree'")
    p.add_argument("--ops", default="NOOP,FETCH FLAGS,FETCH BODY",
                   help="command kinds, comma-separated, of " + ", ".join(n for n, _ in B.MIX))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rate", type=float, default=120.0, help="commands a second, all sessions together")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--workdir", type=Path, default=None, help="keeps the generated maildir between runs")
    a = p.parse_args()
    ops = [x.strip() for x in a.ops.split(",") if x.strip()]
    known = {n for n, _ in B.MIX}
    for op in ops:
        if op not in known:
            p.error(f"unknown command kind {op!r}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="paced-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    maildir, _ = B.prepareMaildir(work, a.messages)
    servers = []
    try:
        for i, rev in enumerate(a.revs):
            B.snapshotSources(run, rev, f"src-{i}")  # (sets PYMAILD_ENV's PYTHONPATH)
            s = B.Pymaild(run / f"server-{i}", maildir)
            s.name = f"{i}:{rev}"
            s.env = dict(B.PYMAILD_ENV)
            s.setPassword("{PLAIN}" + B.PASSWORD)
            servers.append(s)
        for s in servers:
            B.PYMAILD_ENV.clear()
            B.PYMAILD_ENV.update(s.env)
            s.start()
        B.chooseLogin(servers, [])
        for s in servers:
            B.measureLoginSelect(s, 60)
        results = collections.defaultdict(list)
        for r in range(a.rounds):
            for op in ops:
                B.MIX = ((op, 1),)
                for s in servers if r % 2 == 0 else servers[::-1]:
                    before = cpuNs(s.pid)
                    m = B.measureMixed(s, 10, a.seconds, seed=r + 1, rate=a.rate)
                    spent = cpuNs(s.pid) - before
                    if m["errors"]:
                        log(f"{s.name} {op}: errors {m['errors']}")
                    results[(s.name, op)].append((spent / m["ops"] / 1e3, m["p50"] * 1e6))
            log(f"round {r + 1} of {a.rounds} done")
        print(f"server CPU per command (every thread) and p50 at the client, {a.rate:g} commands/s over 10 sessions, "
              f"{a.seconds:g} s a run, {a.rounds} rounds, INBOX of {a.messages:,}")
        for op in ops:
            for s in servers:
                xs = results[(s.name, op)]
                print(f"{op:12s} {s.name:24s} cpu {statistics.median(x[0] for x in xs):6.0f} us/command "
                      f"({' '.join(f'{x[0]:.0f}' for x in xs)})   p50 {statistics.median(x[1] for x in xs):6.0f} us "
                      f"({' '.join(f'{x[1]:.0f}' for x in xs)})")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(run, ignore_errors=True)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
