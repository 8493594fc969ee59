"""
IMAP over the store, end to end: a real server subprocess, Python's imaplib over TLS, messages
delivered into the maildir by another process (as an MDA would).
"""

from __future__ import annotations

import imaplib
import os
import re
import socket
import threading

import pytest

from conftest import wait_for
from imapwire import read_to_close, tls_session
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
BIG = b"Subject: big\r\n\r\n" + b"".join(b"line %06d of a large message\r\n" % i for i in range(40000))


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
        # small messages and the large one in one FETCH (answered at once for the small ones
        # alone: with a section to stream, the general way), and a small part of the large one
        _, data = imap.fetch("1:3", "(BODY.PEEK[])")
        assert [d[1] for d in data if isinstance(d, tuple)] == [PLAIN, MULTIPART, BIG]
        _, data = imap.fetch("1:2", "(BODY.PEEK[])")
        assert [d[1] for d in data if isinstance(d, tuple)] == [PLAIN, MULTIPART]
        _, data = imap.fetch("3", "(BODY.PEEK[]<5.100>)")
        assert data[0][1] == BIG[5:105]
        # UID FETCH answers carry the UID, asked for or not (RFC 3501 6.4.8)
        _, data = imap.uid("FETCH", "2", "(RFC822.SIZE BODY.PEEK[HEADER])")
        assert re.match(rb"2 \(UID 2 RFC822.SIZE %d BODY\[HEADER\] " % len(MULTIPART), data[0][0]), data


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


def read_until(sock, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {data!r}")
        data += chunk
        assert len(data) < limit
    return data


def raw_session(server):
    """
    A raw IMAPS connection, logged in, INBOX selected.
    """
    sock = server.tls().wrap_socket(socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=15),
                                    server_hostname="localhost")
    read_until(sock, b"\r\n")
    sock.sendall(b'l LOGIN postmaster@localhost "%s"\r\n' % server.postmaster_password().encode())
    read_until(sock, b"l OK")
    sock.sendall(b"s SELECT INBOX\r\n")
    read_until(sock, b"s OK")
    return sock


def test_idle_hears_a_delivery_by_another_process(mailbox):
    """
    A session in IDLE gets "* 4 EXISTS" when another process delivers into the maildir
    (inotify -> sync -> push), well within a second or two; only DONE ends IDLE.
    """
    import subprocess
    import sys

    sock = raw_session(mailbox)
    sock.sendall(b"i IDLE\r\n")
    read_until(sock, b"+ ")
    home = mailbox.data_dir / "mail" / "localhost" / "postmaster"
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from pymaild.store.delivery import deliver;"
                    "deliver(Path(sys.argv[1]), b'Subject: pushed\\n\\nx\\n')", str(home)], check=True)
    assert b"* 4 EXISTS" in read_until(sock, b"* 4 EXISTS")
    sock.sendall(b"DONE\r\n")
    assert b"i OK" in read_until(sock, b"i OK")
    sock.sendall(b"j IDLE\r\n")
    read_until(sock, b"+ ")
    sock.sendall(b"NOOP\r\n")
    assert b"j BAD" in read_until(sock, b"j BAD")
    sock.close()


def test_two_sessions_see_each_others_changes(mailbox):
    """
    Session B sees A's flag change as an untagged FETCH, and A's expunge only at NOOP (never in
    the middle of B's FETCH), with sequence numbers adjusted.
    """
    a, b = raw_session(mailbox), raw_session(mailbox)
    a.sendall(b"1 STORE 2 +FLAGS (\\Flagged)\r\n")
    read_until(a, b"1 OK")
    seen = read_until(b, b"* 2 FETCH")  # pushed to B without B asking
    while not re.search(rb"\* 2 FETCH [^\r]*\r\n", seen):
        seen += b.recv(4096)
    assert re.search(rb"\* 2 FETCH \(FLAGS \([^)]*\\Flagged", seen), seen
    a.sendall(b"2 STORE 1 +FLAGS (\\Deleted)\r\n3 EXPUNGE\r\n")
    assert b"* 1 EXPUNGE" in read_until(a, b"3 OK")
    b.sendall(b"f FETCH 1:* (UID)\r\n")
    fetched = read_until(b, b"f OK")
    assert b"EXPUNGE" not in fetched  # not during FETCH
    got = []

    def expunge_announced():
        b.sendall(b"x%d NOOP\r\n" % len(got))
        got.append(read_until(b, b"x%d OK" % len(got)))
        return b"* 1 EXPUNGE" in got[-1]

    wait_for(expunge_announced, timeout=10, what="B to hear the expunge at NOOP")
    b.sendall(b"g FETCH 1 (UID)\r\n")
    assert b"* 1 FETCH (UID 2)" in read_until(b, b"g OK")
    a.close()
    b.close()


