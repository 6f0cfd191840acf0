"""The gRPC layer on its own (no etcd): a toy service served in-process by
etcdproxy.grpc.server, called through grpcio (in a thread) and through
etcdproxy.grpc.client."""

import gc
import gzip
import threading
import weakref

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived, StreamReset
from h2.exceptions import DenialOfServiceError
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from etcdproxy.grpc.client import Channel, GRPCClientProtocol, IClientCallListener
from etcdproxy.grpc.connection import Limits
from etcdproxy.grpc.h2connection import BoundedH2Connection, StreamRefused
from etcdproxy.grpc.framing import MessageDecoder, encode_message
from etcdproxy.grpc.metadata import application_metadata, format_timeout, parse_timeout
from etcdproxy.grpc.server import GRPCServerFactory, ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode, decode_grpc_message, encode_grpc_message
from tests.support.relay import RelayHandler


@implementer(ICallHandler)
class ToyHandler:
    """Unary, server-, client- and bidi-streaming behaviours chosen by method name."""

    def __init__(self, service, kind):
        self.service = service
        self.kind = kind
        self.received = []
        self.cancelled = None
        service.handlers.append(self)

    def call_started(self, call):
        self.call = call
        self.metadata = call.metadata
        if self.kind == b"Early":
            # Answers before the client half-closes: trailers, then RST_STREAM(NO_ERROR).
            for i in range(3000):
                call.send_message(b"%d" % i)
            call.finish()
        if self.kind == b"PausedCount":
            # Reads nothing for a while, as a handler whose upstream is slow.
            call.pause_receiving()
            reactor.callLater(0.3, call.resume_receiving)
        if self.kind == b"Big":
            self.call.registerProducer(self)
            self.paused = 0
            self.sent = 0
            self._produce()

    def request_received(self, message):
        self.received.append(message)
        if self.kind == b"Bidi":
            self.call.send_message(message.upper())

    def half_closed(self):
        call = self.call
        if self.kind == b"Unary":
            call.send_headers([(b"x-echo", dict(self.metadata).get(b"x-custom", b"-"))])
            call.send_message(self.received[0][::-1])
            call.finish()
        elif self.kind == b"ServerStream":
            for i in range(int(self.received[0])):
                call.send_message(b"%d" % i)
            call.finish()
        elif self.kind == b"ClientStream":
            call.send_message(b"|".join(self.received))
            call.finish()
        elif self.kind == b"PausedCount":
            call.send_message(b"%d" % len(self.received))
            call.finish()
        elif self.kind == b"Bidi":
            call.finish()
        elif self.kind == b"Fail":
            call.finish(StatusCode.NOT_FOUND, "nope: 100% \u2713\n", [(b"x-trailer", b"t1")])
        elif self.kind == b"Broken":
            raise RuntimeError("a bug in a handler")
        elif self.kind == b"Slow":
            reactor.callLater(0.3, lambda: (call.send_message(b"slow"), call.finish()))
        # Hang: never answers.

    # Big: streams 64 KiB messages while the client reads; IPushProducer.
    def _produce(self):
        while not self.paused and self.sent < 200:
            self.sent += 1
            self.call.send_message(b"x" * 65536)
        if self.sent >= 200:
            self.call.unregisterProducer()
            self.call.finish()

    def pauseProducing(self):
        self.paused += 1
        self.service.max_queued = max(self.service.max_queued, self.call.queued_bytes)

    def resumeProducing(self):
        self.paused = 0
        reactor.callLater(0, self._produce)

    def stopProducing(self):
        pass

    def call_cancelled(self, error):
        self.cancelled = error
        self.service.cancelled.append(error)

    def call_draining(self):
        # A call that would never end by itself ends when the server drains.
        if self.kind == b"Hang":
            self.call.finish(StatusCode.UNAVAILABLE, "draining")


