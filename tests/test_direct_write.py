"""etcdproxy.grpc.directwrite over real loopback TCP connections: bytes sent at
once when Twisted's buffer is empty, the rest through Twisted's buffer, every
byte in order, and other transports left to Twisted."""

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from etcdproxy.grpc.directwrite import DirectWriter


class Sink(protocol.Protocol):
    def __init__(self):
        self.received = bytearray()

    def dataReceived(self, data):
        self.received += data


class Writer(protocol.Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)


class WriterFactory(protocol.Factory):
    protocol = Writer

    def __init__(self):
        self.made = defer.Deferred()


class DirectWriteTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connected_pair(self):
        factory = WriterFactory()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        sink = Sink()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), sink)
        writer = yield factory.made
        self.addCleanup(sink.transport.abortConnection)
        self.addCleanup(writer.transport.abortConnection)
        return writer, sink

    @defer.inlineCallbacks
    def until(self, condition, timeout=10.0):
        for _ in range(int(timeout / 0.01)):
            if condition():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not met within %.0f s" % timeout)

    @defer.inlineCallbacks
    def test_small_writes_go_out_at_once(self):
        writer, sink = yield self.connected_pair()
        out = DirectWriter(writer.transport)
        for i in range(50):
            out.write(b"message %03d;" % i)
            # sent before the reactor runs again: nothing waits in Twisted's buffer
            self.assertEqual(writer.transport.dataBuffer[writer.transport.offset:], b"")
            self.assertEqual(writer.transport._tempDataLen, 0)
        self.assertEqual(out.direct_bytes, 50 * 12)
        yield self.until(lambda: len(sink.received) == 50 * 12)
        self.assertEqual(bytes(sink.received), b"".join(b"message %03d;" % i for i in range(50)))

    @defer.inlineCallbacks
    def test_a_reader_that_stops_gets_every_byte_in_order(self):
        writer, sink = yield self.connected_pair()
        sink.transport.pauseProducing()  # the peer reads nothing for now
        out = DirectWriter(writer.transport)
        chunks = [bytes([i % 251]) * 65536 + b"#%04d" % i for i in range(120)]  # about 8 MiB
        for chunk in chunks:
            out.write(chunk)
        total = sum(map(len, chunks))
        # the socket took what it could at once, Twisted's buffer holds the rest
        self.assertGreater(out.direct_bytes, 0)
        self.assertLess(out.direct_bytes, total)
        sink.transport.resumeProducing()
        yield self.until(lambda: len(sink.received) >= total, timeout=30)
        self.assertEqual(len(sink.received), total)
        self.assertTrue(bytes(sink.received) == b"".join(chunks), "bytes out of order or changed")

    @defer.inlineCallbacks
    def test_a_write_over_twisteds_send_limit_goes_to_its_buffer_whole(self):
        writer, sink = yield self.connected_pair()
        out = DirectWriter(writer.transport)
        limit = writer.transport.SEND_LIMIT
        large = bytes(range(256)) * (3 * limit // 256) + b"end"
        out.write(b"small")
        out.write(large)  # the object itself waits in Twisted's buffer (no copy of a rest)
        self.assertIs(writer.transport._tempDataBuffer[-1], large)
        out.write(b"after")  # behind it, in order
        self.assertEqual(out.direct_bytes, len(b"small"))
        yield self.until(lambda: len(sink.received) >= len(large) + 10)
        self.assertTrue(bytes(sink.received) == b"small" + large + b"after", "bytes out of order or changed")

    @defer.inlineCallbacks
    def test_a_closing_connection_is_left_to_twisted(self):
        writer, sink = yield self.connected_pair()
        out = DirectWriter(writer.transport)
        out.write(b"before")
        writer.transport.loseConnection()
        # Twisted still sends what is written before it has flushed and closed:
        # through its own buffer, not at once
        out.write(b"after")
        self.assertEqual(out.direct_bytes, len(b"before"))
        yield self.until(lambda: not sink.transport.connected)
        self.assertEqual(bytes(sink.received), b"beforeafter")
        out.write(b"gone")  # after the close: dropped, as by Twisted's write
        self.assertEqual(out.direct_bytes, len(b"before"))

    @defer.inlineCallbacks
    def test_nothing_is_sent_once_the_connection_is_aborted(self):
        writer, sink = yield self.connected_pair()
        out = DirectWriter(writer.transport)
        out.write(b"before")
        writer.transport.abortConnection()
        out.write(b"after")  # Twisted drops it; so must this
        self.assertEqual(out.direct_bytes, len(b"before"))
        yield self.until(lambda: not sink.transport.connected)
        self.assertEqual(bytes(sink.received), b"before")

    @defer.inlineCallbacks
    def test_a_transport_with_tls_started_is_left_to_twisted(self):
        writer, sink = yield self.connected_pair()
        out = DirectWriter(writer.transport)
        written = []
        writer.transport.TLS = True  # what startTLS sets: its write encrypts
        writer.transport.write = written.append  # (no TLS here: only where the bytes go)
        self.addCleanup(vars(writer.transport).pop, "write")
        self.addCleanup(setattr, writer.transport, "TLS", False)
        out.write(b"secret")
        self.assertEqual((written, out.direct_bytes), ([b"secret"], 0))

    def test_other_transports_use_their_own_write(self):
        transport = StringTransport()
        out = DirectWriter(transport)
        out.write(b"abc")
        self.assertEqual(transport.value(), b"abc")
        self.assertEqual(out.direct_bytes, 0)
