"""The server side of gRPC over HTTP/2: accepts calls and hands them to handlers.

A router maps a method path to a new `ICallHandler`, which sees every call kind
(unary, client-, server-, bidi-streaming) the same way: messages in, messages
out, then a status.
"""

from hyperframe.frame import GoAwayFrame
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import Interface, implementer

from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError

from etcdproxy.grpc.connection import H2Protocol, Limits
from etcdproxy.grpc.stream import MessageStream
from etcdproxy.grpc.metadata import application_metadata, parse_timeout
from etcdproxy.grpc.status import GRPCError, StatusCode, encode_grpc_message

_log = Logger()
_CONTENT_TYPE = (b"content-type", b"application/grpc")
_STATUS_200 = (b":status", b"200")
_GRPC_STATUS = [b"%d" % code for code in range(17)]


class ICallHandler(Interface):
    """What a router returns for each incoming call."""

    def call_started(call):
        """The request headers are in; ``call`` is the `ServerCall`."""

    def request_received(message):
        """One request message (bytes, decompressed)."""

    def half_closed():
        """The client will send no more messages."""

    def call_cancelled(error):
        """The call ended without the handler finishing it: client cancel or
        reset, deadline, connection loss, or bad input (a `GRPCError`)."""

    def call_draining():
        """The server is shutting down gracefully. A call that would go on
        indefinitely (a watch) should end now, e.g. with UNAVAILABLE so that the
        client reconnects elsewhere; others may just complete."""


class ICallObserver(Interface):
    """Told of every call, e.g. to count them (metrics)."""

    def call_started(method):
        """A call to ``method`` (its path, bytes) started."""

    def call_ended(method, code, seconds):
        """It ended with status ``code`` after ``seconds`` (CANCELLED when the
        client reset it or went away)."""


@implementer(ICallHandler)
class _Ended:
    """The handler of a call that is over: nothing is told to it any more, and
    the call no longer keeps its handler (nor the handler's references back to
    the call) alive: without cycles, refcounting frees a call's objects at once,
    not the garbage collector later (about a tenth of a cached Range's CPU)."""

    def call_started(self, call):
        pass

    def request_received(self, message):
        pass

    def half_closed(self):
        pass

    def call_cancelled(self, error):
        pass

    def call_draining(self):
        pass


_ENDED = _Ended()


