"""The client side of gRPC over HTTP/2: calls toward one server address.

`Channel` owns (re)connecting to one address and starts calls on it.
`Channel.start_call` gives a streaming call of any kind that reports to a listener;
`Channel.unary_call` is the Deferred-based convenience for unary calls.

A call that fails with UNAVAILABLE says whether its request may have reached the
server (`GRPCError.unprocessed`), and a channel tells its owner when its
connection fails (`Channel.on_failure`), so that the owner can go elsewhere.
"""

from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

from h2.errors import ErrorCodes

import etcdproxy
from etcdproxy.grpc.connection import H2Protocol, Limits
from etcdproxy.grpc.stream import MessageStream
from etcdproxy.grpc.metadata import application_metadata, format_timeout
from etcdproxy.grpc.status import GRPCError, StatusCode, decode_grpc_message, status_for_reset

USER_AGENT = b"etcdgrpcproxy/%s" % etcdproxy.__version__.encode()

# gRPC spec: the status to report when the HTTP status is not 200.
_HTTP_TO_STATUS = {
    b"400": StatusCode.INTERNAL,
    b"401": StatusCode.UNAUTHENTICATED,
    b"403": StatusCode.PERMISSION_DENIED,
    b"404": StatusCode.UNIMPLEMENTED,
    b"429": StatusCode.UNAVAILABLE,
    b"502": StatusCode.UNAVAILABLE,
    b"503": StatusCode.UNAVAILABLE,
    b"504": StatusCode.UNAVAILABLE,
}


class IClientCallListener(Interface):
    def headers_received(metadata):
        """Response headers, as application metadata (bytes pairs)."""

    def response_received(message):
        """One response message (bytes)."""

    def call_finished(error, metadata):
        """The call is over: ``error`` is None for OK, else a `GRPCError`;
        ``metadata`` is the trailing application metadata."""


@implementer(IClientCallListener)
class _NoListener:
    """A listener that takes nothing: a call's once it is over (see
    `etcdproxy.grpc.server._Ended`), or one whose outcome nobody waits for."""

    def headers_received(self, metadata):
        pass

    def response_received(self, message):
        pass

    def call_finished(self, error, metadata):
        pass


NO_LISTENER = _NoListener()


