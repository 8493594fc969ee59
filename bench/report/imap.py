"""
Adapter for bench/imap_bench.py (pymaild's IMAP server against a listening Dovecot): its
C{--json} output as report rows, one per workload and INBOX size, plus the memory per idle
IMAP connection (PSS and RSS) at each connection count.
"""

from __future__ import annotations

import re

from report import Row

SCRIPT = "imap_bench.py"
#: 10,000 messages only, 2 rounds (the mixed workload runs 2 anyway), 1,000 idle connections:
#: about 1.5 minutes; the rows are the full run's 10,000-message rows
QUICK_ARGS = ["--messages", "10000", "--repeat", "2", "--idle", "1000"]
#: 10,000 and 100,000 messages, 5 rounds (within --row-budget: the slow rows on 100,000 get
#: fewer; the mixed workload 2), 1,000 and 5,000 idle connections: about 12 minutes
FULL_ARGS: list[str] = ["--repeat", "5"]
#: Dovecot's master runs as root and switches its mail processes to nobody
NEEDS_ROOT = True
PACKAGES = ["dovecot-imapd"]

BENCHMARK = "imap"
SERVERS = (("pymaild", "pymaild"), ("dovecot", "Dovecot"))  # JSON key -> server name
#: kind (imap_bench's) -> (unit, better, factor from the JSON's figures)
KINDS = {"time": ("ms", "lower", 1000.0), "mbps": ("MB/s", "higher", 1.0), "rate": ("op/s", "higher", 1.0)}


def _name(label: str, parent: str) -> str:
    """
    The script's row label without its number, the unit it carries, or its dependence on the
    row above (C{"   p99 latency"} under the mixed workload, C{"   of which SELECT INBOX"}).
    """
    name = re.sub(r"^\s*\d+\.\s*", "", label).strip()
    name = re.sub(r"\s*\(MB/s\)$", "", name)
    name = re.sub(r":\s*ops/s$", "", name)
    if name.startswith("of which "):
        return f"{name[len('of which '):]} (within {parent.split(' (')[0]})"
    if (name.endswith(" latency") or " latency paced" in name) and not label.strip()[:1].isdigit():
        return f"{parent}: {name}"
    return name


def _notePrefixes(name: str) -> tuple[str, ...]:
    """
    The beginnings of the script's per-size notes that concern the row C{name}.
    """
    if name.startswith("LOGIN+SELECT") or name.startswith("SELECT INBOX"):
        return ("LOGIN+SELECT:",)
    if name.startswith("UID FETCH") and name.endswith("first"):
        return ("first UID FETCH ENVELOPE:",)
    if name.startswith("UID FETCH 1:* (FLAGS)"):
        return ("UID FETCH FLAGS:",)
    if name.startswith("UID FETCH"):
        return ("UID FETCH ENVELOPE:",)
    if "BODY.PEEK[]" in name:
        return ("BODY.PEEK[]:",)
    if name.startswith("SEARCH "):
        line = name.split(" [")[0]  # 'SEARCH FROM "mallory.robinson"'
        return (" ".join(line.split()[:2]) + ":", line + ":")
    if name.startswith("STORE"):
        return ("STORE:",)
    if name.startswith("mixed"):
        return ("mixed workload:",)
    return ()


def _sizeRows(size: int, res: dict) -> list[Row]:
    out = []
    parent = ""
    notes = res.get("notes", [])
    everywhere = [n for n in notes if n.startswith("MISMATCH")]
    for row in res.get("rows", []):
        name = _name(row["label"], parent)
        if row["label"].strip()[:1].isdigit():
            parent = name
        unit, better, factor = KINDS.get(row["kind"], (row["kind"], "lower", 1.0))
        samples = {server: [x * factor for x in row.get(key) or [] if x is not None] for key, server in SERVERS}
        rowNotes = list(everywhere)
        for key, server in SERVERS:
            if row.get(key + "Note"):
                rowNotes.append(f"{server}: {row[key + 'Note']}")
        prefixes = _notePrefixes(name)
        rowNotes += [n for n in notes if prefixes and n.startswith(prefixes)]
        if name.startswith("mixed") and name.endswith("p50 latency"):
            # (each session sends its next command when the last is answered: the mean latency
            # is sessions / ops per second for every server; the p50 shows only how it spreads)
            rowNotes.append("a closed loop: every session waits for its answer, so the mean latency is "
                            "sessions / (ops/s) for both servers (Little's law); Dovecot's median is low "
                            "because a few of its operations wait up to its p99 (index locks), pymaild's "
                            "one event loop spreads the same wait over all of them: read it with ops/s and p99")
        if name.startswith("mixed") and " latency paced" in name:
            rowNotes += [n for n in notes if n.startswith("mixed workload, paced")]
        if name.startswith("UID FETCH") and name.endswith("first"):
            rowNotes += [n for n in notes if n.startswith("UID FETCH ENVELOPE:") and "FETCH responses" in n]
            rowNotes.append("one sample: the first FETCH after the index was built")
        out.append(Row(BENCHMARK, f"{name}, {size:,} messages", unit, better, samples, "; ".join(rowNotes)))
    return out


def _idleRows(idle: dict) -> list[Row]:
    out = []
    size = idle["size"]
    for i, target in enumerate(idle.get("counts", [])):
        steps = {}
        failed = []
        for key, server in SERVERS:
            st = (idle.get(key) or [])[i] if i < len(idle.get(key) or []) else None
            steps[server] = st
            if st is None:
                failed.append(f"{server}: not measured (stopped after failed connections at a lower count)")
            elif st["open"] != target or st["failures"]:
                failed.append(f"{server} {st['open']:,} open, {st['failures']} failed")
        for field, what in (("pssPerConn", "PSS"), ("rssPerConn", "RSS")):
            samples = {server: [st[field]] if st and st.get(field) is not None else []
                       for server, st in steps.items()}
            notes = list(failed)
            if what == "RSS":
                notes.append("Dovecot's RSS counts the shared pages again in each imap process (one per "
                             "connection): PSS is the fairer figure")
            out.append(Row(BENCHMARK, f"memory per idle connection ({what}) at {target:,} connections, "
                                      f"{size:,} messages", "KB", "lower", samples, "; ".join(notes)))
    return out


def rows(data: dict) -> list[Row]:
    out: list[Row] = []
    for size in data.get("sizes", []):
        res = data.get("bySize", {}).get(str(size))
        if res is not None:
            out += _sizeRows(size, res)
    for idle in data.get("idle", []):
        out += _idleRows(idle)
    return out
