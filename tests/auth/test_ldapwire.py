"""
The reactor's LDAP login (pymaild/auth/ldapwire.py): its requests byte for byte against ldap3's
own encoder (binds, searches over a corpus of RFC 4515 filters and filter templates with hostile
logins, message IDs across the BER length boundaries, StartTLS, Unbind, Abandon), and against a
real slapd (tests/ldapserver.py): 50 logins at once pipelined, a connection dropped mid-request
by a proxy, a notice of disconnection, a SIGSTOPped slapd, LDAPS and StartTLS with the
certificate's names checked.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from ldap3 import DEREF_ALWAYS, SIMPLE, SUBTREE, BASE
from ldap3.core.exceptions import LDAPException
from ldap3.operation.abandon import abandon_operation
from ldap3.operation.bind import bind_operation
from ldap3.operation.extended import extended_operation
from ldap3.operation.search import compile_filter, parse_filter, search_operation
from ldap3.operation.unbind import unbind_operation
from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
from ldap3.utils.asn1 import encode
from ldap3.utils.conv import escape_filter_chars

from pymaild.auth import ldapwire
from pymaild.auth.ldap import LdapChecker, LdapClient, LdapSettings
from pymaild.errors import TemporaryFailure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ldapserver  # noqa: E402


# --- byte for byte against ldap3 ------------------------------------------------------------------


def ldap3Message(messageId: int, name: str, request) -> bytes:
    m = LDAPMessage()
    m["messageID"] = MessageID(messageId)
    m["protocolOp"] = ProtocolOp().setComponentByName(name, request)
    return encode(m)


def ldap3Filter(text: str) -> bytes:
    return encode(compile_filter(parse_filter(text, None, True, True, None, True).elements[0]))


MESSAGE_IDS = [1, 2, 127, 128, 255, 256, 32767, 32768, 65535, 65536, 8388607, 8388608, 2 ** 24, 2 ** 31 - 1]

LONG = "x" * 200
LONGER = "é" * 40000  # (80,000 bytes: a 3-byte length)

FILTERS = [
    "(uid=alice)", "(objectClass=*)", "( uid = alice )", "(uid=al ice)", "(&(objectClass=inetOrgPerson)(uid=a))",
    "(|(uid=a)(mail=a@example.com)(mailLocalAddress=a@example.com))", "(!(employeeType=disabled))",
    "(&(objectClass=inetOrgPerson)(|(uid=bob)(mail=bob))(!(employeeType=disabled)))",
    "( & ( uid=a ) ( mail=b ) )", "(&(a=1)\n  (b=2))",
    "(cn=ab*)", "(cn=*ab)", "(cn=*ab*)", "(cn=a*b*c*d)", "(cn=a**b)", "(cn=*\\2a*)",
    "(uidNumber>=1000)", "(uidNumber<=2000)", "(cn~=smith)", "(cn >= a)", "(cn<= b )",
    "(cn:=Alice)", "(cn:dn:=Alice)", "(cn:caseExactMatch:=Alice)", "(cn:dn:2.5.13.5:=Alice)", "(:caseExactMatch:=x)",
    "(:dn:2.5.13.5:=x)", "(o:dn:=Example)", "(userAccountControl:1.2.840.113556.1.4.803:=2)",
    "(cn=\\28x\\29)", "(cn=a\\5cb)", "(cn=a\\zzb)", "(cn=a\\)", "(cn=a\\4)", "(cn=\\e9t\\c3\\a9)", "(cn=été)",
    "(cn=日本語)", f"(cn={LONG})", f"(description={LONGER})", "(cn=a\\5)", "(cn=\\41\\42)",
    "(&(cn=a)(|(sn=b)(!(sn=c))(sn=d*e)))", "(proxyAddresses=smtp:a\\2ab@corp.example.com)",
    "(objectGUID=\\4f\\2e\\9a\\1c)", "(member=cn=x,ou=groups,dc=example,dc=com)",
]

BAD_FILTERS = ["", "uid=a", "(uid=a", "(&)", "(!(a=b)(c=d))", "(a=b)(c=d)", "((a=b))", "(uid)", "(:=x)", "(a:b:c:d:=x)",
               "(cn=a(b)", "(&(a=b)", "(a=b))"]

TEMPLATES = [
    "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",
    "(&(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))(!(employeeType=disabled)))",
    "(uid={login})", "(mail={login}@example.com)", "(cn={login}*)", "(cn=*{login}*)", "(cn:dn:={login})",
    "(sAMAccountName={login})", "(uid=\\2a{login})", "(uid=a\\zz{login})", "(uid={login}\\4)", "(uid= {login} )",
    "(uid={login}{login})",
]

LOGINS = ["alice", "Alice@Example.com", "*", "*)(uid=*", "al*", "alice)(|(uid=*", "alice\\2a", "a\\b", "\\5c", "é",
          "日本語", "a b", "x" * 130, "y" * 70000, "a=b", "(", ")", "\\", "~", ":dn:", "a\x01b"]


@pytest.mark.parametrize("messageId", MESSAGE_IDS)
def test_bind_bytes_are_ldap3s(messageId):
    for dn, password in [("uid=alice,ou=people,dc=example,dc=com", "secret"), ("cn=é,dc=example", "pässwörd"),
                         ("uid=" + "x" * 300, "p" * 200), ("", "x"), ("cn=a", "ℌ\u00adx")]:
        expected = ldap3Message(messageId, "bindRequest", bind_operation(3, SIMPLE, dn or "x", password, auto_encode=True))
        if not dn:
            continue
        assert ldapwire.bindRequest(messageId, dn, ldapwire.simplePassword(password)) == expected


@pytest.mark.parametrize("messageId", MESSAGE_IDS)
def test_search_bytes_are_ldap3s(messageId):
    for text in FILTERS[:8] + [f"(cn={LONGER})"]:
        for base, scope, attributes in [("dc=example,dc=com", SUBTREE, ["mail", "mailLocalAddress", "entryUUID"]),
                                        ("uid=é,ou=people,dc=example,dc=com", BASE, ["objectGUID"])]:
            expected = ldap3Message(messageId, "searchRequest", search_operation(
                base, text, scope, DEREF_ALWAYS, attributes, 100, 5, False, True, True, None, None, True))
            ours = ldapwire.searchRequest(messageId, base, 2 if scope == SUBTREE else 0, ldapwire.encodeFilter(text),
                                          ldapwire.attributeList(attributes), 100, 5)
            assert ours == expected, text


@pytest.mark.parametrize("text", FILTERS)
def test_filters_are_encoded_as_ldap3_encodes_them(text):
    assert ldapwire.encodeFilter(text) == ldap3Filter(text)


@pytest.mark.parametrize("text", BAD_FILTERS)
def test_filters_ldap3_refuses_are_refused(text):
    with pytest.raises(LDAPException):
        ldap3Filter(text)
    with pytest.raises(ldapwire.FilterError):
        ldapwire.encodeFilter(text)


def test_empty_substring_filters_are_refused_as_ldap3_refuses_them():
    from pyasn1.error import PyAsn1Error

    for text in ("(cn=**)", "(cn= *)", "(cn=***)"):
        with pytest.raises(PyAsn1Error):
            ldap3Filter(text)
        with pytest.raises(ldapwire.FilterError):
            ldapwire.encodeFilter(text)


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_with_hostile_logins_are_ldap3s_filters(template):
    compiled = ldapwire.FilterTemplate(template)
    for login in LOGINS:
        assert compiled.encode(login) == ldap3Filter(template.replace("{login}", escape_filter_chars(login))), login


def test_templates_parsed_once_only_when_a_login_cannot_change_them():
    assert ldapwire.FilterTemplate("(uid={login})")._tree is not None
    assert ldapwire.FilterTemplate("(uid=a\\zz{login})")._tree is None  # (ldap3 re-escapes such a value)
    assert ldapwire.FilterTemplate("({login}=x)")._tree is None


@pytest.mark.parametrize("messageId", MESSAGE_IDS)
def test_starttls_unbind_and_abandon_bytes_are_ldap3s(messageId):
    assert ldapwire.startTlsRequest(messageId) == ldap3Message(
        messageId, "extendedReq", extended_operation("1.3.6.1.4.1.1466.20037"))
    assert ldapwire.unbindRequest(messageId) == ldap3Message(messageId, "unbindRequest", unbind_operation())
    assert ldapwire.abandonRequest(1, messageId) == ldap3Message(1, "abandonRequest", abandon_operation(messageId))


def test_certificate_names_are_checked_as_ldap3_checks_them(tmp_path):
    import ssl

    cert = _certificate(tmp_path, "ldap.other.example")
    # (the dictionary ssl.SSLObject.getpeercert() gives, from the file)
    names = ssl._ssl._test_decode_cert(str(cert))
    ldapwire.checkHostname(names, "ldap.other.example")
    for host in ("127.0.0.1", "localhost", "other.example", "x.ldap.other.example"):
        with pytest.raises(ValueError):
            ldapwire.checkHostname(names, host)


class _MemoryServer:
    """
    The server's end of an L{ldapwire.LdapProtocol}'s TLS, in memory: an C{ssl.SSLObject} with
    a certificate for C{name}, fed what the client wrote to its C{StringTransport}.  The
    client starts TLS for C{host} (C{name} unless given).
    """

    def __init__(self, directory: Path, name: str, host: str | None = None):
        import ssl

        from twisted.internet.testing import StringTransport

        cert = _certificate(directory, name)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(str(cert), str(directory / "other-key.pem"))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = server.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.shaken = False
        self.notified = False  # (the client's close_notify came)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.load_verify_locations(cafile=str(cert))
        from twisted.internet.task import Clock

        self.protocol = ldapwire.LdapProtocol(Clock(), 5, "ldaps://test")  # (its timers on no real reactor)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.handshake = self.protocol.startTLS(client, host or name)

    def pump(self) -> bytes:
        """Hand the client's bytes to the server, its answers back, until the client is quiet;
        the plaintext the server read."""
        import ssl

        plain = b""
        for _ in range(10):
            sent = self.transport.value()
            self.transport.clear()
            if not sent:
                break
            self.incoming.write(sent)
            try:
                if not self.shaken:
                    self.tls.do_handshake()
                    self.shaken = True
                while chunk := self.tls.read(65536):
                    plain += chunk
                self.notified = True  # (b"": the client's close_notify; the server's own goes back)
                try:
                    self.tls.unwrap()
                except ssl.SSLError:
                    pass
            except ssl.SSLWantReadError:
                pass
            answer = self.outgoing.read()
            if answer:
                self.protocol.dataReceived(answer)
        return plain

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.protocol.dataReceived(self.outgoing.read())


def _warnings(events) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


@pytest.fixture
def logged():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_tls_in_memory_carries_requests_and_answers(tmp_path, logged):
    server = _MemoryServer(tmp_path, "ldap.example")
    server.pump()
    answered = []
    server.handshake.addCallback(answered.append)
    assert answered == [server.protocol] and "subjectAltName" in server.protocol.peerCertificate()
    got = []
    server.protocol.request(ldapwire.bindRequest, "cn=x", b"pw").addCallback(got.append)
    assert server.pump() == ldapwire.bindRequest(1, "cn=x", b"pw")
    server.send(bytes.fromhex("300c02010161070a010004000400"))  # bindResponse success, ID 1
    assert got[0]["result"] == 0
    # closing: an UnbindRequest and close_notify go out; the server's close_notify, arriving
    # after, is no event
    server.protocol.close()
    assert server.pump() == ldapwire.unbindRequest(2)
    assert server.notified and server.transport.disconnecting
    assert _warnings(logged) == []


def test_tls_in_memory_a_bad_record_drops_the_connection(tmp_path, logged):
    server = _MemoryServer(tmp_path, "ldap.example")
    server.pump()
    failed = []
    server.protocol.request(ldapwire.bindRequest, "cn=x", b"pw").addErrback(failed.append)
    server.pump()
    server.protocol.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data that does not decrypt
    assert server.protocol.closed and server.transport.disconnected  # (StringTransport's mark of an abort)
    assert any("TLS" in w and "dropped" in w for w in _warnings(logged))


def test_tls_in_memory_the_servers_close_notify_ends_the_connection(tmp_path, logged):
    import ssl

    server = _MemoryServer(tmp_path, "ldap.example")
    server.pump()
    try:
        server.tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    server.protocol.dataReceived(server.outgoing.read())
    assert server.protocol.closed and server.transport.disconnected
    assert _warnings(logged) == []


@pytest.mark.parametrize("injected", [b"", b"\x30\x0c\x02\x01\x02\x61\x07\x0a\x01\x00\x04\x00"])
def test_data_in_the_clear_after_the_starttls_answer_drops_the_connection(tmp_path, logged, injected):
    """
    Bytes after the StartTLS answer in the same read (here the start of a forged bindResponse
    for the next message ID, which the real, encrypted answer would complete) would be taken
    for the server's once TLS is up: the connection is dropped (RFC 4513 3.1.1).
    """
    import ssl

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    cert = _certificate(tmp_path, "ldap.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(cert))
    protocol = ldapwire.LdapProtocol(Clock(), 5, "ldap://test")
    transport = StringTransport()
    protocol.makeConnection(transport)
    handshakes = []
    protocol.request(ldapwire.startTlsRequest).addCallback(
        lambda answer: handshakes.append(protocol.startTLS(context, "ldap.example")))
    assert transport.value() == ldapwire.startTlsRequest(1)
    transport.clear()
    answer = bytes.fromhex("300c02010178070a010004000400")  # extendedResp, success, message 1
    protocol.dataReceived(answer + injected)
    assert len(handshakes) == 1
    if injected:
        assert protocol.closed and transport.disconnected
        assert any("StartTLS" in w for w in _warnings(logged))
        handshakes[0].addErrback(lambda f: None)
    else:
        assert not protocol.closed and transport.value()[:1] == b"\x16"  # (the ClientHello)
        assert _warnings(logged) == []


def _startTlsAnswered(tmp_path):
    """
    A plain connection whose StartTLS was answered (the ClientHello sent), and the server's
    end of the TLS to come, an C{ssl.SSLObject}: C{(protocol, transport, server TLS, the
    server's first flight)}.
    """
    import ssl

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    cert = _certificate(tmp_path, "ldap.example")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(tmp_path / "other-key.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = server.wrap_bio(incoming, outgoing, server_side=True)
    protocol = ldapwire.LdapProtocol(Clock(), 5, "ldap://test")
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.request(ldapwire.startTlsRequest).addCallback(
        lambda answer: protocol.startTLS(client, "ldap.example").addErrback(lambda f: None))
    transport.clear()
    protocol.dataReceived(bytes.fromhex("300c02010178070a010004000400"))
    incoming.write(transport.value())  # (the ClientHello)
    transport.clear()
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return protocol, transport, tls, outgoing.read()


FORGED = b"\x30\x0c\x02\x01\x02\x61\x07\x0a\x01\x00\x04\x00\x04\x00"  # a bindResponse, success, message 2


@pytest.mark.parametrize("shape", ["a read of its own", "before the server's flight", "after the server's flight"])
def test_data_in_the_clear_during_the_handshake_drops_the_connection(tmp_path, shape):
    """
    Plaintext spliced in after the StartTLS answer but in another read goes to the TLS layer as
    records: the handshake fails, or the record does not decrypt; either way the connection is
    dropped and nothing of it is taken for an answer.
    """
    protocol, transport, _, flight = _startTlsAnswered(tmp_path)
    if shape == "a read of its own":
        protocol.dataReceived(FORGED)
        protocol.dataReceived(flight)
    elif shape == "before the server's flight":
        protocol.dataReceived(FORGED + flight)
    else:
        protocol.dataReceived(flight + FORGED)
    assert protocol.closed and transport.disconnected
    assert protocol._pending == {}


def test_starttls_refuses_data_in_the_clear_left_from_before(tmp_path, logged):
    """
    TLS started later than from the StartTLS answer's callback, with bytes in the clear still
    unparsed (the start of a forged message): refused, the connection dropped.
    """
    import ssl

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    protocol = ldapwire.LdapProtocol(Clock(), 5, "ldap://test")
    transport = StringTransport()
    protocol.makeConnection(transport)
    answers = []
    protocol.request(ldapwire.startTlsRequest).addCallback(answers.append)
    protocol.dataReceived(bytes.fromhex("300c02010178070a010004000400") + FORGED[:6])
    assert answers and not protocol.closed
    with pytest.raises(ldapwire.ConnectionBroken):
        protocol.startTLS(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "ldap.example")
    assert protocol.closed and transport.disconnected
    assert any("clear" in w for w in _warnings(logged))


def test_tls_in_memory_another_name_fails_the_handshake(tmp_path):
    server = _MemoryServer(tmp_path, "ldap.other.example", host="ldap.example")
    server.pump()
    failures = []
    server.handshake.addErrback(failures.append)
    assert failures and failures[0].check(ldapwire.ConnectionBroken)
    assert "ldap.example" in str(failures[0].value) and server.protocol.closed


def _messageId(request: bytes) -> int:
    """The message ID of a BER-encoded LDAPMessage (short or long length form)."""
    i = 2 if request[1] < 0x80 else 2 + (request[1] & 0x7F)
    assert request[i] == 0x02
    return int.from_bytes(request[i + 2 : i + 2 + request[i + 1]], "big")


@pytest.mark.parametrize("forged", ["none", "whole", "start"])
def test_ldap3_starttls_takes_nothing_sent_in_the_clear(tmp_path, forged):
    """
    The directory threads' ldap3 client (LdapClient, SYNC strategy) against a server that
    answers StartTLS with a forged bindResponse (success, the next message ID) in the same
    segment, whole or its first bytes: the service account's bind fails (ldap3 keeps no
    buffer across the TLS switch and refuses a message for an ID it has not sent), and
    the true server's refusal is never overridden.  "none" is the control: the same server
    without the forgery completes TLS and the bind.
    """
    import socket
    import ssl
    import threading

    from pymaild.auth.ldap import LdapUnavailable

    cert = _certificate(tmp_path, "ldap.example", ip="127.0.0.1")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(15)  # (the thread ends even if the client never comes)
    binds = []

    def answer(tag: int, ident: int, code: int) -> bytes:  # LDAPResult: code, "", "" (49: invalidCredentials)
        return ldapwire._message(ident, ldapwire._tlv(tag, bytes((0x0A, 1, code, 4, 0, 4, 0))))

    def bindResponse(ident: int, code: int) -> bytes:
        return answer(0x61, ident, code)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(10)
        tls = None
        try:
            request = conn.recv(4096)  # the StartTLS extendedRequest
            ident = _messageId(request)
            # (message IDs count on across ldap3's connections in a process: they pass 127
            # in a full run, and take two bytes)
            spliced = bindResponse(ident + 1, 0) if forged != "none" else b""
            conn.sendall(answer(0x78, ident, 0) + (spliced if forged == "whole" else spliced[:5]))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(tmp_path / "other-key.pem"))
            tls = context.wrap_socket(conn, server_side=True)
            request = tls.recv(4096)  # the bind, in TLS
            binds.append(_messageId(request))
            # success only in the control: a client that took the forgery sees success anyway
            tls.sendall(bindResponse(_messageId(request), 0 if forged == "none" else 49))
            tls.recv(4096)
        except (OSError, ssl.SSLError):
            pass
        finally:
            (tls or conn).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = LdapSettings(urls=(f"ldap://127.0.0.1:{listener.getsockname()[1]}",), base_dn="dc=example,dc=org",
                            bind_dn="cn=svc,dc=example,dc=org", bind_password="secret", start_tls=True,
                            ca_file=str(cert), timeout=1)
    client = LdapClient(settings)
    try:
        if forged == "none":
            client._open(settings.bind_dn, settings.bind_password).unbind()
        else:
            with pytest.raises(LdapUnavailable):
                client._open(settings.bind_dn, settings.bind_password)
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive()
    # the control's bind went through TLS; the forged cases were refused before TLS (the forged
    # answer, or the wait for its end)
    assert len(binds) == (1 if forged == "none" else 0)


def _certificate(directory: Path, name: str, ip: str | None = None) -> Path:
    """A self-signed certificate (and key) naming only C{name} (and C{ip})."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(name)] + ([x509.IPAddress(ipaddress.ip_address(ip))] if ip else [])), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "other-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path = directory / "other-cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --- against slapd -------------------------------------------------------------------------------


settings = ldapserver.checkerSettings


class _Proxy(portforward.ProxyServer):
    """A TCP proxy to slapd that can drop a connection when a request comes, or send a notice of disconnection."""

    def dataReceived(self, data):
        if self.factory.dropNext > 0:
            self.factory.dropNext -= 1
            self.factory.dropped += 1
            self.transport.abortConnection()
            return
        if self.factory.notice:
            self.factory.notice = False
            # (extendedResp, messageID 0, unavailable (52), responseName 1.3.6.1.4.1.1466.20036)
            oid = b"1.3.6.1.4.1.1466.20036"
            body = b"\x0a\x01\x34\x04\x00\x04\x00" + bytes((0x8A, len(oid))) + oid
            op = bytes((0x78, len(body))) + body
            self.transport.write(bytes((0x30, len(op) + 3)) + b"\x02\x01\x00" + op)
            return
        super().dataReceived(data)


class _ProxyFactory(portforward.ProxyFactory):
    protocol = _Proxy
    dropNext = 0
    dropped = 0
    notice = False


class _WireCase(unittest.TestCase):
    def setUp(self):
        if not ldapserver.slapd_available():
            raise unittest.SkipTest("slapd is not installed (scripts/test installs it)")
        self.tmp = Path(tempfile.mkdtemp(prefix="pymaild-ldapwire-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.slapd = ldapserver.Slapd(self.tmp / "slapd")
        self.slapd.start()
        self.addCleanup(self.slapd.close)
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="test-ldapwire")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def use(self, s: LdapSettings) -> None:
        self.client = LdapClient(s)
        self.checker = LdapChecker(self.client, self.pool, reactor)
        self.addCleanup(self.checker.close)

    def login(self, user, password):
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def proxy(self) -> _ProxyFactory:
        factory = _ProxyFactory("127.0.0.1", int(self.slapd.url.rsplit(":", 1)[1]))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory.url = f"ldap://127.0.0.1:{port.getHost().port}"
        return factory


USERS = [("alice", "alice@example.com"), ("bob", "bob@example.com"), ("dave", "dave@example.com"),
         ("a.smith@example.com", None), ("carol", None), ("nobody", None)]


class PipelineCase(_WireCase):
    @defer.inlineCallbacks
    def test_fifty_logins_at_once_are_pipelined_and_all_answered_right(self):
        self.use(settings(self.slapd.url, pool_size=4))
        most = [0]
        request = ldapwire.LdapProtocol.request

        def counting(protocol, *args):
            d = request(protocol, *args)
            most[0] = max(most[0], protocol.outstanding)
            return d

        self.patch(ldapwire.LdapProtocol, "request", counting)
        asked = []
        for i in range(50):
            user, primary = USERS[i % len(USERS)]
            uid = user.split("@")[0] if primary else "alice"
            right = i % 3 != 0
            password = ldapserver.PASSWORDS.get(uid, "x") if right else "wrong"
            asked.append(((primary if right else None), self.login(user, password)))
        results = yield defer.DeferredList([d for _, d in asked], consumeErrors=True)
        for (expected, _), (ok, value) in zip(asked, results):
            if expected:
                self.assertEqual((ok, value), (True, expected))
            else:
                self.assertFalse(ok)
                self.assertTrue(value.check(UnauthorizedLogin), value)
        self.assertGreater(most[0], 10)  # (the searches outstanding together on the service connection)
        self.assertLessEqual(self.checker.wire._binders, 4)


class BrokenConnectionCase(_WireCase):
    @defer.inlineCallbacks
    def test_a_connection_dropped_mid_request_is_tried_once_more(self):
        proxy = self.proxy()
        self.use(settings(proxy.url))
        alice = ldapserver.PASSWORDS["alice"]
        self.assertEqual((yield self.login("alice", alice)), "alice@example.com")
        proxy.dropNext = 1  # (the search's connection: the second try, on a new one, answers)
        self.assertEqual((yield self.login("alice", alice)), "alice@example.com")
        self.assertEqual(proxy.dropped, 1)
        proxy.dropNext = 2  # (the search, then its second try: a temporary failure)
        yield self.assertFailure(self.login("alice", alice), TemporaryFailure)
        self.assertEqual(proxy.dropped, 3)
        self.assertEqual((yield self.login("alice", alice)), "alice@example.com")
        yield self.assertFailure(self.login("alice", "wrong"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_a_notice_of_disconnection_drops_the_connection(self):
        proxy = self.proxy()
        self.use(settings(proxy.url))
        alice = ldapserver.PASSWORDS["alice"]
        self.assertEqual((yield self.login("alice", alice)), "alice@example.com")
        first = self.checker.wire._service
        proxy.notice = True
        self.assertEqual((yield self.login("alice", alice)), "alice@example.com")
        self.assertTrue(first.closed)
        self.assertIsNot(self.checker.wire._service, first)

    @defer.inlineCallbacks
    def test_an_unreachable_directory_is_a_temporary_failure(self):
        self.use(settings("ldap://127.0.0.1:1"))
        yield self.assertFailure(self.login("alice", ldapserver.PASSWORDS["alice"]), TemporaryFailure)


class StoppedCase(_WireCase):
    @defer.inlineCallbacks
    def test_a_sigstopped_directory_fails_temporarily_within_the_timeout(self):
        self.use(settings(self.slapd.url, timeout=1.0))
        bob = ldapserver.PASSWORDS["bob"]
        self.assertEqual((yield self.login("bob", bob)), "bob@example.com")
        os.kill(self.slapd.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(self.slapd.process.pid, signal.SIGCONT))
        started = time.monotonic()
        yield self.assertFailure(self.login("bob", bob), TemporaryFailure)
        self.assertLess(time.monotonic() - started, 1.8)
        started = time.monotonic()
        yield self.assertFailure(self.login("bob", bob), TemporaryFailure)  # (the pause: at once)
        self.assertLess(time.monotonic() - started, 0.2)
        os.kill(self.slapd.process.pid, signal.SIGCONT)
        self.client._downUntil = 0
        self.assertEqual((yield self.login("bob", bob)), "bob@example.com")


class TLSWireCase(_WireCase):
    @defer.inlineCallbacks
    def test_ldaps_and_starttls_connections_are_tls(self):
        for s in (settings(self.slapd.ldapsUrl, ca_file=str(self.slapd.certPath)),
                  settings(self.slapd.url, start_tls=True, ca_file=str(self.slapd.certPath))):
            self.use(s)
            self.assertEqual((yield self.login("alice", ldapserver.PASSWORDS["alice"])), "alice@example.com")
            yield self.assertFailure(self.login("alice", "wrong"), UnauthorizedLogin)
            for protocol in [self.checker.wire._service] + self.checker.wire._idle:
                self.assertIn("subjectAltName", protocol.peerCertificate())
                self.assertIn(protocol._tls.version(), ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_a_certificate_from_another_ca_is_a_temporary_failure(self):
        other = self.tmp / "other-ca.pem"  # (the right name, 127.0.0.1, signed by another key)
        ldapserver.generateSelfSigned(other, self.tmp / "other-ca-key.pem", "127.0.0.1")
        for s in (settings(self.slapd.ldapsUrl, ca_file=str(other)),
                  settings(self.slapd.url, start_tls=True, ca_file=str(other))):
            self.use(s)
            events = []
            globalLogPublisher.addObserver(events.append)
            try:
                yield self.assertFailure(self.login("alice", ldapserver.PASSWORDS["alice"]), TemporaryFailure)
            finally:
                globalLogPublisher.removeObserver(events.append)
            self.assertTrue(any("CERTIFICATE_VERIFY_FAILED" in (formatEvent(e) or "") for e in events))

    @defer.inlineCallbacks
    def test_a_certificate_for_another_name_is_a_temporary_failure(self):
        cert = _certificate(self.tmp, "ldap.other.example")
        other = ldapserver.Slapd(self.tmp / "other", certPath=cert, keyPath=self.tmp / "other-key.pem")
        other.start()
        self.addCleanup(other.close)
        for s in (settings(other.ldapsUrl, ca_file=str(cert)), settings(other.url, start_tls=True, ca_file=str(cert))):
            self.use(s)
            yield self.assertFailure(self.login("alice", ldapserver.PASSWORDS["alice"]), TemporaryFailure)


class BalanceCase(_WireCase):
    @defer.inlineCallbacks
    def test_round_robin_opens_each_connection_at_the_next_server_and_failover_uses_the_other(self):
        first, second = ldapserver.twoServers(self.tmp / "two")
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.use(settings(first.url, second.url, balance="round-robin", pool_size=3))
        results = yield defer.gatherResults([self.login("bob", ldapserver.PASSWORDS["bob"]) for _ in range(6)])
        self.assertEqual(set(results), {"bob@example.com"})
        wire = self.checker.wire
        names = [p.name for p in [wire._service] + wire._idle]
        self.assertEqual(len(names), 4)
        self.assertEqual(set(names), {first.url, second.url})
        self.use(settings(first.url, second.url))  # (failover: the first server while it answers)
        self.assertEqual((yield self.login("bob", ldapserver.PASSWORDS["bob"])), "bob@example.com")
        self.assertEqual(self.checker.wire._service.name, first.url)
        first.stop()
        self.assertEqual((yield self.login("bob", ldapserver.PASSWORDS["bob"])), "bob@example.com")
        self.assertEqual(self.checker.wire._service.name, second.url)


class SameAnswersCase(_WireCase):
    @defer.inlineCallbacks
    def test_entries_are_what_the_threads_ldap3_client_gives(self):
        """The wire's search gives the entries LdapClient.search (ldap3) gives, attribute values and keys alike."""
        self.use(settings(self.slapd.url, quota_attribute="roomNumber"))
        attributes = self.checker.lookups.attributes() + ["objectClass", "cn", "uidNumber", "createTimestamp"]
        for text in ("(uid=alice)", "(|(uid=bob)(uid=dave)(mail=carol@example.com))", "(objectClass=*)", "(uid=nobody)"):
            expected = yield self.pool_call(self.client.search, text, attributes)
            got = yield self.checker.wire.search(ldapwire.encodeFilter(text), tuple(attributes),
                                                 ldapserver.BASE_DN, ldapwire.SCOPE_SUBTREE)
            self.assertEqual(got, expected, text)

    def pool_call(self, f, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(reactor, self.pool, f, *args)


class StoreSinkCase(_WireCase):
    """
    What a login tells the store (its quota, its mailbox key) goes through the thread pool: the
    store's sinks take its locks and may write its key database.
    """

    @defer.inlineCallbacks
    def test_the_store_hears_of_the_entry_off_the_reactor(self):
        import threading

        self.use(ldapserver.checkerSettings(self.slapd.url, mailbox_attribute="entryUUID"))
        seen = []
        self.checker.lookups.keySink = lambda user, key: seen.append((user, key, threading.current_thread()))
        self.assertEqual((yield self.login("alice", ldapserver.PASSWORDS["alice"])), "alice@example.com")
        self.assertEqual((yield self.login("alice", ldapserver.PASSWORDS["alice"])), "alice@example.com")
        self.assertEqual(len(seen), 2)
        (_, key1, first), (_, key2, second) = seen
        self.assertTrue(key1 and key1 == key2)
        self.assertIsNot(first, threading.main_thread())
        self.assertIsNot(second, threading.main_thread())


# --- a broken or hostile server's answers (no slapd: bytes fed to the protocol) -----------------


def _wired():
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    protocol = ldapwire.LdapProtocol(Clock(), timeout=5.0, name="test")
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _failureOf(d):
    failures = []
    d.addErrback(failures.append)
    return failures


def _lose(protocol):
    from twisted.internet.error import ConnectionAborted
    from twisted.python.failure import Failure

    protocol.connectionLost(Failure(ConnectionAborted()))


def test_a_good_bind_answer_is_the_requests():
    protocol, transport = _wired()
    answers = []
    protocol.request(ldapwire.bindRequest, "cn=a", b"x").addCallback(answers.append)
    protocol.dataReceived(bytes.fromhex("300c02010161070a010004000400"))  # bindResponse, success
    assert answers and answers[0]["result"] == 0 and not protocol.closed


@pytest.mark.parametrize("answer", [
    bytes.fromhex("30050201016100"),  # a bindResponse with nothing in it
    bytes.fromhex("300c02010165070a010004000400"),  # a searchResDone for a bind
    bytes.fromhex("300c02010178070a010004000400"),  # an extendedResp for a bind
])
def test_a_broken_answer_fails_its_request_and_drops_the_connection(answer):
    """Never a login left waiting for ever: the connection goes, its requests fail temporarily."""
    protocol, transport = _wired()
    failures = _failureOf(protocol.request(ldapwire.bindRequest, "cn=a", b"x"))
    protocol.dataReceived(answer)
    assert protocol.closed and transport.disconnecting
    _lose(protocol)  # (what the reactor does next)
    assert len(failures) == 1 and failures[0].check(ldapwire.ConnectionBroken)


def test_an_oversized_answer_is_refused_from_its_length_alone():
    protocol, transport = _wired()
    failures = _failureOf(protocol.request(ldapwire.searchRequest, "dc=x", 2, b"\x87\x01a", b"\x30\x00"))
    protocol.dataReceived(b"\x30\x84" + (ldapwire.MAX_MESSAGE + 1).to_bytes(4, "big") + b"\x02\x01")
    assert protocol.closed
    _lose(protocol)
    assert failures and failures[0].check(ldapwire.ConnectionBroken)


def test_a_large_answer_in_many_pieces_is_taken_whole():
    protocol, transport = _wired()
    answers = []
    protocol.request(ldapwire.bindRequest, "cn=a", b"x").addCallback(answers.append)
    message = bytes.fromhex("30840000000c02010161070a010004000400")  # (a four-byte length form)
    for i in range(len(message)):
        protocol.dataReceived(message[i:i + 1])
    assert answers and answers[0]["result"] == 0 and not protocol.closed


@pytest.mark.parametrize("password", ["a\x01b", "\u00ad", "\u0627a"])
def test_a_password_saslprep_refuses_is_a_wrong_password(password):
    """(Checked before any connection: this directory URL is not even reachable.)"""
    login = ldapwire.WireLogin(LdapClient(settings("ldap://127.0.0.1:1")), reactor)
    d = login.checkPassword("uid=alice,dc=example,dc=com", password)
    results = []
    d.addBoth(results.append)
    assert results == [False]


@pytest.mark.parametrize("template", ["", "uid={login},ou=people,dc=example,dc=com"])
def test_the_login_search_is_the_threads_search(template):
    """
    The wire's login search has the filter, base and scope of L{_Lookups.findUserByLogin} (the
    threads' search): only C{user_filter}'s C{{login}} is the login, whatever C{active_filter}
    holds, with or without C{bind_dn_template}.
    """
    from pymaild.auth.ldap import _Lookups

    s = settings("ldap://127.0.0.1:1", bind_dn_template=template,
                 active_filter="(&(objectClass=inetOrgPerson)(description={login}))")
    checker = LdapChecker(LdapClient(s), None, reactor)
    sent, asked = [], []
    checker.wire.search = lambda filterBer, attributes, base, scope: sent.append((filterBer, base, scope))
    lookups = _Lookups(LdapClient(s))
    lookups.client.search = lambda ldapFilter, attributes, base=None, scope="SUBTREE": asked.append(
        (ldapFilter, base, scope))
    for login in ("alice", "a*b(c)\\d"):
        checker._findUserByLogin(login)
        lookups.findUserByLogin(login)
    for (filterBer, base, scope), (text, threadBase, threadScope) in zip(sent, asked):
        assert filterBer == ldap3Filter(text)
        assert scope == {"BASE": ldapwire.SCOPE_BASE, "SUBTREE": ldapwire.SCOPE_SUBTREE}[threadScope]
        if template:
            assert base == threadBase
