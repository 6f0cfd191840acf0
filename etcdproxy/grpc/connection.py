"""What gRPC's server and client sides share on one HTTP/2 connection.

`H2Protocol` drives an h2 state machine on a Twisted transport, writes once per
batch of work, replenishes the connection-level window at once (so one paused
stream never stalls the others, see `etcdproxy.grpc.stream`), and ends a
connection whose peer floods it with frames that cost work without being calls.
"""

import dataclasses

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError, StreamIDTooLowError
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
from hyperframe.frame import RstStreamFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from etcdproxy.grpc.hpackcache import CachingDecoder, CachingEncoder


_MAX_INT31 = 2**31 - 1

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


def _receive_frame_as_expected():
    """Whether h2's private ``_receive_frame`` is the one `_Connection` copies
    (h2 4.x: a trace log, then the dispatch with its StreamClosedError and
    StreamIDTooLowError handling); on any other h2 the original runs."""
    import inspect
    import h2

    if not h2.__version__.startswith("4."):
        return False
    try:
        source = inspect.getsource(H2Connection._receive_frame)
    except (OSError, TypeError, AttributeError):
        return False
    needed = ("_frame_dispatch_table[frame.__class__](frame)", "_stream_is_closed_by_reset(e.stream_id)",
              "_stream_is_closed_by_end(e.stream_id)", "e._events", "self._prepare_for_sending(frames)",
              "except StreamIDTooLowError", "except StreamClosedError")
    return all(n in source for n in needed) and source.count("except") == 2


_RECEIVE_FRAME_AS_EXPECTED = _receive_frame_as_expected()


class _Connection(H2Connection):
    """h2's H2Connection, with stream counting in amortized O(1), and kept
    open after a GOAWAY for the streams the peer still finishes.

    h2 counts open streams by walking its whole stream table each time a stream
    is opened (and forgets closed streams on the way), so opening N streams costs
    O(N^2): 10,000 watch streams took 30 s. Here the walk runs only when the
    table has doubled since the last one; in between, the count is the last
    walk's plus the streams opened since (from the stream ids, which only grow).
    That is an upper bound, so a concurrency limit is never exceeded; near the
    limit the exact walk decides.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self._walked = {}  # parity -> (open count, highest stream id) at the last walk
        self._walk_at = 64
        # Nothing has been encoded or decoded yet: swap in the caching coders.
        decoder = CachingDecoder()
        decoder.max_header_list_size = self.decoder.max_header_list_size
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        self.decoder = decoder
        self.encoder = CachingEncoder()

    if _RECEIVE_FRAME_AS_EXPECTED:
        def _receive_frame(self, frame):
            # h2's own, less its first line: ``logger.trace("Received frame:
            # %s", repr(frame))`` formats every frame for a log that is off
            # (about 4% of a proxied call). The rest is h2 4.1-4.3's verbatim.
            try:
                frames, events = self._frame_dispatch_table[frame.__class__](frame)
            except StreamClosedError as e:
                if self._stream_is_closed_by_reset(e.stream_id):
                    f = RstStreamFrame(e.stream_id)
                    f.error_code = e.error_code
                    self._prepare_for_sending([f])
                    events = e._events
                else:
                    raise
            except StreamIDTooLowError as e:
                if self._stream_is_closed_by_reset(e.stream_id):
                    f = RstStreamFrame(e.stream_id)
                    f.error_code = ErrorCodes.STREAM_CLOSED
                    self._prepare_for_sending([f])
                    events = []
                elif self._stream_is_closed_by_end(e.stream_id):
                    raise StreamClosedError(e.stream_id) from e
                else:
                    raise
            else:
                self._prepare_for_sending(frames)
            return events

    def _receive_goaway_frame(self, frame):
        # h2 treats any GOAWAY as the end of the connection and would refuse
        # the frames that follow, even in the same read. HTTP/2 lets the
        # streams up to last_stream_id finish, so the state is kept open; the
        # protocol opens no new stream once it has seen the GOAWAY.
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return result

    def _open_streams(self, remainder):
        outbound = remainder == (1 if self.config.client_side else 0)
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        highest = highest or 0
        if len(self.streams) < self._walk_at and remainder in self._walked:
            count, highest_then = self._walked[remainder]
            bound = count + (highest - highest_then) // 2
            settings = self.remote_settings if outbound else self.local_settings
            if bound + 1 <= settings.max_concurrent_streams:
                return bound
        count = super()._open_streams(remainder)
        self._walked[remainder] = (count, highest)
        self._walk_at = max(64, 2 * len(self.streams))
        return count


def _pending_frame_length(conn):
    """The declared length of the incomplete frame h2 holds, or 0.

    Complete frames have been consumed, so the buffer starts with a frame header
    (h2 4.1 names the buffer ``data``, 4.3+ ``_data``).
    """
    buffer = conn.incoming_buffer
    pending = getattr(buffer, "_data", None) or getattr(buffer, "data", b"")
    if len(pending) < 9:
        return 0
    return int.from_bytes(pending[:3], "big")


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
            pending.pop()._flush_now()


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
        self._batch = _WriteBatch.of(reactor)
        self._in_batch = False
        self._lost = False
        self._transport_paused = False
        self._conn_unacked = 0
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
        # h2's header checks cost about a quarter of a call, so they are off: the
        # server checks the request headers it acts on itself (method, path,
        # content-type, grpc-timeout, grpc-encoding), and metadata it relays that
        # etcd finds malformed gets etcd's own refusal.
        config = H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.conn = _Connection(config)
        limits = self.limits
        self.conn.local_settings = type(self.conn.local_settings)(
            client=self.client_side,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 applies a changed limit to its header decoder only on the peer's ACK of a
        # SETTINGS change, so set the decoder's limit directly.
        self.conn.decoder.max_header_list_size = limits.max_header_list_size
        self.conn.initiate_connection()
        if limits.connection_window > 65535:
            self.conn.increment_flow_control_window(limits.connection_window - 65535)
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
                self._write_out()
                self.transport.loseConnection()
                return
            for event in events:
                self._dispatch(event)
            # h2 checks a frame's declared length only once the whole frame is in,
            # so a peer could make it buffer 16 MiB: check the pending header now.
            if _pending_frame_length(self.conn) > self.conn.max_inbound_frame_size:
                self.conn.close_connection(ErrorCodes.FRAME_SIZE_ERROR, b"frame too large")
                self.close_after_writing()
                return
        finally:
            batch.depth -= 1
            if batch.depth == 0:
                batch.write_all()

    def _dispatch(self, event):
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(self, event)

    def _data_received(self, event):
        self._conn_unacked += event.flow_controlled_length
        if self._conn_unacked >= self.limits.connection_window // 4:
            self.conn.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.data_received(event.data, event.flow_controlled_length)

    def _stream_ended(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.end_received()

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
        if not self._lost and self.conn.state_machine.state != ConnectionState.CLOSED:
            self._log.warn("{peer} sent over {limit} {frame} frames in a second: connection closed",
                           peer=self.transport.getPeer(), limit=self._guards[frame_type].limit,
                           frame=frame_type)
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, f"too many {frame_type} frames".encode())
            self.close_after_writing()
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
                    stream.close()
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
        if self._held_timer is not None:
            if self._held_timer.active():
                self._held_timer.cancel()
            self._held_timer = None
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

    def ping_acked(self, event):
        pass
