"""
The queue runner over real sockets: a twisted.names server (tests/queue/fakedns.py) answers MX
and address queries for test domains, pointing at small SMTP sinks (tests/queue/sinks.py) on
127.0.0.x that accept, defer, reject, hang or offer STARTTLS.  The runner's schedule runs on a
C{task.Clock}, so retries and expiry happen without waiting; the network is real.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from pymaild import tls
from pymaild.queue.files import DELIVERED, FAILED, PENDING, Envelope, QueueFiles, Recipient
from pymaild.queue.mx import MXResolver, makeResolver
from pymaild.queue import files as filesmod
from pymaild.queue.runner import Destination, Policy, Runner, _Remover

import sys

sys.path.insert(0, str(Path(__file__).parent))
from fakedns import startDNSServer  # noqa: E402
from sinks import Sink  # noqa: E402


def commonPort(hosts) -> int:
    """A port free on every one of C{hosts} (127.0.0.x)."""
    for _ in range(50):
        s = socket.socket()
        s.bind((hosts[0], 0))
        port = s.getsockname()[1]
        s.close()
        ok = True
        for host in hosts:
            t = socket.socket()
            try:
                t.bind((host, port))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return port
    raise RuntimeError("no common port")


MESSAGE = b"From: alice@here.test\nTo: someone\nSubject: hello\n\nHello.\n.leading dot\n"


class _Base(unittest.TestCase):
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    zones = {
        "accept.test": [("MX", 10, "mx-a.test")],
        "defer.test": [("MX", 10, "mx-b.test")],
        "reject.test": [("MX", 10, "mx-c.test")],
        "mx-a.test": [("A", "127.0.0.2")],
        "mx-b.test": [("A", "127.0.0.3")],
        "mx-c.test": [("A", "127.0.0.4")],
        "dead.test": [("A", "127.0.0.9")],
        "twomx.test": [("MX", 10, "dead.test"), ("MX", 20, "mx-a.test")],
        "equal.test": [("MX", 10, "mx-a.test"), ("MX", 10, "mx-b.test")],
        "nullmx.test": [("MX", 0, ".")],
        "servfail.test": "SERVFAIL",
        "hang.test": [("MX", 10, "mx-e.test"), ("MX", 20, "mx-a.test")],
        "mx-e.test": [("A", "127.0.0.5")],
        "nopipe.test": [("MX", 10, "mx-e.test")],
        "v6.test": [("MX", 10, "mx-v6.test")],
        "mx-v6.test": [("AAAA", "::1")],
        "both.test": [("MX", 10, "mx-both.test")],
        "mx-both.test": [("A", "127.0.0.9"), ("AAAA", "::1")],
    }
    behaviours = {
        "127.0.0.2": {},
        "127.0.0.3": {"defer_first": 1},
        "127.0.0.4": {"rcpt_default": "550 5.1.1 no such user here"},
        "127.0.0.5": {"pipelining": False, "rcpt": {"no@nopipe.test": "550 5.1.1 no such user"}},
    }
    policy = {}

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="queue-runner-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.files = QueueFiles(self.tmp / "queue")
        self.files.create()
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.port = commonPort(self.hosts)
        self.sinks = {}
        for host in self.hosts:
            behaviour = dict(self.behaviours.get(host, {}))
            if behaviour.get("starttls") is True:
                cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
                if not cert.exists():
                    tls.generateSelfSigned(cert, key, "mx-a.test")
                behaviour.update(tls_cert=str(cert), tls_key=str(key))
            sink = self.sinks[host] = Sink(behaviour)
            listening = reactor.listenTCP(self.port, sink, interface=host)
            self.addCleanup(listening.stopListening)
        dnsPort, stop = startDNSServer(self.zones)
        self.addCleanup(stop)
        self.resolver = MXResolver(makeResolver([("127.0.0.1", dnsPort)], timeout=2.0), shuffle=self.shuffle)
        self.bounces = []
        self.runner = self.makeRunner()

    def shuffle(self, items):
        pass

    def makeRunner(self, **policy):
        settings = dict(remotePort=self.port, minBackoff=300, maxBackoff=3600, maxLifetime=5 * 86400,
                        connectTimeout=2, commandTimeout=2)
        settings.update(self.policy)
        settings.update(policy)

        def bounce(path, recipient):
            self.bounces.append((recipient, Path(path).read_bytes()))
            return defer.succeed(None)

        runner = Runner(self.files, self.resolver, lambda f, *a: defer.maybeDeferred(f, *a), self.clock,
                        Policy(**settings), "queue.test", bounce, tlsOptions=tls.clientTLS)
        self.files.recover()  # (as service.build does before anything can be queued)
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    def enqueue(self, recipients, sender="alice@here.test", message=MESSAGE, **kw) -> str:
        envelope = Envelope(id="", sender=sender, arrival=self.clock.seconds(),
                            recipients=[Recipient(r) if isinstance(r, str) else r for r in recipients], **kw)
        id = self.files.enqueue(message, envelope)
        self.runner.add(id)
        return id

    @defer.inlineCallbacks
    def runDue(self, advance: float = 0):
        """Advance the runner's clock and wait for every attempt that starts."""
        self.clock.advance(advance)
        while self.runner.attempts:
            yield defer.DeferredList(list(self.runner.attempts.values()))

    @defer.inlineCallbacks
    def settle(self):
        """Start what is due, and wait until no attempt and no connection is under way."""
        self.clock.advance(0)
        while self.runner.attempts or self.runner.working:
            yield defer.DeferredList(list(self.runner.attempts.values()) + list(self.runner.working))
            self.clock.advance(0)

    def envelope(self, id) -> Envelope:
        return self.files.load(id)

    @defer.inlineCallbacks
    def waitFor(self, condition, timeout=10.0):
        """Poll C{condition} on the real reactor (sinks and DNS answer there) until it holds."""
        for _ in range(int(timeout / 0.02)):
            if condition():
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail("timed out")