def test_uidplus_move_unselect_id_enable(mailbox):
    """
    APPENDUID, COPYUID, UID EXPUNGE (RFC 4315), MOVE (RFC 6851), UNSELECT, ID and ENABLE.
    """
    with login(mailbox) as imap:
        caps = imap.capabilities
        for cap in ("UIDPLUS", "MOVE", "UNSELECT", "ID", "ENABLE", "IDLE", "NAMESPACE", "SPECIAL-USE"):
            assert cap in caps, cap
        typ, data = imap.append("Drafts", "(\\Draft)", None, PLAIN)
        assert typ == "OK" and re.match(rb"\[APPENDUID \d+ 1\]", data[0]), data
        typ, data = imap.append("Nowhere", None, None, PLAIN)
        assert typ == "NO" and b"TRYCREATE" in data[0]
        imap.select("INBOX")
        typ, data = imap._simple_command("UID", "COPY", "1:2", "Archive")  # the tagged text
        assert typ == "OK" and re.match(rb"\[COPYUID \d+ 1:2 1:2\]", data[0]), data
        typ, data = imap._simple_command("UID", "MOVE", "3", "Archive")
        assert typ == "OK", data
        assert re.search(rb"COPYUID \d+ 3 3", b" ".join(imap.untagged_responses.get("OK", [])))
        assert imap.untagged_responses.pop("EXPUNGE") == [b"3"]
        imap.store("1:2", "+FLAGS", "(\\Deleted)")
        typ, data = imap._simple_command("UID", "EXPUNGE", "2")
        assert typ == "OK" and imap.untagged_responses.pop("EXPUNGE") == [b"2"]
        assert imap.fetch("1:*", "(UID)")[1] == [b"1 (UID 1)"]
        assert imap.xatom("UNSELECT")[0] == "OK"
        assert imap.state == "SELECTED"  # imaplib does not know UNSELECT; the server does:
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            imap._simple_command("FETCH", "1", "(UID)")
        typ, data = imap.xatom("ID", "NIL")
        assert typ == "OK" and b"pymaild" in imap.untagged_responses["ID"][0]
    with login(mailbox) as imap:
        assert imap.xatom("ENABLE", "CONDSTORE")[0] == "OK"
        imap.select("Archive")
        assert imap.fetch("1:*", "(UID)")[1] == [b"1 (UID 1)", b"2 (UID 2)", b"3 (UID 3)"]


def test_search(mailbox):
    """
    SEARCH over flags, headers, text and UIDs; an empty result still answers "* SEARCH";
    a bad charset is NO [BADCHARSET]; a malformed query is BAD.
    """
    with login(mailbox) as imap:
        imap.select("INBOX")
        imap.store("2", "+FLAGS", "(\\Seen)")
        assert imap.search(None, "FROM", "alice") == ("OK", [b"1"])
        assert imap.search(None, "SUBJECT", '"hello THERE"') == ("OK", [b"1"])
        assert imap.search(None, "UNSEEN") == ("OK", [b"1 3"])
        assert imap.search(None, "OR", "SEEN", "LARGER", "100000") == ("OK", [b"2 3"])
        assert imap.search(None, "BODY", "text") == ("OK", [b"2"])
        assert imap.search(None, "TEXT", "Report") == ("OK", [b"2"])
        assert imap.search(None, "NOT", "ALL") == ("OK", [b""])
        assert imap.uid("SEARCH", "UID", "2:*") == ("OK", [b"2 3"])
        assert imap.search("UTF-8", "SUBJECT", "Hello") == ("OK", [b"1"])
        typ, data = imap._simple_command("SEARCH", "CHARSET", "KOI8-R", "SUBJECT", "x")
        assert typ == "NO" and b"BADCHARSET" in data[0]
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            imap.search(None, "FROBNICATE")
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            imap.search(None, "0:4294967296")