class ToyService:
    def __init__(self):
        self.handlers = []
        self.cancelled = []
        self.max_queued = 0

    def __call__(self, path):
        service, _, method = path.lstrip(b"/").partition(b"/")
        if service != b"test.Toy":
            raise GRPCError(StatusCode.UNIMPLEMENTED, f"unknown service {service.decode()}")
        return ToyHandler(self, method)


class ServerTestMixin:
    limits = Limits()

    @defer.inlineCallbacks
    def setUp(self):
        self.service = ToyService()
        self.factory = GRPCServerFactory(self.service, reactor, self.limits)
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.port.stopListening()
        for c in list(self.factory.connections):
            c.abort()
        yield task.deferLater(reactor, 0.05, lambda: None)

    def grpcio(self, fn):
        """Runs fn(channel) in a thread with a fresh grpcio channel."""

        def run():
            with grpc.insecure_channel(self.address) as channel:
                return fn(channel)

        return threads.deferToThread(run)


def _identity(b):
    return b


def _call(channel, kind, path):
    return getattr(channel, kind)(path, request_serializer=_identity, response_deserializer=_identity)


class GrpcioClientTests(ServerTestMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_unary_with_metadata(self):
        def run(ch):
            response, call = _call(ch, "unary_unary", "/test.Toy/Unary").with_call(
                b"hello", metadata=[("x-custom", "v1")], timeout=5
            )
            return response, dict(call.initial_metadata()), call.code()

        response, headers, code = yield self.grpcio(run)
        self.assertEqual(response, b"olleh")
        self.assertEqual(headers["x-echo"], "v1")
        self.assertEqual(code, grpc.StatusCode.OK)

    @defer.inlineCallbacks
    def test_server_streaming(self):
        out = yield self.grpcio(lambda ch: list(_call(ch, "unary_stream", "/test.Toy/ServerStream")(b"5", timeout=5)))
        self.assertEqual(out, [b"0", b"1", b"2", b"3", b"4"])

    @defer.inlineCallbacks
    def test_client_streaming_gzip(self):
        def run(ch):
            return _call(ch, "stream_unary", "/test.Toy/ClientStream")(
                iter([b"a", b"b" * 1000, b"c"]), timeout=5, compression=grpc.Compression.Gzip
            )

        out = yield self.grpcio(run)
        self.assertEqual(out, b"a|" + b"b" * 1000 + b"|c")

    @defer.inlineCallbacks
    def test_bidi_streaming(self):
        out = yield self.grpcio(lambda ch: list(_call(ch, "stream_stream", "/test.Toy/Bidi")(iter([b"x", b"y", b"z"]), timeout=5)))
        self.assertEqual(out, [b"X", b"Y", b"Z"])

    @defer.inlineCallbacks
    def test_error_status_message_and_trailers(self):
        def run(ch):
            try:
                _call(ch, "unary_unary", "/test.Toy/Fail")(b"", timeout=5)
            except grpc.RpcError as e:
                return e.code(), e.details(), dict(e.trailing_metadata())
            return None

        code, details, trailers = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(details, "nope: 100% \u2713\n")
        self.assertEqual(trailers["x-trailer"], "t1")

    @defer.inlineCallbacks
    def test_handler_bug_ends_the_call_with_internal(self):
        def run(ch):
            try:
                _call(ch, "unary_unary", "/test.Toy/Broken")(b"", timeout=5)
            except grpc.RpcError as e:
                first = e.code(), e.details()
            return first, _call(ch, "unary_unary", "/test.Toy/Unary")(b"ok", timeout=5)

        (code, details), second = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.INTERNAL)
        self.assertEqual(details, "internal error in the proxy")
        self.assertEqual(second, b"ko")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_unknown_service(self):
        def run(ch):
            try:
                _call(ch, "unary_unary", "/other.Svc/M")(b"", timeout=5)
            except grpc.RpcError as e:
                return e.code(), e.details()

        code, details = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(details, "unknown service other.Svc")

    @defer.inlineCallbacks
    def test_deadline_cancels_handler(self):
        def run(ch):
            try:
                _call(ch, "unary_unary", "/test.Toy/Hang")(b"", timeout=0.3)
            except grpc.RpcError as e:
                return e.code()

        code = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.service.cancelled), 1)
        self.assertIn(self.service.cancelled[0].code, (StatusCode.DEADLINE_EXCEEDED, StatusCode.CANCELLED))

    @defer.inlineCallbacks
    def test_client_cancel_reaches_handler(self):
        def run(ch):
            future = _call(ch, "unary_unary", "/test.Toy/Hang").future(b"", timeout=10)
            threading.Event().wait(0.3)
            future.cancel()
            return future.cancelled()

        cancelled = yield self.grpcio(run)
        self.assertTrue(cancelled)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([e.code for e in self.service.cancelled], [StatusCode.CANCELLED])


