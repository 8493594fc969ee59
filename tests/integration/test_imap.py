"""
IMAP over the store, end to end: a real server subprocess, Python's imaplib over TLS, messages
delivered into the maildir by another process (as an MDA would).
"""

from __future__ import annotations

import imaplib
import re
import socket
import ssl

import pytest

from pymaild.store.delivery import deliver

PLAIN = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Hello there\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob,\r\nsee you.\r\n"
)
MULTIPART = (
    b"From: carol@example.com\r\nSubject: Report\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\npreamble\r\n--XX\r\n'
    b"Content-Type: text/plain\r\n\r\nthe text\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--XX--\r\n"
)
BIG = b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a large message\r\n" % i for i in range(6000))


@pytest.fixture
def mailbox(server):
    """
    The running server with three messages delivered into postmaster's INBOX.
    """
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for message in (PLAIN, MULTIPART, BIG):
        deliver(home, message)
    return server


def login(server) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30)
    imap.login("postmaster@localhost", server.postmaster_password())
    return imap


def test_list_shows_special_use_folders(mailbox):
    """
    LIST shows INBOX and the folders created at first login with their RFC 6154 attributes.
    """
    with login(mailbox) as imap:
        typ, lines = imap.list()
        assert typ == "OK"
        text = b"\n".join(lines).decode()
        for name, attribute in (("Sent", "\\Sent"), ("Trash", "\\Trash"), ("Drafts", "\\Drafts")):
            assert re.search(rf"\(.*{re.escape(attribute)}.*\) \"/\" \"?{name}\"?", text), text
        assert "INBOX" in text


def test_select_sends_every_response(mailbox):
    """
    SELECT answers EXISTS, RECENT, FLAGS, PERMANENTFLAGS, UIDVALIDITY, UIDNEXT and UNSEEN, and
    READ-WRITE in the tagged OK.
    """
    with login(mailbox) as imap:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"3"]
        assert imap.untagged_responses.get("UIDNEXT") == [b"4"]
        assert imap.untagged_responses.get("UNSEEN") == [b"1"]
        assert imap.untagged_responses.get("UIDVALIDITY")
        assert b"\\*" in imap.untagged_responses["PERMANENTFLAGS"][0]
        assert "READ-WRITE" in imap.untagged_responses


def test_fetch_metadata_envelope_and_structure(mailbox):
    """
    FETCH of UID, FLAGS, RFC822.SIZE, INTERNALDATE, ENVELOPE and BODYSTRUCTURE comes from the
    index; RFC822.SIZE counts CRLF line ends.
    """
    with login(mailbox) as imap:
        imap.select("INBOX")
        typ, data = imap.fetch("1:2", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)")
        assert typ == "OK"
        first = data[0] if isinstance(data[0], bytes) else data[0][0]
        assert b"UID 1" in first and b"RFC822.SIZE %d" % len(PLAIN) in first
        assert b'"Hello there"' in first and b'"Alice"' in first
        second = b" ".join(d if isinstance(d, bytes) else d[0] for d in data[1:])
        assert b'"MIXED"' in second.upper() and b"INTERNALDATE" in first


def test_body_sections_are_the_stored_bytes(mailbox):
    """
    BODY.PEEK[] is the message as delivered (CRLF), headers come back exactly as stored, MIME
    parts by number, partial fetches by origin, and a non-PEEK fetch sets \\Seen.
    """
    with login(mailbox) as imap:
        imap.select("INBOX")
        _, data = imap.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == PLAIN
        _, data = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in data[0]
        _, data = imap.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT FROM)])")
        assert data[0][1] == b"From: Alice <alice@example.com>\r\nSubject: Hello there\r\n\r\n"
        assert b"\\Seen" in b" ".join(x if isinstance(x, bytes) else x[0] for x in data)
        _, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert data[0][1] == b"Hi Bob,\r\nsee you.\r\n"
        _, data = imap.fetch("1", "(BODY.PEEK[]<0.4>)")
        assert b"BODY[]<0>" in data[0][0] and data[0][1] == b"From"
        _, data = imap.fetch("2", "(BODY.PEEK[1])")
        assert data[0][1] == b"the text"
        _, data = imap.fetch("2", "(BODY.PEEK[2.MIME])")
        assert data[0][1] == b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"


