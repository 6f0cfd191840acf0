"""What gRPC's server and client sides share on one HTTP/2 connection.

`H2Protocol` drives an h2 state machine on a Twisted transport, writes once per
batch of work, replenishes the connection-level window at once (so one paused
stream never stalls the others, see `etcdproxy.grpc.stream`), and ends a
connection whose peer floods it with frames that cost work without being calls.
"""

import dataclasses

from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from etcdproxy.grpc.h2connection import StreamRefused
from etcdproxy.grpc.h2fast import FastH2Connection


_MAX_INT31 = 2**31 - 1
END_GRACE = 5.0  # seconds a connection the proxy ended has to take its GOAWAY

# How long PING ACKs may wait for other output to go with (H2Protocol._write_out): longer than most
# calls take, so that the answer to the next call carries them.
CONTROL_DELAY = 0.05


def _only_ping_acks(data):
    """Whether ``data`` (whole HTTP/2 frames) is nothing but PING ACKs."""
    if len(data) % 17:  # a PING frame: 9-byte header, 8 bytes of payload
        return False
    for i in range(0, len(data), 17):
        if data[i + 3] != 0x6 or not data[i + 4] & 0x1 or data[i + 2] != 8:
            return False
    return True


def new_h2_connection(client_side, limits, connection_class=FastH2Connection):
    """The h2 state machine of one connection, configured and started (its
    preface and SETTINGS are in ``data_to_send()``)."""
    # h2's header checks cost about a quarter of a call, so they are off: the
    # server checks the request headers it acts on itself (method, path,
    # content-type, grpc-timeout, grpc-encoding), and metadata it relays that
    # etcd finds malformed gets etcd's own refusal.
    config = H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    conn = connection_class(config, limits.max_header_list_size)
    conn.local_settings = type(conn.local_settings)(
        client=client_side,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    if limits.connection_window > 65535:
        conn.increment_flow_control_window(limits.connection_window - 65535)
    return conn


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-connection limits, all in bytes except max_concurrent_streams."""

    max_receive_message: int = 4 * 1024 * 1024
    max_send_message: int = _MAX_INT31
    max_concurrent_streams: int = 2**32 - 1
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_header_list_size: int = 16 * 1024
    # Outbound bytes queued per stream before its producer is paused.
    stream_high_watermark: int = 256 * 1024
    # Frames a peer may send per second of each kind that costs the proxy work
    # without being a call: past them the connection ends with GOAWAY
    # ENHANCE_YOUR_CALM (HTTP/2 rapid reset, CVE-2023-44487; PING and SETTINGS
    # floods). grpc-go sends a BDP ping per burst of data: hundreds a second.
    max_resets_per_second: int = 1000
    max_pings_per_second: int = 10000
    max_settings_per_second: int = 100
    # Seconds a stream may hold data its peer gives no window for before
    # `stream_stalled` is called (0: never).
    send_stall_timeout: float = 0


class _RateGuard:
    """Counts events in one-second windows."""

    __slots__ = ("limit", "window", "count")

    def __init__(self, limit):
        self.limit = limit
        self.window = None
        self.count = 0

    def exceeded(self, now):
        if self.window is None or now - self.window >= 1.0:
            self.window = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class _WriteBatch:
    """Connections with output pending, written once per reactor callback.

    Work on one connection (a response arriving from etcd) queues output on
    others (the client's); they are all written when the outermost dataReceived
    returns, or on the next reactor turn when the work came from a timer.
    """

    _by_reactor = {}

    @classmethod
    def of(cls, reactor):
        batch = cls._by_reactor.get(id(reactor))
        if batch is None or batch.reactor is not reactor:
            batch = cls._by_reactor[id(reactor)] = cls(reactor)
        return batch

    def __init__(self, reactor):
        self.reactor = reactor
        self.depth = 0
        self.pending = []
        self._call = None

    def add(self, protocol):
        self.pending.append(protocol)
        if self.depth == 0 and self._call is None:
            self._call = self.reactor.callLater(0, self.write_all)

    def write_all(self):
        self._call = None
        pending = self.pending
        while pending:
            protocol = pending.pop()
            try:
                protocol._flush_now()
            except Exception:
                # A bug on one connection must not skip the others' writes nor
                # surface in whichever connection's read is running.
                protocol._log.failure("writing to {peer} failed; connection aborted",
                                      peer=protocol.transport.getPeer())
                protocol.transport.abortConnection()


@implementer(IPushProducer)
class H2Protocol(Protocol):
    """Shared HTTP/2 event loop. Subclasses handle the stream events."""

    client_side = None  # set by subclasses
    _log = Logger()

    def __init__(self, reactor, limits):
        self.reactor = reactor
        self.limits = limits
        self.streams = {}
        self._to_flush = set()
        self._blocked = set()  # streams with data queued but no window to send it
        self._stall_check = None
        self._ending = None  # the abort timer, once end_connection() was called
        self._batch = _WriteBatch.of(reactor)
        self._in_batch = False
        self._lost = False
        self._transport_paused = False
        self._held_output = []  # PING ACKs waiting for a write to go with (_write_out)
        self._held_timer = None
        self._guards = {
            "RST_STREAM": _RateGuard(limits.max_resets_per_second),
            "PING": _RateGuard(limits.max_pings_per_second),
            "SETTINGS": _RateGuard(limits.max_settings_per_second),
        }

    def connectionMade(self):
        # Small frames (headers, short messages) must not wait for Nagle's algorithm.
        tcp = self.transport
        while not hasattr(tcp, "setTcpNoDelay") and hasattr(tcp, "transport"):
            tcp = tcp.transport  # under TLS
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        self.conn = new_h2_connection(self.client_side, self.limits)
        self.transport.registerProducer(self, True)
        self.transport.write(self.conn.data_to_send())

    def dataReceived(self, data):
        batch = self._batch
        batch.depth += 1
        self.schedule_flush(None)
        try:
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as e:
                self._log.debug("HTTP/2 protocol error from {peer}: {e}", peer=self.transport.getPeer(), e=e)
                self.end_connection()  # h2 has framed the GOAWAY
                return
            for event in events:
                if self._ending is not None:
                    return  # ended by one of them (a flood)
                self._dispatch(event)
            self._replenish_connection_window()
            # h2 checks a frame's declared length only once the whole frame is in,
            # so a peer could make it buffer 16 MiB: check the pending header now.
            if self.conn.pending_frame_length() > self.conn.max_inbound_frame_size:
                self.end_connection(ErrorCodes.FRAME_SIZE_ERROR, b"frame too large")
                return
        finally:
            batch.depth -= 1
            if batch.depth == 0:
                batch.write_all()

    def _replenish_connection_window(self):
        # From the window itself, whatever consumed it (h2 credits DATA on
        # closed streams on its own): once a quarter is spent, all of it back.
        window = max(self.limits.connection_window, 65535)
        spent = window - self.conn.inbound_flow_control_window
        if spent >= window // 4:
            self.conn.increment_flow_control_window(spent)

    def _dispatch(self, event):
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(self, event)

    def _data_received(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.data_received(event.data, event.flow_controlled_length)

    def _stream_ended(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.remote_ended()

    def _stream_refused(self, event):
        # Refusing costs a header block's decoding, as a reset stream does.
        self._flooded("RST_STREAM")

    def _stream_reset(self, event):
        if self._flooded("RST_STREAM"):
            return
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            stream.reset_received(event.error_code)

    def _flooded(self, frame_type):
        """Counts a frame of the peer's; past the limit, ends the connection."""
        if not self._guards[frame_type].exceeded(self.reactor.seconds()):
            return False
        if self._ending is None and not self._lost:
            self._log.warn("{peer} sent over {limit} {frame} frames in a second: connection closed",
                           peer=self.transport.getPeer(), limit=self._guards[frame_type].limit,
                           frame=frame_type)
            self.end_connection(ErrorCodes.ENHANCE_YOUR_CALM, f"too many {frame_type} frames".encode())
        return True

    def _window_updated(self, event):
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._to_flush.add(stream)
        else:
            self._unblock()

    def _settings_changed(self, event):
        if self._flooded("SETTINGS"):
            return
        self._unblock()  # the initial stream window may have grown

    def _ping_received(self, event):
        self._flooded("PING")  # h2 has answered it already

    def stream_blocked(self, stream):
        """``stream`` has data queued that the peer's windows hold back."""
        self._blocked.add(stream)
        if stream.blocked_since is None:
            stream.blocked_since = self.reactor.seconds()
        if self.limits.send_stall_timeout and self._stall_check is None:
            self._stall_check = self.reactor.callLater(self.limits.send_stall_timeout, self._check_stalls)

    def _check_stalls(self):
        self._stall_check = None
        if self._lost:
            return
        now = self.reactor.seconds()
        timeout = self.limits.send_stall_timeout
        for stream in list(self._blocked):
            if stream.blocked_since is not None and now - stream.blocked_since >= timeout:
                stream.blocked_since = now  # the next call, if any, one timeout later
                self.stream_stalled(stream)
        waiting = [stream.blocked_since for stream in self._blocked if stream.blocked_since is not None]
        if waiting:
            self._stall_check = self.reactor.callLater(max(0.1, min(waiting) + timeout - now),
                                                       self._check_stalls)

    def _unblock(self):
        if self._blocked:
            self._to_flush |= self._blocked
            self._blocked = set()

    _handlers = {
        DataReceived: _data_received,
        RequestReceived: lambda self, event: self.request_received(event),
        ResponseReceived: lambda self, event: self.response_received(event),
        TrailersReceived: lambda self, event: self.trailers_received(event),
        StreamEnded: _stream_ended,
        StreamReset: _stream_reset,
        StreamRefused: _stream_refused,
        WindowUpdated: _window_updated,
        RemoteSettingsChanged: _settings_changed,
        ConnectionTerminated: lambda self, event: self.goaway_received(event),
        PingAckReceived: lambda self, event: self.ping_acked(event),
        PingReceived: _ping_received,
    }

    # -- writing ----------------------------------------------------------------

    def schedule_flush(self, stream):
        if stream is not None:
            self._to_flush.add(stream)
        if not self._in_batch:
            self._in_batch = True
            self._batch.add(self)

    def _flush_now(self):
        self._in_batch = False
        if self._lost:
            return
        if not self._transport_paused:
            streams, self._to_flush = self._to_flush, set()
            conn = self.conn
            for stream in streams:
                try:
                    stream.flush(conn)
                except (StreamClosedError, FlowControlError):
                    stream.send_failed()
        self._write_out(hold_acks=True)

    def _write_out(self, hold_acks=False):
        data = self.conn.data_to_send()
        if hold_acks and data and _only_ping_acks(data):
            # grpc-go pings after each DATA frame it receives while no ping
            # of its is unanswered (its bandwidth estimator, with a
            # WINDOW_UPDATE before each ping); answering at once costs a write
            # of its own (a send and two epoll_ctl) per call. The ACKs ride
            # along with the next write on this connection instead, or go
            # after CONTROL_DELAY.
            self._held_output.append(data)
            if self._held_timer is None:
                self._held_timer = self.reactor.callLater(CONTROL_DELAY, self._release_held)
            return
        if self._held_output:
            if hold_acks:
                # After the new frames: a grpc-go peer that reads a DATA frame
                # while its ping is still unanswered sends no new ping (with
                # the ACKs first, it pings again for that DATA frame).
                self._held_output.insert(0, data)
            else:
                # Before: what is written now may end the connection (GOAWAY).
                self._held_output.append(data)
            data = b"".join(self._held_output)
            self._held_output = []
            if self._held_timer is not None:
                if self._held_timer.active():
                    self._held_timer.cancel()
                self._held_timer = None
        if data:
            self.transport.write(data)

    def _release_held(self):
        self._held_timer = None
        if not self._lost:
            self._write_out()

    # IPushProducer: the transport's buffer toward the peer is full (or drained).
    def pauseProducing(self):
        self._transport_paused = True

    def resumeProducing(self):
        self._transport_paused = False
        self.schedule_flush(None)

    def stopProducing(self):
        self._transport_paused = True

    def close_after_writing(self):
        self._write_out()
        self.transport.loseConnection()

    def end_connection(self, error_code=None, reason=b""):
        """Ends the connection on the proxy's initiative (the peer broke the
        protocol or flooded it) with GOAWAY ``error_code`` (None: h2 has framed
        one). The calls end now, not when the transport closes, and a peer that
        does not read its last frames is cut off after ``END_GRACE`` seconds."""
        if self._ending is not None or self._lost:
            return
        if error_code is not None and self.conn.state_machine.state != ConnectionState.CLOSED:
            self.conn.close_connection(error_code, reason)
        self.close_after_writing()
        self._ending = self.reactor.callLater(END_GRACE, self.transport.abortConnection)
        self._end_streams(Failure(ConnectionDone("connection ended by the proxy")))

    def reset_stream(self, stream_id, error_code=ErrorCodes.CANCEL):
        self.streams.pop(stream_id, None)
        try:
            self.conn.reset_stream(stream_id, error_code)
        except (StreamClosedError, ProtocolError):
            pass
        self.schedule_flush(None)

    def stream_done(self, stream):
        """Forgets a stream whose both sides are closed."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        stream.close()

    def connectionLost(self, reason):
        self._lost = True
        self._held_output = []
        for timer in (self._stall_check, self._ending, self._held_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._stall_check = self._held_timer = None
        self._end_streams(reason)

    def _end_streams(self, reason):
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connection_lost(reason)

    # Subclass hooks.
    def request_received(self, event):
        self.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def response_received(self, event):
        self.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def trailers_received(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.trailers_received(event.headers)

    def goaway_received(self, event):
        pass

    def stream_stalled(self, stream):
        """``stream``'s peer has not read it for ``send_stall_timeout`` seconds."""

    def ping_acked(self, event):
        pass
