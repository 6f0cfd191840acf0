"""Pass-through: a client's call relayed to the same method upstream, bytes as they are.

No message is decoded; flow control links the two sides, so a client that reads
slowly slows its upstream stream down, and an upstream that reads slowly slows
the client down, with no unbounded buffer in between.

Failover: a unary call that fails upstream with UNAVAILABLE is sent again, to the
endpoint the monitor picks now (another one than the failed, when there is one),
if nothing has reached the client yet, the client's deadline allows, and either
the request never reached etcd (`GRPCError.unprocessed`) or the method only reads.
A write whose outcome is unknown (sent, then the connection was lost) is not
repeated: the client gets UNAVAILABLE, as from etcd itself. Streaming calls are
not repeated either: they end with UNAVAILABLE and clients open them again.
"""

from zope.interface import implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.services.catalog import READ_ONLY_PATHS, UNARY_PATHS
from etcdproxy.services.relay import open_upstream

# Pauses before each further attempt: the first retry goes at once (another
# endpoint), later ones give etcd a moment (e.g. "leader changed" in an election).
RETRY_DELAYS = (0.0, 0.1, 0.2, 0.4)


@implementer(ICallHandler, IClientCallListener)
class ForwardedCall:
    def __init__(self, upstream):
        self.upstream = upstream  # the EndpointMonitor
        self.call = None
        self.upstream_call = None
        self._channel = None
        self._retryable = False  # a unary call: its one request is kept
        self._request = None
        self._half_closed = False
        self._relayed = False  # something was sent to the client
        self._retries = 0
        self._retry_timer = None

    # Client side.
    def call_started(self, call):
        self.call = call
        self._retryable = call.method in UNARY_PATHS
        self._start_upstream(())

    def request_received(self, message):
        if self._retryable:
            self._request = message
        if self.upstream_call is not None:
            self.upstream_call.send_message(message)

    def half_closed(self):
        self._half_closed = True
        if self.upstream_call is not None:
            self.upstream_call.end()

    def call_cancelled(self, error):
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self.upstream_call is not None:
            self.upstream_call.cancel()

    def call_draining(self):
        # Unary calls complete; a stream would never end by itself, so it ends
        # now and the client opens it again, on another proxy.
        if not self._retryable:
            self.call_cancelled(None)
            self.call.finish(StatusCode.UNAVAILABLE, "proxy shutting down")

    # Upstream side.
    def headers_received(self, metadata):
        self._relayed = True
        self.call.send_headers(metadata)

    def response_received(self, message):
        self._relayed = True
        self.call.send_message(message)

    def call_finished(self, error, metadata):
        self.upstream_call = None
        if error is None:
            self.call.finish(StatusCode.OK, "", metadata)
        elif self._may_retry(error):
            self._retries += 1
            self._retry_timer = self.upstream.reactor.callLater(
                RETRY_DELAYS[self._retries - 1], self._retry)
        else:
            self.call.finish(error.code, error.message, error.metadata)

    # Failover.
    def _start_upstream(self, avoid):
        try:
            self._channel, upstream_call = open_upstream(self.upstream, self.call, self, avoid)
        except GRPCError as e:
            self.call.finish(e.code, e.message)
            return
        if upstream_call is None:
            return
        self.upstream_call = upstream_call
        if self._request is not None:
            upstream_call.send_message(self._request)
        if self._half_closed:
            upstream_call.end()

    def _may_retry(self, error):
        if not (self._retryable and error.code == StatusCode.UNAVAILABLE and not self._relayed):
            return False
        if self._retries >= len(RETRY_DELAYS):
            return False
        if not (error.unprocessed or self.call.method in READ_ONLY_PATHS):
            return False
        remaining = self.call.time_remaining()
        return remaining is None or remaining > RETRY_DELAYS[self._retries]

    def _retry(self):
        self._retry_timer = None
        self._start_upstream((self._channel,))
