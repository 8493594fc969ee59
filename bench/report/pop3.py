"""
The adapter of bench/pop3_bench.py (pymaild's POP3 against Dovecot and `twistd mail`): the RETR
rates (1 and 4 sessions, msg/s) and the STAT, LIST and UIDL times (ms) of its --json output.
"""

from __future__ import annotations

from report import Row

SCRIPT = "pop3_bench.py"
# 300 messages, 1 round; twistd mail hangs at its first RETR (see bench/README.md), so a short
# socket timeout keeps its two failed RETR rows from costing 2 x 120 s
QUICK_ARGS = ["--smoke", "--timeout", "10"]
# the defaults (2,000 messages, 3 rounds) but for the same reason 30 s, not 120 s, of waiting
FULL_ARGS = ["--timeout", "30"]
NEEDS_ROOT = True  # Dovecot's master, as written, switches to nobody (the passwd-file's uid)
PACKAGES = ["dovecot-pop3d"]

BENCHMARK = "pop3"
#: the timed commands taken from the listing part; the script's "USER/PASS (opens the mailbox)"
#: row is left out (twistd mail checks a cleartext dirdbm password, pymaild and Dovecot Argon2id)
TIMED = ("STAT", "LIST", "UIDL")


def _failures(slots: dict) -> list[str]:
    return [f"{name} failed: {slot['error']}" for name, slot in slots.items() if slot.get("error")]


def _samples(slots: dict, value) -> dict:
    """Per server, C{value(sample)} of every round; none for a server that failed (as the script)."""
    return {name: [] if slot.get("error") else [value(x) for x in slot["samples"]] for name, slot in slots.items()}


def rows(data: dict) -> list[Row]:
    out = []
    for label, slots in data.items():
        if label.startswith("RETR"):
            notes = _failures(slots)
            sent = {name: sorted({(x["messages"], x["octets"]) for x in slot["samples"]})
                    for name, slot in slots.items() if slot["samples"]}
            if len({c for cs in sent.values() for c in cs}) > 1:
                notes.append("the servers sent different (messages, octets): "
                             + ", ".join(f"{name} {cs}" for name, cs in sent.items()))
            out.append(Row(BENCHMARK, label, "msg/s", "higher",
                           _samples(slots, lambda x: x["messages"] / x["seconds"]), "; ".join(notes)))
        elif label.split()[0] in TIMED:
            out.append(Row(BENCHMARK, label, "ms", "lower", _samples(slots, lambda x: x * 1000),
                           "; ".join(_failures(slots))))
    return out
