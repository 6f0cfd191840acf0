"""Failover of calls in-process: a proxy (ProxyRouter + EndpointMonitor) in front
of two toy upstream gRPC servers A and B, driven by grpcio. Which calls are sent
again to B when A fails, and which are not."""

import time

import grpc
from h2.errors import ErrorCodes
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from zope.interface import implementer

from etcdproxy.grpc.server import GRPCServerFactory, ICallHandler
from etcdproxy.pb.etcdserverpb import rpc_pb2
from etcdproxy.proxy import ProxyRouter
from etcdproxy.upstream.endpoints import parse_endpoint
from etcdproxy.upstream.monitor import STATUS, EndpointMonitor

RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"
# A stream relayed as it is (Watch and LeaseKeepAlive streams have their own handlers).
OBSERVE = "/v3electionpb.Election/Observe"


@implementer(ICallHandler)
class Handler:
    def __init__(self, upstream, path):
        self.upstream = upstream
        self.path = path
        self.messages = []

    def call_started(self, call):
        self.call = call
        if self.path != STATUS:
            self.upstream.calls.append(self.path)
            if self.upstream.mode == "refuse-stream":
                call.protocol.reset_stream(call.stream_id, ErrorCodes.REFUSED_STREAM)
                call.reset_received(ErrorCodes.REFUSED_STREAM)  # ends the call here too

    def request_received(self, message):
        self.messages.append(message)

    def half_closed(self):
        if self.path == STATUS:
            self.call.send_message(rpc_pb2.StatusResponse(leader=1).SerializeToString())
            self.call.finish()
        elif self.upstream.mode == "abort":
            # The request arrived; the answer never leaves: outcome unknown.
            self.call.protocol.abort()
        elif self.upstream.mode == "answer":
            self.call.send_message(self.upstream.name + self.messages[0])
            self.call.finish()

    def call_cancelled(self, error):
        pass

    def call_draining(self):
        pass


class Upstream:
    def __init__(self, name, mode="answer"):
        self.name = name
        self.mode = mode
        self.calls = []

    def __call__(self, path):
        return Handler(self, path)


def _identity(b):
    return b


class FailoverTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, mode_a, mode_b="answer", policy="round-robin", listening=(True, True)):
        self.a, self.b = Upstream(b"A:", mode_a), Upstream(b"B:", mode_b)
        self.factories, ports = [], []
        for upstream in (self.a, self.b):
            factory = GRPCServerFactory(upstream, reactor)
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            self.factories.append(factory)
            ports.append(port)
            self.addCleanup(self._stop_port, port)
        endpoints = [parse_endpoint("127.0.0.1:%d" % p.getHost().port) for p in ports]
        for port, listen in zip(ports, listening):
            if not listen:
                yield port.stopListening()
        # round-robin: the first call goes to A
        self.monitor = EndpointMonitor(reactor, endpoints, policy=policy)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.proxy_factory = GRPCServerFactory(ProxyRouter(self.monitor), reactor)
        proxy_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.proxy_factory)
        self.addCleanup(self._stop_port, proxy_port)
        self.address = "127.0.0.1:%d" % proxy_port.getHost().port

    @defer.inlineCallbacks
    def _stop_port(self, port):
        yield port.stopListening()
        for factory in self.factories + [self.proxy_factory]:
            for c in list(factory.connections):
                c.abort()
        yield task.deferLater(reactor, 0.01, lambda: None)

    def unary(self, path, request=b"req", timeout=5):
        def run():
            with grpc.insecure_channel(self.address) as channel:
                method = channel.unary_unary(path, request_serializer=_identity,
                                             response_deserializer=_identity)
                try:
                    return method(request, timeout=timeout)
                except grpc.RpcError as e:
                    return e.code(), e.details()
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_read_with_unknown_outcome_is_sent_again_elsewhere(self):
        yield self.start("abort")
        result = yield self.unary(RANGE)
        self.assertEqual(result, b"B:req")
        self.assertEqual((self.a.calls, self.b.calls), ([RANGE.encode()], [RANGE.encode()]))

    @defer.inlineCallbacks
    def test_write_with_unknown_outcome_is_unavailable_and_not_repeated(self):
        yield self.start("abort")
        code, details = yield self.unary(PUT)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("upstream connection lost", details)
        self.assertEqual((self.a.calls, self.b.calls), ([PUT.encode()], []))
        # the next call goes to B without failing
        result = yield self.unary(PUT)
        self.assertEqual(result, b"B:req")

    @defer.inlineCallbacks
    def test_write_that_never_reached_the_server_is_sent_elsewhere(self):
        yield self.start("answer", listening=(False, True))
        result = yield self.unary(PUT)
        self.assertEqual(result, b"B:req")
        self.assertEqual(self.b.calls, [PUT.encode()])

    @defer.inlineCallbacks
    def test_refused_stream_is_sent_elsewhere(self):
        yield self.start("refuse-stream")
        result = yield self.unary(PUT)
        self.assertEqual(result, b"B:req")
        self.assertEqual((self.a.calls, self.b.calls), ([PUT.encode()], [PUT.encode()]))

    @defer.inlineCallbacks
    def test_streams_are_not_sent_again(self):
        yield self.start("abort")

        def run():
            with grpc.insecure_channel(self.address) as channel:
                method = channel.stream_stream(OBSERVE, request_serializer=_identity,
                                               response_deserializer=_identity)
                try:
                    list(method(iter([b"x"]), timeout=5))
                except grpc.RpcError as e:
                    return e.code()

        code = yield threads.deferToThread(run)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.b.calls, [])

    @defer.inlineCallbacks
    def test_nothing_reachable_fails_at_once(self):
        yield self.start("answer", listening=(False, False))
        started = time.monotonic()
        for path in (PUT, RANGE, PUT):
            code, details = yield self.unary(path, timeout=10)
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(details, "no healthy etcd endpoint")
        self.assertEqual([e["healthy"] for e in self.monitor.snapshot()["endpoints"]], [False, False])
