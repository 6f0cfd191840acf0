"""What gRPC's server and client sides share on one HTTP/2 connection.

`H2Protocol` drives an h2 state machine (`new_h2_connection`, with the fast
path of `etcdproxy.grpc.h2fast`) on a Twisted transport and dispatches its
events to the streams; it replenishes the connection-level window at once (so
one paused stream never stalls the others, see `etcdproxy.grpc.stream`). Its
other jobs each have a module: writing once per batch of work
(`etcdproxy.grpc.writebatch`), counting floods (`etcdproxy.grpc.floodguard`),
holding PING ACKs for the next write (`etcdproxy.grpc.pingacks`), timing
streams the peer does not read (`etcdproxy.grpc.stalls`) and sending without
a poll round when the socket takes it (`etcdproxy.grpc.directwrite`).
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

from etcdproxy.grpc.directwrite import DirectWriter
from etcdproxy.grpc.floodguard import FloodGuard
from etcdproxy.grpc.h2connection import StreamRefused
from etcdproxy.grpc.h2fast import FastH2Connection
from etcdproxy.grpc.pingacks import HeldAcks, only_ping_acks
from etcdproxy.grpc.stalls import StallWatch
from etcdproxy.grpc.writebatch import WriteBatch


_MAX_INT31 = 2**31 - 1
END_GRACE = 5.0  # seconds a connection the proxy ended has to take its GOAWAY

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
        self._stalls = StallWatch(reactor, limits.send_stall_timeout, self.stream_stalled)
        self._ending = None  # the abort timer, once end_connection() was called
        self._batch = WriteBatch.of(reactor)
        self._in_batch = False
        self._lost = False
        self._transport_paused = False
        self._held_acks = HeldAcks(reactor, self._release_held)
        self._flood_guard = FloodGuard(limits)

    def connectionMade(self):
        # Small frames (headers, short messages) must not wait for Nagle's algorithm.
        tcp = self.transport
        while not hasattr(tcp, "setTcpNoDelay") and hasattr(tcp, "transport"):
            tcp = tcp.transport  # under TLS
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        self.conn = new_h2_connection(self.client_side, self.limits)
        self.transport.registerProducer(self, True)
        self._writer = DirectWriter(self.transport)
        self._writer.write(self.conn.data_to_send())

    def dataReceived(self, data):
        if self._ending is not None:
            return  # ended: what the peer still sends is read and dropped (see end_connection)
        batch = self._batch
        batch.enter()
        self.schedule_flush(None)
        try:
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as e:
                self._log.debug("HTTP/2 protocol error from {peer}: {e}", peer=self.transport.getPeer(), e=e)
                self.end_connection()  # h2 has framed the GOAWAY
                return
            handlers = self._handlers
            for event in events:
                if self._ending is not None:
                    return  # ended by one of them (a flood)
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
            self._replenish_connection_window()
            # h2 checks a frame's declared length only once the whole frame is in,
            # so a peer could make it buffer 16 MiB: check the pending header now.
            if self.conn.pending_frame_length() > self.conn.max_inbound_frame_size:
                self.end_connection(ErrorCodes.FRAME_SIZE_ERROR, b"frame too large")
                return
        finally:
            batch.leave()

    def _replenish_connection_window(self):
        # From the window itself, whatever consumed it (h2 credits DATA on
        # closed streams on its own): once a quarter is spent, all of it back.
        window = max(self.limits.connection_window, 65535)
        spent = window - self.conn.inbound_flow_control_window
        if spent >= window // 4:
            self.conn.increment_flow_control_window(spent)

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
        if not self._flood_guard.flooded(frame_type, self.reactor.seconds()):
            return False
        if self._ending is None and not self._lost:
            self._log.warn("{peer} sent over {limit} {frame} frames in a second: connection closed",
                           peer=self.transport.getPeer(), limit=self._flood_guard.limit(frame_type),
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
        self._stalls.blocked(stream)

    def _unblock(self):
        self._to_flush |= self._stalls.take_blocked()

    @classmethod
    def _event_handlers(cls):
        """h2 event type -> the function (of this class) taking it."""
        return {
            DataReceived: cls._data_received,
            RequestReceived: cls.request_received,
            ResponseReceived: cls.response_received,
            TrailersReceived: cls.trailers_received,
            StreamEnded: cls._stream_ended,
            StreamReset: cls._stream_reset,
            StreamRefused: cls._stream_refused,
            WindowUpdated: cls._window_updated,
            RemoteSettingsChanged: cls._settings_changed,
            ConnectionTerminated: cls.goaway_received,
            PingAckReceived: cls.ping_acked,
            PingReceived: cls._ping_received,
        }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._handlers = cls._event_handlers()  # the subclass's own hooks, looked up once

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
        if hold_acks and data and only_ping_acks(data):
            self._held_acks.hold(data)  # until the next write, or CONTROL_DELAY
            return
        data = self._held_acks.with_output(data, after=hold_acks)
        if data:
            self._writer.write(data)

    def _release_held(self):
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
        self._write_out()
        # Only our side is closed: closing a socket whose peer is still sending
        # (a flood) resets it, and the reset can destroy the GOAWAY before the peer
        # reads it. What it still sends is read and dropped until it closes too,
        # or END_GRACE runs out. (TLS transports have no half-close.)
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self.transport.loseConnection()
        self._ending = self.reactor.callLater(END_GRACE, self.transport.abortConnection)
        self._end_streams(Failure(ConnectionDone("connection ended by the proxy")))

    def reset_stream(self, stream_id, error_code=ErrorCodes.CANCEL):
        self.streams.pop(stream_id, None)
        try:
            self.conn.reset_stream(stream_id, error_code)
        except (StreamClosedError, ProtocolError):
            pass
        self.conn.forget_closed_stream(stream_id)
        self.schedule_flush(None)

    def stream_done(self, stream):
        """Forgets a stream whose both sides are closed."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.conn.forget_closed_stream(stream.stream_id)
        stream.close()

    def connectionLost(self, reason):
        # What the connection held (h2's state and buffers, Twisted's unsent
        # bytes) is freed here by refcounting, not left in cycles for the
        # collector (see etcdproxy.collector): the helpers drop their callbacks
        # into this protocol and h2 its own cycle.
        self._lost = True
        self._held_acks.stop()
        self._stalls.stop()
        if self._ending is not None and self._ending.active():
            self._ending.cancel()
        self._end_streams(reason)
        if getattr(self, "conn", None) is not None:  # (lost before it was made: no h2 state)
            self.conn.release()

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