def test_large_body_is_streamed_exactly(mailbox):
    """
    A body larger than the in-memory threshold is streamed from the file, byte-exact.
    """
    with login(mailbox) as imap:
        imap.select("INBOX")
        _, data = imap.fetch("3", "(RFC822.SIZE BODY.PEEK[])")
        assert data[0][1] == BIG
        assert b"RFC822.SIZE %d" % len(BIG) in data[0][0]


def test_store_append_copy_expunge_and_status(mailbox):
    """
    STORE, APPEND (with flags), COPY, STATUS, EXPUNGE behave as RFC 3501 says and reach the
    files.
    """
    with login(mailbox) as imap:
        imap.select("INBOX")
        typ, data = imap.store("1", "+FLAGS", "(\\Flagged Important)")
        assert typ == "OK" and b"\\Flagged" in data[0] and b"Important" in data[0]
        typ, data = imap.append("Sent", "(\\Seen)", None, PLAIN)
        assert typ == "OK"
        typ, data = imap.status("Sent", "(MESSAGES UNSEEN UIDNEXT)")
        assert typ == "OK" and b"MESSAGES 1" in data[0] and b"UNSEEN 0" in data[0]
        assert imap.copy("1:2", "Archive")[0] == "OK"
        assert imap.status("Archive", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 2)")
        imap.store("2", "+FLAGS", "(\\Deleted)")
        typ, data = imap.expunge()
        assert typ == "OK" and data == [b"2"]
        typ, data = imap.fetch("1:*", "(UID)")
        assert [re.search(rb"UID (\d+)", d).group(1) for d in data] == [b"1", b"3"]
    home = mailbox.data_dir / "mail" / "localhost" / "postmaster"
    assert len(list((home / ".Sent" / "cur").iterdir())) == 1
    assert len(list((home / "cur").iterdir())) == 2


def test_folder_commands_and_hostile_names(mailbox):
    """
    CREATE/RENAME/DELETE/SUBSCRIBE work on Maildir++ folders (non-ASCII names in modified
    UTF-7); hostile names get NO and create nothing.
    """
    home = mailbox.data_dir / "mail" / "localhost" / "postmaster"
    with login(mailbox) as imap:
        assert imap.create("Projekte/Entw&APw-rfe")[0] == "OK"
        assert (home / ".Projekte.Entw&APw-rfe" / "cur").is_dir()
        assert imap.subscribe("Projekte/Entw&APw-rfe")[0] == "OK"
        assert imap.rename("Projekte", "Jobs")[0] == "OK"
        assert (home / ".Jobs.Entw&APw-rfe").is_dir()
        typ, data = imap.lsub()
        assert b"Jobs/Entw&APw-rfe" in b" ".join(data)
        typ, data = imap.create("Sent")
        assert typ == "NO" and b"ALREADYEXISTS" in data[0]
        for hostile in ("../evil", "a/../b", ".hidden", "x\\y"):
            typ, data = imap.create(hostile)
            assert typ == "NO", (hostile, data)
        assert not (mailbox.data_dir / "mail" / "localhost" / "evil").exists()
        assert imap.delete("Jobs/Entw&APw-rfe")[0] == "OK"
        typ, data = imap.select("Nope")
        assert typ == "NO" and b"NONEXISTENT" in data[0]


def test_starttls_discards_pipelined_plaintext(server):
    """
    Commands sent in the same packet as STARTTLS are not executed inside TLS (CVE-2011-0411
    class): after the handshake only the client's new command is answered.
    """
    raw = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
    raw.recv(4096)
    raw.sendall(b"a STARTTLS\r\nb LOGIN postmaster@localhost x\r\nc CAPABILITY\r\n")
    reply = b""
    while b"a OK" not in reply:
        reply += raw.recv(4096)
    tls = server.tls().wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"d NOOP\r\n")
    answer = b""
    while b"d OK" not in answer:
        answer += tls.recv(4096)
    assert not re.search(rb"^(b|c) ", answer, re.M), answer
    tls.close()
