"""
QueueFiles.recover at start-up: tmp/ emptied, a message file without its envelope removed (its
sender never got a 250), an envelope without its message and anything that is not a queue
file moved to corrupt/, complete messages counted and left alone.
"""

from __future__ import annotations

from pymaild.queue.files import QueueFiles, newId


def test_recover_sorts_out_every_kind_of_leftover(tmp_path):
    files = QueueFiles(tmp_path / "queue")
    files.create()
    good, orphanEml, orphanJson, dirEml = newId(), newId(), newId(), newId()
    (files.tmp / "half-written.eml").write_text("x")
    for name in (f"{good}.eml", f"{good}.json", f"{orphanEml}.eml", f"{orphanJson}.json", "notes.txt",
                 "bad!id.json"):
        (files.messages / name).write_text("x")
    (files.messages / f"{dirEml}.eml").mkdir()
    (files.messages / f"{dirEml}.json").write_text("x")
    assert files.recover() == 1
    assert sorted(p.name for p in files.messages.iterdir()) == [f"{good}.eml", f"{good}.json"]
    assert list(files.tmp.iterdir()) == []
    assert sorted(p.name for p in files.corrupt.iterdir()) == sorted(
        [f"{orphanJson}.json", "notes.txt", "bad!id.json", f"{dirEml}.eml", f"{dirEml}.json"])
