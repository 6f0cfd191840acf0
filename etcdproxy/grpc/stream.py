"""One call's gRPC messages on an HTTP/2 stream, both ways, with flow control.

- inbound, the stream's window is replenished only when its data has been handed
  on, and not while the stream is paused, so a slow consumer makes the peer stop
  sending (the connection-level window is `H2Protocol`'s); the peer's END_STREAM
  waits behind the data held meanwhile, so every message is handed on before
  the end (a status, a half-close) is;
- outbound, messages wait in the stream's queue for the peer's window; past a high
  watermark the queue pauses its registered producer (the other side of the proxy)
  and resumes it once drained, as in Twisted's producer/consumer model. A large
  message is queued as its 5-byte prefix and the payload object itself, and its
  DATA frames are views of that object: it is copied once, on its way out of h2
  (`etcdproxy.grpc.h2fast`), not also into a prefixed copy here.
"""

from h2.exceptions import ProtocolError, StreamClosedError
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from etcdproxy.grpc.framing import PREFIX_SIZE, MessageDecoder, encode_message, message_prefix, whole_message
from etcdproxy.grpc.status import GRPCError

# Payloads from this size on are queued as they are, behind a prefix of their own.
SEPARATE_PAYLOAD = 64 * 1024


@implementer(IPushProducer)
class MessageStream:
    """One HTTP/2 stream's gRPC messages, with flow control both ways.

    Subclasses implement ``_deliver(message)``, ``_receive_failed(GRPCError)``
    and ``end_received()``, the peer's end of the stream once every message
    before it was delivered.
    """

    # (a call's objects are made and dropped by the thousand a second: slots
    # make them quicker to make and to read)
    __slots__ = ("protocol", "stream_id", "limits", "_encoding", "_decoder", "_out", "_out_size", "_out_large", "_head_tail",
                 "_end", "_end_stream", "_producer", "_producer_paused", "_receiving_paused", "_held",
                 "_end_held", "_resuming", "_sending_stopped", "_unacked", "closed", "blocked_since",
                 "__weakref__")

    def __init__(self, protocol, stream_id, limits, encoding=None):
        self.protocol = protocol  # None until a client call is attached to a connection
        self.stream_id = stream_id
        self.limits = limits
        self._encoding = encoding
        self._decoder = None  # made once a message comes in pieces (or compressed)
        self._out = []  # pieces of the queued messages (whole ones, or a prefix and a large payload)
        self._out_size = 0
        self._out_large = False  # _out holds a large payload as it is
        self._head_tail = 0  # unsent bytes of a message partly sent, at the head of _out
        self._end = None  # callable that sends what ends our side, after the queue
        self._end_stream = False  # END_STREAM on the last queued DATA frame
        self._producer = None
        self._producer_paused = False
        self._receiving_paused = False
        self._held = []
        self._end_held = False  # the peer's END_STREAM, behind the held data
        self._resuming = False  # resume_receiving is delivering held data
        self._sending_stopped = False  # the peer takes nothing more (stop_sending)
        self._unacked = 0
        self.closed = False
        self.blocked_since = None  # when the peer's windows last stopped its data

    # -- outbound ---------------------------------------------------------------

    def registerProducer(self, producer, streaming=True):
        self._producer = producer
        self._producer_paused = False

    def unregisterProducer(self):
        self._producer = None

    def queue_message(self, payload):
        if self.closed or self._sending_stopped:
            return
        if type(payload) is memoryview and (payload.format != "B" or not payload.c_contiguous):
            payload = payload.tobytes()  # (its len() is not its size in bytes)
        if len(payload) < SEPARATE_PAYLOAD:
            self._out.append(encode_message(payload))
        else:
            if type(payload) is not bytes and not (type(payload) is memoryview and payload.readonly):
                # kept as it is only when it does not change: bytes, or a read-only
                # view (what a decoder hands on, see framing.MessageDecoder.feed)
                payload = bytes(payload)
            self._out += (message_prefix(len(payload)), payload)
            self._out_large = True
        self._out_size += PREFIX_SIZE + len(payload)
        if (
            self._producer is not None
            and not self._producer_paused
            and self._out_size > self.limits.stream_high_watermark
        ):
            self._producer_paused = True
            self._producer.pauseProducing()
        if self.protocol is not None:
            self.protocol.schedule_flush(self)

    def queue_end(self, send_end):
        """Runs ``send_end()`` (trailers, END_STREAM) once queued data is sent."""
        self._end = send_end
        if self.protocol is not None:
            self.protocol.schedule_flush(self)

    def queue_end_stream(self):
        """Ends our side with the last queued DATA frame (no frame of its own)."""
        self._end_stream = True
        if self.protocol is not None:
            self.protocol.schedule_flush(self)

    def flush(self, conn):
        """Sends what the peer's windows allow; called by the protocol."""
        if self.closed or self.stream_id is None or self._sending_stopped:
            return
        last = False
        if self._out:
            window = conn.local_flow_control_window(self.stream_id)
            if window <= 0:
                self.protocol.stream_blocked(self)
                return
            frame_size = conn.max_outbound_frame_size
            out, total = self._out, self._out_size
            n = min(window, total)
            self.blocked_since = None
            last = n == total and self._end_stream
            if self._out_large:
                # Frames cut from the pieces: views of a large payload, small
                # pieces joined (a frame's worth at most).
                sent, rest = _split(out, n)
                frames = _frames(sent, frame_size)
            else:
                data = out[0] if len(out) == 1 else b"".join(out)
                if n > frame_size:
                    # A long queue goes out in views of it, and what the window
                    # holds back stays a view (copied once, into h2's buffer).
                    data = memoryview(data)
                if n <= frame_size:
                    frames = (data if n == len(data) else data[:n],)
                else:
                    frames = [data[start:min(n, start + frame_size)] for start in range(0, n, frame_size)]
                rest = [data[n:]] if n < total else []
            for frame in frames[:-1]:
                conn.send_data(self.stream_id, frame)
            conn.send_data(self.stream_id, frames[-1], end_stream=last)
            if rest:
                self.protocol.stream_blocked(self)
                self._head_tail = _tail_after(out, self._head_tail, n)
            else:
                self._head_tail = 0
                self._out_large = False
            self._out = rest
            self._out_size = total - n
            if (
                self._producer_paused
                and self._out_size <= self.limits.stream_high_watermark // 2
            ):
                self._producer_paused = False
                self._producer.resumeProducing()
        if self._out:
            return
        if self._end_stream:
            self._end_stream = False
            if not last:
                conn.end_stream(self.stream_id)
            self.end_sent()
        elif self._end is not None:
            send_end, self._end = self._end, None
            send_end()

    def end_sent(self):
        """Our side of the stream is closed (hook for subclasses)."""

    def stop_sending(self):
        """The peer takes nothing more on this stream (it reset it after
        ending its side): what is queued is dropped, what is held still goes
        to the consumer."""
        self._sending_stopped = True
        self._out = []
        self._out_size = 0
        self._out_large = False
        self._end = None
        self._end_stream = False

    def send_failed(self):
        """h2 refused to send on the stream (it is closed there)."""
        self.close()

    @property
    def queued_bytes(self):
        return self._out_size

    def discard_unsent(self):
        """Drops the queued messages not yet begun; the rest of one partly
        sent still goes, so that the peer can read what comes after it."""
        if self._out:
            self._out = _split(self._out, self._head_tail)[0]
            self._out_size = self._head_tail

    # -- inbound ----------------------------------------------------------------

    def pause_receiving(self):
        self._receiving_paused = True

    def resume_receiving(self):
        if not self._receiving_paused:
            return
        self._receiving_paused = False
        if self._resuming:
            return  # resumed from a delivery below: its loop goes on
        self._resuming = True
        try:
            while self._held and not self._receiving_paused and not self.closed:
                data, flow_length = self._held.pop(0)
                self._consume(data, flow_length)
        finally:
            self._resuming = False
        if self._end_held and not self._held and not self.closed:
            self._end_held = False
            self.end_received()
        if self.protocol is not None:
            self.protocol.schedule_flush(None)

    # IPushProducer, so that the other side of a proxied call can pause us.
    pauseProducing = pause_receiving
    resumeProducing = resume_receiving

    def stopProducing(self):
        pass

    def data_received(self, data, flow_length):
        if self.closed:
            return
        if self._receiving_paused:
            self._held.append((data, flow_length))
        else:
            self._consume(data, flow_length)

    def remote_ended(self):
        """The peer ended its side (END_STREAM): ``end_received`` runs once
        the data held before it has been delivered."""
        if self._held:
            self._end_held = True
        else:
            self.end_received()

    @property
    def fully_received(self):
        """The peer has ended its side; only held data remains to deliver."""
        return self._end_held

    @property
    def partial_message_received(self):
        """The peer sent the start of a message and not yet its end."""
        return self._decoder is not None and self._decoder.has_partial_message

    def _consume(self, data, flow_length):
        decoder = self._decoder
        body = whole_message(data, self.limits.max_receive_message) if decoder is None else None
        if body is not None:
            messages = (body,)
        else:
            if decoder is None:
                decoder = self._decoder = MessageDecoder(self.limits.max_receive_message, self._encoding)
            try:
                messages = decoder.feed(data)
            except GRPCError as e:
                self._receive_failed(e)
                return
        # The window back to the peer once a quarter of it is handed on.
        self._unacked += flow_length
        if self._unacked >= self.limits.stream_window // 4:
            increment, self._unacked = self._unacked, 0
            try:
                self.protocol.conn.increment_flow_control_window(increment, self.stream_id)
            except (StreamClosedError, ProtocolError):
                pass
        for message in messages:
            if self.closed:
                return
            self._deliver(message)

    def close(self):
        self.closed = True
        if self._decoder is not None:
            self._decoder.release()
        self._out = []
        self._out_size = 0
        self._out_large = False
        self._held = []
        self._end_held = False
        self._end = None
        self._producer = None