class SmallLimitTests(ServerTestMixin, unittest.TestCase):
    limits = Limits(max_receive_message=1024)

    @defer.inlineCallbacks
    def test_oversize_message_refused_connection_usable(self):
        def run(ch):
            unary = _call
            try:
                unary(ch, "unary_unary", "/test.Toy/Unary")(b"x" * 2000, timeout=5)
            except grpc.RpcError as e:
                first = e.code(), e.details()
            second = unary(ch, "unary_unary", "/test.Toy/Unary")(b"ab", timeout=5)
            return first, second

        (code, details), second = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("larger than max (2000 vs. 1024)", details)
        self.assertEqual(second, b"ba")


@implementer(IClientCallListener)
class Collector:
    def __init__(self):
        self.headers = None
        self.messages = []
        self.done = defer.Deferred()
        self.received_bytes = 0

    def headers_received(self, metadata):
        self.headers = metadata

    def response_received(self, message):
        self.messages.append(message)
        self.received_bytes += len(message)

    def call_finished(self, error, metadata):
        self.done.callback((error, metadata))


class ChannelTests(ServerTestMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.channel = Channel(
            reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port),
            self.address.encode(), Limits(stream_window=65536),
        )
        self.addCleanup(self.channel.close)

    @defer.inlineCallbacks
    def test_unary_call(self):
        out = yield self.channel.unary_call(b"/test.Toy/Unary", b"abc", [(b"x-custom", b"z")], timeout=5)
        self.assertEqual(out, b"cba")
        self.assertEqual(dict(self.service.handlers[0].metadata)[b"x-custom"], b"z")

    @defer.inlineCallbacks
    def test_calls_that_ended_leave_no_cycles_to_collect(self):
        # A relaying handler in front of the toy server, as the proxy's: a
        # server call, its handler and the handler's upstream call, each
        # holding the next. Once the calls are over they are freed as they go.
        relay_factory = GRPCServerFactory(lambda path: RelayHandler(self.channel, timeout=5), reactor, Limits())
        relay_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(relay_factory)
        self.addCleanup(relay_port.stopListening)
        client = Channel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port.getHost().port),
                         b"relay", Limits())
        self.addCleanup(client.close)
        yield client.unary_call(b"/test.Toy/Unary", b"warm", timeout=5)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.set_debug, 0)
        for i in range(20):
            out = yield client.unary_call(b"/test.Toy/Unary", b"abc%d" % i, timeout=5)
            self.assertEqual(out, (b"abc%d" % i)[::-1])
        yield task.deferLater(reactor, 0.05, lambda: None)  # the last writes and stream ends
        gc.collect()
        in_cycles = {type(o).__name__ for o in gc.garbage} & {"ServerCall", "ClientCall", "RelayHandler"}
        del gc.garbage[:]
        self.assertEqual(in_cycles, set())

    @defer.inlineCallbacks
    def test_unary_error(self):
        error = yield self.assertFailure(self.channel.unary_call(b"/test.Toy/Fail", b"", timeout=5), GRPCError)
        self.assertEqual(error.code, StatusCode.NOT_FOUND)
        self.assertEqual(error.message, "nope: 100% \u2713\n")
        self.assertEqual(dict(error.metadata)[b"x-trailer"], b"t1")

    @defer.inlineCallbacks
    def test_timeout(self):
        error = yield self.assertFailure(self.channel.unary_call(b"/test.Toy/Hang", b"", timeout=0.2), GRPCError)
        self.assertEqual(error.code, StatusCode.DEADLINE_EXCEEDED)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.service.cancelled), 1)

    @defer.inlineCallbacks
    def test_all_streaming_kinds(self):
        for path, requests, expected in [
            (b"/test.Toy/ServerStream", [b"3"], [b"0", b"1", b"2"]),
            (b"/test.Toy/ClientStream", [b"a", b"b"], [b"a|b"]),
            (b"/test.Toy/Bidi", [b"a", b"b"], [b"A", b"B"]),
        ]:
            listener = Collector()
            call = self.channel.start_call(path, [], listener, timeout=5)
            for r in requests:
                call.send_message(r)
            call.end()
            error, _ = yield listener.done
            self.assertIsNone(error)
            self.assertEqual(listener.messages, expected)

    @defer.inlineCallbacks
    def test_stalled_stream_is_bounded_and_does_not_block_others(self):
        """A reader that stops reading holds the sender back (bounded queue),
        and other calls on the same connection still complete."""
        slow = Collector()
        call = self.channel.start_call(b"/test.Toy/Big", [], slow, timeout=20)
        call.end()
        call.pause_receiving()
        yield task.deferLater(reactor, 0.5, lambda: None)
        handler = self.service.handlers[0]
        self.assertGreater(handler.paused, 0, "producer was never paused")
        stalled_at = handler.sent
        self.assertLess(stalled_at, 200)
        # Bounded: the server queue stays near its watermark.
        self.assertLessEqual(self.service.max_queued, Limits().stream_high_watermark + 65536 + 5)
        # Another call on the same connection is not stalled.
        out = yield self.channel.unary_call(b"/test.Toy/Unary", b"ok", timeout=5)
        self.assertEqual(out, b"ko")
        call.resume_receiving()
        error, _ = yield slow.done
        self.assertIsNone(error)
        self.assertEqual(slow.received_bytes, 200 * 65536)

    @defer.inlineCallbacks
    def test_end_of_stream_waits_for_held_responses(self):
        """The server's messages and END_STREAM arrive while the client does
        not read: every message is delivered before the status."""
        listener = Collector()
        call = self.channel.start_call(b"/test.Toy/ServerStream", [], listener, timeout=5)
        call.pause_receiving()
        call.send_message(b"3000")  # about 13 KiB: within the 64 KiB stream window
        call.end()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(listener.done.called, "the call ended while its messages were held")
        call.resume_receiving()
        error, _ = yield listener.done
        self.assertIsNone(error)
        self.assertEqual(listener.messages, [b"%d" % i for i in range(3000)])

    @defer.inlineCallbacks
    def test_held_answer_survives_the_trailing_reset(self):
        """The server answers, then resets the stream (NO_ERROR) while the
        client, which has not half-closed, does not read: the answer is
        delivered whole, and what the client sends after it goes nowhere."""
        listener = Collector()
        call = self.channel.start_call(b"/test.Toy/Early", [], listener, timeout=5)
        call.pause_receiving()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(call.fully_received)
        call.send_message(b"late")
        call.end()
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(listener.done.called, "the call ended while its messages were held")
        call.resume_receiving()
        error, _ = yield listener.done
        self.assertIsNone(error)
        self.assertEqual(listener.messages, [b"%d" % i for i in range(3000)])

    @defer.inlineCallbacks
    def test_half_close_waits_for_held_requests(self):
        """The client's messages and END_STREAM arrive while the handler does
        not read: the handler gets every message before half_closed."""
        listener = Collector()
        call = self.channel.start_call(b"/test.Toy/PausedCount", [], listener, timeout=5)
        for i in range(2000):
            call.send_message(b"m%d" % i)
        call.end()
        error, _ = yield listener.done
        self.assertIsNone(error)
        self.assertEqual(listener.messages, [b"2000"])
        self.assertEqual(self.service.handlers[0].received, [b"m%d" % i for i in range(2000)])

    @defer.inlineCallbacks
    def test_graceful_drain_lets_calls_finish(self):
        listener = Collector()
        call = self.channel.start_call(b"/test.Toy/Slow", [], listener, timeout=5)
        call.send_message(b"")
        call.end()
        yield task.deferLater(reactor, 0.1, lambda: None)
        drained = self.factory.drain(5)
        error, _ = yield listener.done
        self.assertIsNone(error)
        self.assertEqual(listener.messages, [b"slow"])
        yield drained
        self.assertEqual(self.factory.connections, set())

    @defer.inlineCallbacks
    def test_drain_ends_endless_calls_and_closes_promptly(self):
        slow, endless = Collector(), Collector()
        call = self.channel.start_call(b"/test.Toy/Slow", [], slow, timeout=5)
        call.send_message(b"")
        call.end()
        self.channel.start_call(b"/test.Toy/Hang", [], endless, timeout=30)
        yield task.deferLater(reactor, 0.1, lambda: None)
        started = reactor.seconds()
        yield self.factory.drain(10)
        self.assertLess(reactor.seconds() - started, 2)
        error, _ = yield slow.done
        self.assertIsNone(error)
        error, _ = yield endless.done
        self.assertEqual((error.code, error.message), (StatusCode.UNAVAILABLE, "draining"))

    @defer.inlineCallbacks
    def test_drain_timeout_ends_remaining_calls_unavailable(self):
        listener = Collector()
        call = self.channel.start_call(b"/test.Toy/ClientStream", [], listener, timeout=30)
        call.send_message(b"a")  # never half-closed: the call stays open
        yield task.deferLater(reactor, 0.1, lambda: None)
        yield self.factory.drain(0.3)
        error, _ = yield listener.done
        self.assertEqual((error.code, error.message), (StatusCode.UNAVAILABLE, "server shutting down"))

    @defer.inlineCallbacks
    def test_connect_failure_is_unavailable(self):
        channel = Channel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 1), b"x")
        error = yield self.assertFailure(channel.unary_call(b"/test.Toy/Unary", b"", timeout=5), GRPCError)
        self.assertEqual(error.code, StatusCode.UNAVAILABLE)


