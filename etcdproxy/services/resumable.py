"""A client stream relayed to an upstream stream that is opened again, on
another endpoint, when the upstream one fails with UNAVAILABLE (its endpoint
died, hung or went away); the client sees no error. Subclasses say what a new
upstream stream must be told (`reopened`) and may read along the messages."""

from zope.interface import implementer

from etcdproxy.grpc.client import IClientCallListener
from etcdproxy.grpc.server import ICallHandler
from etcdproxy.grpc.status import GRPCError, StatusCode
from etcdproxy.services.relay import open_upstream

# Pauses before each attempt to open the stream again (the first one at once).
RESUME_DELAYS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0)


@implementer(ICallHandler, IClientCallListener)
class ResumableStream:
    def __init__(self, upstream):
        self.upstream = upstream  # the EndpointMonitor
        self.call = None
        self.upstream_call = None
        self._channel = None
        self._attempts = 0
        self._timer = None
        self._half_closed = False
        self._ended = False

    def reopened(self):
        """A new upstream stream replaces a failed one: bring it up to date."""

    def send_upstream(self, message):
        """Relays a request message; while a new stream is being opened there is
        none to send it on (`reopened` covers what still matters)."""
        if self.upstream_call is not None:
            self.upstream_call.send_message(message)

    def end(self, code, message):
        self.call_cancelled(None)
        self.call.finish(code, message)

    # Client side.
    def call_started(self, call):
        self.call = call
        self._open_upstream(())

    def request_received(self, message):
        self.send_upstream(message)

    def half_closed(self):
        self._half_closed = True
        if self.upstream_call is not None:
            self.upstream_call.end()

    def call_cancelled(self, error):
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.upstream_call is not None:
            self.upstream_call.cancel()
            self.upstream_call = None

    def call_draining(self):
        self.end(StatusCode.UNAVAILABLE, "proxy shutting down")

    # Upstream side.
    def headers_received(self, metadata):
        self.call.send_headers(metadata)

    def response_received(self, message):
        self._attempts = 0
        self.call.send_message(message)

    def call_finished(self, error, metadata):
        self.upstream_call = None
        if self._ended:
            return
        if error is None:
            self.call.finish(StatusCode.OK, "", metadata)
        elif error.code == StatusCode.UNAVAILABLE and self._attempts < len(RESUME_DELAYS):
            self._timer = self.upstream.reactor.callLater(RESUME_DELAYS[self._attempts], self._resume)
            self._attempts += 1
        else:
            self.call.finish(error.code, error.message, error.metadata)

    def _open_upstream(self, avoid):
        try:
            self._channel, self.upstream_call = open_upstream(self.upstream, self.call, self, avoid)
        except GRPCError as e:  # no endpoint can take it: say so at once
            self._ended = True
            self.call.finish(e.code, e.message)
            return False
        return self.upstream_call is not None

    def _resume(self):
        self._timer = None
        if self._open_upstream((self._channel,)):
            self.reopened()
            if self._half_closed:
                self.upstream_call.end()
