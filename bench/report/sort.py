"""
Rows of bench/sort_bench.py: one per line of its table (recordFrom for all, each SORT, each
THREAD, formatThreads), pymaild alone (no peer), in ms per run.
"""

from __future__ import annotations

from . import Row

SCRIPT = "sort_bench.py"
#: 10,000 messages (the README's smoke run), 3 runs of each command: about 1-2 s
QUICK_ARGS = ["--messages", "10000", "--runs", "3"]
#: 100,000 messages, 5 runs: about 25 s here (the README says 1.5 minutes), most of it summarising
FULL_ARGS: list[str] = []
NEEDS_ROOT = False
PACKAGES: list[str] = []


def rows(data: dict) -> list[Row]:
    n = data["messages"]
    keep = ", summaries kept alive" if data.get("keepSummaries") else ""
    out = []
    for label, samples in data["samples"].items():
        if label == "recordFrom for all":
            note = "one run (not repeated)"
        elif label.startswith("formatThreads"):
            note = f"{data['threads']:,} threads"
        else:
            note = ""
        out.append(Row(benchmark="sort", workload=f"{label}, {n:,} messages in memory{keep}", unit="ms",
                       better="lower", samples={"pymaild": list(samples)}, note=note))
    return out