class PureLogicTests(unittest.TestCase):
    def test_grpc_message_round_trip(self):
        for text in ["plain", "100%", "\u00e9t\u00e9 \u2713", "new\nline", ""]:
            self.assertEqual(decode_grpc_message(encode_grpc_message(text)), text)
        self.assertEqual(encode_grpc_message("a%b"), b"a%25b")

    def test_grpc_message_bad_escapes_never_fail(self):
        self.assertEqual(decode_grpc_message(b"bad %zz %"), "bad %zz %")
        self.assertEqual(decode_grpc_message(b"%ff"), "\ufffd")

    def test_timeout(self):
        self.assertAlmostEqual(parse_timeout(b"2998177u"), 2.998177)
        self.assertEqual(parse_timeout(b"1H"), 3600)
        for bad in [b"", b"123456789S", b"1x", b"-1S", b"S"]:
            self.assertRaises(ValueError, parse_timeout, bad)
        for seconds in [0.0001, 1.5, 3600 * 24 * 365]:
            self.assertGreaterEqual(parse_timeout(format_timeout(seconds)), seconds * 0.999999)
            self.assertLessEqual(len(format_timeout(seconds)), 9)

    def test_application_metadata(self):
        self.assertEqual(application_metadata([(b":status", b"200"), (b"content-type", b"application/grpc")]), [])
        self.assertEqual(application_metadata([(b"grpc-status", b"0"), (b"grpc-message", b"x")]), [])
        request = [(b":method", b"POST"), (b":path", b"/etcdserverpb.KV/Range"), (b"te", b"trailers"),
                   (b"token", b"abc"), (b"hasleader", b"true"), (b":odd", b"pseudo"), (b"x-bin", b"\x00"),
                   (b"token", b"second")]
        self.assertEqual(application_metadata(request),
                         [(b"token", b"abc"), (b"hasleader", b"true"), (b"x-bin", b"\x00"), (b"token", b"second")])

    def test_decoder_hands_over_a_large_message_that_fills_its_buffer(self):
        big = bytes(range(256)) * 1024  # 256 KiB
        decoder = MessageDecoder(10 << 20)
        framed = encode_message(big)
        bodies = []
        for start in range(0, len(framed), 16384):
            bodies += decoder.feed(framed[start:start + 16384])
        self.assertEqual(len(bodies), 1)
        body = bodies[0]
        self.assertIsInstance(body, memoryview)  # not copied out of the buffer
        self.assertTrue(body.readonly)
        self.assertEqual(body, big)
        # the decoder goes on with a buffer of its own: the body stays as it was
        second = encode_message(b"x" * 70000) + encode_message(b"next")[:3]
        got = decoder.feed(second[:40000]) + decoder.feed(second[40000:])
        self.assertEqual(got, [b"x" * 70000])
        self.assertIsInstance(got[0], bytes)  # (the next message's start was behind it: copied)
        self.assertEqual(decoder.feed(encode_message(b"next")[3:]), [b"next"])
        self.assertEqual(body, big)

    def test_decoder_any_cuts(self):
        # Messages of every size, cut anywhere (a large one over many DATA
        # frames, several in one): the same bodies, in order, nothing left over.
        import random
        rng = random.Random(7)
        bodies = [bytes([i % 256]) * size for i, size in enumerate([0, 1, 4, 5, 300, 70000, 0, 16384, 2, 1 << 20])]
        data = b"".join(encode_message(b) for b in bodies)
        for _ in range(20):
            decoder = MessageDecoder(max_size=2 << 20)
            out, position = [], 0
            while position < len(data):
                step = rng.choice([1, 3, 5, 9, 100, 16384, 65536, 300000])
                out += decoder.feed(data[position:position + step])
                position += step
            self.assertEqual(out, bodies)
            self.assertFalse(decoder.has_partial_message)

    def test_decoder_split_and_limit(self):
        decoder = MessageDecoder(max_size=10)
        data = encode_message(b"hello") + encode_message(b"") + encode_message(b"world!")
        out = []
        for i in range(len(data)):
            out += decoder.feed(data[i : i + 1])
        self.assertEqual(out, [b"hello", b"", b"world!"])
        self.assertFalse(decoder.has_partial_message)
        # The prefix alone is enough to refuse: no body is needed.
        e = self.assertRaises(GRPCError, MessageDecoder(max_size=10).feed, b"\x00\x00\x00\x00\x0b")
        self.assertEqual(e.code, StatusCode.RESOURCE_EXHAUSTED)

    def test_decoder_gzip(self):
        body = gzip.compress(b"a" * 100)
        framed = b"\x01" + len(body).to_bytes(4, "big") + body
        self.assertEqual(MessageDecoder(1000, "gzip").feed(framed), [b"a" * 100])
        # Decompression bombs are bounded by the same limit.
        e = self.assertRaises(GRPCError, MessageDecoder(50, "gzip").feed, framed)
        self.assertEqual(e.code, StatusCode.RESOURCE_EXHAUSTED)
        e = self.assertRaises(GRPCError, MessageDecoder(1000).feed, framed)
        self.assertEqual(e.code, StatusCode.INTERNAL)


