"""
Raw POP3 for tests that check exact responses: sessions on 995 (TLS) and 110 (plaintext, for
STLS), single-line and multi-line answers.
"""

from __future__ import annotations

import socket


def read_line(sock, data: bytearray) -> bytes:
    """One CRLF-terminated line from C{sock} (C{data} holds what was read beyond it)."""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; had {bytes(data)!r}")
        data += chunk
    line, _, rest = bytes(data).partition(b"\r\n")
    data[:] = rest
    return line


class Session:
    def __init__(self, sock):
        self.sock = sock
        self.data = bytearray()
        self.greeting = self.line()

    def line(self) -> bytes:
        return read_line(self.sock, self.data)

    def ask(self, command: bytes) -> bytes:
        """Send C{command}; its one-line answer."""
        self.sock.sendall(command + b"\r\n")
        return self.line()

    def multi(self) -> bytes:
        """The body of a multi-line answer exactly as sent (dot-stuffed), up to the final CRLF.CRLF."""
        while True:
            data = bytes(self.data)
            if data.startswith(b".\r\n"):
                self.data[:] = data[3:]
                return b""
            end = data.find(b"\r\n.\r\n")
            if end >= 0:
                self.data[:] = data[end + 5:]
                return data[: end + 2]
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed in a multi-line answer; had {len(data)} bytes")
            self.data += chunk

    def ask_multi(self, command: bytes) -> tuple[bytes, bytes]:
        first = self.ask(command)
        return first, (self.multi() if first.startswith(b"+OK") else b"")

    def login(self, user: bytes, password: bytes) -> bytes:
        assert self.ask(b"USER " + user).startswith(b"+OK")
        return self.ask(b"PASS " + password)

    def close(self):
        self.sock.close()


def tls_session(server) -> Session:
    sock = server.tls().wrap_socket(socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=20),
                                    server_hostname="localhost")
    return Session(sock)


def plain_session(server) -> Session:
    return Session(socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=20))


def logged_in(server) -> Session:
    s = tls_session(server)
    answer = s.login(b"postmaster@localhost", server.postmaster_password().encode())
    assert answer.startswith(b"+OK"), answer
    return s


def stuffed(message: bytes) -> bytes:
    """What RETR must send for C{message} (CRLF line ends): dots doubled, a final CRLF."""
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
