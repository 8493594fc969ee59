# -*- test-case-name: tests.auth.test_ldapwire -*-
"""
LDAP logins on the reactor: the two requests of a login (a search for the user as the service
account, then a bind as the entry found) spoken by a Twisted protocol, without threads, for
L{pymaild.auth.ldap.LdapChecker}.

Interfaces implemented: none of pymaild's own; L{LdapProtocol} is a Twisted C{IProtocol}.

Implementation summary:

  - requests are BER-encoded here (RFC 4511), only the ones a login needs: a simple
    BindRequest, a SearchRequest, an UnbindRequest, the StartTLS ExtendedRequest (RFC 4513) and
    an AbandonRequest; the filter is an RFC 4515 string encoded by L{encodeFilter}, which
    parses it exactly as C{ldap3} does (its whitespace and escaping rules included) and gives
    the same bytes as ldap3's own encoder (the tests compare them over a corpus of filters);
    a filter template with C{{login}} in its assertion values is parsed once
    (L{FilterTemplate}) and the login's bytes are put into the values at each login;
  - responses are decoded with ldap3's fast decoder (C{decode_message_fast} and the
    C{*_to_dict_fast} helpers), so entries look as they do from an ldap3 connection;
  - one connection bound as the service account carries the searches, pipelined (many
    outstanding, told apart by message ID); up to C{[ldap] pool_size} more carry the users'
    binds, one bind at a time each (RFC 4511 4.2.1); a login waits for a free one;
  - servers, failover and round-robin, timeouts, the retry and the pause are
    L{pymaild.auth.ldap.LdapClient}'s rules, applied here to the reactor's connections: a
    connection that breaks is dropped and the operation tried once more (from the first
    server, or the next one in round-robin); an operation not answered within the timeout
    drops its connection (every request outstanding on it fails) and is not tried again, and
    the client's "directory down" pause (shared with the directory's threads) begins; an
    unsolicited notification (message ID 0: a notice of disconnection) drops the connection;
  - TLS (C{ldaps://} URLs, or StartTLS) is Twisted's, verifying the server's certificate
    against C{[ldap] ca_file} (or the system's CAs) and its name against the URL's host, as
    the threads' ldap3 connections do.

Directory lookups (recipients, a user's addresses, groups: L{pymaild.auth.ldap.LdapDirectory})
stay on ldap3 in the thread pool.
"""

from __future__ import annotations

import collections
import functools
import ssl
import time
import warnings

from twisted.internet import defer, error
from twisted.python import failure
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from pymaild.errors import TemporaryFailure

log = Logger()


# --- BER ------------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(len(content)) + content