def test_children_status_size_and_quota(make_server):
    """
    LIST marks \\HasChildren/\\HasNoChildren and shows a parent that is no folder as \\Noselect;
    STATUS answers SIZE (RFC 8438); GETQUOTAROOT/GETQUOTA report the Maildir++ quota in KiB and
    messages (RFC 9208); SETQUOTA is refused.
    """
    server = make_server('[store]\nquota_storage = "10M"\nquota_messages = 1000\n').start()
    home = server.data_dir / "mail" / "localhost" / "postmaster"
    with login(server) as imap:
        imap.append("INBOX", None, None, PLAIN)
        imap.create("Work/Clients")
        (home / ".Only.Child" / "cur").mkdir(parents=True)  # as Dovecot makes A/B: no .Only
        for sub in ("new", "tmp"):
            (home / ".Only.Child" / sub).mkdir()
        typ, lines = imap.list()
        text = b"\n".join(lines)
        assert re.search(rb"\(\\HasChildren\) \"/\" \"?Work\"?$", text, re.M), text
        assert re.search(rb"\(\\HasNoChildren\) \"/\" \"?Work/Clients\"?$", text, re.M), text
        assert re.search(rb"\(\\Noselect \\HasChildren\) \"/\" \"?Only\"?$", text, re.M), text
        typ, data = imap.status("INBOX", "(MESSAGES SIZE)")
        assert b"SIZE %d" % len(PLAIN) in data[0]
        typ, data = imap.getquotaroot("INBOX")
        assert typ == "OK"
        flat = b" ".join(x for part in data for x in part if isinstance(x, bytes))
        assert b"STORAGE 1 10240" in flat and b"MESSAGE 1 1000" in flat, data
        typ, data = imap.setquota('""', "(STORAGE 1)")
        assert typ == "NO"


def test_create_special_use(server):
    """
    CREATE name (USE (\\Archive)) makes a folder LIST shows with that attribute (RFC 6154); an
    unknown attribute is NO [USEATTR].
    """
    with login(server) as imap:
        typ, data = imap._simple_command("CREATE", "Ablage", "(USE (\\Archive))")
        assert typ == "OK", data
        typ, lines = imap.list('""', "Ablage")
        assert b"\\Archive" in lines[0]
        typ, data = imap._simple_command("CREATE", "Odd", "(USE (\\Bogus))")
        assert typ == "NO" and b"USEATTR" in data[0]


def test_literal_plus(server):
    """
    LITERAL+ (RFC 7888): a {n+} literal is read without a "+" continuation, in LOGIN and in
    APPEND; an oversized non-synchronising literal closes the connection with BYE.
    """
    password = server.postmaster_password().encode()
    sock = tls_session(server)
    sock.sendall(b"l LOGIN {20+}\r\npostmaster@localhost {%d+}\r\n%s\r\n" % (len(password), password))
    reply = read_until(sock, b"l OK")
    assert b"+ " not in reply
    body = b"Subject: plus\r\n\r\nx\r\n"
    sock.sendall(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(body), body))
    reply = read_until(sock, b"a OK")
    assert b"+ " not in reply and b"APPENDUID" in reply
    sock.sendall(b"b APPEND INBOX {999999999999+}\r\n")
    data = read_to_close(sock)
    assert b"* BYE [TOOBIG]" in data


def test_plaintext_networks_allow_login_without_tls(make_server):
    """
    From a network in [auth] plaintext_networks, LOGIN works on port 143 without STARTTLS
    (LOGINDISABLED is not advertised); elsewhere it stays refused (tested above).
    """
    server = make_server('[auth]\nplaintext_networks = ["127.0.0.0/8"]\n').start()
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        assert "LOGINDISABLED" not in imap.capabilities
        assert imap.login("postmaster@localhost", server.postmaster_password())[0] == "OK"
    finally:
        imap.logout()