class RunnerCase(_Base):
    @defer.inlineCallbacks
    def test_three_domains_accept_defer_reject(self):
        """
        One message to a domain that accepts, one that defers once, one that rejects: the first
        gets it at once, the third fails with one DSN to the sender, the second gets it at the
        retry 5 minutes later, and then the message leaves the queue.
        """
        id = self.enqueue(["bob@accept.test", "carol@defer.test", "dave@reject.test"])
        yield self.runDue()
        state = {r.address: r for r in self.envelope(id).recipients}
        self.assertEqual(state["bob@accept.test"].state, DELIVERED)
        self.assertEqual(state["carol@defer.test"].state, PENDING)
        self.assertEqual(state["carol@defer.test"].attempts, 1)
        self.assertEqual(state["carol@defer.test"].next_attempt, self.clock.seconds() + 300)
        self.assertIn("451", state["carol@defer.test"].reply)
        self.assertEqual(state["dave@reject.test"].state, FAILED)
        self.assertEqual(state["dave@reject.test"].status, "5.1.1")
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)
        self.assertEqual(self.sinks["127.0.0.2"].received[0]["rcpts"][0][0], "bob@accept.test")
        self.assertEqual(len(self.bounces), 1)
        to, dsn = self.bounces[0]
        self.assertEqual(to, "alice@here.test")
        self.assertIn(b"dave@reject.test", dsn)
        self.assertIn(b"550 5.1.1 no such user here", dsn)
        self.assertNotIn(b"Final-Recipient: rfc822; carol@defer.test", dsn)

        yield self.runDue(299)
        self.assertEqual(self.sinks["127.0.0.3"].transactions, 1)  # not yet
        yield self.runDue(1)
        self.assertEqual(len(self.sinks["127.0.0.3"].received), 1)
        self.assertEqual(self.sinks["127.0.0.3"].transactions, 2)
        self.assertEqual(self.files.ids(), [])  # done
        self.assertEqual(len(self.bounces), 1)
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)  # never twice

    @defer.inlineCallbacks
    def test_message_arrives_intact_with_dots(self):
        """Lines starting with a dot, one exactly at 16 KiB, arrive as they were."""
        body = b"x" * (16384 - 40) + b"\n"
        message = b"Subject: dots\n\n" + body
        message += b"." * (16384 - len(message) % 16384 - 1) + b"\n" if len(message) % 16384 else b""
        message = b"Subject: dots\n\n" + b"a" * 16368 + b"\n.at the boundary\n..two\n.\nend\n"
        self.assertEqual(message.index(b"\n.at") + 1, 16384)
        self.enqueue(["bob@accept.test"], message=message)
        yield self.runDue()
        [got] = self.sinks["127.0.0.2"].received
        self.assertEqual(got["message"], message.replace(b"\n", b"\r\n"))
        self.assertEqual(self.sinks["127.0.0.2"].transactions, 1)

    def holdOpening(self, ids):
        """The envelopes of C{ids} are read only when the test says (a slow thread)."""
        held, run = {}, self.runner.run

        def slow(f, *args):
            if f == self.runner._open and args[0] in ids:
                held[args[0]] = defer.Deferred().addCallback(lambda _: run(f, *args))
                return held[args[0]]
            return run(f, *args)

        self.runner.run = slow
        return held

    @defer.inlineCallbacks
    def test_a_connection_waits_for_a_job_on_its_way(self):
        """
        A connection that finds no job while another message's envelope is still being read
        waits (parked) instead of QUIT, and carries that message when its job comes: one
        session for both.
        """
        from pymaild.queue import runner as runnermod

        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, perDestination=1))
        first = self.enqueue(["a@accept.test"])
        second = self.enqueue(["b@accept.test"])
        held = self.holdOpening({second})
        self.clock.advance(0)
        sink = self.sinks["127.0.0.2"]
        yield self.waitFor(lambda: sum(len(d.parked) for d in self.runner.destinations.values()) == 1)
        self.assertEqual([r["rcpts"][0][0] for r in sink.received], ["a@accept.test"])
        self.assertNotIn(first, self.files.ids())
        held[second].callback(None)
        yield self.settle()
        self.assertEqual(sorted(r["rcpts"][0][0] for r in sink.received), ["a@accept.test", "b@accept.test"])
        self.assertEqual((sink.connections, sink.transactions), (1, 2))
        self.assertEqual(self.files.ids(), [])
        self.assertEqual(runnermod.PARK_WAIT, 0.5)

    @defer.inlineCallbacks
    def test_a_parked_connection_quits_when_nothing_comes(self):
        """
        Parked, a connection QUITs once no envelope is being read any more (the message was
        deleted meanwhile), or after PARK_WAIT seconds; the next message opens a new session.
        """
        from pymaild.queue.runner import PARK_WAIT

        sink = self.sinks["127.0.0.2"]
        quits = lambda: sum(1 for line in sink.log if line.upper().startswith(b"QUIT"))
        for ending in ("gone", "timeout"):
            sessions, quit = sink.connections, quits()
            self.enqueue([f"{ending}1@accept.test"])
            other = self.enqueue([f"{ending}2@accept.test"])
            held = self.holdOpening({other})
            self.clock.advance(0)
            parked = lambda: sum(len(d.parked) for d in self.runner.destinations.values())
            yield self.waitFor(lambda: parked() == 1)
            if ending == "gone":
                self.files.remove(other)
                held[other].callback(None)  # (KeyError: nothing comes)
            else:
                self.clock.advance(PARK_WAIT)
            yield self.waitFor(lambda: parked() == 0)
            yield self.waitFor(lambda: not self.runner.working)
            self.assertEqual((sink.connections, quits()), (sessions + 1, quit + 1))  # (QUIT, not a time-out)
            if ending == "timeout":
                held[other].callback(None)
                yield self.settle()
                self.assertEqual(sink.connections, sessions + 2)  # (a new session for it)
            self.runner.run = lambda f, *a: defer.maybeDeferred(f, *a)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_small_messages_are_written_whole_and_larger_ones_streamed(self):
        """
        A message file of at most 16 KiB is read from its lock's descriptor (no file opened on
        the reactor) and written with its final dot at once; one byte more, and it is streamed
        with Twisted's FileSender.  Both arrive as they were, dots and all.
        """
        from twisted.protocols import basic

        from pymaild.queue.client import QueueClient

        streamed = []
        real = basic.FileSender.beginFileTransfer
        self.patch(basic.FileSender, "beginFileTransfer", lambda *a: (streamed.append(a[1].name), real(*a))[1])
        head = b"Subject: dots\n\n.first\n..two\n"
        tail = b"\n.\nlast line without an end"
        messages = []
        for size in (QueueClient.WHOLE_AT_MOST, QueueClient.WHOLE_AT_MOST + 1, 200):
            messages.append(head + b"a" * (size - len(head) - len(tail)) + tail)
            self.assertEqual(len(messages[-1]), size)
            self.enqueue([f"u{size}@accept.test"], message=messages[-1])
        yield self.runDue()
        got = {r["rcpts"][0][0]: r["message"] for r in self.sinks["127.0.0.2"].received}
        for message in messages:
            self.assertEqual(got[f"u{len(message)}@accept.test"], message.replace(b"\n", b"\r\n") + b"\r\n")
        self.assertEqual(len(streamed), 1)  # (the larger one alone)
        self.assertTrue(streamed[0].endswith(".eml"))

    @defer.inlineCallbacks
    def test_several_messages_over_one_connection(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, perDestination=1))
        for i in range(5):
            self.enqueue([f"u{i}@accept.test"])
        yield self.runDue()
        sink = self.sinks["127.0.0.2"]
        self.assertEqual(len(sink.received), 5)
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_a_server_without_pipelining_gets_one_command_at_a_time(self):
        id = self.enqueue(["yes@nopipe.test", "no@nopipe.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.5"].received
        self.assertEqual([r[0] for r in got["rcpts"]], ["yes@nopipe.test"])
        self.assertEqual(self.files.ids(), [])
        [(to, dsn)] = self.bounces
        self.assertIn(b"no@nopipe.test", dsn)

    @defer.inlineCallbacks
    def test_pipelined_transaction_with_some_recipients_refused(self):
        self.sinks["127.0.0.2"].behaviour["rcpt"] = {"b@accept.test": "550 5.1.1 no such user"}
        id = self.enqueue(["a@accept.test", "b@accept.test", "c@accept.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.2"].received
        self.assertEqual([r[0] for r in got["rcpts"]], ["a@accept.test", "c@accept.test"])
        self.assertEqual(len(self.bounces), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_mail_refused_in_a_pipeline(self):
        self.sinks["127.0.0.2"].behaviour["mail"] = "550 5.7.1 sender refused"
        self.enqueue(["a@accept.test", "b@accept.test"])
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        [(to, dsn)] = self.bounces
        self.assertIn(b"5.7.1 sender refused", dsn)

    @defer.inlineCallbacks
    def test_unreachable_first_mx_falls_back_to_the_next(self):
        id = self.enqueue(["bob@twomx.test"])
        yield self.runDue()
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_equal_preference_follows_the_resolvers_order(self):
        self.resolver.shuffle = lambda items: items.reverse()
        self.enqueue(["bob@equal.test"])
        yield self.runDue()
        self.assertEqual(len(self.sinks["127.0.0.3"].received) + self.sinks["127.0.0.3"].transactions, 1)
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 0)

    @defer.inlineCallbacks
    def test_ipv6_and_falling_back_from_ipv4_to_ipv6(self):
        """An MX with only an AAAA record; an MX whose IPv4 address refuses, then its IPv6 one."""
        sink = Sink({})
        try:
            listening = reactor.listenTCP(self.port, sink, interface="::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(listening.stopListening)
        self.enqueue(["bob@v6.test"])
        self.enqueue(["carol@both.test"])
        yield self.runDue()
        self.assertEqual(sorted(r["rcpts"][0][0] for r in sink.received), ["bob@v6.test", "carol@both.test"])
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_null_mx_fails_at_once(self):
        id = self.enqueue(["bob@nullmx.test"])
        yield self.runDue()
        self.assertEqual(self.files.ids(), [])
        [(to, dsn)] = self.bounces
        self.assertIn(b"Status: 5.1.10", dsn)

    @defer.inlineCallbacks
    def test_dns_failure_is_temporary(self):
        id = self.enqueue(["bob@servfail.test"])
        yield self.runDue()
        [r] = self.envelope(id).recipients
        self.assertEqual((r.state, r.status), (PENDING, "4.4.3"))
        self.assertEqual(self.bounces, [])

    @defer.inlineCallbacks
    def test_expiry_fails_with_a_dsn(self):
        """Deferred again and again until the lifetime is over: then failed, and reported once."""
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, maxLifetime=1000))
        id = self.enqueue(["carol@reject.test"])
        self.sinks["127.0.0.4"].behaviour["rcpt_default"] = "452 4.2.2 mailbox full"
        yield self.runDue()
        self.assertEqual(self.envelope(id).recipients[0].next_attempt, self.clock.seconds() + 300)
        yield self.runDue(300)
        self.assertEqual(self.envelope(id).recipients[0].next_attempt, self.clock.seconds() + 600)
        self.assertEqual(self.bounces, [])
        yield self.runDue(600)  # the next retry would be after the lifetime
        self.assertEqual(self.files.ids(), [])
        [(to, dsn)] = self.bounces
        self.assertIn(b"expired", dsn)
        self.assertIn(b"Status: 4.2.2", dsn)
        self.assertIn(b"Action: failed", dsn)

    @defer.inlineCallbacks
    def test_no_bounce_for_a_bounce(self):
        self.enqueue(["dave@reject.test"], sender="")
        yield self.runDue()
        self.assertEqual(self.files.ids(), [])
        self.assertEqual(self.bounces, [])

    @defer.inlineCallbacks
    def test_notify_never_and_orcpt(self):
        self.enqueue([Recipient("dave@reject.test", notify=["NEVER"]),
                      Recipient("erin@reject.test", orcpt="rfc822;erin@alias.test")])
        yield self.runDue()
        [(to, dsn)] = self.bounces
        self.assertNotIn(b"dave@reject.test", dsn)
        self.assertIn(b"Original-Recipient: rfc822; erin@alias.test", dsn)

    @defer.inlineCallbacks
    def test_corrupt_envelope_is_set_aside(self):
        bad = self.enqueue(["bob@accept.test"])
        self.files.paths(bad)[1].write_text("{not json")
        good = self.enqueue(["carl@accept.test"])
        yield self.runDue()
        self.assertEqual(self.files.ids(), [])
        self.assertTrue((self.files.corrupt / f"{bad}.json").exists())
        self.assertEqual([r["rcpts"][0][0] for r in self.sinks["127.0.0.2"].received], ["carl@accept.test"])

    @defer.inlineCallbacks
    def test_restart_picks_up_the_queue(self):
        """A new runner over the same directory finds the deferred message and sends it when due."""
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        yield self.runner.stopService()
        self.runner = self.makeRunner()
        yield self.runner.ready
        yield self.runDue(300)
        self.assertEqual(len(self.sinks["127.0.0.3"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_held_message_waits(self):
        id = self.enqueue(["bob@accept.test"], held=True)
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        self.assertEqual(self.files.ids(), [id])


class TLSCase(_Base):
    behaviours = {"127.0.0.2": {"starttls": True}, "127.0.0.3": {"starttls": "broken"},
                  "127.0.0.4": {"starttls": "refuse"}}

    @defer.inlineCallbacks
    def test_starttls_refused_falls_back_to_plain_text(self):
        self.enqueue(["dave@reject.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.4"].received
        self.assertFalse(got["tls"])

    @defer.inlineCallbacks
    def test_a_failed_handshake_falls_back_to_plain_text(self):
        self.enqueue(["carol@defer.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.3"].received
        self.assertFalse(got["tls"])
        self.assertEqual(self.sinks["127.0.0.3"].connections, 2)

    @defer.inlineCallbacks
    def test_a_failed_handshake_is_not_retried_in_plain_text_when_tls_is_required(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, tls="encrypt"))
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.3"].received, [])
        self.assertEqual(self.sinks["127.0.0.3"].connections, 1)
        self.assertEqual(self.envelope(id).recipients[0].state, PENDING)

    @defer.inlineCallbacks
    def test_opportunistic_tls_takes_a_self_signed_certificate(self):
        self.enqueue(["bob@accept.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.2"].received
        self.assertTrue(got["tls"])

    @defer.inlineCallbacks
    def test_verify_policy_with_the_ca_file_delivers(self):
        cert = self.tmp / "cert.pem"
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, tls="verify"))
        self.runner.tlsOptions = lambda host, verify: tls.clientTLS(host, verify, cert)
        self.enqueue(["bob@accept.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.2"].received
        self.assertTrue(got["tls"])

    @defer.inlineCallbacks
    def test_verify_policy_refuses_an_untrusted_certificate(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, tls="verify"))
        id = self.enqueue(["bob@accept.test"])
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        [r] = self.envelope(id).recipients
        self.assertEqual(r.state, PENDING)

    @defer.inlineCallbacks
    def test_encrypt_policy_refuses_a_server_without_starttls(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, tls="encrypt"))
        id = self.enqueue(["carol@defer.test"])
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.3"].transactions, 0)
        self.assertEqual(self.envelope(id).recipients[0].state, PENDING)


class ChangesCase(_Base):
    """Envelopes changed on disk by someone else (pymaildctl) are heard through inotify."""

    @defer.inlineCallbacks
    def test_release_by_another_process_is_heard(self):
        yield self.runner.ready
        id = self.enqueue(["bob@accept.test"], held=True)
        yield self.runDue()
        envelope = self.files.load(id)
        envelope.held = False
        envelope.recipients[0].next_attempt = 0
        with self.files.lock(id):
            self.files.save(envelope)
        yield self.waitFor(lambda: self.runner.due.get(id) is not None)
        yield self.runDue()
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_a_locked_message_waits_and_is_tried_later(self):
        id = self.enqueue(["bob@accept.test"])
        lock = self.files.lock(id).__enter__()
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.2"].received, [])
        lock.__exit__()
        yield self.runDue(2)
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)


class RelayCase(_Base):
    """[queue] relay_host: everything goes to one smarthost, with AUTH only over TLS."""

    behaviours = {"127.0.0.2": {"starttls": True, "auth": True}, "127.0.0.3": {"auth": True}}

    @defer.inlineCallbacks
    def test_smarthost_with_auth_over_starttls(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, relayHost=("127.0.0.2", self.port),
                                           authUser="relay@provider.test", authPassword="s3cret"))
        self.enqueue(["bob@nowhere-in-dns.test", "carol@also-not.test"])
        yield self.runDue()
        [got] = self.sinks["127.0.0.2"].received
        self.assertTrue(got["tls"])
        self.assertEqual(sorted(r[0] for r in got["rcpts"]), ["bob@nowhere-in-dns.test", "carol@also-not.test"])
        [auth] = self.sinks["127.0.0.2"].auth
        import base64

        mechanism, _, response = auth.partition(" ")
        self.assertEqual(mechanism, "PLAIN")
        self.assertEqual(base64.b64decode(response), b"\0relay@provider.test\0s3cret")

    @defer.inlineCallbacks
    def test_credentials_never_go_over_plain_text(self):
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, relayHost=("127.0.0.3", self.port),
                                           authUser="relay@provider.test", authPassword="s3cret"))
        id = self.enqueue(["bob@nowhere-in-dns.test"])
        yield self.runDue()
        self.assertEqual(self.sinks["127.0.0.3"].auth, [])
        self.assertEqual(self.sinks["127.0.0.3"].received, [])
        [r] = self.envelope(id).recipients
        self.assertEqual(r.state, PENDING)


