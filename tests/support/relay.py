"""A handler relaying each call to a Channel, as etcdproxy.services.forward does
(without retries or etcd): for the gRPC layer's tests and bench/h2_layer.py."""

from zope.interface import implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import StatusCode


@implementer(ICallHandler, IClientCallListener)
class RelayHandler:
    def __init__(self, channel, timeout=None):
        self.channel = channel
        self.timeout = timeout

    def call_started(self, call):
        self.call = call
        self.upstream = self.channel.start_call(call.method, call.metadata, self, timeout=self.timeout)

    def request_received(self, message):
        self.upstream.send_message(message)

    def half_closed(self):
        self.upstream.end()

    def call_cancelled(self, error):
        self.upstream.cancel()

    def call_draining(self):
        pass

    def headers_received(self, metadata):
        self.call.send_headers(metadata)

    def response_received(self, message):
        self.call.send_message(message)

    def call_finished(self, error, metadata):
        if error is None:
            self.call.finish(StatusCode.OK, "", metadata)
        else:
            self.call.finish(error.code, error.message, error.metadata)
