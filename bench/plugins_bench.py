"""
The plugin benchmark of issue 9: what the plugin pipeline costs.  The same pymaild SMTP
accept-and-deliver workload as bench/smtp_bench.py, run against three pymaild servers side by
side: one without plugins, one with a plugin that hooks every SMTP stage and does nothing
(bench/plugins/noop.py: the pipeline's own cost), and one with the four built-ins enabled (dnsbl with two client zones
and one domain zone answered by a twisted.names server of the benchmark's own, greylist,
ratelimit, headers with an add, a remove and a rewrite rule), taking turns (A B A B ...).

    .venv/bin/python bench/plugins_bench.py [--messages 1000] [--clients 10] [--repeat 3] [--smoke]

The greylisted triplet (one sender, one recipient, 127.0.0.1) is passed once before the clock
starts ([plugins.greylist] delay = 0 still refuses the first attempt): the runs measure mail
from a known triplet, as most mail is.  The rate limits are set high enough never to refuse.
Both servers fsync every message before their 250; the count of delivered files is checked and
the plugins' header field is checked in a delivered message.  It asserts nothing.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import smtp_bench  # noqa: E402
from imap_bench import STARTED, snapshotSources  # noqa: E402
from store_bench import fmtRatio, log, machineLine  # noqa: E402

FAKEDNS = REPO / "tests" / "queue" / "fakedns.py"

PLUGINS = """
[plugins]
enabled = ["dnsbl", "greylist", "ratelimit", "headers"]

[plugins.dnsbl]
zones = [{{zone = "zen.bench.test", weight = 1}}, {{zone = "cop.bench.test", weight = 1}}]
domain_zones = [{{zone = "dbl.bench.test"}}]
threshold = 1
action = "reject"
dns_timeout = 2

[plugins.greylist]
delay = 0

[plugins.ratelimit]
window = "1h"
messages_per_ip = 100000000
recipients_per_ip = 100000000
messages_per_sender = 100000000

[plugins.headers]
add = [{{name = "X-External", value = "yes", when = "external"}}]
remove = [{{name = "X-Spam-Flag", when = "external"}}]
rewrite = [{{name = "Subject", match = "^", replace = "[EXT] ", when = "external"}}]

[queue]
nameservers = ["127.0.0.1:{dnsPort}"]
"""


class WithNoop(smtp_bench.Pymaild):
    name = "pymaild+noop"

    def __init__(self, root: Path):
        super().__init__(root)
        with open(self.config, "a") as f:
            f.write(f'\n[plugins]\nenabled = ["noop"]\npaths = ["{HERE / "plugins"}"]\n')


class WithPlugins(smtp_bench.Pymaild):
    name = "pymaild+plugins"

    def __init__(self, root: Path, dnsPort: int):
        super().__init__(root)
        with open(self.config, "a") as f:
            f.write(PLUGINS.format(dnsPort=dnsPort))


def startDNS(work: Path) -> tuple[subprocess.Popen, int]:
    zones = work / "zones.json"
    # (listed: another address, so that every lookup pymaild makes is a real NXDOMAIN answer)
    zones.write_text(json.dumps({"2.0.0.127.zen.bench.test": [["A", "127.0.0.2"]]}))
    proc = subprocess.Popen([sys.executable, str(FAKEDNS), str(zones), "127.0.0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=str(REPO / "tests" / "queue"))
    port = int(proc.stdout.readline())
    return proc, port


def passGreylist(server) -> None:
    """One message from the benchmark's triplet: refused (451), then taken on the retry."""
    for attempt in range(2):
        with smtplib.SMTP(smtp_bench.HOST, server.port, timeout=30) as s:
            s.ehlo("bench.example")
            s.mail("sender@localhost")
            code, _ = s.rcpt(smtp_bench.RECIPIENT)
            if code == 250:
                s.data(smtp_bench.message(1024, -1))
                return
    raise RuntimeError("the greylist did not let the benchmark's triplet through")


def main() -> None:
    p = smtp_bench.arguments(__doc__)
    a = p.parse_args()
    if a.smoke:
        a.messages, a.repeat = 100, 1
    tmp = Path(tempfile.mkdtemp(prefix="pluginsbench-"))
    os.chmod(tmp, 0o755)
    _, sourceLine = snapshotSources(tmp, a.pymaild_source)
    dns, dnsPort = startDNS(tmp)
    servers = [smtp_bench.Pymaild(tmp / "plain"), WithNoop(tmp / "noop"), WithPlugins(tmp / "plugins", dnsPort)]
    results: dict = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    try:
        for server in servers:
            server.start()
        passGreylist(servers[2])
        for size, count in ((4096, a.messages), (102400, max(10, a.messages // 10))):
            label = f"{size // 1024} KB x {count:,}, {a.clients} clients"
            log(label)
            for _ in range(a.repeat):
                for server in servers:
                    slot = results.setdefault(label, {}).setdefault(server.name, {"samples": []})
                    sample = smtp_bench.send(server, size, count, a.clients, a.timeout)
                    slot["samples"].append(sample)
                    if sample["arrived"] != count:
                        notes.append(f"{label}: {server.name}: {sample['arrived']} of {count} arrived")
        newest = max((p for sub in ("new", "cur") for p in (servers[2].maildir() / sub).iterdir()),
                     key=lambda p: p.stat().st_mtime)
        head = newest.read_bytes()[:4096]
        if b"X-External: yes" not in head or b"Subject: [EXT] benchmark message" not in head:
            notes.append("the plugins' header changes are missing from a delivered message")
    finally:
        for server in servers:
            server.stop()
        for server in STARTED:
            if server not in servers:
                server.stop()
        dns.kill()
        dns.wait()
    print(f"## Plugin pipeline benchmark, {time.strftime('%Y-%m-%d %H:%M')} ({time.perf_counter() - t0:.0f} s)")
    print(machineLine(tmp))
    print(sourceLine)
    print(f"repeat {a.repeat}, medians (min-max) of messages/s until the last one is a Maildir file\n")
    names = [s.name for s in servers]
    print("| workload | " + " | ".join(names) + " | noop / without | built-ins / without |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for label, slots in results.items():
        row, rates = [], {}
        for name in names:
            rates[name], text = smtp_bench.rateCell(slots[name]["samples"])
            row.append(text)
        print(f"| {label} | " + " | ".join(row) + f" | {fmtRatio(rates[names[1]] / rates[names[0]])} "
              f"| {fmtRatio(rates[names[2]] / rates[names[0]])} |")
    print("\nRatios: the rate with a plugin that hooks every SMTP stage and does nothing (the pipeline's own cost),"
          " and with the four built-in plugins, over the rate without plugins (1.0: no cost).")
    smtp_bench.finish(a, results, notes)


if __name__ == "__main__":
    main()
