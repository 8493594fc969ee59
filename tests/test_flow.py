"""
pymaild.flow's writing and holding helpers: L{writeNow} over real TCP connections on
127.0.0.1 (the reactor's own sockets), L{LazyPause} on a string transport (a parser-level
unit: what it changes is when the transport is told to stop reading).
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.protocols import basic
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from pymaild.flow import _IOV_MAX, HELD_INPUT, LazyPause, writeNow, writeSequenceNow


class _Collect(protocol.Protocol):
    """The client: everything received, and a Deferred fired once C{want} bytes are in."""

    def __init__(self, want: int):
        self.want = want
        self.data = bytearray()
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        if len(self.data) >= self.want and not self.done.called:
            self.done.callback(bytes(self.data))


class _Server(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class _TCPCase(unittest.TestCase):
    """A server and a client over TCP on 127.0.0.1 (the reactor's own sockets)."""

    def setUp(self):
        self.serverFactory = protocol.Factory.forProtocol(_Server)
        self.serverFactory.connected = defer.Deferred()
        self.wrapped = WrappingFactory(self.serverFactory)
        self.port = reactor.listenTCP(0, self.wrapped, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def _connect(self, want: int):
        client = _Collect(want)
        creator = protocol.ClientCreator(reactor, lambda: client)
        clientProto = yield creator.connectTCP("127.0.0.1", self.port.getHost().port)
        server = yield self.serverFactory.connected
        self.addCleanup(clientProto.transport.loseConnection)
        self.addCleanup(server.transport.loseConnection)
        return client, server

    @defer.inlineCallbacks
    def _partlySent(self, write, data, whole: bytes):
        """C{write(transport, data)} of more than the socket takes at once: it says so, the
        rest waits for the reactor, and the client gets C{whole}."""
        client, server = yield self._connect(len(whole))
        self.assertFalse(write(server.transport, data))
        self.assertIn(server.transport.transport, reactor.getWriters())
        received = yield client.done
        self.assertEqual(len(received), len(whole))
        self.assertEqual(received, whole)


class WriteNowTests(_TCPCase):
    @defer.inlineCallbacks
    def test_small_answer_goes_out_without_registering_for_writing(self):
        client, server = yield self._connect(5)
        # the transport is the WrappingFactory's ProtocolWrapper, as the listeners' tracking is
        self.assertIsInstance(server.transport, ProtocolWrapper)
        conn = server.transport.transport
        self.assertTrue(writeNow(server.transport, b"+OK\r\n"))
        self.assertNotIn(conn, reactor.getWriters())  # sent: nothing left for the reactor
        self.assertEqual(conn._tempDataBuffer, [])
        self.assertEqual((yield client.done), b"+OK\r\n")

    @defer.inlineCallbacks
    def test_behind_buffered_data_the_order_is_kept(self):
        client, server = yield self._connect(8)
        server.transport.write(b"first ")  # buffered until the reactor's next turn
        self.assertFalse(writeNow(server.transport, b"2\r"))
        self.assertIn(server.transport.transport, reactor.getWriters())
        self.assertEqual((yield client.done), b"first 2\r")

    def test_what_the_socket_does_not_take_is_buffered_and_arrives_whole(self):
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers take at once
        return self._partlySent(writeNow, big, big)

    @defer.inlineCallbacks
    def test_after_lose_connection_it_writes_as_write_does(self):
        client, server = yield self._connect(6)
        server.transport.loseConnection()
        conn = server.transport.transport
        self.assertFalse(writeNow(server.transport, b"late\r\n"))  # disconnecting: left to transport.write,
        self.assertIn(conn, reactor.getWriters())  # which sends it before the close
        self.assertEqual((yield client.done), b"late\r\n")

    def test_tls_and_unknown_transports_write_as_usual(self):
        t = StringTransport()
        self.assertFalse(writeNow(t, b"x\r\n"))
        self.assertEqual(t.value(), b"x\r\n")
        self.assertFalse(writeSequenceNow(t, [b"y", b"\r\n"]))
        self.assertEqual(t.value(), b"x\r\ny\r\n")


class WriteSequenceNowTests(_TCPCase):
    """L{writeSequenceNow}: the same, for a list of pieces gathered by C{sendmsg}."""

    @defer.inlineCallbacks
    def test_pieces_go_out_in_order_without_registering_for_writing(self):
        pieces = [b"* 1 FETCH (", b"BODY[] {3}\r\n", b"abc", b")\r\n"] * 3 + [b""]
        client, server = yield self._connect(sum(map(len, pieces)))
        conn = server.transport.transport
        self.assertTrue(writeSequenceNow(server.transport, pieces))
        self.assertNotIn(conn, reactor.getWriters())
        self.assertEqual(conn._tempDataBuffer, [])
        self.assertEqual((yield client.done), b"".join(pieces))

    @defer.inlineCallbacks
    def test_more_pieces_than_one_sendmsg_takes(self):
        pieces = [b"%d," % i for i in range(3 * _IOV_MAX + 7)]
        client, server = yield self._connect(sum(map(len, pieces)))
        self.assertTrue(writeSequenceNow(server.transport, pieces))
        self.assertEqual((yield client.done), b"".join(pieces))

    def test_what_the_socket_does_not_take_is_buffered_from_where_it_stopped(self):
        # 8 MiB in pieces of odd sizes: the socket stops within one of them
        pieces = [bytes([i % 251]) * (1000 + 37 * (i % 50)) for i in range(4000)]
        return self._partlySent(writeSequenceNow, pieces, b"".join(pieces))

    @defer.inlineCallbacks
    def test_behind_buffered_data_pieces_keep_their_order(self):
        client, server = yield self._connect(10)
        server.transport.write(b"first ")
        self.assertFalse(writeSequenceNow(server.transport, [b"2", b"\r", b"\n", b"."]))
        self.assertEqual((yield client.done), b"first 2\r\n.")


class _Lines(LazyPause, basic.LineReceiver):
    MAX_LENGTH = 1 << 20

    def __init__(self):
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)


class LazyPauseTests(unittest.TestCase):
    def setUp(self):
        self.t = StringTransport()
        self.p = _Lines()
        self.p.makeConnection(self.t)

    def test_held_lines_wait_without_stopping_the_transport(self):
        self.p.dataReceived(b"ONE\r\n")
        self.p.pauseProducing()
        self.p.dataReceived(b"TWO\r\nTHREE\r\n")
        self.assertEqual(self.p.lines, [b"ONE"])
        self.assertEqual(self.t.producerState, "producing")  # no epoll_ctl for a short hold
        self.p.resumeProducing()
        self.assertEqual(self.p.lines, [b"ONE", b"TWO", b"THREE"])
        self.assertEqual(self.t.producerState, "producing")

    def test_a_flood_while_held_stops_the_transport_then_resumes_it(self):
        self.p.pauseProducing()
        line = b"N" * 99 + b"\r\n"
        count = HELD_INPUT // len(line) + 2
        for _ in range(count):
            self.p.dataReceived(line)
        self.assertEqual(self.t.producerState, "paused")
        self.assertEqual(self.p.lines, [])
        self.p.resumeProducing()
        self.assertEqual(self.t.producerState, "producing")
        self.assertEqual(len(self.p.lines), count)

    def test_pausing_with_much_already_buffered_stops_the_transport_at_once(self):
        self.p.pauseProducing()
        self.p.dataReceived(b"X" * (HELD_INPUT - 10))  # (no line end: one partial line)
        self.p.resumeProducing()
        self.assertEqual(self.t.producerState, "producing")
        self.p.pauseProducing()  # the buffer already holds about HELD_INPUT bytes
        self.p.dataReceived(b"Y" * 20)
        self.assertEqual(self.t.producerState, "paused")


class IMAPHoldTests(unittest.TestCase):
    """
    The IMAP server holds the commands pipelined behind one that answers later (FETCH, STORE:
    a store thread) the same way, on its own protocol object: no C{epoll_ctl} for a short hold,
    and a client that floods meanwhile still stops the reading.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from pymaild.imap.server import IMAPFactory
        from pymaild.throttle import LoginThrottle

        self.clock = MemoryReactorClock()
        factory = IMAPFactory(portal=None, tls=None, implicitTLS=True, throttle=LoginThrottle(), clock=self.clock)
        self.p = factory.buildProtocol(None)
        self.p.callLater = self.clock.callLater  # the idle timer too, not on the global reactor
        self.t = StringTransport()
        self.p.makeConnection(self.t)
        self.t.clear()

    def tearDown(self):
        self.p.connectionLost(None)

    def test_commands_behind_a_held_one_wait_without_stopping_the_transport(self):
        self.p._hold(b"a")  # a FETCH is running in a store thread
        self.p.dataReceived(b"b NOOP\r\nc NOOP\r\n")
        self.assertEqual(self.t.producerState, "producing")
        self.assertEqual(self.t.value(), b"")
        self.p.sendPositiveResponse(b"a", b"FETCH completed")
        self.clock.advance(0)
        self.assertEqual(self.t.value(), b"a OK FETCH completed\r\nb OK NOOP completed\r\nc OK NOOP completed\r\n")
        self.assertEqual(self.t.producerState, "producing")

    def test_a_flood_behind_a_held_command_stops_the_reading_until_its_answer(self):
        count = HELD_INPUT // len(b"d NOOP\r\n") + 2
        self.p._hold(b"a")
        self.p.dataReceived(b"d NOOP\r\n" * count)
        self.assertEqual(self.t.producerState, "paused")
        self.assertEqual(self.t.value(), b"")
        self.p.sendPositiveResponse(b"a", b"FETCH completed")
        self.clock.advance(0)
        self.assertEqual(self.t.producerState, "producing")
        self.assertEqual(self.t.value().count(b"d OK NOOP completed\r\n"), count)


class IMAPAnswerTests(unittest.TestCase):
    """
    The IMAP server's tagged answer with nothing pipelined behind it goes out with one send,
    over a real TCP connection: the socket is not registered for writing (and unregistered
    after the next reactor turn) for it, two C{epoll_ctl} an answer.
    """

    def setUp(self):
        from pymaild.imap.server import IMAPFactory
        from pymaild.throttle import LoginThrottle

        factory = IMAPFactory(portal=None, tls=None, implicitTLS=True, throttle=LoginThrottle())
        self.connected = defer.Deferred()
        build = factory.buildProtocol

        def buildProtocol(addr):
            p = build(addr)
            reactor.callLater(0, self.connected.callback, p)
            return p

        factory.buildProtocol = buildProtocol
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_a_tagged_answer_goes_out_without_registering_for_writing(self):
        client = _Collect(1)
        creator = protocol.ClientCreator(reactor, lambda: client)
        clientProto = yield creator.connectTCP("127.0.0.1", self.port.getHost().port)
        server = yield self.connected
        self.addCleanup(clientProto.transport.loseConnection)
        yield client.done  # the greeting
        conn = server.transport
        while not isinstance(conn, tcp.Connection):
            conn = conn.transport
        registered = []
        original = conn.startWriting
        conn.startWriting = lambda: registered.append(1) or original()
        self.addCleanup(setattr, conn, "startWriting", original)
        client.want, client.done = len(client.data) + len(b"a OK NOOP completed\r\n"), defer.Deferred()
        clientProto.transport.write(b"a NOOP\r\n")
        answer = yield client.done
        self.assertTrue(answer.endswith(b"a OK NOOP completed\r\n"))
        self.assertEqual(registered, [])
        # pipelined: the first answer waits for the second (the usual write, registered)
        client.want, client.done = len(answer) + 2 * len(b"b OK NOOP completed\r\n"), defer.Deferred()
        clientProto.transport.write(b"b NOOP\r\nc NOOP\r\n")
        answer = yield client.done
        self.assertTrue(answer.endswith(b"b OK NOOP completed\r\nc OK NOOP completed\r\n"))
