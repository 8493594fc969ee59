"""
Tests for C{pymaildctl queue}: the real console script, run as a subprocess against the queue
files of a stopped server's data directory (L{pymaild.queue.files}), as an administrator runs
it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for
from pymaild import cli
from pymaild.queue.files import DELIVERED, FAILED, PENDING, Envelope, QueueFiles, Recipient

PYMAILDCTL = Path(sys.executable).parent / "pymaildctl"

CONFIG = """\
[domains]
local = ["example.com"]
"""

MESSAGE = b"Subject: x\nFrom: alice@example.com\n\nbody\n"


@pytest.fixture
def setup(tmp_path) -> tuple[Path, Path]:
    """
    A configuration file and a data directory (not created yet).
    """
    config = tmp_path / "pymaild.toml"
    config.write_text(CONFIG)
    return config, tmp_path / "data"


@pytest.fixture
def files(setup) -> QueueFiles:
    """
    The (empty) queue of the data directory, as the server creates it.
    """
    queue = QueueFiles(setup[1] / "queue")
    queue.create()
    return queue


def ctl(setup, *args: str) -> subprocess.CompletedProcess:
    config, data = setup
    return subprocess.run(
        [str(PYMAILDCTL), "--config", str(config), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result


def assert_one_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    assert result.returncode == status, result
    assert result.stderr.startswith("pymaildctl: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert result.stdout == ""


def enqueue(files: QueueFiles, *recipients: Recipient, sender: str = "alice@example.com", **fields) -> str:
    return files.enqueue(MESSAGE, Envelope(id="", sender=sender, recipients=list(recipients) or
                                           [Recipient("bob@example.net")], **fields))


def snapshot(files: QueueFiles) -> dict[str, bytes]:
    """
    Every file of the queue with its content.
    """
    return {str(p.relative_to(files.root)): p.read_bytes() for p in sorted(files.root.rglob("*")) if p.is_file()}


def local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def test_list_empty(setup):
    """
    Without a queue directory (the server never ran) and with an empty one, the queue is
    empty; nothing is created.
    """
    _, data = setup
    result = ctl(setup, "queue", "list")
    assert_ok(result)
    assert result.stdout == "Mail queue is empty\n"
    assert not data.exists()
    QueueFiles(data / "queue").create()
    result = ctl(setup, "queue", "list")
    assert_ok(result)
    assert result.stdout == "Mail queue is empty\n"
    result = ctl(setup, "queue", "list", "--json")
    assert_ok(result)
    assert json.loads(result.stdout) == []


def test_list(files, setup):
    """
    One block per message, oldest first: ID (with "!" when held), size, local arrival time,
    sender ("<>" when null), then the recipients not delivered with state, attempts, next
    attempt and last reply; then the total.
    """
    later = time.time() + 3600
    newer = enqueue(
        files,
        Recipient("bob@example.net", attempts=3, next_attempt=later, reply="451 4.3.0 try\n again later"),
        Recipient("carol@example.net", state=DELIVERED, reply="250 ok"),
        Recipient("dave@example.net", state=FAILED, attempts=1, reply="550 5.1.1 no such user"),
        arrival=2_000_000_000.0,
    )
    older = enqueue(files, Recipient("erin@example.org"), sender="", held=True, arrival=1_900_000_000.0)
    result = ctl(setup, "queue", "list")
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].split() == [f"{older}!", str(len(MESSAGE) + MESSAGE.count(b"\n")), *local(1_900_000_000.0).split(), "<>"]
    assert lines[2].split()[0] == "erin@example.org" and "pending" in lines[2] and "0 attempts" in lines[2]
    assert lines[3] == ""
    assert lines[4].split() == [newer, str(len(MESSAGE) + MESSAGE.count(b"\n")), *local(2_000_000_000.0).split(), "alice@example.com"]
    assert lines[5].startswith("    bob@example.net  pending, 3 attempts")
    assert f"next {local(later)}" in lines[5] and lines[5].endswith("(451 4.3.0 try again later)")
    assert lines[6].startswith("    dave@example.net  failed, 1 attempt")
    assert lines[6].endswith("(550 5.1.1 no such user)")
    assert "carol@example.net" not in result.stdout
    assert lines[7:] == ["", "-- 1 Kbytes in 2 messages."]


def test_list_json(files, setup):
    """
    --json prints the envelopes as stored, oldest first.
    """
    second = enqueue(files, arrival=2_000_000_000.0)
    first = enqueue(files, Recipient("x@example.org", notify=["NEVER"]), sender="", arrival=1_900_000_000.0)
    result = ctl(setup, "queue", "list", "--json")
    assert_ok(result)
    stored = [json.loads(files.paths(id)[1].read_bytes()) for id in (first, second)]
    assert json.loads(result.stdout) == stored


def test_list_damaged(files, setup):
    """
    A damaged envelope is reported as such and does not stop the listing; it is left where
    it is (the server moves it aside).
    """
    good = enqueue(files)
    (files.messages / "BROKEN0001.eml").write_bytes(MESSAGE)
    (files.messages / "BROKEN0001.json").write_text("{not json")
    before = snapshot(files)
    result = ctl(setup, "queue", "list")
    assert_ok(result)
    assert good in result.stdout and "-- 1 Kbytes in 1 message." in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("BROKEN0001")][0].split()[1] == "damaged:"
    result = ctl(setup, "queue", "list", "--json")
    assert result.returncode == 0
    assert [e["id"] for e in json.loads(result.stdout)] == [good]
    assert "BROKEN0001" in result.stderr and "damaged" in result.stderr
    assert snapshot(files) == before
    assert list(files.corrupt.iterdir()) == []


def test_show(files, setup):
    """
    show prints the envelope as JSON and the message's header block, not its body.
    """
    id = enqueue(files)
    result = ctl(setup, "queue", "show", id)
    assert_ok(result)
    envelope, _, header = result.stdout.partition("\n\n")
    assert json.loads(envelope) == json.loads(files.paths(id)[1].read_bytes())
    assert header == "Subject: x\nFrom: alice@example.com\n"


def test_flush(files, setup):
    """
    flush makes every pending recipient of every message not held due now.
    """
    later = time.time() + 3600
    due = enqueue(files, Recipient("a@example.net", attempts=5, next_attempt=later),
                  Recipient("b@example.net", state=FAILED, next_attempt=later))
    held = enqueue(files, Recipient("c@example.net", next_attempt=later), held=True)
    start = time.time()
    result = ctl(setup, "queue", "flush")
    assert_ok(result)
    assert result.stdout == "flushed 1 message (1 held)\n"
    recipients = files.load(due).recipients
    assert start <= recipients[0].next_attempt <= time.time()
    assert recipients[0].attempts == 5
    assert recipients[1].next_attempt == later  # (failed: not retried)
    assert files.load(held).recipients[0].next_attempt == later


def test_flush_skips_a_message_being_delivered(files, setup):
    """
    flush does not wait for a message being delivered right now (it is being tried already).
    """
    later = time.time() + 3600
    id = enqueue(files, Recipient("a@example.net", next_attempt=later))
    with files.lock(id):
        start = time.monotonic()
        result = ctl(setup, "queue", "flush")
        assert time.monotonic() - start < cli.LOCK_WAIT
    assert_ok(result)
    assert result.stdout == "flushed 0 messages (1 being delivered right now)\n"
    assert files.load(id).recipients[0].next_attempt == later


def test_retry(files, setup):
    """
    retry makes one message's pending recipients due now, however often they were deferred;
    a held message is refused with a hint to release it.
    """
    later = time.time() + 86400
    id = enqueue(files, Recipient("a@example.net", attempts=40, next_attempt=later))
    other = enqueue(files, Recipient("b@example.net", next_attempt=later))
    start = time.time()
    result = ctl(setup, "queue", "retry", id)
    assert_ok(result)
    assert id in result.stdout
    assert start <= files.load(id).recipients[0].next_attempt <= time.time()
    assert files.load(other).recipients[0].next_attempt == later

    held = enqueue(files, Recipient("c@example.net", next_attempt=later), held=True)
    before = snapshot(files)
    assert_one_line(ctl(setup, "queue", "retry", held), 2, "held", f"queue release {held}")
    assert snapshot(files) == before


def test_hold_and_release(files, setup):
    """
    hold sets held; release clears it and makes the pending recipients due now.
    """
    later = time.time() + 3600
    id = enqueue(files, Recipient("a@example.net", next_attempt=later),
                 Recipient("b@example.net", state=DELIVERED, next_attempt=later))
    assert_ok(ctl(setup, "queue", "hold", id))
    envelope = files.load(id)
    assert envelope.held and envelope.recipients[0].next_attempt == later
    assert f"{id}!" in ctl(setup, "queue", "list").stdout

    start = time.time()
    assert_ok(ctl(setup, "queue", "release", id))
    envelope = files.load(id)
    assert not envelope.held
    assert start <= envelope.recipients[0].next_attempt <= time.time()
    assert envelope.recipients[1].next_attempt == later


def test_delete(files, setup):
    """
    delete removes the message and its envelope, and nothing else.
    """
    id = enqueue(files)
    other = enqueue(files)
    result = ctl(setup, "queue", "delete", id)
    assert_ok(result)
    assert result.stdout == f"deleted {id}\n"
    assert files.ids() == [other]
    assert not any(path.exists() for path in files.paths(id))
    assert list(files.corrupt.iterdir()) == [] and list(files.tmp.iterdir()) == []


def test_delete_damaged(files, setup):
    """
    A damaged message can be deleted; other commands refuse it with a one-line message.
    """
    (files.messages / "BROKEN0001.eml").write_bytes(MESSAGE)
    (files.messages / "BROKEN0001.json").write_text('{"version": 1}')
    for command in ("show", "retry", "hold", "bounce"):
        assert_one_line(ctl(setup, "queue", command, "BROKEN0001"), 1, "BROKEN0001", "damaged")
    assert_ok(ctl(setup, "queue", "delete", "BROKEN0001"))
    assert list(files.messages.iterdir()) == []


def test_bounce(files, setup):
    """
    bounce fails every pending recipient with 5.0.0; a report is owed unless NOTIFY says
    otherwise; delivered and already failed recipients are left alone; held is cleared.
    """
    id = enqueue(
        files,
        Recipient("default@example.net", attempts=2),
        Recipient("never@example.net", notify=["NEVER"]),
        Recipient("success@example.net", notify=["SUCCESS"]),
        Recipient("failure@example.net", notify=["FAILURE", "DELAY"]),
        Recipient("done@example.net", state=DELIVERED, reply="250 ok", reported=True),
        Recipient("gone@example.net", state=FAILED, status="5.1.1", reply="550 no", reported=True),
        held=True,
    )
    result = ctl(setup, "queue", "bounce", id)
    assert_ok(result)
    assert id in result.stdout
    envelope = files.load(id)
    assert not envelope.held
    states = [(r.address, r.state, r.status, r.reply, r.reported, r.attempts) for r in envelope.recipients]
    bounced = (FAILED, "5.0.0", "bounced by the administrator")
    assert states == [
        ("default@example.net", *bounced, False, 2),
        ("never@example.net", *bounced, True, 0),
        ("success@example.net", *bounced, True, 0),
        ("failure@example.net", *bounced, False, 0),
        ("done@example.net", DELIVERED, None, "250 ok", True, 0),
        ("gone@example.net", FAILED, "5.1.1", "550 no", True, 0),
    ]
    assert not envelope.finished() and envelope.pending() == []


def test_bounce_null_sender(files, setup):
    """
    A message from the null sender is never reported: after bounce it is finished.
    """
    id = enqueue(files, Recipient("a@example.net"), sender="")
    assert_ok(ctl(setup, "queue", "bounce", id))
    envelope = files.load(id)
    assert [(r.state, r.reported) for r in envelope.recipients] == [(FAILED, True)]
    assert envelope.finished()


@pytest.mark.parametrize("command", ["show", "retry", "hold", "release", "delete", "bounce"])
@pytest.mark.parametrize(
    "id, fragments",
    [
        ("0123456789ABCDEF", ["no message 0123456789ABCDEF in the queue"]),
        ("short", ["'short' is not a queue ID"]),
        ("../../etc/passwd", ["'../../etc/passwd' is not a queue ID"]),
        ("ABCDEFGH-1", ["is not a queue ID"]),
    ],
)
def test_unknown_or_malformed_id(files, setup, command, id, fragments):
    """
    An ID that is not queued, or is not an ID at all, is one line on stderr and exit 1;
    nothing changes.
    """
    enqueue(files)
    before = snapshot(files)
    assert_one_line(ctl(setup, "queue", command, id), 1, *fragments)
    assert snapshot(files) == before


def test_unknown_id_without_queue_directory(setup):
    """
    Without a queue directory every ID is unknown; nothing is created.
    """
    _, data = setup
    assert_one_line(ctl(setup, "queue", "delete", "0123456789ABCDEF"), 1, "no message 0123456789ABCDEF")
    assert not data.exists()


def test_queue_command_required(setup):
    """
    "queue" alone is a usage mistake like "user" alone.
    """
    assert_one_line(ctl(setup, "queue"), 2, "required")
    assert_one_line(ctl(setup, "queue", "flush", "extra"), 2, "unrecognized")


def test_busy(files, setup):
    """
    A message whose lock stays held (the runner is delivering it) is not changed: after
    LOCK_WAIT seconds the command says so and exits 75 (EX_TEMPFAIL).
    """
    id = enqueue(files)
    before = snapshot(files)
    lock = files.lock(id).__enter__()
    try:
        start = time.monotonic()
        result = ctl(setup, "queue", "delete", id)
        waited = time.monotonic() - start
    finally:
        lock.__exit__()
    assert_one_line(result, 75, id, "being delivered right now", "try again")
    assert waited >= cli.LOCK_WAIT
    assert snapshot(files) == before


def test_waits_for_the_lock(files, setup):
    """
    A command waits for a message's lock and works on the envelope as it is once it gets it
    (here: changed by the lock's holder meanwhile, as the runner records a result).
    """
    id = enqueue(files, Recipient("a@example.net"), Recipient("b@example.net"))
    lock = files.lock(id).__enter__()
    try:
        config, data = setup
        proc = subprocess.Popen(
            [str(PYMAILDCTL), "--config", str(config), "--data-dir", str(data), "queue", "hold", id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        eml = str(files.paths(id)[0])

        def waiting():  # (it has the message file open: it is trying to lock it)
            assert proc.poll() is None, proc.communicate()
            try:
                return any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == eml for fd in os.listdir(f"/proc/{proc.pid}/fd"))
            except OSError:
                return False

        wait_for(waiting, timeout=30, what="pymaildctl to wait for the lock")
        envelope = files.load(id)
        envelope.recipients[0].state = DELIVERED
        files.save(envelope)
    finally:
        lock.__exit__()
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr, stdout) == (0, "", f"held {id}\n")
    envelope = files.load(id)
    assert envelope.held
    assert [r.state for r in envelope.recipients] == [DELIVERED, PENDING]