class ServerCall(MessageStream):
    """One incoming call, as its handler sees it."""

    __slots__ = ("method", "metadata", "deadline", "handler", "_headers_sent", "_finished", "_remote_closed",
                 "_ended", "_timer", "_end_callbacks", "_started_at")

    def __init__(self, protocol, stream_id, method, metadata, deadline, encoding):
        super().__init__(protocol, stream_id, protocol.limits, encoding)
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.handler = None
        self._headers_sent = False
        self._finished = False
        self._remote_closed = False
        self._ended = False
        self._timer = None
        self._end_callbacks = []

    @property
    def peer(self):
        return self.protocol.transport.getPeer()

    @property
    def server_draining(self):
        """Whether the server is shutting down gracefully."""
        return self.protocol.factory.draining

    def time_remaining(self):
        """Seconds left before the client's deadline, or None."""
        if self.deadline is None:
            return None
        return self.deadline - self.protocol.reactor.seconds()

    def start(self, handler):
        self.handler = handler
        self._started_at = self.protocol.reactor.seconds()
        for observer in self.protocol.factory.observers:
            observer.call_started(self.method)
        if self.deadline is not None:
            remaining = self.deadline - self._started_at
            self._timer = self.protocol.reactor.callLater(max(0, remaining), self._deadline_expired)
        try:  # (the handler is called this way, not by _invoke, where calls are many)
            handler.call_started(self)
        except Exception:
            self._handler_failed(handler.call_started)

    # -- handler API ------------------------------------------------------------

    def send_headers(self, metadata=()):
        if self._headers_sent or self._finished or self.closed:
            return
        self._headers_sent = True
        try:
            self.protocol.conn.send_headers(self.stream_id, [_STATUS_200, _CONTENT_TYPE, *metadata])
        except StreamClosedError:
            return  # reset by the client in the read being handled; its StreamReset follows
        self.protocol.schedule_flush(None)

    def send_message(self, payload):
        if self._finished or self.closed:
            return
        limit = self.protocol.limits.max_send_message
        if len(payload) > limit:
            self._ended_by_us(GRPCError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: trying to send message larger than max ({len(payload)} vs. {limit})",
            ))
            return
        if not self._headers_sent:
            self.send_headers()
        self.queue_message(payload)

    def finish(self, code=StatusCode.OK, message="", metadata=()):
        """Ends the call with a status, after the queued messages."""
        if self._finished or self.closed:
            return
        self._finished = True
        self._ended = True
        self._cancel_timer()
        self._observe_end(code)
        trailers = [(b"grpc-status", _GRPC_STATUS[code] if 0 <= code <= 16 else b"%d" % code)]
        if message:
            trailers.append((b"grpc-message", encode_grpc_message(message)))
        trailers.extend(metadata)
        if not self._headers_sent:
            # Trailers-Only: one HEADERS frame; gRPC clients need content-type here too.
            self._headers_sent = True
            trailers[:0] = [_STATUS_200, _CONTENT_TYPE]
        self.queue_end(lambda: self._send_trailers(trailers))

    def _send_trailers(self, trailers):
        self.protocol.conn.send_headers(self.stream_id, trailers, end_stream=True)
        if not (self._remote_closed or self.fully_received):
            # The client may still be sending; tell it to stop (gRPC spec).
            self.protocol.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
        self.protocol.stream_done(self)
        self.handler = _ENDED  # it was told of the end when finishing

    def _end_abruptly(self, error):
        """The stream is gone (reset, connection lost): only the handler is told."""
        self._cancel_timer()
        self.close()
        if not self._finished:
            self._finished = True
            self._observe_end(StatusCode.CANCELLED)
        if not self._ended:
            self._ended = True
            self._invoke(self.handler.call_cancelled, error)
        self.handler = _ENDED

    def draining(self):
        if not self._ended:
            self._invoke(self.handler.call_draining)

    def abandon(self, code, message):
        """Ends the call now with a status, telling the handler; messages not
        yet sent are dropped (a peer that does not read still gets the status
        as soon as it reads again)."""
        self.discard_unsent()
        self._ended_by_us(GRPCError(code, message))

    def stalled(self, seconds):
        """The client has read none of this call's data for ``seconds``: the
        call ends with RESOURCE_EXHAUSTED (unsent messages dropped); one whose
        status is already queued behind the unread data, or that stays stalled,
        is reset, which frees all it holds."""
        if self._finished:
            self._end_abruptly(GRPCError(StatusCode.CANCELLED, "call not read"))
            self.protocol.reset_stream(self.stream_id, ErrorCodes.CANCEL)
            return
        self.abandon(StatusCode.RESOURCE_EXHAUSTED,
                     f"call not read for {seconds:g} s: {self.queued_bytes} bytes wait")

    def when_ended(self, callback):
        """Calls ``callback()`` once the call is over, however it ends."""
        self._end_callbacks.append(callback)

    def _observe_end(self, code):
        callbacks, self._end_callbacks = self._end_callbacks, []
        for callback in callbacks:
            callback()
        observers = self.protocol.factory.observers
        if observers:
            seconds = self.protocol.reactor.seconds() - self._started_at
            for observer in observers:
                observer.call_ended(self.method, code, seconds)

    def _invoke(self, method, *args):
        """Calls the handler; a bug in it ends this call with INTERNAL, not the
        connection (nor a call left hanging)."""
        try:
            method(*args)
        except Exception:
            self._handler_failed(method)

    def _handler_failed(self, method):
        """Called while the handler's exception is handled."""
        _log.failure("handler {method} failed for {path}", method=method.__qualname__, path=self.method)
        if not self._ended:
            self._ended = True
            self.finish(StatusCode.INTERNAL, "internal error in the proxy")

    def _cancel_timer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- stream events ----------------------------------------------------------

    def _deliver(self, message):
        if not self._ended:
            handler = self.handler
            try:
                handler.request_received(message)
            except Exception:
                self._handler_failed(handler.request_received)

    def _receive_failed(self, error):
        self._ended_by_us(error)

    def _ended_by_us(self, error):
        """Ends the call on the proxy's initiative (bad input, deadline)."""
        if self._ended:
            return
        self._ended = True
        self.finish(error.code, error.message)
        self._invoke(self.handler.call_cancelled, error)

    def end_received(self):
        self._remote_closed = True
        if self._ended:
            return  # the trailers, when sent, see _remote_closed
        if self.partial_message_received:
            # What etcd (grpc-go) answers for a stream that ends inside a message.
            self._ended_by_us(GRPCError(StatusCode.UNKNOWN, "unexpected EOF"))
            return
        handler = self.handler
        try:
            handler.half_closed()
        except Exception:
            self._handler_failed(handler.half_closed)

    def reset_received(self, error_code):
        self._end_abruptly(GRPCError(StatusCode.CANCELLED, "call cancelled by the client"))

    def connection_lost(self, reason):
        self._end_abruptly(GRPCError(StatusCode.CANCELLED, "client connection lost"))

    def _deadline_expired(self):
        self._timer = None
        self._ended_by_us(GRPCError(StatusCode.DEADLINE_EXCEEDED, "context deadline exceeded"))


