"""
Raw SMTP for tests that check exact replies: a session that sends bytes and reads whole
(multi-line) replies, an smtplib client after EHLO, and the messages delivered to the postmaster.
"""

from __future__ import annotations

import smtplib
import socket

from conftest import maildir_files, postmaster_inbox


def inbox_messages(server) -> list[bytes]:
    home = postmaster_inbox(server)
    return [p.read_bytes() for p in maildir_files(home)]


def smtp(server, port="smtp") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.ports[port], timeout=30)
    s.ehlo("client.example")
    return s


class Raw:
    """A raw SMTP session: send bytes, read whole replies."""

    def __init__(self, server, port="smtp"):
        self.sock = socket.create_connection(("127.0.0.1", server.ports[port]), timeout=20)
        self.data = b""
        self.server = server
        self.greeting = self.reply()

    def reply(self) -> bytes:
        while True:
            lines = self.data.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    out = b"\r\n".join(lines[: i + 1])
                    self.data = b"\r\n".join(lines[i + 1:])
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; had {self.data!r}")
            self.data += chunk

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def starttls(self):
        assert self.ask(b"STARTTLS").startswith(b"220 ")
        self.sock = self.server.tls().wrap_socket(self.sock, server_hostname="localhost")
