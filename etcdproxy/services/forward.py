"""Pass-through: a client's call relayed to the same method upstream, bytes as they are.

No message is decoded; flow control links the two sides, so a client that reads
slowly slows its upstream stream down, and an upstream that reads slowly slows
the client down, with no unbounded buffer in between.
"""

from zope.interface import implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import StatusCode


@implementer(ICallHandler, IClientCallListener)
class ForwardedCall:
    def __init__(self, upstream):
        self.upstream = upstream
        self.call = None
        self.upstream_call = None

    # Client side.
    def call_started(self, call):
        self.call = call
        self.upstream_call = upstream_call = self.upstream.start_call(
            call.method, call.metadata, self, call.time_remaining()
        )
        call.registerProducer(upstream_call)
        upstream_call.registerProducer(call)

    def request_received(self, message):
        self.upstream_call.send_message(message)

    def half_closed(self):
        self.upstream_call.end()

    def call_cancelled(self, error):
        self.upstream_call.cancel()

    # Upstream side.
    def headers_received(self, metadata):
        self.call.send_headers(metadata)

    def response_received(self, message):
        self.call.send_message(message)

    def call_finished(self, error, metadata):
        if error is None:
            self.call.finish(StatusCode.OK, "", metadata)
        else:
            self.call.finish(error.code, error.message, error.metadata)
