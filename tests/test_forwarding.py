"""The pass-through path in-process: a proxy (ProxyRouter + EndpointMonitor)
in front of a toy upstream gRPC server, driven by grpcio. Checks what etcd
cannot show: every metadata key reaches upstream, response metadata comes back,
deadlines and cancellation propagate, and an upstream failure ends the call."""

import threading

import grpc
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from zope.interface import implementer

from etcdproxy.grpc.server import GRPCServerFactory, ICallHandler
from etcdproxy.grpc.status import StatusCode
from etcdproxy.proxy import ProxyRouter
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.upstream.endpoints import parse_endpoint
from etcdproxy.upstream.monitor import STATUS, EndpointMonitor

RANGE = "/etcdserverpb.KV/Range"
# A stream relayed as it is (Watch and LeaseKeepAlive streams have their own handlers).
OBSERVE = "/v3electionpb.Election/Observe"


@implementer(ICallHandler)
class UpstreamHandler:
    """Range: answers with the request reversed, echoing metadata back.
    Watch: never answers (a call that blocks)."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.cancelled = None
        self.messages = []
        upstream.calls.append(self)

    def call_started(self, call):
        self.call = call
        self.metadata = dict(call.metadata)
        self.time_remaining = call.time_remaining()
        if self.upstream.abort_on_start:
            reactor.callLater(0.05, call.protocol.abort)

    def request_received(self, message):
        self.messages.append(message)

    def half_closed(self):
        if self.call.method == STATUS:  # the monitor's health check
            self.call.send_message(rpc_pb2.StatusResponse(leader=1).SerializeToString())
            self.call.finish()
        elif self.call.method == RANGE.encode():
            self.call.send_headers([(b"x-header-back", self.metadata.get(b"x-custom", b"-"))])
            self.call.send_message(self.messages[0][::-1])
            self.call.finish(StatusCode.OK, "", [(b"x-trailer-back", b"t"),
                                                 (b"x-bin-bin", self.metadata.get(b"x-bin-bin", b""))])

    def call_cancelled(self, error):
        self.cancelled = error

    def call_draining(self):
        pass


class ToyUpstream:
    def __init__(self):
        self.calls = []
        self.abort_on_start = False

    def __call__(self, path):
        if path == STATUS:  # health checks: answered, never aborted, not recorded
            return UpstreamHandler(ToyUpstream())
        return UpstreamHandler(self)


def _identity(b):
    return b


class ForwardingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.upstream = ToyUpstream()
        self.upstream_factory = GRPCServerFactory(self.upstream, reactor)
        self.upstream_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.upstream_factory)
        endpoint = parse_endpoint("127.0.0.1:%d" % self.upstream_port.getHost().port)
        self.client = EndpointMonitor(reactor, [endpoint])
        self.client.startService()
        self.proxy_factory = GRPCServerFactory(ProxyRouter(self.client), reactor)
        self.proxy_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.proxy_factory)
        self.address = "127.0.0.1:%d" % self.proxy_port.getHost().port

    @defer.inlineCallbacks
    def tearDown(self):
        self.client.stopService()
        yield self.proxy_port.stopListening()
        yield self.upstream_port.stopListening()
        for factory in (self.proxy_factory, self.upstream_factory):
            for c in list(factory.connections):
                c.abort()
        yield task.deferLater(reactor, 0.05, lambda: None)

    def grpcio(self, fn):
        def run():
            with grpc.insecure_channel(self.address) as channel:
                return fn(channel)
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_metadata_both_ways_and_deadline_propagated(self):
        metadata = [("token", "tok-1"), ("hasleader", "true"), ("x-custom", "c1"),
                    ("x-bin-bin", b"\x00\x01\xff")]

        def run(ch):
            method = ch.unary_unary(RANGE, request_serializer=_identity, response_deserializer=_identity)
            response, call = method.with_call(b"abc", metadata=metadata, timeout=7)
            return response, dict(call.initial_metadata()), dict(call.trailing_metadata())

        response, headers, trailers = yield self.grpcio(run)
        self.assertEqual(response, b"cba")
        seen = self.upstream.calls[0]
        self.assertEqual(seen.metadata[b"token"], b"tok-1")
        self.assertEqual(seen.metadata[b"hasleader"], b"true")
        self.assertEqual(seen.metadata[b"x-custom"], b"c1")
        self.assertIn(b"x-bin-bin", seen.metadata)
        self.assertTrue(5 < seen.time_remaining <= 7.01, seen.time_remaining)
        self.assertEqual(headers["x-header-back"], "c1")
        self.assertEqual(trailers["x-trailer-back"], "t")
        self.assertEqual(trailers["x-bin-bin"], b"\x00\x01\xff")

    @defer.inlineCallbacks
    def test_deadline_releases_the_upstream_call(self):
        def run(ch):
            method = ch.stream_stream(OBSERVE, request_serializer=_identity, response_deserializer=_identity)
            try:
                list(method(iter([b"x"]), timeout=0.3))
            except grpc.RpcError as e:
                return e.code()

        code = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertIsNotNone(self.upstream.calls[0].cancelled, "upstream call still open")

    @defer.inlineCallbacks
    def test_client_cancel_releases_the_upstream_call(self):
        def run(ch):
            method = ch.stream_stream(OBSERVE, request_serializer=_identity, response_deserializer=_identity)
            call = method(iter([b"x"]), timeout=30)
            threading.Event().wait(0.3)
            call.cancel()
            return call.code()

        code = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.CANCELLED)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.upstream.calls[0].cancelled.code, StatusCode.CANCELLED)

    @defer.inlineCallbacks
    def test_upstream_failure_ends_the_call_unavailable(self):
        self.upstream.abort_on_start = True

        def run(ch):
            method = ch.stream_stream(OBSERVE, request_serializer=_identity, response_deserializer=_identity)
            try:
                list(method(iter([b"x"]), timeout=10))
            except grpc.RpcError as e:
                return e.code(), e.details()

        code, details = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("upstream connection lost", details)

    @defer.inlineCallbacks
    def test_upstream_down_is_unavailable(self):
        yield self.upstream_port.stopListening()

        def run(ch):
            method = ch.unary_unary(RANGE, request_serializer=_identity, response_deserializer=_identity)
            try:
                method(b"", timeout=10)
            except grpc.RpcError as e:
                return e.code()

        code = yield self.grpcio(run)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
