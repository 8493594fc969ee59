"""
Small SMTP servers for outbound tests: each answers as its C{behaviour} says, so a test can
have one that accepts, one that defers, one that rejects, one that hangs or drops, with or
without STARTTLS, and see exactly what arrived.

Behaviour keys (all optional):
  greeting      the greeting line (default "220 sink ESMTP"); "" = never greet (hang)
  starttls      offer STARTTLS (needs tls_cert/tls_key, PEM paths); "broken": offer it, then
                answer the handshake with garbage; "refuse": offer it, then answer 454
  dsn           offer DSN
  smtputf8      offer SMTPUTF8 (default true)
  pipelining    offer PIPELINING (default true)
  rcpt          {address: "reply"} replies to RCPT for some recipients (default "250 2.1.5 ok")
  rcpt_default  the reply to any other RCPT
  mail          the reply to MAIL
  rset          the reply to RSET
  data_end      the reply after the data (default "250 2.0.0 queued as N")
  drop_in_data  close the connection after this many bytes of data
  defer_first   answer "451 4.3.0 try later" to the first N transactions' end of data, then data_end
  data_end_delay  seconds to wait before answering the end of data; a message counts as
                received only once its 250 is sent (a connection lost before gets nothing)

Messages received are appended to C{sink.received}: dicts with mail_from, mail_params,
rcpts (accepted ones with their parameters), data (the raw DATA bytes, dot-stuffed as sent),
message (unstuffed, CRLF), tls (bool), helo, auth (the AUTH command's arguments, if any).

Run as a program (C{python sinks.py spec.json}) it serves the sinks the JSON spec lists
(C{[{"host": "127.0.0.2", "port": 0, ...behaviour}]}), prints one line of JSON with the ports
once listening, and writes each received message to C{<out_dir>/<host>-<n>.json}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twisted.internet import protocol
from twisted.protocols import basic


class SinkProtocol(basic.LineReceiver):
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.sink = self.factory.sink
        self.sink.connections += 1
        self.b = self.factory.behaviour
        self.tls = False
        self.authed = None
        self.helo = None
        self.reset()
        greeting = self.b.get("greeting", "220 sink ESMTP")
        if greeting:
            self.sendLine(greeting.encode())

    def reset(self):
        self.mailFrom = None
        self.mailParams = ""
        self.rcpts = []
        self.inData = False
        self.data = bytearray()

    def lineReceived(self, line):
        self.sink.log.append(line)
        if self.inData:
            self.dataLine(line)
            return
        word, _, rest = line.decode("utf-8", "replace").partition(" ")
        word = word.upper()
        if word in ("EHLO", "HELO"):
            self.helo = rest
            if word == "HELO":
                self.sendLine(b"250 sink")
                return
            lines = ["sink", "SIZE 100000000", "8BITMIME"]
            if self.b.get("pipelining", True):
                lines.append("PIPELINING")
            if self.b.get("starttls") and not self.tls:
                lines.append("STARTTLS")
            if self.b.get("dsn"):
                lines.append("DSN")
            if self.b.get("smtputf8", True):
                lines.append("SMTPUTF8")
            if self.b.get("auth"):
                lines.append("AUTH PLAIN LOGIN")
            for i, text in enumerate(lines):
                self.sendLine(("250-" if i < len(lines) - 1 else "250 ").encode() + text.encode())
        elif word == "STARTTLS" and self.b.get("starttls") == "refuse":
            self.sendLine(b"454 4.7.0 TLS not available due to temporary reason")
        elif word == "STARTTLS" and self.b.get("starttls") == "broken":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.write(b"this is not a TLS server hello\r\n")
            self.transport.loseConnection()
        elif word == "STARTTLS" and self.b.get("starttls"):
            self.sendLine(b"220 2.0.0 go ahead")
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization
            from twisted.internet import ssl

            # (cryptography's objects: Twisted's PrivateCertificate hands pyOpenSSL its deprecated X509)
            cert = x509.load_pem_x509_certificate(Path(self.b["tls_cert"]).read_bytes())
            key = serialization.load_pem_private_key(Path(self.b["tls_key"]).read_bytes(), None)
            self.transport.startTLS(ssl.CertificateOptions(privateKey=key, certificate=cert))
            self.tls = True
            self.reset()
        elif word == "AUTH":
            self.sink.auth.append(rest)
            self.authed = rest
            self.sendLine(self.b.get("auth_reply", "235 2.7.0 ok").encode())
        elif word == "MAIL":
            self.mailFrom = rest[5:].split(">")[0].lstrip("<")
            self.mailParams = rest.partition(">")[2].strip()
            self.sendLine(self.b.get("mail", "250 2.1.0 ok").encode())
        elif word == "RCPT":
            address = rest[3:].split(">")[0].lstrip("<")
            reply = self.b.get("rcpt", {}).get(address, self.b.get("rcpt_default", "250 2.1.5 ok"))
            if reply.startswith("2"):
                self.rcpts.append((address, rest.partition(">")[2].strip()))
            self.sendLine(reply.encode())
        elif word == "DATA":
            if not self.rcpts:
                self.sendLine(b"554 5.5.1 no valid recipients")
                return
            self.inData = True
            self.sendLine(b"354 go")
        elif word == "RSET":
            self.reset()
            self.sendLine(self.b.get("rset", "250 2.0.0 ok").encode())
        elif word == "NOOP":
            self.sendLine(b"250 2.0.0 ok")
        elif word == "QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"500 5.5.2 what")

    pending = None

    def accept(self, record, reply):
        self.pending = None
        if reply.startswith(b"2"):
            self.sink.received.append(record)
            self.sink.onReceive(record)
        self.sendLine(reply)

    def connectionLost(self, reason):
        if self.pending is not None and self.pending.active():
            self.pending.cancel()

    def dataLine(self, line):
        if line == b".":
            self.inData = False
            n = self.sink.transactions = self.sink.transactions + 1
            raw = bytes(self.data)
            message = b"".join(l[1:] + b"\r\n" if l.startswith(b".") else l + b"\r\n"
                               for l in raw.split(b"\r\n")[:-1])
            deferFirst = self.b.get("defer_first", 0)
            if n <= deferFirst:
                self.sendLine(b"451 4.3.0 try again later")
            else:
                record = {"mail_from": self.mailFrom, "mail_params": self.mailParams, "rcpts": self.rcpts,
                          "data": raw, "message": message, "tls": self.tls, "helo": self.helo,
                          "auth": self.authed}
                reply = self.b.get("data_end", "250 2.0.0 queued as %d" % n).encode()
                delay = self.b.get("data_end_delay")
                if delay:
                    from twisted.internet import reactor

                    self.pending = reactor.callLater(delay, self.accept, record, reply)
                else:
                    self.accept(record, reply)
            self.reset()
            return
        self.data += line + b"\r\n"
        drop = self.b.get("drop_in_data")
        if drop is not None and len(self.data) >= drop:
            self.transport.abortConnection()


class Sink(protocol.Factory):
    protocol = SinkProtocol

    def __init__(self, behaviour: dict | None = None, onReceive=None):
        self.behaviour = behaviour or {}
        self.sink = self
        self.received: list[dict] = []
        self.log: list[bytes] = []
        self.auth: list[str] = []
        self.connections = 0
        self.transactions = 0
        self.onReceive = onReceive or (lambda record: None)


def main(specPath: str, outDir: str) -> None:
    from twisted.internet import reactor

    spec = json.loads(Path(specPath).read_text())
    out = Path(outDir)
    ports = []
    for i, entry in enumerate(spec):
        host, port = entry.pop("host"), entry.pop("port", 0)
        counter = iter(range(1, 1 << 30))

        def save(record, host=host, counter=counter):
            record = dict(record, data=record["data"].decode("utf-8", "replace"),
                          message=record["message"].decode("utf-8", "replace"))
            path = out / f"{host}-{next(counter)}.json"
            path.with_suffix(".tmp").write_text(json.dumps(record))
            path.with_suffix(".tmp").rename(path)

        listening = reactor.listenTCP(port, Sink(entry, save), interface=host)
        ports.append(listening.getHost().port)
    print(json.dumps(ports), flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