class ConnectionLifetimeTests(unittest.TestCase):
    """A connection that ended is freed at once, with its h2 state and
    buffers (refcounting, not the cyclic collector: see etcdproxy.collector)."""

    def assert_freed_when_lost(self, protocol):
        transport = StringTransport()
        protocol.makeConnection(transport)
        # (the transport lives as long as the connection's writer, which holds it)
        refs = [weakref.ref(o) for o in (protocol, protocol.conn, transport, protocol._held_acks,
                                         protocol._stalls)]
        transport.unregisterProducer()  # as Twisted's TCP transport does when the connection is lost
        protocol.connectionLost(Failure(ConnectionDone()))
        gc.disable()
        self.addCleanup(gc.enable)
        del protocol, transport
        self.assertEqual([ref() for ref in refs], [None] * len(refs))

    def test_server_side(self):
        factory = GRPCServerFactory(ToyService(), task.Clock(), Limits())
        self.assert_freed_when_lost(factory.buildProtocol(None))

    def test_client_side_with_its_keepalive(self):
        clock = task.Clock()
        channel = Channel(clock, None, b"x", Limits(), keepalive_interval=5)
        self.assert_freed_when_lost(GRPCClientProtocol(channel))


class KeepaliveTests(ServerTestMixin, unittest.TestCase):
    """Pings toward the server only while calls are open, and a dead peer
    (no ping answer) is detected."""

    def count_pings(self):
        pings = []
        original = self.factory.buildProtocol

        def build(addr):
            protocol = original(addr)
            flooded = protocol._flooded  # asked of every PING the server receives

            def counting(frame_type):
                if frame_type == "PING":
                    pings.append(frame_type)
                return flooded(frame_type)

            protocol._flooded = counting
            return protocol

        self.factory.buildProtocol = build
        return pings

    def channel(self, port, interval, timeout=1.0):
        channel = Channel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port), b"x",
                          keepalive_interval=interval, keepalive_timeout=timeout)
        self.addCleanup(channel.close)
        return channel

    @defer.inlineCallbacks
    def test_pings_only_while_calls_are_open(self):
        pings = self.count_pings()
        channel = self.channel(self.port.getHost().port, 0.1)
        out = yield channel.unary_call(b"/test.Toy/Unary", b"ab", timeout=5)
        self.assertEqual(out, b"ba")
        yield task.deferLater(reactor, 0.6, lambda: None)
        self.assertEqual(pings, [], "pinged with no call open")
        listener = Collector()
        call = channel.start_call(b"/test.Toy/Hang", [], listener, timeout=5)
        yield task.deferLater(reactor, 0.65, lambda: None)
        self.assertGreaterEqual(len(pings), 4)
        call.cancel()

    @defer.inlineCallbacks
    def test_unanswered_ping_closes_connection(self):
        from twisted.internet.protocol import Factory, Protocol

        silent = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(silent.stopListening)
        channel = self.channel(silent.getHost().port, 0.2, timeout=0.3)
        listener = Collector()
        started = reactor.seconds()
        channel.start_call(b"/test.Toy/Hang", [], listener, timeout=10)
        error, _ = yield listener.done
        self.assertEqual(error.code, StatusCode.UNAVAILABLE)
        self.assertLess(reactor.seconds() - started, 2)


