"""One call's gRPC messages on an HTTP/2 stream, both ways, with flow control.

- inbound, the stream's window is replenished only when its data has been handed
  on, and not while the stream is paused, so a slow consumer makes the peer stop
  sending (the connection-level window is `H2Protocol`'s); the peer's END_STREAM
  waits behind the data held meanwhile, so every message is handed on before
  the end (a status, a half-close) is;
- outbound, messages wait in the stream's queue for the peer's window; past a high
  watermark the queue pauses its registered producer (the other side of the proxy)
  and resumes it once drained, as in Twisted's producer/consumer model.
"""

from h2.exceptions import ProtocolError, StreamClosedError
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from etcdproxy.grpc.framing import MessageDecoder, encode_message
from etcdproxy.grpc.status import GRPCError


@implementer(IPushProducer)
class MessageStream:
    """One HTTP/2 stream's gRPC messages, with flow control both ways.

    Subclasses implement ``_deliver(message)``, ``_receive_failed(GRPCError)``
    and ``end_received()``, the peer's end of the stream once every message
    before it was delivered.
    """

    def __init__(self, protocol, stream_id, limits, encoding=None):
        self.protocol = protocol  # None until a client call is attached to a connection
        self.stream_id = stream_id
        self.limits = limits
        self.decoder = MessageDecoder(limits.max_receive_message, encoding)
        self._out = []
        self._out_size = 0
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
        frame = encode_message(payload)
        self._out.append(frame)
        self._out_size += len(frame)
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
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            n = min(window, len(data))
            if n > frame_size:
                # A large message goes out in views of it, not copies, and what
                # the window holds back stays a view (copied once, into h2's buffer).
                data = memoryview(data)
            self.blocked_since = None
            last = n == len(data) and self._end_stream
            for start in range(0, n, frame_size):
                end = min(n, start + frame_size)
                conn.send_data(self.stream_id, data[start:end], end_stream=last and end == n)
            rest = data[n:]
            if rest:
                self.protocol.stream_blocked(self)
                self._head_tail = _tail_after(data, self._head_tail, n)
            else:
                self._head_tail = 0
            self._out = [rest] if rest else []
            self._out_size = len(rest)
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
            data = b"".join(self._out)
            self._out = [data[:self._head_tail]] if self._head_tail else []
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

    def _consume(self, data, flow_length):
        try:
            messages = self.decoder.feed(data)
        except GRPCError as e:
            self._receive_failed(e)
            return
        self._acknowledge(flow_length)
        for message in messages:
            if self.closed:
                return
            self._deliver(message)

    def _acknowledge(self, flow_length):
        self._unacked += flow_length
        if self._unacked >= self.limits.stream_window // 4:
            increment, self._unacked = self._unacked, 0
            try:
                self.protocol.conn.increment_flow_control_window(increment, self.stream_id)
            except (StreamClosedError, ProtocolError):
                pass

    def close(self):
        self.closed = True
        self.decoder.release()
        self._out = []
        self._out_size = 0
        self._held = []
        self._end_held = False
        self._end = None
        self._producer = None


def _tail_after(data, head_tail, sent):
    """How many bytes of the message cut at ``sent`` remain in ``data`` (gRPC
    frames, the first ``head_tail`` bytes being the end of an earlier one)."""
    position = head_tail
    while position < sent:
        position += 5 + int.from_bytes(data[position + 1:position + 5], "big")
    return position - sent
