"""
Raw IMAP over TLS for tests that check exact responses: a session, a command and everything
up to its tagged completion.
"""

from __future__ import annotations

import re
import socket


def tls_session(server):
    sock = server.tls().wrap_socket(socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=15),
                                    server_hostname="localhost")
    sock.recv(4096)
    return sock


def ask(sock, line: bytes, tag: bytes) -> bytes:
    """
    Send C{line}; return every byte received up to and including C{tag}'s completion line.
    """
    sock.sendall(line + b"\r\n")
    return read_tagged(sock, tag)


def read_tagged(sock, tag: bytes) -> bytes:
    """Every byte received up to and including C{tag}'s completion line (or the close)."""
    data = b""
    while not re.search(rb"(^|\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\n]*\n", data):
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def logged_in(server, select: bytes | None = None):
    sock = tls_session(server)
    ask(sock, b'l LOGIN postmaster@localhost "%s"' % server.postmaster_password().encode(), b"l")
    if select is not None:
        assert b"s OK" in ask(sock, b"s SELECT " + select, b"s")
    return sock


def read_to_close(sock) -> bytes:
    """
    Everything the server sends until it closes the connection.
    """
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