def _int(v: int, tag: int = 0x02) -> bytes:
    return _tlv(tag, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big", signed=True))


def _message(messageId: int, op: bytes) -> bytes:
    """LDAPMessage ::= SEQUENCE { messageID, protocolOp } (no controls)."""
    return _tlv(0x30, _int(messageId) + op)


def bindRequest(messageId: int, dn: str, password: bytes) -> bytes:
    """A simple BindRequest ([APPLICATION 0]: version 3, name, simple [0] password)."""
    return _message(messageId, _tlv(0x60, b"\x02\x01\x03" + _tlv(0x04, dn.encode("utf-8")) + _tlv(0x80, password)))


def unbindRequest(messageId: int) -> bytes:
    """UnbindRequest ::= [APPLICATION 2] NULL"""
    return _message(messageId, b"\x42\x00")


def abandonRequest(messageId: int, abandoned: int) -> bytes:
    """AbandonRequest ::= [APPLICATION 16] MessageID"""
    return _message(messageId, _int(abandoned, 0x50))


#: RFC 4511 4.14.1: the StartTLS request's OID
STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"


def startTlsRequest(messageId: int) -> bytes:
    """ExtendedRequest ::= [APPLICATION 23] SEQUENCE { requestName [0] LDAPOID }"""
    return _message(messageId, _tlv(0x77, _tlv(0x80, STARTTLS_OID)))


SCOPE_BASE, SCOPE_SUBTREE = 0, 2
DEREF_ALWAYS = 3  # (ldap3's default, which pymaild's searches keep)


def attributeList(names) -> bytes:
    """AttributeSelection ::= SEQUENCE OF LDAPString"""
    return _tlv(0x30, b"".join(_tlv(0x04, n.encode("utf-8")) for n in names))


def searchRequest(messageId: int, base: str, scope: int, filterBer: bytes, attributes: bytes, sizeLimit: int = 100,
                  timeLimit: int = 0, derefAliases: int = DEREF_ALWAYS) -> bytes:
    """
    A SearchRequest ([APPLICATION 3]); C{filterBer} from L{encodeFilter} or
    L{FilterTemplate.encode}, C{attributes} from L{attributeList}.
    """
    body = (_tlv(0x04, base.encode("utf-8")) + _int(scope, 0x0A) + _int(derefAliases, 0x0A) + _int(sizeLimit)
            + _int(timeLimit) + b"\x01\x01\x00" + filterBer + attributes)
    return _message(messageId, _tlv(0x63, body))


#: the protocolOp that ends the answer to each request: bindResponse, searchResDone, extendedResp
_ANSWERS = {bindRequest: 1, searchRequest: 5, startTlsRequest: 24}
#: the largest answer (one LDAP message) accepted: a login's entry is a few KB; more is a
#: broken or hostile server, and its connection is dropped (a temporary failure)
MAX_MESSAGE = 1 << 20
#: entries (and referrals) kept of one search's answer: the same as the size limit it asks
MAX_ENTRIES = 100


# --- RFC 4515 filters, as ldap3 reads them ------------------------------------------------------


class FilterError(ValueError):
    """A filter ldap3 would refuse (ldap3's LDAPInvalidFilterError)."""


_AND, _OR, _NOT = 0xA0, 0xA1, 0xA2
_EQUAL, _SUBSTRINGS, _GREATER, _LESS, _PRESENT, _APPROX, _EXTENSIBLE = 0xA3, 0xA4, 0xA5, 0xA6, 0x87, 0xA8, 0xA9
_WHITESPACE = " \t\n\r\x0b\x0c"  # (string.whitespace, what ldap3 skips between items)


@functools.lru_cache(maxsize=1024)
def _assertionValue(text: str) -> bytes:
    """
    An assertion value's bytes as ldap3 sends them (validate_assertion_value,
    prepare_filter_for_sending).  Cached: a template's constant parts come back at every login
    (ldap3's conversion of them was a third of a login's filter encoding).
    """
    from ldap3.protocol.convert import prepare_filter_for_sending
    from ldap3.utils.conv import escape_filter_chars, is_filter_escaped

    if "\\" in text and not is_filter_escaped(text):
        text = escape_filter_chars(text)
    return prepare_filter_for_sending(text)


def _parseMatch(match: str):
    """One item (between its parentheses) as a node; ldap3's evaluate_match, rule for rule."""
    left, equal, right = match.strip().partition("=")
    if not equal:
        raise FilterError("invalid matching assertion")
    if left.endswith(("~", ">", "<")):
        tag = {"~": _APPROX, ">": _GREATER, "<": _LESS}[left[-1]]
        return (tag, left[:-1].strip(), right.strip())
    if left.endswith(":"):
        left = left[:-1].strip()
        right = right.strip()
        parts = left.split(":")
        rule = dn = name = False
        if parts[0] == "":
            if len(parts) == 2 and parts[1].lower().strip() != "dn":
                rule = parts[1]
            elif len(parts) == 3 and parts[1].lower().strip() == "dn":
                dn, rule = True, parts[2]
            else:
                raise FilterError("invalid extensible filter")
        elif len(parts) <= 3:
            if len(parts) == 1:
                name = parts[0]
            elif len(parts) == 2:
                name = parts[0]
                if parts[1].lower().strip() == "dn":
                    dn = True
                else:
                    rule = parts[1]
            elif len(parts) == 3 and parts[1].lower().strip() == "dn":
                name, dn, rule = parts[0], True, parts[2]
            else:
                raise FilterError("invalid extensible filter")
        if not name and not rule:
            raise FilterError("invalid extensible filter")
        return (_EXTENSIBLE, name.strip() if name else "", rule.strip() if rule else "", dn, right)
    if right == "*":
        return (_PRESENT, left.strip())
    if "*" in right:
        pieces = right.strip().split("*")
        return (_SUBSTRINGS, left.strip(), pieces[0], [p for p in pieces[1:-1] if p], pieces[-1])
    return (_EQUAL, left.strip(), right.strip())


def parseFilter(text: str):
    """
    An RFC 4515 filter string as a tree of tuples (values still as text, escapes in them),
    parsed with ldap3's state machine (C{ldap3.operation.search.parse_filter}) so that what it
    accepts, refuses and how it treats whitespace are the same.

    @raise FilterError: a filter ldap3 refuses.
    """
    text = text.strip()
    if not (text and text.count("(") == text.count(")") and text.startswith("(") and text.endswith(")")):
        raise FilterError("invalid filter")
    OPEN, OPEN_OR_CLOSE, MATCH_OR_CLOSE, MATCH_OR_CONTROL = range(4)
    state = OPEN_OR_CLOSE
    root = [None, [], None]  # [tag, children, parent]
    current = root
    start = None
    skipWhitespace = True
    justClosed = False
    for pos, c in enumerate(text):
        if skipWhitespace and c in _WHITESPACE:
            continue
        if state in (OPEN, OPEN_OR_CLOSE) and c == "(":
            state = MATCH_OR_CONTROL
            justClosed = False
        elif state == MATCH_OR_CONTROL and c in "&!|":
            node = [{"&": _AND, "|": _OR, "!": _NOT}[c], [], current]
            current[1].append(node)
            current = node
            state = OPEN
        elif state in (MATCH_OR_CLOSE, OPEN_OR_CLOSE) and c == ")":
            if justClosed:
                current = current[2]
            else:
                justClosed = True
                skipWhitespace = True
                if start:
                    if current[0] == _NOT and current[1]:
                        raise FilterError("NOT (!) clause in filter cannot be multiple")
                    current[1].append(_parseMatch(text[start:pos]))
            start = None
            state = OPEN_OR_CLOSE
        elif state in (MATCH_OR_CLOSE, MATCH_OR_CONTROL) and c not in "()":
            skipWhitespace = False
            if not start:
                start = pos
            state = MATCH_OR_CLOSE
        else:
            raise FilterError("malformed filter")
    if len(root[1]) != 1:
        raise FilterError("missing boolean operator in filter")
    return _freeze(root[1][0])


def _freeze(node):
    if isinstance(node, list):
        return (node[0], [_freeze(k) for k in node[1]])
    return node


def _encodeNode(node, value) -> bytes:
    """BER of a parsed node; C{value(text)} gives an assertion value's bytes."""
    tag = node[0]
    if tag in (_AND, _OR):
        return _tlv(tag, b"".join(_encodeNode(k, value) for k in node[1]))
    if tag == _NOT:
        return _tlv(tag, _encodeNode(node[1][0], value))
    if tag == _PRESENT:
        return _tlv(tag, node[1].encode("utf-8"))
    if tag == _SUBSTRINGS:
        _, attr, initial, anys, final = node
        items = b""
        if initial:
            items += _tlv(0x80, value(initial))
        for a in anys:
            items += _tlv(0x81, value(a))
        if final:
            items += _tlv(0x82, value(final))
        if not items:  # ((cn=**): ldap3's encoder refuses an empty SEQUENCE OF substrings too)
            raise FilterError("a substring filter without a substring")
        return _tlv(tag, _tlv(0x04, attr.encode("utf-8")) + _tlv(0x30, items))
    if tag == _EXTENSIBLE:
        _, attr, rule, dn, text = node
        body = (_tlv(0x81, rule.encode("utf-8")) if rule else b"") + (_tlv(0x82, attr.encode("utf-8")) if attr else b"")
        # (dnAttributes BOOLEAN DEFAULT FALSE: left out when false, TRUE as 0xFF, as ldap3 sends them)
        return _tlv(tag, body + _tlv(0x83, value(text)) + (b"\x84\x01\xff" if dn else b""))
    return _tlv(tag, _tlv(0x04, node[1].encode("utf-8")) + _tlv(0x04, value(node[2])))


def encodeFilter(text: str) -> bytes:
    """
    The BER of an RFC 4515 filter string, byte for byte what ldap3 sends for it.

    @raise FilterError: a filter ldap3 refuses.
    """
    return _encodeNode(parseFilter(text), _assertionValue)


_HEX = frozenset("0123456789abcdefABCDEF")


def _clean(text: str) -> bool:
    """Whether every backslash in C{text} starts a complete \\XX escape (and nothing needs ldap3's re-escaping)."""
    if "\0" in text:
        return False
    i = text.find("\\")
    while i >= 0:
        if not (i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX):
            return False
        i = text.find("\\", i + 3)
    return True


_LOGIN = "{login}"


class FilterTemplate:
    """
    A filter with C{{login}} in it, as C{[ldap] user_filter} is: L{encode} gives the BER of the
    filter the template makes with a login put in, escaped (C{escape_filter_chars}), as
    L{pymaild.auth.ldap._Lookups.findUserByLogin} makes it: the same bytes ldap3 sends.

    The template is parsed once when C{{login}} appears only in assertion values, between
    complete escapes: the login's UTF-8 bytes are then put into the values as they are (an
    escaped login is exactly its bytes once unescaped, and cannot change the filter's shape:
    it has no parenthesis, no C{*}, no unescaped backslash, and no white space at its ends).
    Other templates are filled in and parsed at each login.
    """

    def __init__(self, text: str):
        self.text = text
        self._tree = None
        tree = parseFilter(text)  # (raises FilterError now for a filter ldap3 would refuse)
        if self._simple(tree):
            self._tree = tree
        self._constant = None if _LOGIN in text else encodeFilter(text)

    def _simple(self, node) -> bool:
        tag = node[0]
        if tag in (_AND, _OR, _NOT):
            return all(self._simple(k) for k in node[1])
        if tag == _PRESENT:
            return _LOGIN not in node[1]
        if tag == _SUBSTRINGS:
            names, values = [node[1]], [node[2], *node[3], node[4]]
        elif tag == _EXTENSIBLE:
            names, values = [node[1], node[2]], [node[4]]
        else:
            names, values = [node[1]], [node[2]]
        if any(_LOGIN in n for n in names):
            return False
        return all(_clean(part) for v in values if _LOGIN in v for part in v.split(_LOGIN))

    def encode(self, login: str) -> bytes:
        if self._constant is not None:
            return self._constant
        if self._tree is None:
            from ldap3.utils.conv import escape_filter_chars

            return encodeFilter(self.text.replace(_LOGIN, escape_filter_chars(login)))
        raw = login.encode("utf-8")

        def value(text: str) -> bytes:
            if _LOGIN not in text:
                return _assertionValue(text)
            return raw.join(_assertionValue(part) for part in text.split(_LOGIN))

        return _encodeNode(self._tree, value)


def simplePassword(password: str) -> bytes:
    """A simple bind's password as ldap3 sends it (C{validate_simple_password}: SASLprep, UTF-8)."""
    if password.isascii() and password.isprintable():  # (SASLprep leaves printable ASCII as it is)
        return password.encode("ascii")
    from ldap3.protocol.sasl.sasl import sasl_prep

    prepared = sasl_prep(password)
    return prepared if isinstance(prepared, bytes) else prepared.encode("utf-8")


# --- the protocol -------------------------------------------------------------------------------


class ConnectionBroken(TemporaryFailure):
    """The connection closed (or was dropped) with the request outstanding."""


class Timeout(TemporaryFailure):
    """No answer within the timeout (the connection was dropped)."""


def checkHostname(certificate: dict, host: str) -> None:
    """
    The certificate's names (C{ssl.SSLObject.getpeercert()}) against the URL's host, as ldap3
    checks them (its C{check_hostname} with C{match_hostname}: IP addresses against IP SANs,
    names against DNS SANs or else the common name).

    @raise ValueError: they do not match.
    """
    from ldap3.core.tls import CertificateError, match_hostname

    try:
        match_hostname(certificate, host)
    except CertificateError as e:
        raise ValueError(f"the certificate does not match {host}: {e}") from None


# ldap3's match_hostname is ssl.match_hostname on Python 3.11 (deprecated there): filtered once
# for the process, as warnings.catch_warnings() around each call is not thread-safe (it would
# undo a filter another thread installs meanwhile, such as pymaild.auth.passwords' own).
warnings.filterwarnings("ignore", message=r"ssl\.match_hostname\(\) is deprecated", category=DeprecationWarning)


class LdapProtocol(Protocol):
    """
    LDAP messages over one connection: requests sent with a message ID of their own, answers
    decoded as they arrive and handed to the request's Deferred: C{(done, entries, references)}
    for a search, the result dictionary for the others.  An answer not there within C{timeout}
    seconds drops the connection; so does a notice of disconnection.

    TLS (LDAPS from the first byte, or after StartTLS: L{startTLS}) is the standard library's
    C{ssl.SSLObject} over memory BIOs, inside this protocol, not the transport's C{startTLS}:
    Twisted's TLS protocol (pyOpenSSL through cffi, and a reactor turn before each small write
    goes out, its write aggregation) cost ~80 us of CPU a login, a sixth of it.
    """

    def __init__(self, reactor, timeout: float, name: str = "ldap"):
        self._reactor = reactor
        self.timeout = timeout
        self.name = name
        self._buffer = bytearray()
        self._pending: dict[int, list] = {}
        self._nextId = 0
        self.closed = False
        #: the host the server's certificate must name, once TLS starts
        self.tlsHost: str | None = None
        #: fires when the TLS handshake is over and the certificate's names matched
        self.handshake: defer.Deferred | None = None
        self._tls: ssl.SSLObject | None = None
        self._tlsIn = self._tlsOut = None
        self._receiving = False  # (inside dataReceived's loop over the answers)

    def startTLS(self, context: ssl.SSLContext, host: str) -> defer.Deferred:
        """
        TLS from now on (the client's hello goes out at once); a Deferred that fires when the
        handshake is over, the certificate verified by C{context} and its names matched
        against C{host} (L{checkHostname}), or fails with L{ConnectionBroken}.
        """
        if self._buffer and not self._receiving:
            # bytes in the clear not yet parsed would be taken for the server's once TLS is up
            # (called from an answer's callback, dataReceived checks what follows it instead)
            log.warn("ldap: {name}: data in the clear before TLS starts; connection dropped", name=self.name)
            self.drop()
            raise ConnectionBroken(f"{self.name}: data in the clear before TLS started")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        # (first: should it raise, for a name IDNA cannot encode, no Deferred is left to fail unheard)
        tls = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=host)
        self._tls, self._tlsIn, self._tlsOut = tls, incoming, outgoing
        self.tlsHost = host
        d = self.handshake = defer.Deferred()
        self._handshake()
        return d

    def peerCertificate(self) -> dict | None:
        """The server's certificate as C{ssl.SSLObject.getpeercert()} gives it, once TLS is up."""
        return self._tls.getpeercert() if self._tls is not None and self.handshake is None else None

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flushTLS()
            return
        except (ssl.SSLError, OSError) as e:  # (a certificate that does not verify, a refusal)
            self._handshakeFailed(f"TLS: {e}")  # (the connection aborted: no alert goes out)
            return
        self._flushTLS()
        try:
            checkHostname(self._tls.getpeercert(), self.tlsHost)
        except ValueError as e:
            self._handshakeFailed(str(e))
            return
        d, self.handshake = self.handshake, None
        d.callback(self)

    def _handshakeFailed(self, why: str) -> None:
        d, self.handshake = self.handshake, None
        self.drop()
        if d is not None:
            d.errback(ConnectionBroken(f"{self.name}: {why}"))

    def _flushTLS(self) -> None:
        out = self._tlsOut.read()
        if out and not self.closed:
            self.transport.write(out)

    def _write(self, data: bytes) -> None:
        if self._tls is None:
            self.transport.write(data)
            return
        self._tls.write(data)
        self._flushTLS()

    def nextId(self) -> int:
        self._nextId = self._nextId % 0x7FFFFFFF + 1  # (1 to maxInt, RFC 4511 4.1.1.1)
        return self._nextId

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def request(self, encode, *args) -> defer.Deferred:
        """Send C{encode(messageId, *args)}; a Deferred of its answer."""
        if self.closed:
            return defer.fail(ConnectionBroken(f"{self.name}: connection closed"))
        messageId = self.nextId()
        d = defer.Deferred()
        timer = self._reactor.callLater(self.timeout, self._timedOut, messageId)
        self._pending[messageId] = [d, [], [], timer, _ANSWERS[encode]]
        try:
            self._write(encode(messageId, *args))
        except ssl.SSLError as e:  # (TLS broken on our side: the connection is of no more use)
            log.warn("ldap: {name}: TLS: {error}; connection dropped", name=self.name, error=str(e))
            self.drop()  # (this request fails as broken with the others: connectionLost)
        return d

    def _timedOut(self, messageId: int) -> None:
        pending = self._pending.pop(messageId, None)
        if pending is None:
            return
        pending[3] = None
        self.drop()  # (the others outstanding fail as broken)
        pending[0].errback(Timeout(f"{self.name}: no answer within {self.timeout:g}s"))

    def drop(self) -> None:
        """Close the connection at once (what is outstanding fails)."""
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def close(self) -> None:
        """An UnbindRequest (and TLS's close_notify), then close (RFC 4511 4.3)."""
        if not self.closed:
            try:
                if self._tls is None or self.handshake is None:
                    self._write(unbindRequest(self.nextId()))
                if self._tls is not None:
                    self._tls.unwrap()
            except ssl.SSLError:
                pass  # (SSLWantReadError from unwrap: the server's close_notify is not awaited)
            finally:
                if self._tls is not None:
                    self._flushTLS()
                self.closed = True
                self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._decrypt(data)
            if not data:
                return
        buf = self._buffer
        buf += data  # (a bytearray: a large answer in many pieces is not copied again per piece)
        pos, n = 0, len(buf)
        try:
            while n - pos >= 2:
                first = buf[pos + 1]
                if first < 0x80:
                    end = pos + 2 + first
                else:
                    k = first & 0x7F
                    if k == 0 or k > 4:
                        raise ValueError(f"unsupported BER length form 0x{first:02x}")
                    if n - pos < 2 + k:
                        break
                    end = pos + 2 + k + int.from_bytes(buf[pos + 2:pos + 2 + k], "big")
                if end - pos > MAX_MESSAGE:
                    raise ValueError(f"an answer of {end - pos:,} bytes (at most {MAX_MESSAGE:,})")
                if end > n:
                    break
                tls = self._tls
                self._receiving = True
                try:
                    self._answer(bytes(buf[pos:end]))
                finally:
                    self._receiving = False
                pos = end
                if self.closed:
                    return
                if self._tls is not tls:
                    # TLS started with this answer (StartTLS): whatever came after it in the
                    # clear would be taken for the server's answers once TLS is up (an
                    # attacker's, spliced in before the handshake: RFC 4513 3.1.1, CVE-2011-0411)
                    self._buffer = bytearray()
                    if pos < n:
                        log.warn("ldap: {name}: data in the clear after the StartTLS answer; connection dropped",
                                 name=self.name)
                        self.drop()
                    return
        except Exception as e:
            log.warn("ldap: {name}: undecodable answer ({error}); connection dropped", name=self.name, error=repr(e))
            self._buffer = bytearray()
            self.drop()  # (what is outstanding fails as broken: connectionLost)
            return
        del buf[:pos]

    def _decrypt(self, data: bytes) -> bytes:
        """The plaintext in C{data} (received over TLS); b"" until there is some."""
        if self.closed:
            return b""  # (after close(): the server's close_notify, nothing to read)
        self._tlsIn.write(data)
        if self.handshake is not None:
            self._handshake()
            if self.handshake is not None or self.closed:
                return b""
        plain = []
        try:
            # (a record's plaintext is at most 16 KB; reading until the BIO and the record are
            # used up spares the SSLWantReadError that a read of nothing raises)
            while True:
                chunk = self._tls.read(16384)
                if not chunk:  # (the server's close_notify: nothing more comes on this connection)
                    self.drop()
                    break
                plain.append(chunk)
                if not self._tlsIn.pending and not self._tls.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as e:  # (a bad record, an alert: the connection is over)
            log.warn("ldap: {name}: TLS: {error}; connection dropped", name=self.name, error=str(e) or repr(e))
            self.drop()
            return b""
        self._flushTLS()  # (TLS 1.3's key updates and the like)
        return b"".join(plain)

    def _answer(self, message: bytes) -> None:
        from ldap3.utils.asn1 import decode_message_fast

        m = decode_message_fast(message)
        messageId, op = m["messageID"], m["protocolOp"]
        if messageId == 0:  # an unsolicited notification (RFC 4511 4.4): the server is leaving
            from ldap3.utils.asn1 import ldap_result_to_dict_fast

            log.warn("ldap: {name}: unsolicited notification ({result}); connection dropped", name=self.name,
                     result=ldap_result_to_dict_fast(m["payload"]).get("description"))
            self.drop()
            return
        pending = self._pending.get(messageId)
        if pending is None:
            return  # (an answer to a request that timed out and was failed)
        if op == 4:  # searchResEntry
            from ldap3.operation.search import search_result_entry_response_to_dict_fast

            if len(pending[1]) < MAX_ENTRIES:  # (more than one already makes a login ambiguous)
                # (check_names as an ldap3 connection has it by default: values through its standard formatters)
                entry = search_result_entry_response_to_dict_fast(m["payload"], None, None, True)
                entry["type"] = "searchResEntry"
                pending[1].append(entry)
            return
        if op == 19:  # searchResRef (pymaild does not chase referrals)
            if len(pending[2]) < MAX_ENTRIES:
                pending[2].append(m["payload"])
            return
        if op != pending[4]:
            # (the wrong kind of answer for this request: a broken server; dataReceived drops
            # the connection and connectionLost fails what is outstanding, this one included)
            raise ValueError(f"protocolOp {op} in answer to a request expecting {pending[4]}")
        if op == 5:  # searchResDone
            from ldap3.utils.asn1 import ldap_result_to_dict_fast

            result = (ldap_result_to_dict_fast(m["payload"]), pending[1], pending[2])
        elif op == 1:  # bindResponse
            from ldap3.operation.bind import bind_response_to_dict_fast

            result = bind_response_to_dict_fast(m["payload"])
        else:  # extendedResp
            from ldap3.utils.asn1 import ldap_result_to_dict_fast

            result = ldap_result_to_dict_fast(m["payload"])
        # (decoded: only now is the request answered; a decoding error above leaves it to
        # connectionLost, which fails it)
        del self._pending[messageId]
        if pending[3] is not None:
            pending[3].cancel()
        pending[0].callback(result)

    def connectionLost(self, reason) -> None:
        self.closed = True
        d, self.handshake = self.handshake, None
        if d is not None:
            d.errback(ConnectionBroken(f"{self.name}: TLS: {reason.getErrorMessage()}"))
        pending, self._pending = self._pending, {}
        for d, _, _, timer, _ in pending.values():
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(ConnectionBroken(f"{self.name}: connection lost ({reason.getErrorMessage()})"))


