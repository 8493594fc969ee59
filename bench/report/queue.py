"""
Adapter for bench/queue_bench.py: emptying a full outbound queue into smtp-sink (pymaild against
Postfix), the CPU that took, and the idle part (start-up, RSS and CPU with many deferred
messages, and with an empty queue).
"""

from __future__ import annotations

import re
import statistics

import report
from report import Row

SCRIPT = "queue_bench.py"
QUICK_ARGS = ["--quick"]  # 300 messages, 1 round, 10,000 deferred, 10 s idle: under a minute
FULL_ARGS: list[str] = []  # 2,000 messages, 3 rounds, 100,000 deferred, 60 s idle: about 5 minutes
NEEDS_ROOT = True  # the fake DNS server binds port 53; Postfix's instance runs as root
PACKAGES = ["postfix"]

BENCHMARK = "queue"


def _row(workload: str, unit: str, better: str, samples: dict, note: str = "") -> Row | None:
    return report.row(BENCHMARK, workload, unit, better, samples, note)


def _throughput(data: dict) -> list[Row]:
    rates, cpus = [], []
    for label, slots in data.get("throughput", {}).items():
        rate, cpu, notes, reactor = {}, {}, [], []
        m = re.match(r"([\d,]+) x ", label)
        queued = int(m.group(1).replace(",", "")) if m else None
        for name, slot in slots.items():
            got = slot.get("samples") or []
            rate[name] = [s["delivered"] / s["seconds"] for s in got if s.get("seconds")]
            cpu[name] = [s["cpu"] for s in got if "cpu" in s]
            if name == "pymaild":
                reactor = [s["reactorCpu"] for s in got if "reactorCpu" in s]
            for why in slot.get("failures") or []:
                notes.append(f"{name}: a run not counted ({why[:120]})")
            if slot.get("error"):
                notes.append(f"{name}: gave up after two failures")
            short = [s for s in got if queued is not None and s["delivered"] != queued]
            if short:
                notes.append(f"{name}: the sink's count differed from the messages queued in {len(short)} run(s)")
        base = ("from the release to an empty queue, by MX to one smtp-sink (pymaild: from its queue loaded, "
                "start-up not counted" + ("; Postfix: from `postsuper -H ALL`, its queue moves counted)"
                                          if rate.get("Postfix") else ")"))
        rates.append(_row(f"empty the queue: {label}", "msg/s", "higher", rate, "; ".join([base] + notes)))
        cpuNote = ("pymaild: its one process"
                   + (f" (the reactor thread {statistics.median(reactor):.2f} s of it)" if reactor else "")
                   + ("; Postfix: its whole instance, reaped children included; the fake DNS server's CPU in neither"
                      if cpu.get("Postfix") else "; the fake DNS server's CPU not counted"))
        cpus.append(_row(f"CPU to empty the queue: {label}", "s", "lower", cpu, cpuNote))
    return [r for r in rates + cpus if r is not None]


def _idle(data: dict) -> list[Row]:
    idle = data.get("idle") or {}
    if not idle:
        return []
    deferred = next((k[len("pymaild, "):] for k in idle if k.startswith("pymaild, ") and k.endswith(" deferred")),
                    None)
    out = []
    for state, title in ((deferred, f"{deferred} messages"), ("empty queue", "empty queue")):
        if state is None:
            continue
        pym = idle.get(f"pymaild, {state}", {})
        pf = idle.get(f"Postfix, {state}: all processes", {})
        qmgr = idle.get(f"Postfix, {state}: qmgr", {})
        one = "one window side by side after the start-ups (not one per round)"
        rows = [
            _row(f"idle, {title}: start-up to the SMTP greeting", "s", "lower",
                 {"pymaild": pym.get("startup", []), "Postfix": pf.get("startup", [])},
                 "Postfix: `postfix start` to its greeting" if pf.get("startup") else ""),
            _row(f"idle, {title}: start-up to the queue loaded", "s", "lower",
                 {"pymaild": pym.get("loaded", [])},
                 "to pymaild's log line \"queue: N messages queued\" (Postfix keeps no queue in memory)"),
            _row(f"idle, {title}: CPU until the queue is loaded", "s", "lower",
                 {"pymaild": pym.get("cpuLoaded", [])}, ""),
            _row(f"idle, {title}: RSS after the idle window", "MB", "lower",
                 {"pymaild": [pym["rss"] / 1024] if "rss" in pym else [],
                  "Postfix": [pf["rss"] / 1024] if "rss" in pf else []},
                 one + (f"; Postfix: all its processes (its qmgr alone {qmgr['rss'] / 1024:.1f} MB)"
                        if "rss" in pf and "rss" in qmgr else "")),
            _row(f"idle, {title}: CPU in the idle window", "s", "lower",
                 {"pymaild": [pym["cpu"]] if "cpu" in pym else [], "Postfix": [pf["cpu"]] if "cpu" in pf else []},
                 one + (f"; Postfix: all its processes (its qmgr alone {qmgr['cpu']:.2f} s)"
                        if "cpu" in pf and "cpu" in qmgr else "")),
        ]
        out += [r for r in rows if r is not None]
    return out


def rows(data: dict) -> list[Row]:
    return _throughput(data) + _idle(data)
