"""A fast path through h2 for the frames that make up gRPC traffic.

h2 spends most of a gRPC call on generic per-frame machinery, not on HTTP/2
itself: hyperframe builds a Frame, a Flags set and padding/priority state for
every frame it parses or writes, h2's frame buffer re-slices its whole buffer per
frame, and every frame goes through several layers of calls and (no-op) logs.
`FastH2Connection` keeps h2 as the engine of record and takes the common frames
a shorter way, on h2's own objects, so that its state is h2's at every moment:

- receiving: whole frames are cut out of the read with plain byte arithmetic.
  DATA (unpadded), HEADERS (a whole header block: END_HEADERS, no padding or
  priority), WINDOW_UPDATE and PING go as lean frame records (`h2records`) to
  h2's own handlers for them (`_receive_data_frame` and so on, through h2's
  dispatch and error handling), or, in the common cases, to the steps of those
  handlers, so every state transition, window, event and error is h2's.
  Every other frame (the preface, SETTINGS, RST_STREAM, GOAWAY, PRIORITY,
  CONTINUATION, unknown types) and every frame that would be an error in
  hyperframe's parsing (stream 0, a bad increment, a frame over the size limit)
  is fed to h2's ``receive_data`` unchanged, in order.
- sending: DATA and HEADERS on streams in the states where h2 would send them
  without an event or an error are framed here (a 9-byte header and the
  payload, the header block from h2's own encoder) straight into h2's output
  buffer (a large payload is queued beside it as it is, and copied once, by
  ``data_to_send``), with h2's windows and stream state machine updated as h2 does;
  anything else (padding, priority, an informational response, a window or
  frame size exceeded, a closed stream, header validation on) goes to h2.

`tests/test_h2_fast_path.py` proves the two equivalent: the same frame
sequences, valid and hostile, fed to plain h2 and to this, give the same
events, bytes, errors and state. The fast path is used only on the h2 releases
it was tested with (`etcdproxy.grpc.h2internals.supported()`), and only where h2's internals are what it
was written against; a test fails if it turns itself off.
"""

import os
import struct

from hpack import HPACKError, OversizedHeaderListError
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import Frame
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.settings import SettingCodes
from h2.stream import H2Stream, StreamInputs, StreamState

from etcdproxy.grpc.h2connection import BoundedH2Connection
from etcdproxy.grpc.h2internals import (
    DATA_RECEIVED, END_RECEIVED, END_SENT, HEADERS_RECEIVED, HEADERS_SENT, QUIET_CONNECTION_STATES,
    QUIET_PING_STATES, QUIET_RECEIVING_STATES, QUIET_WINDOW_RECEIVING_STATES, QUIET_WINDOW_STATES,
    STREAMS_NOTE_MAX_INBOUND_FRAME_SIZE, SUPPORTED, UNSET_MAX_CONCURRENT_STREAMS, ping_ack_received, ping_received,
    step, window_updated)
from etcdproxy.grpc.h2records import (
    DATA_FLAGS, END_HEADERS as _END_HEADERS, END_STREAM as _END_STREAM, HEADERS_FLAGS, PING_FLAGS, DataFrame,
    HeadersFrame, PingFrame, WindowUpdateFrame)

# Off (plain h2 for every frame) with ETCDPROXY_H2_FAST_PATH=0, to compare the two
# (bench/h2_layer.py --plain, the differential tests).
FAST_PATH_ENABLED = os.environ.get("ETCDPROXY_H2_FAST_PATH", "1") != "0"

_HEADER = struct.Struct(">HBBBL")  # length (16 high bits), length (8 low bits), type, flags, stream id
_DATA, _HEADERS, _PING, _WINDOW_UPDATE = 0x0, 0x1, 0x6, 0x8
_MAX_WINDOW = 2**31 - 1
_PING_ACK_HEADER = _HEADER.pack(0, 8, _PING, 0x1, 0)
# DATA payloads from this size on are queued for sending as they are (bytes, or
# read-only views, which the proxy never changes once sent), not copied into
# h2's output buffer first.
_LARGE_PAYLOAD = 4096
_CONNECTION_WINDOW_UPDATE_HEADER = _HEADER.pack(0, 4, _WINDOW_UPDATE, 0, 0)
_INITIAL_WINDOW_SIZE = SettingCodes.INITIAL_WINDOW_SIZE
# (an enum's member read from its class costs a Python call on every read)
_IDLE, _OPEN, _HALF_CLOSED_LOCAL, _HALF_CLOSED_REMOTE = (
    StreamState.IDLE, StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)
