"""
The adapter of bench/smtp_bench.py (SMTP accept-and-deliver against Postfix and `twistd mail`):
msg/s at 4 KB and at 100 KB, a message counted when it is a file in the Maildir, from its --json
output.
"""

from __future__ import annotations

from report import Row

SCRIPT = "smtp_bench.py"
QUICK_ARGS = ["--repeat", "1"]  # 1,000 x 4 KB and 100 x 100 KB once per server: about 10 s
FULL_ARGS: list[str] = []  # the same, 3 rounds
NEEDS_ROOT = True  # Postfix's own instance: `postfix start`, directories chowned to postfix and nobody
PACKAGES = ["postfix"]

BENCHMARK = "smtp"


def rate(sample: dict) -> float:
    """msg/s of one sample as the script computes it: the messages that arrived over the seconds."""
    return sample["arrived"] / sample["seconds"]


def notes(slots: dict) -> list[str]:
    """The script's notes: a server that failed, a run where fewer messages arrived than were sent."""
    out = []
    for name, slot in slots.items():
        if slot.get("error"):
            out.append(f"{name} failed: {slot['error']}")
        short = [f"{x['arrived']} of {x['sent']}" for x in slot["samples"] if x["arrived"] != x["sent"]]
        if short:
            out.append(f"{name}: only {', '.join(short)} arrived")
    return out


def rows(data: dict) -> list[Row]:
    out = []
    for label, slots in data.items():
        samples = {name: [] if slot.get("error") else [rate(x) for x in slot["samples"]]
                   for name, slot in slots.items()}
        out.append(Row(BENCHMARK, label, "msg/s", "higher", samples, "; ".join(notes(slots))))
    return out