class ClientCall(MessageStream):
    """One outgoing call. Messages sent before the connection is up are queued."""

    __slots__ = ("channel", "method", "metadata", "listener", "timeout", "_http_status", "_trailers",
                 "_finished", "_end_sent", "_timer")

    def __init__(self, channel, method, metadata, listener, timeout):
        super().__init__(None, None, channel.limits)
        self.channel = channel
        self.method = method
        self.metadata = metadata
        self.listener = listener
        self.timeout = timeout
        self._http_status = None
        self._trailers = None
        self._finished = False
        self._end_sent = False
        self._timer = None
        if timeout is not None:
            self._timer = channel.reactor.callLater(max(0, timeout), self._deadline_expired)

    def request_headers(self, authority):
        headers = [
            (b":method", b"POST"),
            (b":scheme", self.channel.scheme),
            (b":path", self.method),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", USER_AGENT),
        ]
        if self.timeout is not None:
            remaining = self._timer.getTime() - self.channel.reactor.seconds()
            headers.append((b"grpc-timeout", format_timeout(remaining)))
        headers.extend(self.metadata)
        return headers

    # -- caller API -------------------------------------------------------------

    def send_message(self, payload):
        self.queue_message(payload)

    def end(self):
        """Half-close: no more request messages."""
        self.queue_end_stream()

    def end_sent(self):
        self._end_sent = True

    def cancel(self):
        """Abandons the call; the listener is not called."""
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        if self.protocol is not None:
            self.protocol.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        else:
            self.channel.forget_waiting(self)
        self.close()
        self.listener = NO_LISTENER

    # -- events -----------------------------------------------------------------

    def headers_received(self, headers):
        status = dict(headers)
        self._http_status = status.get(b":status")
        if b"grpc-status" in status:
            self._trailers = headers  # Trailers-Only
        elif self._http_status == b"200":
            self.listener.headers_received(application_metadata(headers))

    def trailers_received(self, headers):
        self._trailers = headers

    def _deliver(self, message):
        if not self._finished:
            self.listener.response_received(message)

    def _receive_failed(self, error):
        if self.protocol is not None:
            self.protocol.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self._finish(error, ())

    def end_received(self):
        if self._end_sent:
            self.protocol.stream_done(self)
        else:
            # Our side is still open, but the server is done with the call.
            self.protocol.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
        trailers = self._trailers
        if trailers is None:
            code = _HTTP_TO_STATUS.get(self._http_status, StatusCode.UNKNOWN)
            if self._http_status == b"200":
                code, message = StatusCode.INTERNAL, "server closed the stream without sending trailers"
            else:
                message = f"unexpected HTTP status code {self._http_status!r}"
            self._finish(GRPCError(code, message), ())
        else:
            fields = dict(trailers)
            try:
                code = int(fields.get(b"grpc-status", b"2"))
            except ValueError:
                code = StatusCode.UNKNOWN
            error = None
            if code != StatusCode.OK:
                error = GRPCError(code, decode_grpc_message(fields.get(b"grpc-message", b"")))
            metadata = application_metadata(trailers)
            if error is not None:
                error.metadata = tuple(metadata)
            self._finish(error, metadata)

    def reset_received(self, error_code):
        if self.fully_received and error_code == ErrorCodes.NO_ERROR:
            # After the server's trailers (gRPC spec): our side is done too,
            # and the held answer still goes to the listener.
            self.stop_sending()
            return
        self._finish(GRPCError(
            status_for_reset(error_code),
            f"stream terminated by RST_STREAM with error code: {error_code!r}",
            # RFC 9113 8.7: a REFUSED_STREAM stream was not processed at all.
            unprocessed=error_code == ErrorCodes.REFUSED_STREAM,
        ), ())

    def send_failed(self):
        if self.fully_received:
            self.stop_sending()  # the held answer still goes to the listener
        else:
            self._finish(GRPCError(StatusCode.INTERNAL, "stream closed while sending the request"), ())

    def connection_lost(self, reason):
        if self.fully_received:
            return  # the server's whole answer is in; it is delivered as read
        # The request may have been sent and processed: the outcome is unknown.
        self._finish(GRPCError(StatusCode.UNAVAILABLE, f"upstream connection lost: {reason.getErrorMessage()}"), ())

    def refused(self, message):
        """The server will never process this call (GOAWAY, connect failure)."""
        self._finish(GRPCError(StatusCode.UNAVAILABLE, message, unprocessed=True), ())

    def _deadline_expired(self):
        self._timer = None
        if self.protocol is not None:
            self.protocol.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        else:
            self.channel.forget_waiting(self)
        self._finish(GRPCError(StatusCode.DEADLINE_EXCEEDED, "context deadline exceeded"), ())

    def _finish(self, error, metadata):
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        if not self.closed:  # (closed already when the stream is done)
            self.close()
        listener, self.listener = self.listener, NO_LISTENER
        listener.call_finished(error, metadata)

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class GRPCClientProtocol(H2Protocol):
    client_side = True
    _log = Logger()

    def __init__(self, channel):
        super().__init__(channel.reactor, channel.limits)
        self.channel = channel
        self.draining = False
        self._ping = None
        self._ping_payload = 0
        self._ping_timeout = None

    def connectionMade(self):
        super().connectionMade()
        if self.channel.keepalive_interval:
            self._ping = LoopingCall(self._keepalive)
            self._ping.clock = self.reactor
            self._ping.start(self.channel.keepalive_interval, now=False)

    def attach(self, call):
        sid = self.conn.get_next_available_stream_id()
        call.protocol = self
        call.stream_id = sid
        self.streams[sid] = call
        self.conn.send_headers(sid, call.request_headers(self.channel.authority))
        self.schedule_flush(call)

    def response_received(self, event):
        call = self.streams.get(event.stream_id)
        if call is not None:
            call.headers_received(event.headers)

    def goaway_received(self, event):
        self._log.info(
            "upstream {peer} sent GOAWAY ({code!r}, {data!r})",
            peer=self.transport.getPeer(), code=event.error_code, data=event.additional_data,
        )
        self.draining = True  # no new calls here; those in flight may finish
        # Calls above last_stream_id were never seen by the server: safe to retry.
        self.channel.protocol_failed(self, f"GOAWAY ({event.error_code!r})")
        for sid, call in list(self.streams.items()):
            if sid > event.last_stream_id:
                del self.streams[sid]
                call.refused(f"upstream sent GOAWAY ({event.error_code!r})")
        if not self.streams:
            self.close_after_writing()

    def stream_done(self, stream):
        super().stream_done(stream)
        if self.draining and not self.streams:
            self.close_after_writing()

    # Keepalive: etcd answers pings faster than every 5 s, or sent while no
    # stream is open, with GOAWAY "too_many_pings"; ping only while calls run.
    def _keepalive(self):
        if self._ping_timeout is not None or not self.streams:
            return
        self._ping_payload += 1
        self.conn.ping(self._ping_payload.to_bytes(8, "big"))
        self.schedule_flush(None)
        self._ping_timeout = self.reactor.callLater(self.channel.keepalive_timeout, self._ping_missed)

    def _ping_missed(self):
        self._ping_timeout = None
        self._log.warn("upstream {peer} missed a keepalive ping; closing", peer=self.transport.getPeer())
        self.channel.protocol_failed(self, "keepalive ping timeout")
        self.transport.abortConnection()

    def ping_acked(self, event):
        if self._ping_timeout is not None:
            self._ping_timeout.cancel()
            self._ping_timeout = None

    def connectionLost(self, reason):
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        self._ping = None
        if self._ping_timeout is not None:
            self._ping_timeout.cancel()
            self._ping_timeout = None
        # The owner hears of the failure before the calls do, so that calls
        # retried from their listeners already go elsewhere.
        self.channel.protocol_failed(self, f"connection lost: {reason.getErrorMessage()}")
        super().connectionLost(reason)