def _split(pieces, n):
    """The first ``n`` bytes of ``pieces`` and the rest, as two lists of
    pieces (a piece cut in two becomes two views of it)."""
    head = []
    for index, piece in enumerate(pieces):
        size = len(piece)
        if n >= size:
            head.append(piece)
            n -= size
            if n == 0:
                return head, pieces[index + 1:]
            continue
        if n == 0:
            return head, pieces[index:]
        view = memoryview(piece)
        head.append(view[:n])
        return head, [view[n:], *pieces[index + 1:]]
    return head, []


def _frames(pieces, frame_size):
    """The bytes of ``pieces`` as DATA payloads of at most ``frame_size``:
    views of the pieces where a frame lies within one, joined parts where
    it spans several."""
    frames, parts, room = [], [], frame_size
    for piece in pieces:
        view, start, size = None, 0, len(piece)
        while start < size:
            take = min(room, size - start)
            if take == size:
                parts.append(piece)
            else:
                if view is None:
                    view = memoryview(piece)
                parts.append(view[start:start + take])
            start += take
            room -= take
            if not room:
                frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
                parts, room = [], frame_size
    if parts:
        frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
    return frames


def _tail_after(pieces, head_tail, sent):
    """How many bytes of the message cut at ``sent`` remain in ``pieces`` (gRPC
    messages, the first ``head_tail`` bytes being the end of an earlier one)."""
    position = head_tail  # where the next message begins
    index, start = 0, 0  # the piece holding ``position``, and where it begins
    while position < sent:
        while start + len(pieces[index]) <= position:
            start += len(pieces[index])
            index += 1
        offset = position - start
        prefix = bytes(pieces[index][offset:offset + PREFIX_SIZE])
        following = index + 1
        while len(prefix) < PREFIX_SIZE:  # a prefix across pieces
            prefix += bytes(pieces[following][:PREFIX_SIZE - len(prefix)])
            following += 1
        position += PREFIX_SIZE + int.from_bytes(prefix[1:5], "big")
    return position - sent