class BadServersCase(_Base):
    """Servers that never greet, or drop the connection in the middle of the data."""

    behaviours = {"127.0.0.5": {"greeting": ""}, "127.0.0.4": {"drop_in_data": 10}}
    policy = {"commandTimeout": 1}

    @defer.inlineCallbacks
    def test_a_server_that_never_greets_times_out_and_the_next_mx_gets_it(self):
        id = self.enqueue(["bob@hang.test"])
        yield self.runDue()
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 1)
        self.assertEqual(self.files.ids(), [])

    @defer.inlineCallbacks
    def test_a_connection_lost_in_the_data_defers(self):
        id = self.enqueue(["dave@reject.test"])
        yield self.runDue()
        [r] = self.envelope(id).recipients
        self.assertEqual((r.state, r.attempts), (PENDING, 1))
        self.assertIn("lost connection", r.reply)
        self.assertEqual(self.bounces, [])


class ConnectionReuseCase(_Base):
    """The connection loops of one destination: dead hosts, and jobs that come as one QUITs."""

    @defer.inlineCallbacks
    def test_a_dead_destination_defers_each_message_once(self):
        connects = []
        connect = self.runner._connect
        self.runner._connect = lambda *a: (connects.append(a[:3]), connect(*a))[1]
        ids = [self.enqueue([f"u{i}@dead.test"]) for i in range(3)]
        yield self.runDue()
        self.assertLessEqual(len(connects), 3)
        for id in ids:
            [r] = self.envelope(id).recipients
            self.assertEqual((r.state, r.attempts), (PENDING, 1))
            self.assertIn("connection refused", r.reply)

    def countLookups(self) -> list:
        lookups = []
        resolve = self.resolver.resolve
        self.resolver.resolve = lambda name: (lookups.append(name), resolve(name))[1]
        return lookups

    @defer.inlineCallbacks
    def test_connection_loops_started_together_share_one_lookup(self):
        """
        The connection loops a destination starts at once (one per message here) ask DNS once
        between them, each gets the hosts, and every message goes out.
        """
        lookups = self.countLookups()
        for i in range(6):
            self.enqueue([f"u{i}@accept.test"])
        yield self.runDue()
        self.assertEqual(lookups, ["accept.test"])
        sink = self.sinks["127.0.0.2"]
        self.assertEqual(len(sink.received), 6)
        self.assertGreater(sink.connections, 1)  # (several loops, which found the hosts)
        self.assertEqual(self.runner._resolving, {})

    @defer.inlineCallbacks
    def test_a_shared_lookup_that_fails_defers_every_message(self):
        """A DNS failure reaches every connection loop that waited for the shared lookup."""
        lookups = self.countLookups()
        ids = [self.enqueue([f"u{i}@servfail.test"]) for i in range(3)]
        yield self.runDue()
        self.assertEqual(lookups, ["servfail.test"])
        for id in ids:
            [r] = self.envelope(id).recipients
            self.assertEqual((r.state, r.status), (PENDING, "4.4.3"))

    def test_a_shared_lookup_is_cancelled_when_every_waiter_is(self):
        """
        Cancelling one connection loop's wait leaves the lookup to the others; cancelling the
        last one cancels the lookup.
        """
        pending = []

        class Hanging:
            def resolve(self, name):
                d = defer.Deferred(lambda d: pending.remove(d))
                pending.append(d)
                return d

        self.runner.resolver = Hanging()
        destination = Destination("slow.test")
        first, second = self.runner._route(destination), self.runner._route(destination)
        self.assertEqual(len(pending), 1)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(len(pending), 1)
        self.assertNoResult(second)
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        self.assertEqual(pending, [])
        self.assertEqual(self.runner._resolving, {})

    @defer.inlineCallbacks
    def test_a_message_queued_while_the_connection_quits_is_sent(self):
        from pymaild.queue import client as clientmod

        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, perDestination=1))
        added = []
        quit = clientmod.QueueClient._disconnectFromServer

        def hooked(client):
            quit(client)
            if client._quitting and not added:
                added.append(self.enqueue(["b@accept.test"]))
                self.clock.advance(0)

        self.patch(clientmod.QueueClient, "_disconnectFromServer", hooked)
        self.enqueue(["a@accept.test"])
        yield self.runDue()
        yield self.settle()
        self.assertTrue(added)
        self.assertEqual(self.files.ids(), [])
        self.assertEqual(len(self.sinks["127.0.0.2"].received), 2)

    @defer.inlineCallbacks
    def test_no_rset_after_a_message_and_a_refused_rset_ends_the_session(self):
        """
        After the reply to the final dot the next MAIL follows at once (no RSET); after a
        transaction that ended early (all recipients refused) RSET is sent, and a server that
        refuses it gets a new connection for the rest.
        """
        self.runner.policy = Policy(**dict(self.runner.policy.__dict__, perDestination=1))
        sink = self.sinks["127.0.0.2"]
        sink.behaviour.update(rset="500 5.5.1 no RSET here", rcpt={"u1@accept.test": "550 5.1.1 no such user"})
        ids = [self.enqueue([f"u{i}@accept.test"]) for i in range(4)]
        yield self.settle()
        self.assertEqual(self.files.ids(), [])
        self.assertEqual(sorted(r["rcpts"][0][0] for r in sink.received), ["u0@accept.test", "u2@accept.test", "u3@accept.test"])
        self.assertEqual(sink.connections, 2)
        self.assertEqual(sum(1 for line in sink.log if line.upper() == b"RSET"), 1)
        self.assertEqual(len(self.bounces), 1)

    def test_backoff_does_not_overflow(self):
        self.assertEqual(Policy(minBackoff=1.0, maxBackoff=3600.0).backoff(5000), 3600.0)