@implementer(IClientCallListener)
class _UnaryResult:
    def __init__(self):
        self.deferred = defer.Deferred(self._cancel)
        self.call = None
        self.messages = []

    def _cancel(self, d):
        self.call.cancel()

    def headers_received(self, metadata):
        pass

    def response_received(self, message):
        self.messages.append(message)

    def call_finished(self, error, metadata):
        messages, self.messages = self.messages, []  # not kept by the call's objects
        # (the Deferred's canceller is a method of this object: no cycle is left)
        deferred, self.deferred = self.deferred, None
        if error is not None:
            deferred.errback(error)
        elif len(messages) != 1:
            deferred.errback(GRPCError(StatusCode.INTERNAL, f"unary call got {len(messages)} responses"))
        else:
            deferred.callback(messages[0])


class Channel:
    """Calls to one server address over one HTTP/2 connection at a time.

    The connection is opened on the first call and again after it is lost; a
    call made while no connection can be had fails with UNAVAILABLE.

    ``on_failure(reason)``, if set, is called (with a short text) each time a
    connection attempt fails or a connection ends without the owner asking:
    connection lost or reset, GOAWAY, keepalive ping timeout. It is called before
    the calls on that connection end.
    """

    _log = Logger()

    def __init__(self, reactor, endpoint, authority, limits=Limits(),
                 keepalive_interval=10.0, keepalive_timeout=10.0, on_failure=None, tls=False):
        self.reactor = reactor
        self.endpoint = endpoint  # with TLS around it when ``tls``
        self.authority = authority
        self.scheme = b"https" if tls else b"http"
        self.limits = limits
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.on_failure = on_failure
        self._protocol = None
        self._connecting = None
        self._waiting = []
        self._closed = False

    def start_call(self, method, metadata, listener, timeout=None):
        call = ClientCall(self, method, metadata, listener, timeout)
        if self._closed:
            call.refused("channel closed")
        elif self._protocol is not None:
            self._protocol.attach(call)
        else:
            self._waiting.append(call)
            self._connect()
        return call

    def unary_call(self, method, request, metadata=(), timeout=None):
        """Deferred firing with the response bytes, or failing with `GRPCError`."""
        result = _UnaryResult()
        deferred = result.deferred  # (the call may finish at once: refused)
        result.call = self.start_call(method, metadata, result, timeout)
        result.call.send_message(request)
        result.call.end()
        return deferred

    def _connect(self):
        if self._connecting is not None:
            return
        self._connecting = connectProtocol(self.endpoint, GRPCClientProtocol(self))
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol):
        self._connecting = None
        if self._closed:
            protocol.transport.loseConnection()
            return
        self._protocol = protocol
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            protocol.attach(call)

    def _connect_failed(self, failure):
        self._connecting = None
        waiting, self._waiting = self._waiting, []
        message = f"connection error: {failure.getErrorMessage()}"
        self._report(message)
        for call in waiting:
            call.refused(message)

    def forget_waiting(self, call):
        if call in self._waiting:
            self._waiting.remove(call)

    def protocol_failed(self, protocol, reason):
        """``protocol`` takes no new calls any more (GOAWAY, lost, ping timeout)."""
        if self._protocol is protocol:
            self._protocol = None
            self._report(reason)

    def _report(self, reason):
        if self.on_failure is not None and not self._closed:
            self.on_failure(reason)

    def disconnect(self):
        """Drops the connection at once, unreported (the owner knows why);
        calls in flight end with UNAVAILABLE. The next call reconnects."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.transport.abortConnection()

    def close(self):
        """Closes the connection; calls in flight end with UNAVAILABLE."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()  # refuses the waiting calls
        if self._protocol is not None:
            self._protocol.transport.loseConnection()
            self._protocol = None
