"""
Adapter for bench/ldap_bench.py: logins through pymaild's LDAP portal against slapd (sequential,
concurrent, wrong password) beside raw ldap3 and Dovecot's LDAP passdb, per TLS mode; the CPU a
login costs; the reactor's lateness meanwhile; IMAP LOGIN+LOGOUT end to end; and slapd SIGSTOPped.
"""

from __future__ import annotations

import collections
import statistics

import report
from report import Row

SCRIPT = "ldap_bench.py"
QUICK_ARGS = ["--quick"]  # plain LDAP only, 100 / 400 logins, 1 round: about 20 s
FULL_ARGS: list[str] = []  # 3 rounds x plain LDAP, StartTLS, LDAPS: about 3-3.5 minutes
NEEDS_ROOT = True  # only for Dovecot (its master runs as root); without root its rows are left out
PACKAGES = ["slapd", "ldap-utils", "dovecot-ldap", "dovecot-imapd"]

BENCHMARK = "ldap"
MODE_LABELS = {"plain": "plain LDAP", "starttls": "StartTLS", "ldaps": "LDAPS"}
RAW = "raw ldap3"


def _row(workload: str, unit: str, better: str, samples: dict, note: str = "") -> Row | None:
    return report.row(BENCHMARK, workload, unit, better, samples, note)


def _phases(results: list[dict], name: str) -> list[dict]:
    return [r["phases"][name] for r in results if name in (r.get("phases") or {})]


def _bad(phases: list[dict], expect: str) -> str:
    """The answers other than C{expect}, summed over the rounds, e.g. C{"3 temporary"}."""
    bad: collections.Counter = collections.Counter()
    for ph in phases:
        bad.update({k: v for k, v in (ph.get("outcomes") or {}).items() if k != expect})
    return ", ".join(f"{v} {k}" for k, v in bad.items())


def _outcomeNotes(expect: str, **phases: list[dict]) -> list[str]:
    notes = []
    for name, phs in phases.items():
        bad = _bad(phs, expect)
        if bad:
            notes.append(f"{name.replace('_', ' ')}: not all '{expect}': {bad}")
    return notes


def _ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def _count(phases: list[dict]) -> int:
    """The logins of a phase (the same every round)."""
    return phases[0]["n"] if phases else 0


def _rates(phases: list[dict]) -> list[float]:
    return [p["rate"] for p in phases]


def _latency(phases: list[dict], q: str) -> list[float]:
    """Milliseconds."""
    return [p["latency"][q] * 1000 for p in phases if (p.get("latency") or {}).get(q) is not None]


def _cpuPerLogin(phases: list[dict], part: tuple = ("main", "threads")) -> list[float]:
    """Microseconds a login: the reactor (main) thread and the other threads, as the script adds them up."""
    return [sum(p["cpu"][k] for k in part) / p["n"] * 1e6 for p in phases if "cpu" in p and p.get("n")]


def _lateRow(workload: str, stats: list[dict], note: str = "", once: bool = False) -> Row | None:
    """Reactor lateness: each round's p99 as the samples; the worst tick of all rounds in the note."""
    stats = [s for s in stats if s and s.get("n")]
    if not stats:
        return None
    worst = _ms(max(s["max"] for s in stats))
    how = f"p99 of the one run; worst tick {worst}" if once else f"p99 of each round; worst of all rounds {worst}"
    return _row(workload, "ms", "lower", {"pymaild": [s["p99"] * 1000 for s in stats]},
                f"a 10 ms LoopingCall, how late it ran: {how}" + (f"; {note}" if note else ""))