class GRPCServerProtocol(H2Protocol):
    client_side = False
    _log = Logger()

    def __init__(self, factory):
        super().__init__(factory.reactor, factory.limits)
        self.factory = factory
        self._last_stream_id = None  # set once a GOAWAY was sent
        self._closed = defer.Deferred()

    def connectionMade(self):
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.connections.discard(self)
        self._closed.callback(None)

    def stream_stalled(self, call):
        call.stalled(self.limits.send_stall_timeout)

    def request_received(self, event):
        sid = event.stream_id
        if self._last_stream_id is not None and sid > self._last_stream_id:
            self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        headers = dict(event.headers)
        if headers.get(b":method") != b"POST":
            self._refuse(sid, b"405", "invalid gRPC request method")
            return
        content_type = headers.get(b"content-type", b"")
        if not (content_type == b"application/grpc" or content_type.startswith((b"application/grpc+", b"application/grpc;"))):
            self._refuse(sid, b"415", "invalid gRPC request content-type")
            return
        path = headers.get(b":path", b"")
        try:
            deadline = None
            timeout = headers.get(b"grpc-timeout")
            if timeout is not None:
                try:
                    deadline = self.reactor.seconds() + parse_timeout(timeout)
                except ValueError:
                    raise GRPCError(StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
            encoding = headers.get(b"grpc-encoding")
            if encoding is not None:
                encoding = encoding.decode("ascii", "replace")
                if encoding not in ("identity", "gzip", "deflate"):
                    raise GRPCError(StatusCode.UNIMPLEMENTED, f"grpc: Decompressor is not installed for grpc-encoding \"{encoding}\"")
            handler = self.factory.router(path)
        except GRPCError as e:
            self._trailers_only(sid, e.code, e.message)
            return
        call = ServerCall(self, sid, path, application_metadata(event.headers), deadline, encoding)
        self.streams[sid] = call
        call.start(handler)

    def _trailers_only(self, stream_id, code, message, http_status=b"200"):
        headers = [(b":status", http_status), _CONTENT_TYPE, (b"grpc-status", b"%d" % code)]
        if message:
            headers.append((b"grpc-message", encode_grpc_message(message)))
        try:
            self.conn.send_headers(stream_id, headers, end_stream=True)
        except StreamClosedError:
            # The client reset the stream in the same read as its request: h2
            # has taken the RST_STREAM in already, and there is no one to answer.
            return
        # The request side may still be open; RST(NO_ERROR) releases it.
        stream = self.conn.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _refuse(self, stream_id, http_status, message):
        self._trailers_only(stream_id, StatusCode.INTERNAL, message, http_status)

    def drain(self):
        """Graceful shutdown: GOAWAY, let open calls finish, then close.

        Returns a Deferred that fires when the connection is closed.
        """
        if self._last_stream_id is None:
            self._last_stream_id = self.conn.highest_inbound_stream_id
            self._write_out()
            # h2 refuses to send anything after its own close_connection(), so the
            # GOAWAY is framed here and the calls in flight can still finish.
            frame = GoAwayFrame(0)
            frame.last_stream_id = self._last_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self.transport.write(frame.serialize())
            for call in list(self.streams.values()):
                call.draining()
            self._close_when_idle()
        return self._closed

    def end_calls(self, code, message):
        """Ends every open call with a status, then closes the connection."""
        for call in list(self.streams.values()):
            call.abandon(code, message)
        self._flush_now()
        self.close_after_writing()

    def stream_done(self, stream):
        super().stream_done(stream)
        if self._last_stream_id is not None:
            self._close_when_idle()

    def _close_when_idle(self):
        if not self.streams:
            self.close_after_writing()

    def abort(self):
        self.transport.abortConnection()


class GRPCServerFactory(Factory):
    """Builds server connections; ``router(path)`` returns an `ICallHandler`
    or raises `GRPCError` (UNIMPLEMENTED) for an unknown method."""

    def __init__(self, router, reactor, limits=Limits(), observers=()):
        self.router = router
        self.reactor = reactor
        self.limits = limits
        self.observers = tuple(observers)  # ICallObservers
        self.connections = set()
        self.draining = False

    def buildProtocol(self, addr):
        return GRPCServerProtocol(self)

    def drain(self, timeout):
        """GOAWAY to every connection; calls still open after ``timeout`` end
        with UNAVAILABLE."""
        self.draining = True
        closed = [c.drain() for c in list(self.connections)]
        timer = self.reactor.callLater(timeout, self._abort_all)
        d = defer.DeferredList(closed)

        def done(_):
            if timer.active():
                timer.cancel()

        return d.addBoth(done)

    def _abort_all(self):
        for connection in list(self.connections):
            connection.end_calls(StatusCode.UNAVAILABLE, "server shutting down")
