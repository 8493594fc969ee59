"""
One report from the separate benchmarks (bench/run): each benchmark's --json output is turned
into rows by its adapter (bench/report/<benchmark>.py, a function C{rows(data) -> list[Row]}),
and the rows are printed as one table.

A row is one workload: the samples of each server that ran it, in one unit, and whether more
is better (rates) or less (times, memory).  The ratio printed is pymaild's median against the
best peer's median, oriented so that above 1.0 means pymaild is behind by that factor.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """
    @ivar workload: what was measured, e.g. C{"SMTP accept+deliver, 4 KB x 1,000, 10 clients"}.
    @ivar unit: of the samples, e.g. C{"msg/s"}, C{"ms"}, C{"KB"}.
    @ivar better: C{"higher"} (rates) or C{"lower"} (times, memory).
    @ivar samples: C{{server name: [one number per round]}}; pymaild's server is named
        C{"pymaild"} (other pymaild variants, e.g. C{"pymaild+plugins"}, are not peers).
    @ivar note: anything a reader must know to read the row (what a peer does differently).
    @ivar references: names in C{samples} that are limits, not servers (the disk's own rate,
        a bare client library): shown, never the "best peer".
    """

    benchmark: str
    workload: str
    unit: str
    better: str
    samples: dict = field(default_factory=dict)
    note: str = ""
    references: tuple = ()

    def median(self, server: str) -> float | None:
        xs = self.samples.get(server) or []
        return statistics.median(xs) if xs else None

    def peers(self) -> list[str]:
        return [s for s in self.samples
                if not s.startswith("pymaild") and s not in self.references and self.samples[s]]

    def bestPeer(self) -> str | None:
        peers = self.peers()
        if not peers:
            return None
        key = (lambda s: -self.median(s)) if self.better == "higher" else self.median
        return min(peers, key=key)

    def ratio(self) -> float | None:
        """How many times pymaild is behind the best peer (below 1: ahead)."""
        best, mine = self.bestPeer(), self.median("pymaild")
        if best is None or mine is None or not mine or not self.median(best):
            return None
        return self.median(best) / mine if self.better == "higher" else mine / self.median(best)


def row(benchmark: str, workload: str, unit: str, better: str, samples: dict, note: str = "",
        references: tuple = ()) -> Row | None:
    """A Row of the servers that have samples; None when none has."""
    samples = {name: xs for name, xs in samples.items() if xs}
    if not samples:
        return None
    return Row(benchmark, workload, unit, better, samples, note, references)


def fmtNumber(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def cell(row: Row, server: str) -> str:
    xs = row.samples.get(server) or []
    if not xs:
        return "-"
    return f"{fmtNumber(statistics.median(xs))} ({fmtNumber(min(xs))}-{fmtNumber(max(xs))})"


def table(rows: list[Row]) -> str:
    """One markdown table: per workload, every server's median (min-max), and the ratio."""
    servers: list[str] = []
    for row in rows:
        for s in row.samples:
            if s not in servers:
                servers.append(s)
    servers.sort(key=lambda s: (not s.startswith("pymaild"), s))
    out = ["| benchmark | workload | unit | " + " | ".join(servers) + " | best peer | pymaild behind by |",
           "|---|---|---|" + "---|" * len(servers) + "---|---|"]
    for row in rows:
        ratio = row.ratio()
        mark = "-" if ratio is None else f"{ratio:.2f}x" + (" (ahead)" if ratio < 0.995 else "")
        out.append(f"| {row.benchmark} | {row.workload} | {row.unit} ({row.better} is better) | "
                   + " | ".join(cell(row, s) for s in servers) + f" | {row.bestPeer() or '-'} | {mark} |")
    notes = [f"- {row.workload}: {row.note}" for row in rows if row.note]
    return "\n".join(out + ([""] + notes if notes else []))