def _portalRows(mode: str, portal: list[dict], raw: list[dict], dove: list[dict]) -> list[Row | None]:
    label = MODE_LABELS.get(mode, mode)
    seq, conc, wrong = (_phases(portal, p) for p in ("sequential", "concurrent", "wrong"))
    C = next((p["concurrency"] for p in conc + wrong if "concurrency" in p), 50)
    rawOne = _phases(raw, "1 thread")
    rawName = next((n for r in raw for n in r.get("phases", {}) if n.endswith(" threads")), None)
    rawMany = _phases(raw, rawName) if rawName else []
    doveSeq, doveConc, doveWrong = (_phases(dove, p) for p in ("sequential", "concurrent", "wrong"))
    floor = f"{RAW} is a floor, not a server: the same search and bind straight from ldap3"
    out = [
        _row(f"{label}: portal, first login of a process (opens 2 connections)", "ms", "lower",
             {"pymaild": [r["first"] * 1000 for r in portal if "first" in r]},
             "the pool thread's two connections (TLS handshakes too for StartTLS and LDAPS); ldap3 imported before"),
        _row(f"{label}: logins, sequential ({_count(seq):,})", "logins/s", "higher",
             {"pymaild": _rates(seq), RAW: _rates(rawOne), "Dovecot": _rates(doveSeq)},
             "; ".join([f"{floor}, 1 thread, no reactor; Dovecot: its auth-client socket, passdb ldap with auth_bind"]
                       + _outcomeNotes("ok", pymaild=seq, raw_ldap3=rawOne, Dovecot=doveSeq))),
        _row(f"{label}: logins, {C} concurrent ({_count(conc):,})", "logins/s", "higher",
             {"pymaild": _rates(conc), RAW: _rates(rawMany), "Dovecot": _rates(doveConc)},
             "; ".join([f"{floor}, {rawName or 'pool-size threads'} (one login in flight each), no reactor; "
                        f"Dovecot: {C} requests outstanding on its auth-client socket"]
                       + _outcomeNotes("ok", pymaild=conc, raw_ldap3=rawMany, Dovecot=doveConc))),
        _row(f"{label}: logins, {C} concurrent, wrong password ({_count(wrong):,})", "logins/s", "higher",
             {"pymaild": _rates(wrong)},
             "; ".join((["Dovecot left out: 2.3.19 holds every failure until its next 500 ms timer "
                         f"({statistics.median(_rates(doveWrong)):,.0f}/s), not LDAP"] if doveWrong else [])
                       + _outcomeNotes("refused", pymaild=wrong, Dovecot=doveWrong))),
    ]
    for q in ("p50", "p99"):
        out.append(_row(f"{label}: login latency {q} at {C} concurrent", "ms", "lower",
                        {"pymaild": _latency(conc, q), "Dovecot": _latency(doveConc, q)},
                        f"Dovecot: {C} requests outstanding on its auth-client socket"))
    for what, mine, theirs, threads in (("sequential", seq, rawOne, "1 thread"),
                                        (f"{C} concurrent", conc, rawMany, rawName or "pool-size threads")):
        reactor = _cpuPerLogin(mine, ("main",))
        out.append(_row(f"{label}: CPU per login, {what}", "us", "lower",
                        {"pymaild": _cpuPerLogin(mine), RAW: _cpuPerLogin(theirs)},
                        "pymaild: the reactor thread + the pool threads"
                        + (f" (the reactor's part {statistics.median(reactor):,.0f} us)" if reactor else "")
                        + f"; {RAW}: its {threads}; user + system, 10 ms clock ticks"))
    out.append(_lateRow(f"{label}: reactor lateness p99, idle (1 s before any login)",
                        [r.get("baseline") for r in portal]))
    for ph, what in (("sequential", "sequential logins"), ("concurrent", f"{C} concurrent logins"),
                     ("wrong", f"{C} concurrent wrong passwords")):
        late = [p.get("late") for p in _phases(portal, ph)]
        out.append(_lateRow(f"{label}: reactor lateness p99, {what}", late))
    return out


def _imapRows(imap: dict) -> list[Row | None]:
    runs = {name: rs for name, rs in imap.items() if rs}
    if not runs:
        return []
    n = next(iter(runs.values()))[0]["n"]
    title = f"IMAP LOGIN+LOGOUT, plain LDAP ({n:,} a round)"
    bad = "; ".join(_outcomeNotes("ok", **runs))
    out = [_row(f"{title}: logins/s", "logins/s", "higher", {name: _rates(rs) for name, rs in runs.items()},
                "; ".join(["connect, greeting, LOGIN, LOGOUT, close, from concurrent asyncio clients; "
                           "Dovecot forks an imap process per login"] + ([bad] if bad else [])))]
    for q in ("p50", "p99"):
        out.append(_row(f"{title}: latency {q}", "ms", "lower",
                        {name: _latency(rs, q) for name, rs in runs.items()}))
    for key, what, note in (("cpu", "CPU per login, the server's processes",
                             "the server's whole process tree (pymaild: one process)"),
                            ("slapdCpu", "slapd's CPU per login", "")):
        out.append(_row(f"{title}: {what}", "ms", "lower",
                        {name: [r[key] / r["n"] * 1000 for r in rs if key in r] for name, rs in runs.items()}, note))
    return out


def _hungRows(mode: str, r: dict) -> list[Row | None]:
    label = MODE_LABELS.get(mode, mode)
    hung = (r.get("phases") or {}).get("hung")
    title = f"{label}: slapd SIGSTOPped" + (f", {hung['n']} logins at once" if hung else "")
    if "error" in r or not hung:
        return [Row(BENCHMARK, f"{title}: time to every answer", "ms", "lower", {},
                    f"failed: {r.get('error', 'no result')[:120]}")]
    outcomes = ", ".join(f"{v} {k}" for k, v in hung.get("outcomes", {}).items()) or "no answer"
    out = [_row(f"{title}: time to every answer", "ms", "lower", {"pymaild": [hung["latency"]["max"] * 1000]},
                f"once, in a portal with [ldap] timeout = --hung-timeout (1 s by default): {outcomes}; "
                f"p50 {_ms(hung['latency']['p50'])}"),
           _lateRow(f"{title}: reactor lateness p99 meanwhile", [hung.get("late")], f"{hung['late']['n']} ticks",
                   once=True)]
    rec = r.get("recovery")
    if rec:
        after = (r["phases"].get("after") or {}).get("outcomes", {})
        after = ", ".join(f"{v} {k}" for k, v in after.items()) or "-"
        out.append(_row(f"{title}: after SIGCONT, the first good login", "ms", "lower",
                        {"pymaild": [rec["seconds"] * 1000]},
                        f"a try every 50 ms: {rec['tries']} tries, the last {rec['outcome']}; "
                        f"then 200 logins: {after}"))
        out.append(_lateRow(f"{title}: reactor lateness p99, SIGCONT to the first good login", [rec.get("late")],
                            once=True))
    return out


def rows(data: dict) -> list[Row]:
    out: list[Row | None] = []
    for mode, portal in (data.get("portal") or {}).items():
        dove = [r for r in (data.get("dovecot") or {}).get(mode, []) if "error" not in r]
        out += _portalRows(mode, portal, (data.get("raw") or {}).get(mode, []), dove)
    out += _imapRows(data.get("imap") or {})
    for mode, r in (data.get("hung") or {}).items():
        out += _hungRows(mode, r)
    return [r for r in out if r is not None]