def test_sasl_ir(server):
    """
    AUTHENTICATE PLAIN with the initial response on the command line (RFC 4959) logs in without
    a continuation; a wrong password is NO.
    """
    import base64

    sock = tls_session(server)
    good = base64.b64encode(b"\0postmaster@localhost\0" + server.postmaster_password().encode())
    bad = base64.b64encode(b"\0postmaster@localhost\0nope")
    sock.sendall(b"c CAPABILITY\r\n")
    assert b"SASL-IR" in read_until(sock, b"c OK")
    sock.sendall(b"x AUTHENTICATE PLAIN " + bad + b"\r\n")
    assert b"x NO" in read_until(sock, b"x NO")
    sock.sendall(b"a AUTHENTICATE PLAIN " + good + b"\r\n")
    reply = read_until(sock, b"a OK")
    assert b"+ " not in reply
    sock.sendall(b"s SELECT INBOX\r\n")
    assert b"s OK" in read_until(sock, b"s OK")


def test_closed_tls_sessions_free_their_descriptors(mailbox):
    """After LOGOUT over TLS (993, and 143 after STARTTLS) the server's descriptors are freed."""
    import os

    def fds() -> int:
        return len(os.listdir(f"/proc/{mailbox.proc.pid}/fd"))

    with login(mailbox) as imap:
        imap.select("INBOX")
    before = fds()
    for _ in range(4):
        with login(mailbox) as imap:
            imap.select("INBOX")
            imap.fetch("1:3", "(BODY.PEEK[])")
        imap = imaplib.IMAP4("127.0.0.1", mailbox.ports["imap"], timeout=30)
        imap.starttls(ssl_context=mailbox.tls())
        imap.login("postmaster@localhost", mailbox.postmaster_password())
        imap.logout()
    wait_for(lambda: fds() <= before, timeout=15, what=f"descriptors back to {before} (now {fds()})")


def test_a_login_is_logged_once_a_failure_with_its_reason(server):
    """
    A good login is one log line, the protocol's (the checker adds none); a wrong password is
    the protocol's line and the checker's reason (bad-password).
    """
    imap = login(server)
    imap.logout()
    bad = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls(), timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        bad.login("postmaster@localhost", "wrong")
    bad.logout()
    wait_for(lambda: "imap login postmaster@localhost from 127.0.0.1: failed" in server.log(),
             what="the failed login's line")
    text = server.log()
    assert text.count("postmaster@localhost from 127.0.0.1: ok") == 1
    assert text.count("login postmaster@localhost: ok") == 0
    assert text.count("login postmaster@localhost: bad-password") == 1


def inotifyWatches(server) -> set[tuple[int, int]]:
    """
    The server's inotify watches, as (file descriptor, watch descriptor) pairs (from /proc: its
    inotify files' fdinfo): a watch removed and added again gets a new watch descriptor.
    """
    import os

    pid, found = server.proc.pid, set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        found.update((int(fd), int(line.split()[1].partition(":")[2], 16))
                     for line in lines if line.startswith("inotify wd:"))
    return found


def test_selecting_the_same_folder_again_keeps_its_watch(mailbox):
    """
    A SELECT closes the previous mailbox only once the new one is open: selecting the same
    folder again (after a STORE of the session's own) keeps the folder's inotify watch, and
    with it the directory stamps the server noted (its sync then lists nothing: see
    tests/store/test_watch.py OwnStampsTests); selecting another folder lifts it.  (The watch
    is put in place just after the SELECT's answer is written, before the session's next
    command: the NOOPs.)
    """
    imap = login(mailbox)
    try:
        before = inotifyWatches(mailbox)  # (the server's others)
        assert imap.select("INBOX")[0] == "OK" and imap.noop()[0] == "OK"
        inbox = inotifyWatches(mailbox) - before
        assert len(inbox) == 2  # (new/ and cur/)
        assert imap.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
        assert imap.select("INBOX")[0] == "OK" and imap.noop()[0] == "OK"
        assert inotifyWatches(mailbox) == before | inbox
        assert imap.select("Sent")[0] == "OK" and imap.noop()[0] == "OK"
        assert not inotifyWatches(mailbox) & inbox
    finally:
        imap.logout()