class DelayWarningCase(_Base):
    behaviours = {"127.0.0.4": {"rcpt_default": "451 4.2.1 mailbox busy"}}
    policy = {"delayWarning": 600, "minBackoff": 300, "maxBackoff": 300}

    @defer.inlineCallbacks
    def test_one_delay_warning_for_those_who_want_it(self):
        id = self.enqueue([Recipient("a@reject.test"), Recipient("b@reject.test", notify=["FAILURE"]),
                           Recipient("c@reject.test", notify=["DELAY"])])
        yield self.runDue()
        self.assertEqual(self.bounces, [])  # (not yet 10 minutes)
        yield self.runDue(300)
        self.assertEqual(self.bounces, [])
        yield self.runDue(300)
        [(to, dsn)] = self.bounces
        self.assertIn(b"Action: delayed", dsn)
        self.assertIn(b"Final-Recipient: rfc822; a@reject.test", dsn)
        self.assertIn(b"Final-Recipient: rfc822; c@reject.test", dsn)
        self.assertNotIn(b"b@reject.test", dsn)
        self.assertIn(b"Will-Retry-Until:", dsn)
        self.assertTrue(self.envelope(id).warned)
        yield self.runDue(300)
        self.assertEqual(len(self.bounces), 1)  # once only


class RemoverCase(unittest.TestCase):
    """
    Messages that are done are removed in batches (L{_Remover}): one store call at a time, each
    taking what was handed in meanwhile, with one directory fsync; a message's Deferred fires
    once its batch has removed it and released its lock.
    """

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="queue-remover-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.files = QueueFiles(self.tmp / "queue")
        self.files.create()
        self.calls = []  # (function, args, Deferred): the store calls, fired by hand

        def run(f, *args):
            d = defer.Deferred()
            self.calls.append((f, args, d))
            return d

        self.remover = _Remover(self.files, run)

    def queued(self, n):
        ids = [self.files.enqueue(MESSAGE, Envelope(id="", sender="a@here.test", arrival=0,
                                                    recipients=[Recipient("b@there.test")])) for _ in range(n)]
        locks = [self.files.lock(id).__enter__() for id in ids]
        return ids, locks

    def finish(self, i=0):
        """Run store call C{i} now, in this thread, and hand its outcome back."""
        f, args, d = self.calls[i]
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def test_messages_done_meanwhile_go_in_one_batch(self):
        ids, locks = self.queued(4)
        syncs = []
        real = filesmod.syncDirectory
        self.patch(filesmod, "syncDirectory", lambda path: (syncs.append(path), real(path)))
        fired = []
        for id, lock in zip(ids, locks):
            self.remover.remove(id, lock).addCallback(lambda _, id=id: fired.append(id))
        self.assertEqual([args[0] for _, args, _ in self.calls], [ids[:1]])  # (the others wait)
        self.finish(0)
        self.assertEqual(fired, ids[:1])
        self.assertEqual([args[0] for _, args, _ in self.calls[1:]], [ids[1:]])
        self.assertTrue(self.files.paths(ids[1])[0].exists() and locks[1].fd is not None)
        self.finish(1)
        self.assertEqual(fired, ids)
        self.assertEqual(len(syncs), 2)  # (one per batch, not one per message)
        for id, lock in zip(ids, locks):
            self.assertFalse(any(p.exists() for p in self.files.paths(id)))
            self.assertIsNone(lock.fd)
        self.assertEqual(self.files.ids(), [])
        self.assertEqual(len(self.calls), 2)  # (nothing left: no empty batch)

    def test_a_failed_batch_fails_its_messages_and_the_next_batch_runs(self):
        ids, locks = self.queued(3)
        results = {}
        for id, lock in zip(ids, locks):
            self.remover.remove(id, lock).addBoth(lambda r, id=id: results.__setitem__(id, r))
        real = filesmod.syncDirectory

        def failing(path):
            raise OSError(5, "I/O error")

        self.patch(filesmod, "syncDirectory", failing)
        self.finish(0)
        self.assertIsInstance(results[ids[0]], Failure)
        self.assertIsNotNone(locks[0].fd)  # (not released: the attempt's own cleanup does that)
        self.patch(filesmod, "syncDirectory", real)
        self.finish(1)
        self.assertEqual([results[id] for id in ids[1:]], [None, None])
        self.assertEqual([lock.fd for lock in locks[1:]], [None, None])
        locks[0].__exit__()
