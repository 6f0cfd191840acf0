"""How a client Channel reports failures (no etcd): ``on_failure`` for connect
refused, connection lost, GOAWAY and keepalive ping timeout, before the calls
end; ``GRPCError.unprocessed`` tells a call that never reached the server from
one whose outcome is unknown."""

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from etcdproxy.grpc.client import Channel
from etcdproxy.grpc.status import GRPCError, StatusCode
from tests.test_grpc_layer import ServerTestMixin


class ChannelFailureTests(ServerTestMixin, unittest.TestCase):
    def channel(self, port=None, **kw):
        self.events = []
        ch = Channel(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.port.getHost().port),
                     b"toy", on_failure=lambda reason: self.events.append(("failure", reason)), **kw)
        self.addCleanup(ch.close)
        return ch

    def call(self, ch, method=b"/test.Toy/Hang", timeout=5):
        d = ch.unary_call(method, b"x", timeout=timeout)

        def ended(failure):
            failure.trap(GRPCError)
            self.events.append(("call", failure.value))
            return failure.value
        return d.addErrback(ended)

    @defer.inlineCallbacks
    def test_connect_refused_is_reported_and_unprocessed(self):
        port = self.port.getHost().port
        yield self.port.stopListening()
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        error = yield self.call(self.channel(port))
        self.assertEqual([e[0] for e in self.events], ["failure", "call"])
        self.assertIn("connection error", self.events[0][1])
        self.assertEqual((error.code, error.unprocessed), (StatusCode.UNAVAILABLE, True))

    @defer.inlineCallbacks
    def test_connection_lost_is_reported_first_and_outcome_unknown(self):
        ch = self.channel()
        d = self.call(ch)
        yield task.deferLater(reactor, 0.2, lambda: None)
        for c in list(self.factory.connections):
            c.abort()
        error = yield d
        self.assertEqual([e[0] for e in self.events], ["failure", "call"])
        self.assertIn("connection lost", self.events[0][1])
        self.assertEqual((error.code, error.unprocessed), (StatusCode.UNAVAILABLE, False))
        # the channel connects again for the next call
        response = yield ch.unary_call(b"/test.Toy/Unary", b"abc", timeout=5)
        self.assertEqual(response, b"cba")

    @defer.inlineCallbacks
    def test_goaway_is_reported(self):
        ch = self.channel()
        self.call(ch)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.factory.drain(5)
        yield task.deferLater(reactor, 0.2, lambda: None)
        failures = [e for e in self.events if e[0] == "failure"]
        self.assertEqual(len(failures), 1)
        self.assertIn("GOAWAY", failures[0][1])
        self.assertEqual(self.events[0], failures[0], "reported before the call ended")
        # new calls go to a new connection
        response = yield ch.unary_call(b"/test.Toy/Unary", b"abc", timeout=5)
        self.assertEqual(response, b"cba")

    @defer.inlineCallbacks
    def test_keepalive_timeout_on_a_hung_server_is_reported(self):
        # A server whose kernel accepts connections but which never answers (SIGSTOP).
        factory = Factory.forProtocol(Protocol)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        ch = self.channel(port.getHost().port, keepalive_interval=0.2, keepalive_timeout=0.3)
        error = yield self.call(ch, timeout=5)
        self.assertEqual(self.events[0], ("failure", "keepalive ping timeout"))
        self.assertEqual((error.code, error.unprocessed), (StatusCode.UNAVAILABLE, False))

    @defer.inlineCallbacks
    def test_disconnect_and_close_are_not_reported(self):
        ch = self.channel()
        d = self.call(ch)
        yield task.deferLater(reactor, 0.2, lambda: None)
        ch.disconnect()
        error = yield d
        self.assertEqual(error.code, StatusCode.UNAVAILABLE)
        response = yield ch.unary_call(b"/test.Toy/Unary", b"abc", timeout=5)
        self.assertEqual(response, b"cba")
        d = self.call(ch)
        yield task.deferLater(reactor, 0.2, lambda: None)
        ch.close()
        error = yield d
        self.assertEqual(error.code, StatusCode.UNAVAILABLE)
        self.assertEqual([e[0] for e in self.events], ["call", "call"])
        # A call on the closed channel is refused at once, through its Deferred.
        error = yield self.call(ch)
        self.assertEqual((error.code, error.unprocessed), (StatusCode.UNAVAILABLE, True))