_MAX_CONCURRENT_STREAMS = SettingCodes.MAX_CONCURRENT_STREAMS


def _acceptable_header(header, max_size):
    """Whether h2 would wait for the rest of a frame with this header (rather
    than refuse it now, or hold a frame over the size limit for the protocol's
    check of the pending frame)."""
    try:
        _, length = Frame.parse_frame_header(header)
    except (InvalidDataError, InvalidFrameError):
        return False
    return length <= max_size


class FastH2Connection(BoundedH2Connection):
    """`BoundedH2Connection` with the fast path for DATA, HEADERS, WINDOW_UPDATE and PING."""

    def __init__(self, config, max_header_list_size):
        super().__init__(config, max_header_list_size)
        self._fast = FAST_PATH_ENABLED and SUPPORTED
        self._partial = b""  # the start of a frame not yet whole
        self._queued_output = []  # output before h2's buffer (large payloads as they are)
        # Header blocks are framed here only with h2's outbound header checks off
        # (as the proxy configures it; the configuration is not changed later).
        self._fast_headers = self._fast and not (config.validate_outbound_headers
                                                 or config.normalize_outbound_headers)
        # Received header blocks go the short way only as received raw: not
        # converted to text, not checked, not normalised (also read once).
        self._raw_headers_in = not (config.header_encoding or config.validate_inbound_headers
                                    or config.normalize_inbound_headers)
        self._server_side = not config.client_side
        if self._fast:
            table = self._frame_dispatch_table
            table[DataFrame] = self._receive_data_frame
            table[HeadersFrame] = self._receive_headers_frame
            table[WindowUpdateFrame] = self._receive_window_update_frame
            table[PingFrame] = self._receive_ping_frame

    @property
    def fast_path_active(self):
        return self._fast

    def pending_frame_length(self):
        """The declared length of the incomplete frame held, or 0."""
        pending = self._partial
        if len(pending) >= 9:
            return int.from_bytes(pending[:3], "big")
        buffer = self.incoming_buffer
        pending = getattr(buffer, "_data", None) or getattr(buffer, "data", b"")
        if len(pending) < 9:
            return 0
        return int.from_bytes(pending[:3], "big")

    # -- receiving --------------------------------------------------------------

    def receive_data(self, data):
        if not self._fast or type(data) not in (bytes, bytearray, memoryview):
            return super().receive_data(data)  # (h2 refuses what is not bytes-like)
        events = []
        buffer = self.incoming_buffer
        if buffer._preamble_len:
            # The client's connection preface, in h2's hands.
            take = min(buffer._preamble_len, len(data))
            events.extend(super().receive_data(data[:take]))
            data = data[take:]
        if type(data) is not bytes:
            data = bytes(data)
        start = 0
        partial = self._partial
        if partial:
            self._partial = b""
            rest = 9 + int.from_bytes(partial[:3], "big") - len(partial) if len(partial) >= 9 else len(data) + 1
            if rest > len(data):
                data = partial + data  # (the frame held is not whole yet)
            else:
                # The frame held, completed by the start of this read: only that
                # frame is joined, not the whole read (a large answer's reads
                # mostly end inside a frame: this was a copy of all of it).
                try:
                    events += self._receive_frames(partial + data[:rest], 0)
                except BaseException:
                    buffer.add_data(data[rest:])  # (h2 has the rest, as below)
                    raise
                if not self._fast:
                    return events + super().receive_data(data[rest:])
                start = rest
        events += self._receive_frames(data, start)
        return events

    def _receive_frames(self, data, position):
        """The events of the frames in ``data`` (bytes) from ``position`` on;
        what is left of a frame not whole is kept for the next read."""
        events = []
        buffer = self.incoming_buffer
        size = len(data)
        slow = None  # where the frames for h2 start, before ``position``
        max_size = self.max_inbound_frame_size
        try:
            while size - position >= 9:
                high, low, kind, flags, stream_id = _HEADER.unpack_from(data, position)
                length = (high << 8) | low
                if length > max_size:
                    # h2 holds it and refuses it as h2 does; frames are no longer
                    # cut here, since h2's buffer has the rest of this one.
                    break
                end = position + 9 + length
                if end > size:
                    break
                stream_id &= 0x7FFFFFFF
                # The frames taken here: DATA unpadded, HEADERS a whole block
                # without padding or priority, PING and WINDOW_UPDATE valid ones.
                if kind == _DATA:
                    fast = stream_id and flags <= _END_STREAM
                elif kind == _HEADERS:
                    fast = stream_id and (flags == _END_HEADERS or flags == _END_HEADERS | _END_STREAM)
                elif kind == _PING:
                    fast = length == 8 and not stream_id and flags <= 0x1
                elif kind == _WINDOW_UPDATE and length == 4:
                    increment = int.from_bytes(data[position + 9:end], "big")
                    fast = 1 <= increment <= _MAX_WINDOW
                else:
                    fast = False
                if fast and slow is not None:
                    # h2 takes the frames before this one first.
                    events.extend(super().receive_data(data[slow:position]))
                    slow = None
                if not fast or buffer._headers_buffer:
                    # For h2 (inside a header block, any frame but CONTINUATION is h2's error).
                    if slow is None:
                        slow = position
                    position = end
                    continue
                start = position + 9
                position = end
                try:
                    if kind == _DATA:
                        events.extend(self._receive_data_block(stream_id, data[start:end], flags))
                    elif kind == _HEADERS:
                        events.extend(self._receive_header_block(stream_id, data[start:end], flags))
                    elif kind == _PING:
                        events.extend(self._receive_ping(data[start:end], flags))
                    else:
                        events.extend(self._receive_window_update(stream_id, increment))
                except ProtocolError as e:
                    self._terminate_connection(e.error_code)  # as h2's receive_data does
                    raise
            if slow is not None:
                events.extend(super().receive_data(data[slow:position]))
                slow = None
        except BaseException:
            # h2 has what it had not parsed of its frames; the rest goes after it,
            # and from now on everything goes through h2, as without the fast path.
            self._fast = False
            buffer.add_data(data[position:])
            raise
        if position < size:
            if size - position >= 9 and not _acceptable_header(data[position:position + 9], max_size):
                # h2 refuses a frame header as soon as it is in (a frame type on the
                # wrong stream); it is h2's to refuse, and h2's buffer is no longer
                # frame-aligned with this one's, so h2 takes everything from now on.
                self._fast = False
                events.extend(super().receive_data(data[position:]))
            else:
                self._partial = data[position:]
        return events

    def _receive_data_block(self, sid, data, flags):
        """An unpadded DATA frame, as h2's ``_receive_frame`` takes it; on a
        stream open for it, the short way (h2's own window and stream
        handling, without its generic frame handler)."""
        stream = self.streams.get(sid)
        if stream is None or self.state_machine.state not in QUIET_RECEIVING_STATES:
            return self._receive_frame(DataFrame(sid, data, DATA_FLAGS[flags]))
        machine = stream.state_machine
        state = machine.state
        if not (state is _OPEN or state is _HALF_CLOSED_LOCAL) or not machine.headers_received:
            return self._receive_frame(DataFrame(sid, data, DATA_FLAGS[flags]))
        length = len(data)
        # h2's WindowManager.window_consumed, inline while the window holds the
        # data (past it, h2's own raises FlowControlError).
        manager = self._inbound_flow_control_window_manager
        if length <= manager.current_window_size:
            manager.current_window_size -= length
        else:
            manager.window_consumed(length)
        # h2's H2Stream.receive_data, less its no-op log.
        end_stream = flags == _END_STREAM
        events = DATA_RECEIVED(machine, state)  # (the state stays as it is)
        manager = stream._inbound_window_manager
        if length <= manager.current_window_size:
            manager.current_window_size -= length
        else:
            manager.window_consumed(length)
        if stream._expected_content_length is None:
            stream._actual_content_length += length
        else:
            stream._track_content_length(length, end_stream)
        event = events[0]
        if end_stream:
            transition, machine.state = END_RECEIVED[state]
            ended = transition(machine, state)
            event.stream_ended = ended[0]
            events += ended
        event.data = data
        event.flow_controlled_length = length
        return events

    def _receive_ping(self, data, flags):
        """A PING, answered as h2 answers it (h2's ACK frame, written as bytes)."""
        if self.state_machine.state not in QUIET_PING_STATES:
            return self._receive_frame(PingFrame(PING_FLAGS[flags], data))
        if flags:
            return [ping_ack_received(data)]
        self._data_to_send += _PING_ACK_HEADER + data
        return [ping_received(data)]

    def _receive_window_update(self, sid, increment):
        """A WINDOW_UPDATE for the connection, or for a stream h2 holds: h2's
        own handler, without its generic frame handler (whose error handling is
        for streams h2 no longer holds)."""
        if not sid and self.state_machine.state in QUIET_WINDOW_RECEIVING_STATES:
            # h2's own for the connection's window, less its state machine's lookup
            window = self.outbound_flow_control_window + increment
            if window <= _MAX_WINDOW:  # (past it, h2's FlowControlError)
                self.outbound_flow_control_window = window
                return [window_updated(0, increment)]
        frame = WindowUpdateFrame(sid, increment)
        if sid and sid not in self.streams:
            return self._receive_frame(frame)
        frames, events = self._receive_window_update_frame(frame)
        if frames:
            self._prepare_for_sending(frames)
        return events

    def _receive_header_block(self, sid, block, flags):
        """A whole header block (no padding or priority), as h2's
        ``_receive_frame`` takes it, the common cases the short way: a new
        stream the peer may open here, or headers and trailers on a stream of
        ours that expects them. The steps that could fail, or do more than
        these cases need, are h2's own; anything else goes to h2 whole."""
        stream = self.streams.get(sid)
        if self.state_machine.state not in QUIET_RECEIVING_STATES:
            return self._receive_frame(HeadersFrame(sid, block, HEADERS_FLAGS[flags]))
        if stream is None:
            # A new stream: one h2 would open (right parity, above the highest
            # id) within the concurrency limit (past it, h2's refusal).
            if (not self._server_side or not sid & 1 or sid <= self.highest_inbound_stream_id
                    or self._over_stream_limit(self.local_settings, outbound=False)):
                return self._receive_frame(HeadersFrame(sid, block, HEADERS_FLAGS[flags]))
        else:
            state = stream.state_machine.state
            if not (state is _OPEN or state is _HALF_CLOSED_LOCAL):
                return self._receive_frame(HeadersFrame(sid, block, HEADERS_FLAGS[flags]))
        try:  # h2's _decode_headers, inline
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError as e:
            raise DenialOfServiceError(f"Oversized header block: {e}") from e
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise ProtocolError(f"Error decoding header block: {e}") from e
        if stream is None:
            self.highest_inbound_stream_id = sid
            stream = self._new_stream(sid)
        return self._stream_received_headers(stream, headers, flags == _END_HEADERS | _END_STREAM)

    def _new_stream(self, stream_id):
        """h2's ``_begin_new_stream`` for an id it would take (the caller has
        checked it and noted it as the highest of its side), less its no-op logs
        and setting lookups through properties."""
        stream = H2Stream(stream_id, self.config,  # (settings read as h2internals says)
                          self.local_settings._settings[_INITIAL_WINDOW_SIZE][0],
                          self.remote_settings._settings[_INITIAL_WINDOW_SIZE][0])
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        if STREAMS_NOTE_MAX_INBOUND_FRAME_SIZE:
            stream.max_inbound_frame_size = self.max_inbound_frame_size
        self.streams[stream_id] = stream
        return stream

    def get_next_available_stream_id(self):
        # h2's own, less its no-op log (h2's error past the last id)
        highest = self.highest_outbound_stream_id
        stream_id = highest + 2 if highest else 2 if self._server_side else 1
        if stream_id > self.HIGHEST_ALLOWED_STREAM_ID:
            return super().get_next_available_stream_id()
        return stream_id

    def local_flow_control_window(self, stream_id):
        stream = self.streams.get(stream_id)
        if stream is None:
            return super().local_flow_control_window(stream_id)  # h2's error
        # h2's own, without its lookup's error handling (for streams it does not hold)
        window = stream.outbound_flow_control_window
        return window if window < self.outbound_flow_control_window else self.outbound_flow_control_window

    def _over_stream_limit(self, settings, outbound):
        """Whether one more stream would pass the open streams ``settings``
        allow: h2's ``open_outbound_streams`` / ``open_inbound_streams`` + 1 >
        ``max_concurrent_streams``, counted as `BoundedH2Connection` counts
        (which walks the table, and forgets its closed streams, when h2 would
        too), the limit read from h2's settings store (see h2internals)."""
        entry = settings._settings.get(_MAX_CONCURRENT_STREAMS)
        limit = UNSET_MAX_CONCURRENT_STREAMS if entry is None or entry[0] is None else entry[0]
        remainder = self._outbound_remainder if outbound else 1 - self._outbound_remainder
        return self._open_streams(remainder, limit) + 1 > limit

    def _stream_received_headers(self, stream, headers, end_stream):
        """h2's ``H2Stream.receive_headers`` for a block with neither a 1xx
        status nor content-length on a stream that had none, headers not
        checked or converted (the proxy's configuration), and trailers that end
        the stream; h2's own for anything else."""
        machine = stream.state_machine
        if (not self._raw_headers_in or stream.request_method == b"HEAD"
                or stream._expected_content_length is not None
                or (machine.headers_received and not end_stream)):
            return self._stream_headers_by_h2(stream, headers, end_stream)
        for name, value in headers:
            if name == b"content-length" or (name == b":status" and value[:1] == b"1"):
                return self._stream_headers_by_h2(stream, headers, end_stream)
        state = machine.state  # (IDLE, OPEN or HALF_CLOSED_LOCAL: the states taken here)
        if machine.trailers_received or not (machine.headers_received or machine.client is True
                                             or state is _IDLE):
            events = step(machine, StreamInputs.RECV_HEADERS)  # (h2's error)
        else:
            transition, machine.state = HEADERS_RECEIVED[state]
            events = transition(machine, state)
        if end_stream:
            state = machine.state  # (now OPEN or HALF_CLOSED_LOCAL)
            transition, machine.state = END_RECEIVED[state]
            ended = transition(machine, state)
            events[0].stream_ended = ended[0]
            events += ended
        events[0].headers = list(headers)
        return events

    def _stream_headers_by_h2(self, stream, headers, end_stream):
        return stream.receive_headers(headers, end_stream, self.config.header_encoding)[1]

    def update_settings(self, new_settings):
        # h2 applies a new local MAX_FRAME_SIZE (once acknowledged) from the next
        # read on; the frame cutting here would apply it within the read. The proxy
        # never changes it; should anyone, h2 takes the reads from then on.
        if self._fast and SettingCodes.MAX_FRAME_SIZE in new_settings:
            self._fast = False
            partial, self._partial = self._partial, b""
            if partial:
                self.incoming_buffer.add_data(partial)
        return super().update_settings(new_settings)

    # -- sending ----------------------------------------------------------------

    def increment_flow_control_window(self, increment, stream_id=None):
        # The connection's window: h2's window manager, h2's frame written as bytes.
        if (stream_id is not None or not self._fast or not 1 <= increment <= self.MAX_WINDOW_INCREMENT
                or self.state_machine.state not in QUIET_WINDOW_STATES):
            return super().increment_flow_control_window(increment, stream_id)
        self._inbound_flow_control_window_manager.window_opened(increment)
        self._data_to_send += _CONNECTION_WINDOW_UPDATE_HEADER + increment.to_bytes(4, "big")

    def send_data(self, stream_id, data, end_stream=False, pad_length=None):
        stream = self.streams.get(stream_id)
        size = len(data)
        if (not self._fast or pad_length is not None or stream is None
                or (type(data) is not bytes and (type(data) is not memoryview or data.nbytes != size))
                or self.state_machine.state not in QUIET_CONNECTION_STATES
                or size > self.outbound_flow_control_window or size > stream.outbound_flow_control_window
                or size > self.max_outbound_frame_size):
            return super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        state = stream.state_machine.state
        if state is not _OPEN and state is not _HALF_CLOSED_REMOTE:
            return super().send_data(stream_id, data, end_stream=end_stream, pad_length=pad_length)
        # SEND_DATA leaves both state machines as they are in these states.
        if end_stream:
            transition, stream.state_machine.state = END_SENT[state]
            if transition is not None:
                transition(stream.state_machine, state)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        header = _HEADER.pack(size >> 8, size & 0xFF, _DATA, _END_STREAM if end_stream else 0, stream_id)
        if size >= _LARGE_PAYLOAD and (type(data) is bytes or data.readonly):  # (a read-only view: unchanging)
            # h2's buffer so far, then this frame, kept in order until data_to_send()
            self._queued_output += (self._data_to_send, header, data)
            self._data_to_send = bytearray()
            return
        out = self._data_to_send
        out += header
        out += data

    def data_to_send(self, amount=None):
        queued = self._queued_output
        if not queued:
            if amount is None:  # h2's own for all of it
                data = bytes(self._data_to_send)
                self._data_to_send = bytearray()
                return data
            return super().data_to_send(amount)
        queued.append(self._data_to_send)
        data = b"".join(queued)  # the one copy of a large payload on its way out
        self._queued_output = []
        self._data_to_send = bytearray()
        if amount is None:
            return data
        self._data_to_send += data[amount:]
        return data[:amount]

    def clear_outbound_data_buffer(self):
        self._queued_output = []
        super().clear_outbound_data_buffer()

    def send_headers(self, stream_id, headers, end_stream=False, priority_weight=None,
                     priority_depends_on=None, priority_exclusive=None):
        if (not self._fast_headers or priority_weight is not None or priority_depends_on is not None
                or priority_exclusive is not None or type(headers) is not list
                or self.state_machine.state not in QUIET_CONNECTION_STATES):
            return super().send_headers(stream_id, headers, end_stream, priority_weight,
                                        priority_depends_on, priority_exclusive)
        if not headers:
            return super().send_headers(stream_id, headers, end_stream)  # h2 fails on an empty block
        if not 0 < stream_id <= _MAX_WINDOW:
            return super().send_headers(stream_id, headers, end_stream)
        # One pass for what h2 reads of the list in as many: that every header
        # is a pair of bytes, and h2's is_informational_response,
        # extract_method_header and authority_from_headers.
        informational = method = authority = None
        for header in headers:
            if type(header) is not tuple or len(header) != 2:
                return super().send_headers(stream_id, headers, end_stream)
            name, value = header
            if type(name) is not bytes or type(value) is not bytes:
                return super().send_headers(stream_id, headers, end_stream)
            if name[:1] == b":":
                if name == b":method":
                    if method is None:
                        method = value
                elif name == b":authority":
                    if authority is None:
                        authority = value
                elif name == b":status" and informational is None:
                    informational = value[:1] == b"1"
            elif informational is None:
                informational = False  # h2 looks no further than the pseudo-headers
        stream = self.streams.get(stream_id)
        if stream is None:
            if (stream_id <= self.highest_outbound_stream_id or stream_id & 1 == self._server_side
                    or self._over_stream_limit(self.remote_settings, outbound=True)):
                return super().send_headers(stream_id, headers, end_stream)  # h2's refusal
            # h2's connection state machine does nothing here; h2 then opens the stream.
            self.highest_outbound_stream_id = stream_id
            stream = self._new_stream(stream_id)
        # h2's H2Stream.send_headers, less the header validation (off) and its no-op log.
        machine = stream.state_machine
        if informational and not machine.client:
            return super().send_headers(stream_id, headers, end_stream)
        state = machine.state
        entry = HEADERS_SENT.get(state)
        if entry is None or machine.trailers_sent or not (machine.headers_sent or machine.client is False
                                                          or state is _IDLE):
            step(machine, StreamInputs.SEND_HEADERS)  # (h2's error, or its transition elsewhere)
        else:
            transition, machine.state = entry
            transition(machine, state)
        block = self.encoder.encode(headers)
        if end_stream:
            state = machine.state
            entry = END_SENT.get(state)
            if entry is None:
                step(machine, StreamInputs.SEND_END_STREAM)  # (h2's error)
            else:
                transition, machine.state = entry
                if transition is not None:
                    transition(machine, state)
        if machine.trailers_sent and not end_stream:
            raise ProtocolError("Trailers must have END_STREAM set.")
        if machine.client and stream._authority is None:
            stream._authority = authority
        stream.request_method = method
        out = self._data_to_send
        limit = stream.max_outbound_frame_size
        first = _END_STREAM if end_stream else 0
        if len(block) <= limit:
            size = len(block)
            out += _HEADER.pack(size >> 8, size & 0xFF, _HEADERS, first | _END_HEADERS, stream_id)
            out += block
            return
        pieces = [block[i:i + limit] for i in range(0, len(block), limit)]
        for index, piece in enumerate(pieces):
            kind = _HEADERS if index == 0 else 0x9  # CONTINUATION
            flags = (first if index == 0 else 0) | (_END_HEADERS if index == len(pieces) - 1 else 0)
            out += _HEADER.pack(len(piece) >> 8, len(piece) & 0xFF, kind, flags, stream_id)
            out += piece