# --- servers and connections ----------------------------------------------------------------------


def _hostPort(url: str):
    """C{(host, port, ldaps)} of an C{ldap://} or C{ldaps://} URL (as ldap3's Server reads it)."""
    scheme, _, rest = url.partition("://")
    ldaps = scheme.lower() == "ldaps"
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("["):  # [IPv6]:port
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    return host, int(port) if port else (636 if ldaps else 389), ldaps


class WireLogin:
    """
    The login's two operations over reactor connections, with L{LdapClient}'s server order,
    retry, timeout and pause rules (and its C{_downUntil}, so that the directory's threads and
    the logins agree the directory is down).
    """

    def __init__(self, client, reactor):
        self.client = client
        self.settings = s = client.settings
        self._reactor = reactor
        #: seconds an operation waits for its answer (ldap3's receive_timeout, as the threads have it)
        self.operationTimeout = float(max(1, int(round(s.timeout))))
        self.timeLimit = max(1, int(s.timeout))
        self._tlsOptions = None
        self._service = None
        self._serviceWaiters: list[defer.Deferred] = []
        self._idle: list[LdapProtocol] = []
        self._binders = 0  # bind connections open or opening
        self._waiting: collections.deque = collections.deque()
        self._all: set[LdapProtocol] = set()
        self.bindConnections = max(1, s.pool_size)
        self._selections: dict[tuple, bytes] = {}

    # --- connections ------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        """The TLS context of every connection (the same for every host: the names are checked
        by L{checkHostname} once the handshake is over); made, and C{ca_file} read, once."""
        if self._tlsOptions is None:
            # Python's client defaults (certificate required, OpenSSL's security level: forward
            # secret ciphers, no RSA key under 2,048 bits, no SHA-1 signature), TLS 1.2 or later
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = False  # (checkHostname does it, as ldap3 does)
            ca = self.settings.ca_file
            if ca:
                context.load_verify_locations(cafile=str(ca))
            else:
                context.load_default_certs()
            self._tlsOptions = context
        return self._tlsOptions

    @defer.inlineCallbacks
    def _openOne(self, url: str, user: str | None, password: str | None):
        from twisted.internet.abstract import isIPAddress, isIPv6Address
        from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol

        host, port, ldaps = _hostPort(url)
        if isIPAddress(host):  # (an address: no name resolution, which would take a thread)
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self.settings.timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self.settings.timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self.settings.timeout)
        protocol = LdapProtocol(self._reactor, self.operationTimeout, url)
        context = self._tls() if ldaps or self.settings.start_tls else None
        yield connectProtocol(endpoint, protocol)
        self._all.add(protocol)
        try:
            if ldaps:
                yield self._within(protocol.startTLS(context, host), protocol)
            if self.settings.start_tls and not ldaps:
                answer = yield protocol.request(startTlsRequest)
                if answer["result"] != 0:
                    raise TemporaryFailure(f"StartTLS refused by {url}")
                yield self._within(protocol.startTLS(context, host), protocol)
            if user is not None:
                # (an empty bind_dn: an anonymous bind, as ldap3's connection does)
                if user and not password:
                    raise TemporaryFailure(f"{url}: the service account has no password")
                answer = yield protocol.request(bindRequest, user, simplePassword(password) if user else b"")
                if answer["result"] != 0:
                    raise TemporaryFailure(f"{url} refused the service account ({answer.get('description')})")
        except BaseException:
            protocol.drop()
            self._all.discard(protocol)
            raise
        return protocol

    def _within(self, d: defer.Deferred, protocol) -> defer.Deferred:
        """C{d}, or the connection dropped if it has not fired within the operation timeout."""
        timer = self._reactor.callLater(self.operationTimeout, protocol.drop)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _open(self, user: str | None, password: str | None):
        """A new (bound, for the service account) connection to the first server that answers."""
        last = None
        for url in self.client.orderedUrls():
            try:
                protocol = yield self._openOne(url, user, password)
                return protocol
            except (TemporaryFailure, error.ConnectError, error.ConnectionLost, error.ConnectionDone,
                    error.TimeoutError, OSError, defer.CancelledError) as e:
                last = e
                log.warn("ldap: {server}: {error}", server=url, error=str(e) or repr(e))
            except Exception as e:  # (TLS errors and the like)
                last = e
                log.warn("ldap: {server}: {error}", server=url, error=repr(e))
        raise _unavailable(f"no LDAP server answered: {last}")

    def _serviceConnection(self) -> defer.Deferred:
        """The service account's connection: opened once for all the searches that need it."""
        if self._service is not None and not self._service.closed:
            return defer.succeed(self._service)
        d = defer.Deferred()
        self._serviceWaiters.append(d)
        if len(self._serviceWaiters) == 1:
            s = self.settings

            def opened(result):
                if not isinstance(result, failure.Failure):
                    self._service = result
                waiters, self._serviceWaiters = self._serviceWaiters, []
                for waiter in waiters:
                    waiter.callback(result) if not isinstance(result, failure.Failure) else waiter.errback(result)

            self._open(s.bind_dn or "", s.bind_password).addBoth(opened)
        return d

    def _dropService(self, protocol) -> None:
        if self._service is protocol:
            self._service = None
        if protocol is not None:
            protocol.drop()
            self._all.discard(protocol)

    # --- bind connections: one bind at a time each ---------------------------------------------

    def _acquire(self) -> defer.Deferred:
        while self._idle:
            protocol = self._idle.pop()
            if not protocol.closed:
                return defer.succeed(protocol)
            self._binders -= 1
            self._all.discard(protocol)
        if self._binders < self.bindConnections:
            self._binders += 1
            d = self._open(None, None)

            def failed(f):
                self._binders -= 1
                self._wake()
                return f

            return d.addErrback(failed)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _release(self, protocol, broken: bool) -> None:
        if broken or protocol.closed:
            protocol.drop()
            self._all.discard(protocol)
            self._binders -= 1
            self._wake()
            return
        if self._waiting:
            self._waiting.popleft().callback(protocol)
        else:
            self._idle.append(protocol)

    def _wake(self) -> None:
        """A bind connection went away: a waiting login may open one."""
        if self._waiting and self._binders < self.bindConnections:
            self._acquire().chainDeferred(self._waiting.popleft())

    # --- the operations ---------------------------------------------------------------------

    def _elapsed(self, started: float) -> bool:
        return time.monotonic() - started >= self.settings.timeout

    @defer.inlineCallbacks
    def search(self, filterBer: bytes, attributes, base: str, scope: int):
        """
        C{[(dn, {attribute: [values]})]} of the entries found, as L{LdapClient.search} gives
        them (its C{_attributes} applied; a requested attribute the entry lacks as C{[]}, as
        ldap3's C{return_empty_attributes} has it).  C{attributes}: a tuple of names.

        @raise LdapUnavailable: no server could answer (L{_Refused}: one refused).
        """
        from pymaild.auth.ldap import _TRY_ELSEWHERE, LdapUnavailable, _Refused

        self.client._checkDown()
        selection = self._selections.get(attributes)
        if selection is None:
            selection = self._selections[attributes] = attributeList(attributes)
        started = time.monotonic()
        for attempt in (1, 2):
            protocol = None
            try:
                protocol = yield self._serviceConnection()
                done, entries, references = yield protocol.request(
                    searchRequest, base, scope, filterBer, selection, 100, self.timeLimit)
                result = done.get("result")
                if not (entries or references) and result not in (0, 4, 32):  # (ldap3: ok when anything came)
                    message = f"search failed: {done.get('description')} ({result})"
                    if result in _TRY_ELSEWHERE:
                        raise LdapUnavailable(message)
                    log.warn("ldap: search: {error}", error=message)
                    raise _Refused(message)
                for e in entries:
                    for name in attributes:
                        if name not in e["raw_attributes"] and name not in ("*", "+", "1.1"):
                            e["raw_attributes"][name] = []
                            e["attributes"][name] = []
                return [(e["dn"], self.client._attributes(e)) for e in entries]
            except _Refused:
                raise
            except TemporaryFailure as e:
                self._dropService(protocol)
                if attempt == 2 or self._elapsed(started):
                    self.client._failedAfter(started)
                    raise e if isinstance(e, LdapUnavailable) else LdapUnavailable(str(e), cause=e)
        raise AssertionError("unreachable")

    @defer.inlineCallbacks
    def checkPassword(self, dn: str, password: str):
        """
        Whether C{password} is C{dn}'s, by binding as it on a bind connection.

        @raise LdapUnavailable: no server could answer.
        """
        from pymaild.auth.ldap import LdapUnavailable

        if not password:
            return False  # (an empty password would be an anonymous bind, which "succeeds")
        from ldap3.core.exceptions import LDAPException

        try:
            secret = simplePassword(password)
        except LDAPException:  # (SASLprep refuses it, e.g. a control character: no password is it)
            return False
        self.client._checkDown()
        for attempt in (1, 2):
            protocol = None
            started = time.monotonic()
            try:
                protocol = yield self._acquire()
                try:  # (the directory may have timed out while this login waited for a connection)
                    self.client._checkDown()
                except LdapUnavailable:
                    self._release(protocol, False)
                    raise
                if attempt == 1:
                    started = time.monotonic()  # (the wait for a free connection is not the server's)
                broken = True
                try:
                    answer = yield protocol.request(bindRequest, dn, secret)
                    result = answer.get("result")
                    broken = result not in (0, 49)
                finally:
                    self._release(protocol, broken)
                if result == 0:
                    return True
                if result == 49:  # invalidCredentials
                    return False
                raise LdapUnavailable(f"bind as {dn}: {answer.get('description')}")
            except TemporaryFailure as e:
                if attempt == 2 or self._elapsed(started):
                    self.client._failedAfter(started)
                    raise e if isinstance(e, LdapUnavailable) else LdapUnavailable(str(e), cause=e)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Unbind and close every connection (the server stopping)."""
        waiting, self._waiting = self._waiting, collections.deque()
        for d in waiting:
            d.errback(_unavailable("the LDAP client closed"))
        for protocol in list(self._all):
            protocol.close()
        self._all.clear()
        self._idle.clear()
        self._service = None


def _unavailable(message: str):
    from pymaild.auth.ldap import LdapUnavailable

    return LdapUnavailable(message)