def test_a_folder_renamed_then_selected_is_watched(mailbox):
    """
    SELECT A, RENAME A B, SELECT B: the new name's folder shares A's directories (the kernel
    gives the same inode one watch), so A's mailbox is closed before B's opens, and B is
    watched afterwards.
    """
    imap = login(mailbox)
    try:
        assert imap.create("Work")[0] == "OK"
        before = inotifyWatches(mailbox)
        assert imap.select("Work")[0] == "OK" and imap.noop()[0] == "OK"
        assert len(inotifyWatches(mailbox) - before) == 2
        assert imap.rename("Work", "Done")[0] == "OK"
        assert imap.select("Done")[0] == "OK" and imap.noop()[0] == "OK"
        assert len(inotifyWatches(mailbox) - before) == 2
    finally:
        imap.logout()


def test_a_file_whose_name_is_not_utf8_is_left_out(mailbox):
    """
    A file another program put in cur/ under a name that is not UTF-8: INBOX opens with the
    other messages (the sync raised before, and the folder could not be opened), the log names
    the file once, and renamed it is found as new mail.
    """
    home = mailbox.data_dir / "mail" / "localhost" / "postmaster"
    odd = os.fsencode(home / "cur") + b"/1700000000.M1P2.h\xf3st,S=20,W=21:2,S"
    with open(odd, "wb") as f:
        f.write(b"Subject: odd\r\n\r\nhi\r\n")
    with login(mailbox) as imap:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"3"]
        imap.noop()
    wait_for(lambda: "left out" in mailbox.log(), timeout=10)
    assert mailbox.log().count("not UTF-8") == 1 and "h\\xf3st" in mailbox.log()
    os.rename(odd, os.fsencode(home / "cur") + b"/1700000000.M1P2.host,S=20,W=21:2,S")
    with login(mailbox) as imap:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"4"]
        assert b"Subject: odd" in imap.fetch("4", "(BODY.PEEK[])")[1][0][1]


def test_deleting_a_selected_folder_leaves_the_others_watched(mailbox):
    """
    A folder deleted while another session has it selected: its watch goes, the others stay
    (Twisted's INotify closed the whole notifier at the deleted directory's IN_DELETE_SELF),
    and a SELECT still works.
    """
    a, b = login(mailbox), login(mailbox)
    try:
        assert a.create("Gone")[0] == "OK"
        before = inotifyWatches(mailbox)
        assert a.select("INBOX")[0] == "OK" and a.noop()[0] == "OK"
        inbox = inotifyWatches(mailbox) - before
        assert len(inbox) == 2
        assert b.select("Gone")[0] == "OK" and b.noop()[0] == "OK"
        assert a.delete("Gone")[0] == "OK"
        assert a.noop()[0] == "OK"
        wait_for(lambda: inotifyWatches(mailbox) == before | inbox, timeout=10,
                 what=f"INBOX's watches alone (now {inotifyWatches(mailbox)})")
        assert b.select("INBOX")[0] == "OK" and b.noop()[0] == "OK"
        assert inotifyWatches(mailbox) == before | inbox
    finally:
        for c in (a, b):
            try:
                c.logout()
            except Exception:
                pass


def test_a_body_fetched_while_another_session_changes_its_flags(mailbox):
    """
    FETCH BODY.PEEK[] of a message whose file another session renames meanwhile (a STORE of a
    flag, again and again) answers with the body every time: a file renamed between the read
    of its index row and the open is looked up again, not answered with NO.
    """
    answers = []

    def fetch(imap, i):
        typ, data = imap.fetch("1" if i % 2 else "1:2", "(BODY.PEEK[])")
        # (the other session's flag changes come as untagged FETCH responses too)
        bodies = [item[1] for item in data if isinstance(item, tuple)]
        answers.append((typ, bodies if typ == "OK" else data, [PLAIN] if i % 2 else [PLAIN, MULTIPART]))

    stores = whileFlagging(mailbox, "1:3", fetch, 400)
    assert len(stores) > 50 and set(stores) == {"OK"}
    bad = [(typ, got) for typ, got, expected in answers if typ != "OK" or got != expected]
    assert not bad, bad[:3]