class StreamCountingTests(unittest.TestCase):
    """etcdproxy.grpc.h2connection.BoundedH2Connection counts open streams in
    amortized O(1), refuses a stream over the concurrency limit alone (with
    REFUSED_STREAM, HPACK state kept in step) and a CONTINUATION flood."""

    HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x/y"),
               (b":authority", b"a"), (b"content-type", b"application/grpc")]

    def pair(self, max_streams, client_class=H2Connection):
        server = BoundedH2Connection(H2Configuration(client_side=False, header_encoding=None), 16384)
        server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        server.local_settings.acknowledge()
        server.initiate_connection()
        client = client_class(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        # The client ignores the server's limit, as a client may before it has seen it.
        client.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        client.remote_settings.acknowledge()
        return client, server

    def open(self, client, server, n, extra=()):
        ids = []
        for _ in range(n):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, self.HEADERS + list(extra))
            ids.append(sid)
        return ids, server.receive_data(client.data_to_send())

    def test_walks_are_amortized(self):
        walks = []
        original = H2Connection._open_streams

        def counting(conn, remainder):
            if isinstance(conn, BoundedH2Connection):
                walks.append(remainder)
            return original(conn, remainder)

        H2Connection._open_streams = counting
        self.addCleanup(setattr, H2Connection, "_open_streams", original)
        client, server = self.pair(2**31 - 1)
        ids, events = self.open(client, server, 3000)
        self.assertEqual(len(events), 3000)
        self.assertLess(len(walks), 30)
        self.assertEqual(original(server, 1), 3000)

    def test_limit_holds_exactly(self):
        for limit in (1, 2, 5, 63, 64, 100):
            client, server = self.pair(limit)
            ids, events = self.open(client, server, limit + 1)
            self.assertEqual([type(e) for e in events], [RequestReceived] * limit + [StreamRefused], limit)

    def test_closed_streams_cost_bounded_memory(self):
        import tracemalloc

        class ForgetfulClient(H2Connection):  # so that only the server's memory counts
            MAX_CLOSED_STREAMS = 16

        client, server = self.pair(100, ForgetfulClient)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = None
        for n in range(300):  # 30,000 calls, 100 at a time
            ids, events = self.open(client, server, 100)
            for sid in ids:
                client.reset_stream(sid, ErrorCodes.CANCEL)
            server.receive_data(client.data_to_send())
            if n == 50:
                before = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown, 512 * 1024, "%d bytes more after 25,000 more closed streams" % grown)

    def test_stream_over_the_limit_is_refused_alone(self):
        client, server = self.pair(100)
        ids, events = self.open(client, server, 100)
        self.assertEqual(len(events), 100)
        # The refused stream's header block adds an entry to both HPACK tables...
        extra = [(b"x-first-seen", b"on-a-refused-stream")]
        (refused,), events = self.open(client, server, 1, extra)
        self.assertEqual([type(e) for e in events], [StreamRefused])
        # ... and DATA the client had in flight on it is answered, not fatal.
        client.send_data(refused, b"late", end_stream=True)
        self.assertEqual(server.receive_data(client.data_to_send()), [])
        resets = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, StreamReset)]
        self.assertEqual({(e.stream_id, e.error_code) for e in resets},
                         {(refused, ErrorCodes.REFUSED_STREAM)})
        # Once streams close, new ones are allowed again; their headers, encoded
        # with that table entry, decode as sent.
        for sid in ids[:50]:
            client.reset_stream(sid, ErrorCodes.CANCEL)
        server.receive_data(client.data_to_send())
        ids, events = self.open(client, server, 50, extra)
        self.assertEqual(len(events), 50)
        self.assertTrue(all(isinstance(e, RequestReceived) for e in events), events[:3])
        self.assertEqual(events[-1].headers, self.HEADERS + extra)

    def assertHeaderBlockRefused(self, continuations):
        """A HEADERS frame then ``continuations`` (never END_HEADERS): refused
        with GOAWAY ENHANCE_YOUR_CALM before h2 alone would (64 frames of up
        to 16 KiB)."""
        client, server = self.pair(100)
        sid = client.get_next_available_stream_id()
        headers = HeadersFrame(sid, flags=[])
        headers.data = client.encoder.encode(self.HEADERS)
        data = headers.serialize() + b"".join(ContinuationFrame(sid, data=d).serialize() for d in continuations)
        with self.assertRaises(DenialOfServiceError):
            server.receive_data(data)
        goaway = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway[0].error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_continuation_flood_is_refused_early(self):
        self.assertHeaderBlockRefused([b""] * 20)

    def test_header_block_larger_than_the_list_limit_is_refused_early(self):
        self.assertHeaderBlockRefused([b"\0" * 15 * 1024] * 3)
