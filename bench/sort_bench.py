"""
SORT and THREAD over 100,000 messages (pymaild.imap.sort), in memory: prints the best of a few
runs for each command.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymaild.imap.sort import (  # noqa: E402
    formatThreads,
    parseSort,
    recordFrom,
    sortMessages,
    threadMessages,
)
from pymaild.store.summary import summarize  # noqa: E402

SORTS = [b"(ARRIVAL)", b"(REVERSE DATE)", b"(SIZE)", b"(SUBJECT)", b"(FROM)", b"(DISPLAYFROM)",
         b"(SUBJECT DATE)", b"(REVERSE FROM REVERSE DATE)", b"(CC TO SUBJECT SIZE)"]


def mailingList(n: int, seed: int) -> list[bytes]:
    """n messages in n/10 threads of a mailing list; a reply names its last ten ancestors."""
    r = random.Random(seed)
    chains: dict[int, list[str]] = {}
    out = []
    for seq in range(1, n + 1):
        topic = r.randrange(max(1, n // 10))
        chain = chains.setdefault(topic, [])
        headers = [f"Message-ID: <{seq}.{topic}@list.example>",
                   f"Subject: {'Re: ' if chain else ''}[list] topic {topic}",
                   f"From: User {seq % 300} <u{seq % 300}@example.com>",
                   "To: list@example.com", f"Cc: cc{r.randrange(50)}@example.com",
                   f"Date: {1 + seq % 28} Jan 2025 {seq % 24:02d}:{seq % 60:02d}:00 +0000"]
        if chain:
            headers += [f"References: {' '.join(chain[-10:])}", f"In-Reply-To: {chain[-1]}"]
        chain.append(f"<{seq}.{topic}@list.example>")
        out.append(("\n".join(headers) + "\n\nbody\n" * (1 + r.randrange(20))).encode())
    return out


def best(function, runs: int, samples: list[float] | None = None) -> float:
    """The best of C{runs} calls, in ms; every run's ms also go to C{samples} if given."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    if samples is not None:
        samples.extend(t * 1000 for t in times)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep-summaries", action="store_true",
                        help="keep the summaries alive while sorting (as a caller that holds "
                             "them would): the garbage collector then has more to walk")
    parser.add_argument("--json", metavar="FILE", help="also write every sample (ms) as JSON")
    args = parser.parse_args()

    print(f"generating and summarising {args.messages:,} messages ...", file=sys.stderr)
    summaries = [summarize(io.BytesIO(m)) for m in mailingList(args.messages, 5256)]
    start = time.perf_counter()
    records = [recordFrom(seq, seq, 1_735_689_600 + seq * 7, None, s)
               for seq, s in enumerate(summaries, 1)]
    building = (time.perf_counter() - start) * 1000
    if not args.keep_summaries:
        del summaries
    gc.collect()

    #: label as printed -> the ms of every run
    samples: dict[str, list[float]] = {"recordFrom for all": [building]}
    print(f"{args.messages:,} messages, best of {args.runs} (ms)")
    print(f"  {'recordFrom for all':34} {building:8.1f}  (one run)")
    for criteria in SORTS:
        parsed = parseSort(criteria[1:-1].split())
        label = "SORT " + criteria.decode()
        ms = best(lambda: sortMessages(parsed, records), args.runs, samples.setdefault(label, []))
        print(f"  {label:34} {ms:8.1f}")
    for algorithm in ("ORDEREDSUBJECT", "REFERENCES"):
        label = "THREAD " + algorithm
        ms = best(lambda: threadMessages(algorithm, records), args.runs, samples.setdefault(label, []))
        print(f"  {label:34} {ms:8.1f}")
    trees = threadMessages("REFERENCES", records)
    ms = best(lambda: formatThreads(trees), args.runs, samples.setdefault("formatThreads (REFERENCES)", []))
    print(f"  {'formatThreads (REFERENCES)':34} {ms:8.1f}  ({len(trees):,} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps({"messages": args.messages, "runs": args.runs,
                                               "keepSummaries": args.keep_summaries, "threads": len(trees),
                                               "unit": "ms", "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