def test_text_searched_while_another_session_changes_flags(mailbox):
    """
    SEARCH BODY and TEXT, which read the message files, find the same messages while another
    session renames those files again and again (STORE of a flag).
    """
    answers = []

    def search(imap, i):
        typ, data = imap.search(None, "BODY", '"see you"') if i % 2 else imap.search(None, "TEXT", '"large message"')
        answers.append((typ, data, [b"1"] if i % 2 else [b"3"]))

    stores = whileFlagging(mailbox, "1:3", search, 200)
    assert len(stores) > 50 and set(stores) == {"OK"}
    bad = [(typ, got) for typ, got, expected in answers if typ != "OK" or got != expected]
    assert not bad, bad[:3]


def whileFlagging(server, messages, action, times):
    """
    C{action(imap, i)} C{times} times in a read-only session while another session sets and
    clears \\Flagged on C{messages}, renaming their files; the other session's STORE answers.
    """
    stop = threading.Event()
    stores = []

    def flagger():
        with login(server) as imap:
            imap.select("INBOX")
            while not stop.is_set():
                for change in ("+FLAGS.SILENT", "-FLAGS.SILENT"):
                    typ, _ = imap.store(messages, change, "(\\Flagged)")
                    stores.append(typ)

    worker = threading.Thread(target=flagger)
    worker.start()
    try:
        with login(server) as imap:
            imap.select("INBOX", readonly=True)
            for i in range(times):
                action(imap, i)
    finally:
        stop.set()
        worker.join(30)
    return stores


def test_pipelined_commands_answered_at_once_keep_their_order(server):
    """
    A command answered before its handler returns (a FETCH of flags, or of a small body, from
    the index on the reactor) ends its hold on the input there and then, and the next pipelined
    line is read in the same turn, not one reactor turn later.  2,000 commands in one write,
    with commands answered from store threads (STORE, SEARCH, a LITERAL+ APPEND) among them,
    are each answered once and in order, each FETCH's own untagged response just before its
    tagged OK; none is refused (a release that called itself once a line would run out of
    stack long before 2,000).
    """
    from imapwire import logged_in, read_tagged

    home = server.data_dir / "mail" / "localhost" / "postmaster"
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for n in range(1, 6):
        deliver(home, b"From: a@example.com\r\nSubject: number %d\r\n\r\nbody %d\r\n" % (n, n))
    sock = logged_in(server, b"INBOX")
    sock.sendall(b"w FETCH 1:* (FLAGS)\r\n")
    assert b"w OK" in read_tagged(sock, b"w")  # (the flag index kept: the small FETCHes below use it)
    lines, expect = [], []
    for i in range(2000):
        n = i % 5 + 1
        kind = i % 10
        if i % 400 == 399:
            lines.append(b"t%d APPEND Sent {4+}\r\nhi\r\n" % i)
        elif i % 250 == 7:
            lines.append(b"t%d STORE %d +FLAGS.SILENT (\\Flagged)" % (i, n))
        elif i % 250 == 8:
            lines.append(b"t%d SEARCH SUBJECT number" % i)
        elif kind < 4:
            lines.append(b"t%d FETCH %d (FLAGS)" % (i, n))
        elif kind < 8:
            lines.append(b"t%d FETCH %d (BODY.PEEK[])" % (i, n))
        else:
            lines.append(b"t%d NOOP" % i)
        expect.append(b"t%d" % i)
    sock.sendall(b"\r\n".join(lines) + b"\r\n")
    answer = read_tagged(sock, b"t1999")
    sock.close()
    tagged = re.findall(rb"(?m)^(t\d+) (OK|NO|BAD)", answer)
    assert [t for t, _ in tagged] == expect
    assert {state for _, state in tagged} == {b"OK"}
    for i, line in enumerate(lines):
        if b" FETCH " not in line:
            continue
        n = int(line.split()[2])
        before = answer[: answer.index(b"\r\nt%d OK" % i)]
        last = before[before.rindex(b"\r\nt%d " % (i - 1)):] if i else before
        if b"(FLAGS)" in line:
            assert re.search(rb"\* %d FETCH \(FLAGS \([^)]*\)\)$" % n, last), (i, last[-200:])
        else:
            assert last.endswith(b"body %d\r\n)" % n), (i, last[-200:])
