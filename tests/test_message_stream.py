"""etcdproxy.grpc.stream's outbound queue, in memory over real h2 state: every
message reaches the peer whole and in order through any windows, large ones
framed from the payload object itself, and a queue dropped mid-message still
ends the message begun."""

import unittest

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings, strategies as st

from etcdproxy.grpc import stream as stream_module
from etcdproxy.grpc.connection import Limits, new_h2_connection
from etcdproxy.grpc.framing import MessageDecoder, encode_message
from etcdproxy.grpc.stream import MessageStream

REQUEST_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"),
                   (b":authority", b"x"), (b"content-type", b"application/grpc")]
BIG = stream_module.SEPARATE_PAYLOAD


class Protocol:
    """What a MessageStream asks of its protocol."""

    def __init__(self, conn):
        self.conn = conn
        self.blocked = 0

    def schedule_flush(self, stream):
        pass

    def stream_blocked(self, stream):
        self.blocked += 1


class Exchange:
    """A server-side stream of the proxy's h2 connection, and a plain h2 peer
    whose stream window starts at ``window`` and is opened only when asked."""

    def __init__(self, window):
        self.server = new_h2_connection(False, Limits())
        self.peer = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.peer.initiate_connection()
        self.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.peer.send_headers(1, REQUEST_HEADERS)
        self.pump()
        self.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.stream = MessageStream(Protocol(self.server), 1, Limits())
        self.received = bytearray()
        self.unacked = 0

    def pump(self):
        for _ in range(10):
            to_server, to_peer = self.peer.data_to_send(), self.server.data_to_send()
            if not to_server and not to_peer:
                return
            if to_server:
                self.server.receive_data(to_server)
            for event in self.peer.receive_data(to_peer):
                if isinstance(event, DataReceived):
                    self.received += event.data
                    self.unacked += event.flow_controlled_length

    def flush(self):
        self.stream.flush(self.server)
        self.pump()

    def drain(self, rounds=5000):
        """Flushes, the peer reading and opening its windows, until all is sent."""
        for _ in range(rounds):
            self.flush()
            if not self.stream.queued_bytes:
                return
            self.open_window()

    def open_window(self):
        """The peer gives back the window it used (stream and connection)."""
        if self.unacked:
            self.peer.increment_flow_control_window(self.unacked, 1)
            self.peer.increment_flow_control_window(self.unacked)
            self.unacked = 0
        self.pump()


def decoded(data):
    """The messages in ``data``, which must end at the end of one."""
    decoder = MessageDecoder(2**31)
    messages = decoder.feed(bytes(data))
    if decoder.has_partial_message:
        raise AssertionError("a message cut short")
    return messages


class PiecesTests(unittest.TestCase):
    def test_split_cuts_a_piece_into_views(self):
        payload = b"0123456789"
        head, rest = stream_module._split([b"ab", payload, b"cd"], 5)
        self.assertEqual([bytes(p) for p in head], [b"ab", b"012"])
        self.assertEqual([bytes(p) for p in rest], [b"3456789", b"cd"])
        self.assertIs(head[1].obj, payload)
        self.assertEqual(stream_module._split([b"ab", b"cd"], 2), ([b"ab"], [b"cd"]))
        self.assertEqual(stream_module._split([b"ab", b"cd"], 0), ([], [b"ab", b"cd"]))
        self.assertEqual(stream_module._split([b"ab", b"cd"], 4), ([b"ab", b"cd"], []))

    def test_frames_are_views_of_a_large_piece_and_joins_across_pieces(self):
        payload = bytes(range(256)) * 100
        pieces = [b"\x00\x00\x00\x64\x00", payload]
        frames = stream_module._frames(pieces, 1000)
        self.assertEqual(b"".join(bytes(f) for f in frames), b"".join(pieces))
        self.assertTrue(all(len(f) <= 1000 for f in frames))
        self.assertEqual(len(frames), -(-len(b"".join(pieces)) // 1000))
        # the first frame joins the prefix and the payload's start; the others are views
        self.assertIs(type(frames[0]), bytes)
        self.assertTrue(all(type(f) is memoryview and f.obj is payload for f in frames[1:]))

    def test_tail_after_reads_prefixes_wherever_they_lie(self):
        messages = [b"a" * 10, b"b" * 3, b"c" * 40]
        data = b"".join(encode_message(m) for m in messages)
        # as one piece, as pieces cut anywhere (inside a prefix too)
        for pieces in ([data], [data[:7], data[7:16], data[16:]], [data[:1], data[1:3], data[3:]]):
            self.assertEqual(stream_module._tail_after(pieces, 0, 3), 12)  # inside the first
            self.assertEqual(stream_module._tail_after(pieces, 0, 15), 0)  # at its end
            self.assertEqual(stream_module._tail_after(pieces, 0, 16), 7)  # inside the second
            self.assertEqual(stream_module._tail_after(pieces, 0, 30), 38)
        self.assertEqual(stream_module._tail_after([b"zz", data], 2, 1), 1)  # inside the head's tail


class OutboundTests(unittest.TestCase):
    def test_a_large_message_goes_out_whole_without_a_prefixed_copy(self):
        exchange = Exchange(window=2**31 - 1)
        payload = bytes(range(256)) * (4 * BIG // 256)
        exchange.stream.queue_message(payload)
        self.assertIs(exchange.stream._out[1], payload)  # the object itself, behind its prefix
        exchange.drain()
        self.assertEqual(decoded(exchange.received), [payload])

    def test_messages_cross_small_windows_whole_and_in_order(self):
        exchange = Exchange(window=1000)
        messages = [b"s" * 10, b"L" * (BIG + 123), b"m" * 3000, bytes(range(256)) * (BIG // 128), b""]
        for message in messages:
            exchange.stream.queue_message(message)
        exchange.drain()
        self.assertEqual(exchange.stream.queued_bytes, 0)
        self.assertGreater(exchange.stream.protocol.blocked, 0)
        self.assertEqual(decoded(exchange.received), messages)

    def test_views_of_any_shape_are_sent_as_their_bytes(self):
        exchange = Exchange(window=2**31 - 1)
        data = bytes(range(256)) * (BIG // 64)
        views = [memoryview(data).cast("I"), memoryview(data)[::2], memoryview(data)[:100].cast("H")]
        for view in views:
            exchange.stream.queue_message(view)
        exchange.drain()
        self.assertEqual(decoded(exchange.received), [view.tobytes() for view in views])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from([0, 1, 100, 16379, 16384, BIG - 1, BIG, BIG + 7, 3 * BIG]), min_size=1, max_size=6),
           st.sampled_from([1000, 5000, 16384, 70000, 2**31 - 1]),
           st.integers(min_value=0, max_value=8),
           st.booleans())
    def test_any_messages_any_windows_and_a_drop_mid_way(self, sizes, window, drop_after, drop):
        exchange = Exchange(window=window)
        messages = [bytes([i + 65]) * size for i, size in enumerate(sizes)]
        for message in messages:
            exchange.stream.queue_message(message)
        for round_ in range(5000):
            if drop and round_ == drop_after:
                exchange.stream.discard_unsent()
            exchange.flush()
            if not exchange.stream.queued_bytes:
                break
            exchange.open_window()
        self.assertEqual(exchange.stream.queued_bytes, 0)
        got = decoded(exchange.received)  # raises on a message cut short
        if drop:
            self.assertEqual(got, messages[:len(got)])  # the ones begun, whole
        else:
            self.assertEqual(got, messages)


if __name__ == "__main__":
    unittest.main()
