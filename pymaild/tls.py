# -*- test-case-name: tests.test_tls -*-
"""
TLS for every listener: the certificate, its self-signed default, and reloading it on SIGHUP.

L{ServerTLS} is the one object every listener and every STARTTLS hands to Twisted.  It
implements C{IOpenSSLServerConnectionCreator}, so replacing its options on SIGHUP gives new
connections the new certificate while established ones keep theirs.

Security: the private key is read as root before privileges are dropped (and kept in memory);
a generated key is written with mode 0600.  TLS 1.2 is the oldest version accepted unless
C{[tls] min_version} raises it.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from pymaild.errors import ConfigError, fileProblem

log = Logger()

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def selfSignedPaths(dataDir: Path) -> tuple[Path, Path]:
    tlsDir = dataDir / "tls"
    return tlsDir / "cert.pem", tlsDir / "key.pem"


def generateSelfSigned(certPath: Path, keyPath: Path, hostname: str, days: int = 3650) -> None:
    """
    Write a self-signed ECDSA P-256 certificate for C{hostname}, C{localhost}, 127.0.0.1 and
    ::1 (every TLS 1.2 client takes it; against RSA 2048 its key loads in a millisecond instead
    of about 35 ms at every start, and a handshake's signature costs a twentieth).  The key file
    is created with mode 0600; both files are written to a temporary name and renamed, so a
    crash leaves either nothing or both.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    altNames = [x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost"])]
    altNames += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(altNames), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certPath.parent.mkdir(parents=True, exist_ok=True)
    keyBytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _writeAtomically(keyPath, keyBytes, 0o600)
    _writeAtomically(certPath, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _writeAtomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _read(path: Path, key: str, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: [tls] {key}: {path}: {fileProblem(e)}") from None


def optionsFromPem(certData: bytes, keyData: bytes, certPath: Path, keyPath: Path, minVersion: str = "TLSv1.2",
                   where: str = "embedded default") -> ssl.CertificateOptions:
    """
    A PEM certificate chain (leaf first) and its key, as read from C{certPath} and C{keyPath},
    made into Twisted's C{CertificateOptions}.

    @raise ConfigError: no certificate or key in the data, or the key does not belong to the
        certificate; the message names C{[tls] cert} or C{[tls] key} and the file.
    """
    try:
        chain = x509.load_pem_x509_certificates(certData)
    except ValueError:
        raise ConfigError(f"{where}: [tls] cert: {certPath}: no PEM certificate in the file") from None
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise ConfigError(f"{where}: [tls] key: {keyPath}: the key is encrypted with a passphrase") from None
    except (ValueError, Exception):
        raise ConfigError(f"{where}: [tls] key: {keyPath}: not a PEM private key") from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(
            f"{where}: [tls] key: {keyPath}: does not match the certificate in {certPath}"
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        log.warn("TLS certificate {cert} expired on {expiry}", cert=str(certPath), expiry=str(leaf.not_valid_after_utc))
    return ssl.CertificateOptions(
        # cryptography's objects, which Twisted hands to pyOpenSSL's Context as they are
        # (pyOpenSSL deprecated its own X509 and PKey there in 24.3)
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain[1:],
        raiseMinimumTo=_VERSIONS[minVersion],
    )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TLS for every listener, reloadable in place.

    @ivar options: the current C{CertificateOptions}.
    @ivar pem: the contents of the certificate and key files they were made from.
    """

    def __init__(self, certPath: Path, keyPath: Path, minVersion: str, where: str, pem: tuple | None = None):
        """
        @param pem: another L{ServerTLS}'s C{pem} instead of reading the files now (a worker
            process, started after twistd dropped the privileges that could read the key).
        """
        self.certPath = certPath
        self.keyPath = keyPath
        self.minVersion = minVersion
        self.where = where
        if pem is None:
            pem = self._readFiles()
        self.options = optionsFromPem(*pem, certPath, keyPath, minVersion, where)
        self.pem = pem

    def _readFiles(self) -> tuple[bytes, bytes]:
        return _read(self.certPath, "cert", self.where), _read(self.keyPath, "key", self.where)

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.options.getContext(), None)

    def reload(self, pem: tuple | None = None) -> None:
        """
        Re-read the certificate and key (SIGHUP), or take C{pem} (another L{ServerTLS}'s, as it
        read them).  A broken new pair is logged and the old one kept, so a typo never takes TLS
        down.
        """
        try:
            if pem is None:
                pem = self._readFiles()
            self.options = optionsFromPem(*pem, self.certPath, self.keyPath, self.minVersion, self.where)
            self.pem = pem
        except ConfigError as e:
            log.error("TLS reload failed, keeping the old certificate: {error}", error=str(e))
        else:
            log.info("TLS certificate reloaded from {cert}", cert=str(self.certPath))


def clientTLS(hostname: str, verify: bool, caFile: Path | None = None):
    """
    Client TLS for outbound SMTP.  C{verify}: the server's certificate must chain to the
    system's trust store (or C{caFile}) and name C{hostname} (service_identity).  Otherwise
    any certificate is taken (opportunistic TLS, RFC 7435: encryption against passive
    eavesdroppers, and a self-signed certificate does not stop mail); SNI is sent either way.
    """
    if verify:
        return ssl.optionsForClientTLS(hostname, trustRoot=trustRoot(str(caFile)) if caFile else None)
    return _OpportunisticTLS(hostname)


@functools.lru_cache(maxsize=8)
def trustRoot(caFile: str):
    """Every certificate of a PEM bundle, read once (not on each connection)."""
    certificates = x509.load_pem_x509_certificates(Path(caFile).read_bytes())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


@implementer(IOpenSSLClientConnectionCreator)
class _OpportunisticTLS:
    """An C{IOpenSSLClientConnectionCreator} that encrypts but does not authenticate."""

    def __init__(self, hostname: str):
        self.hostname = hostname
        self.options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def getContext(self):
        return self.options.getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        try:
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        return connection
