"""h2's H2Connection adapted to a server facing untrusted peers.

h2 is a correct state machine but trusts its peer's pace: it walks its whole
stream table per new stream, ends the connection for one stream too many,
buffers a header block of up to 64 frames before looking at its size, keeps
the fate of 65536 closed streams, and ends the connection on any GOAWAY.
`BoundedH2Connection` changes those, caches HPACK blocks and skips a costly
trace log; the rest of the protocol is h2's.
"""

from collections import OrderedDict

from h2.connection import ConnectionInputs, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, StreamClosedError, StreamIDTooLowError
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamClosedBy, StreamState
from h2.utilities import SizeLimitDict
from hyperframe.frame import ContinuationFrame, RstStreamFrame

from etcdproxy.grpc.hpackcache import CachingDecoder, CachingEncoder

_ORDERED_SET = OrderedDict.__setitem__


def _receive_frame_as_expected():
    """Whether h2's private ``_receive_frame`` is the one `BoundedH2Connection` copies
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
_CLOSED = StreamState.CLOSED  # (an enum's member read from its class costs a Python call)


class _HeaderBlockBuffer(FrameBuffer):
    """h2's frame buffer, refusing a header block (HEADERS + CONTINUATION
    frames) once it outgrows what a header list of the allowed size needs.

    HPACK never makes a block much larger than its decoded list, so a block
    over twice the list limit, or in many pieces, is a CONTINUATION flood:
    ended with ENHANCE_YOUR_CALM before it is buffered, not after 64 frames.
    """

    MAX_FRAMES = 16

    def __init__(self, server, max_header_list_size):
        super().__init__(server=server)
        self.max_block = 2 * max_header_list_size + 1024
        self._block_frames = 0
        self._block_bytes = 0

    def _update_header_buffer(self, f):
        if not self._headers_buffer:
            self._block_frames = 0
            self._block_bytes = 0
        self._block_frames += 1
        self._block_bytes += len(getattr(f, "data", b"") or b"")
        if self._headers_buffer and isinstance(f, ContinuationFrame) and (
                self._block_frames > self.MAX_FRAMES or self._block_bytes > self.max_block):
            raise DenialOfServiceError("header block too large")
        return super()._update_header_buffer(f)


class StreamRefused:
    """A stream the peer opened past MAX_CONCURRENT_STREAMS, reset at once."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id):
        self.stream_id = stream_id


class BoundedH2Connection(H2Connection):
    """h2's H2Connection, with stream counting in amortized O(1), kept open
    after a GOAWAY for the streams the peer still finishes, and refusing a
    stream over the concurrency limit with REFUSED_STREAM.

    h2 counts open streams by walking its whole stream table each time a stream
    is opened (and forgets closed streams on the way), so opening N streams costs
    O(N^2): 10,000 watch streams took 30 s. Here the walk runs only when the
    table has doubled since the last one; in between, the count is the last
    walk's plus the streams opened since (from the stream ids, which only grow).
    That is an upper bound, so a concurrency limit is never exceeded; near the
    limit the exact walk decides.
    """

    # h2 remembers how its last 65536 closed streams ended (7.5 MiB), to tell
    # a late frame on one of them from a protocol error; a long-lived
    # connection grows to that. Late frames come within a round trip.
    MAX_CLOSED_STREAMS = 4096

    def __init__(self, config, max_header_list_size):
        super().__init__(config=config)
        buffer = _HeaderBlockBuffer(not config.client_side, max_header_list_size)
        buffer.max_frame_size = self.incoming_buffer.max_frame_size
        self.incoming_buffer = buffer
        # Nothing has been encoded or decoded yet: swap in the caching coders.
        decoder = CachingDecoder()
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        # h2 gives its decoder a changed limit only when the peer acknowledges
        # the SETTINGS announcing it; the limit holds from the first frame.
        decoder.max_header_list_size = max_header_list_size
        self.decoder = decoder
        self.encoder = CachingEncoder()
        self._walked = {}  # parity -> (open count, highest stream id) at the last walk
        self._outbound_remainder = 1 if config.client_side else 0  # (stream id % 2 of ours)
        self._walk_at = 64

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

    def _receive_headers_frame(self, frame):
        # h2 ends the whole connection (PROTOCOL_ERROR) when a peer opens one
        # stream too many; HTTP/2 asks only that stream be refused (RFC 9113
        # 5.1.2), which clients retry. Its header block is still decoded, or
        # the HPACK tables of both sides would differ from then on.
        sid = frame.stream_id
        if (sid not in self.streams and sid > self.highest_inbound_stream_id
                and not self._stream_id_is_outbound(sid)
                and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams):
            return self._refuse_stream(frame)
        return super()._receive_headers_frame(frame)

    def _refuse_stream(self, frame):
        _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        self.highest_inbound_stream_id = frame.stream_id
        # Later frames of the stream get h2's answer to a stream it reset.
        self._closed_streams[frame.stream_id] = StreamClosedBy.SEND_RST_STREAM
        reset = RstStreamFrame(frame.stream_id)
        reset.error_code = ErrorCodes.REFUSED_STREAM
        return [reset], events + [StreamRefused(frame.stream_id)]

    def release(self):
        """Ends h2's own reference cycle (its frame dispatch table holds bound
        methods of the connection) once the connection is gone and takes no
        more frames, so that its state is freed as soon as it is dropped."""
        self._frame_dispatch_table = {}

    def forget_closed_stream(self, stream_id):
        """Moves a closed stream out of the stream table into h2's record of
        how streams ended, as h2 does for every closed stream it meets when it
        counts open streams: here one stream when it is done, not the table's
        pile of closed ones at the next walk."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            machine = stream.state_machine  # (h2's ``closed`` and ``closed_by`` read it)
            if machine.state is _CLOSED:
                del self.streams[stream_id]
                closed = self._closed_streams
                if type(closed) is SizeLimitDict:
                    # h2's SizeLimitDict.__setitem__, without its two Python calls
                    _ORDERED_SET(closed, stream_id, machine.stream_closed_by)
                    if len(closed) > self.MAX_CLOSED_STREAMS:
                        closed._check_size_limit()
                else:
                    closed[stream_id] = machine.stream_closed_by

    def _open_streams(self, remainder, limit=None):
        # ``limit``: the side's max_concurrent_streams, when the caller has it
        outbound = remainder == self._outbound_remainder
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        highest = highest or 0
        if len(self.streams) < self._walk_at and remainder in self._walked:
            count, highest_then = self._walked[remainder]
            # ids of this parity in (highest_then, highest]
            bound = count + (highest - remainder) // 2 - (highest_then - remainder) // 2
            if limit is None:
                limit = (self.remote_settings if outbound else self.local_settings).max_concurrent_streams
            if bound + 1 <= limit:
                return bound
        count = super()._open_streams(remainder)
        self._walked[remainder] = (count, highest)
        self._walk_at = max(64, 2 * len(self.streams))
        return count


