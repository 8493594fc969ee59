"""
Header changes on a spooled message (pymaild.pipeline.edit) and Message.get: fields added after
the trace fields, removed with their continuation lines, in bytes and in a file, never beyond the
header block; one field read and decoded without parsing the rest.
"""

from __future__ import annotations

from pymaild.pipeline.edit import edit, fieldLines, headerEnd, readHead
from pymaild.testing import PluginHarness

TRACE = b"Return-Path: <a@example.net>\nReceived: from x\n\tby y; date\n"
MESSAGE = TRACE + b"Subject: hi\nX-Spam: yes\n folded\n\tmore\nFrom: a@example.net\n\nX-Spam: body line\n"


def test_add_and_remove_in_bytes():
    out, cleanup = edit(MESSAGE, len(TRACE), [("X-Tag", "external")], ["x-spam"], None)
    cleanup()
    assert out == TRACE + b"X-Tag: external\nSubject: hi\nFrom: a@example.net\n\nX-Spam: body line\n"


def test_the_trace_fields_are_never_removed_and_a_file_is_rewritten(tmp_path):
    source = tmp_path / "spool"
    source.write_bytes(MESSAGE + b"x" * 3_000_000)
    out, cleanup = edit(source, len(TRACE), [], ["Received", "From"], tmp_path)
    data = out.read_bytes()
    assert data.startswith(TRACE + b"Subject: hi\nX-Spam: yes\n folded\n\tmore\n\nX-Spam: body line\n")
    assert len(data) == len(MESSAGE) + 3_000_000 - len(b"From: a@example.net\n")
    cleanup()
    assert not out.exists() and source.exists()


def test_header_only_and_bodyless_messages():
    assert headerEnd(b"A: 1\nB: 2\n", 0) == len(b"A: 1\nB: 2\n")
    assert headerEnd(TRACE + b"\nbody\n", len(TRACE)) == len(TRACE)
    out, _ = edit(TRACE + b"\nbody\n", len(TRACE), [("X-A", "1")], [], None)
    assert out == TRACE + b"X-A: 1\n\nbody\n"
    assert readHead(MESSAGE) == MESSAGE[:MESSAGE.index(b"\n\n") + 1]


def test_non_ascii_values_are_encoded_words():
    from pymaild.mime import decodeHeader

    line = fieldLines([("X-Note", "caf\u00e9")])
    assert line.startswith(b"X-Note: =?utf-8?") and line.isascii() and line.endswith(b"?=\n")
    assert decodeHeader(line[len(b"X-Note: "):-1]) == "caf\u00e9"


def test_message_get_reads_one_field():
    m = PluginHarness.message(b"From: a\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n and more\r\nsubject: second\r\n\r\nSubject: body")
    assert m.get("subject") == m.get("Subject") == str(m.headers["Subject"])
    assert m.get("X-None") is None and m.get("X-None", "") == ""
    assert m.get("From") == "a"
