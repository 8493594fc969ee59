"""
The adapter of bench/plugins_bench.py (what the plugin pipeline costs): msg/s of the SMTP
accept-and-deliver workload of bench/smtp_bench.py for pymaild without plugins ("pymaild"), with
a plugin that hooks every stage and does nothing ("pymaild+noop") and with the four built-ins
("pymaild+plugins"), from its --json output.  There are no peers: the note gives each variant's
rate over the plain one.
"""

from __future__ import annotations

import statistics

from report import Row
from report.smtp import notes, rate

SCRIPT = "plugins_bench.py"
QUICK_ARGS = ["--repeat", "1"]  # 1,000 x 4 KB and 100 x 100 KB once per server: about 10 s
FULL_ARGS: list[str] = []  # the same, 3 rounds
NEEDS_ROOT = False
PACKAGES: list[str] = []

BENCHMARK = "plugins"
PLAIN = "pymaild"


def rows(data: dict) -> list[Row]:
    out = []
    for label, slots in data.items():
        samples = {name: [] if slot.get("error") else [rate(x) for x in slot["samples"]]
                   for name, slot in slots.items()}
        text = notes(slots)
        if samples.get(PLAIN):
            plain = statistics.median(samples[PLAIN])
            text.append("median rate over pymaild's without plugins: " + ", ".join(
                f"{name} {statistics.median(xs) / plain:.2f}"
                for name, xs in samples.items() if name != PLAIN and xs))
        out.append(Row(BENCHMARK, label, "msg/s", "higher", samples, "; ".join(text)))
    return out
